"""Who may change an instance's forwards: root, and whom polkit authorizes.

Design (as systemd's and NetworkManager's D-Bus services do it): the bus policy lets
every caller send AddForward and RemoveForward, and the instance asks polkit, per call,
whether the caller may perform ACTION_MANAGE_FORWARDS (polkit/org.passtd.Passtd1.policy:
admins after authentication by default; a rules file can name a group, see
polkit/50-passtd.rules.example). Root is always allowed without asking. A caller that
set ALLOW_INTERACTIVE_AUTHORIZATION on its call (passtctl does, `busctl
--allow-interactive-authorization=yes` too) may be asked for a password by its agent
(pkttyagent, a desktop's). Where polkit is not on the bus, root alone may change
forwards, as before there was polkit, and the log says so once. On a session bus (`passtd
run --bus session`: the user's own instance) the instance's own user may too.

`ForwardGuard` is a message handler ahead of dbus-fast's dispatch (it needs the caller's
unique name, and answers after polkit has): an authorized call runs the interface's own
method, a refused one gets the standard errors systemd's services answer with:
org.freedesktop.DBus.Error.InteractiveAuthorizationRequired when polkit would accept an
authentication the call did not allow, org.freedesktop.DBus.Error.AccessDenied otherwise,
with the reason.

Not done here: reading (flows, forwards, statistics and signals are for everyone, the
bus policy says so), the checks of the arguments (the interface's methods).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from dbus_fast import DBusError, Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.signature import Variant

log = logging.getLogger("passtd.dbus")

ACTION_MANAGE_FORWARDS = "org.passtd.Passtd1.manage-forwards"
POLKIT = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
CHECK_ALLOW_USER_INTERACTION = 1
DBUS = "org.freedesktop.DBus"
NO_POLKIT_ERRORS = {f"{DBUS}.Error.ServiceUnknown", f"{DBUS}.Error.NameHasNoOwner",
                    f"{DBUS}.Error.UnknownMethod", f"{DBUS}.Error.Spawn.ServiceNotFound"}
GUARDED = ("AddForward", "RemoveForward")
SIGNATURES = {"AddForward": "ssqq", "RemoveForward": "u"}
ACCESS_DENIED = f"{DBUS}.Error.AccessDenied"
INTERACTIVE_REQUIRED = f"{DBUS}.Error.InteractiveAuthorizationRequired"
INTERACTIVE_TIMEOUT = 300.0  # seconds an agent may take to authenticate someone
CHECK_TIMEOUT = 25.0  # without interaction


class Authorizer:
    """Asks whether the sender of a call may change forwards (see the module docstring)."""

    def __init__(self, bus: MessageBus, instance: str, owner_uid: int | None) -> None:
        self.bus = bus
        self.instance = instance
        self.owner_uid = owner_uid  # a session bus's user, who may too (None: nobody)
        self._said_no_polkit = False

    async def _call(self, msg: Message, timeout: float) -> Message:
        return await asyncio.wait_for(self.bus.call(msg), timeout)

    async def refusal(self, sender: str, interactive: bool) -> tuple[str, str] | None:
        """None if `sender` may change forwards, else the D-Bus error name and why not."""
        reply = await self._call(Message(destination=DBUS, path="/org/freedesktop/DBus",
                                         interface=DBUS, member="GetConnectionUnixUser",
                                         signature="s", body=[sender]), CHECK_TIMEOUT)
        if reply.message_type == MessageType.ERROR:
            return ACCESS_DENIED, f"cannot tell who the caller is ({reply.error_name})"
        uid = int(reply.body[0])
        if uid == 0 or uid == self.owner_uid:
            return None
        subject = ["system-bus-name", {"name": Variant("s", sender)}]
        flags = CHECK_ALLOW_USER_INTERACTION if interactive else 0
        check = Message(destination=POLKIT, path=POLKIT_PATH, interface=POLKIT_INTERFACE,
                        member="CheckAuthorization", signature="(sa{sv})sa{ss}us",
                        body=[subject, ACTION_MANAGE_FORWARDS, {"instance": self.instance},
                              flags, ""])
        try:
            answer = await self._call(check, INTERACTIVE_TIMEOUT if interactive
                                      else CHECK_TIMEOUT)
        except TimeoutError:
            return ACCESS_DENIED, "polkit did not answer in time"
        if answer.message_type == MessageType.ERROR:
            if answer.error_name in NO_POLKIT_ERRORS:
                if not self._said_no_polkit:
                    log.warning("polkit is not available on the bus: only root may change "
                                "forwards")
                    self._said_no_polkit = True
                return ACCESS_DENIED, f"only root may change forwards (uid {uid} is not; " \
                                      "polkit is not available to authorize others)"
            return ACCESS_DENIED, f"polkit refused to answer ({answer.error_name}: " \
                                  f"{answer.body[0] if answer.body else ''})"
        authorized, challenge, _details = answer.body[0]
        if authorized:
            return None
        if challenge:
            return INTERACTIVE_REQUIRED, f"uid {uid} must authenticate for " \
                f"{ACTION_MANAGE_FORWARDS} (with an authentication agent, e.g. pkttyagent)"
        return ACCESS_DENIED, f"uid {uid} is not authorized for {ACTION_MANAGE_FORWARDS} " \
                              "(polkit)"


class ForwardGuard:
    """Answers AddForward and RemoveForward once the caller is authorized."""

    def __init__(self, bus: MessageBus, path: str, interface: str,
                 methods: dict[str, Callable[..., Any]], authorizer: Authorizer,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.bus = bus
        self.path = path
        self.interface = interface
        self.methods = methods  # member -> the interface's method
        self.authorizer = authorizer
        self.loop = loop
        self._tasks: set[asyncio.Task[None]] = set()

    def handle(self, msg: Message) -> bool:
        """dbus-fast's message handler: True when the call is ours to answer."""
        if (msg.message_type != MessageType.METHOD_CALL or msg.path != self.path
                or msg.interface != self.interface or msg.member not in GUARDED
                or msg.signature != SIGNATURES[msg.member]):
            return False  # (a wrong signature: dbus-fast answers it as usual)
        task = self.loop.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _answer(self, msg: Message) -> None:
        interactive = bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        try:
            refused = await self.authorizer.refusal(msg.sender or "", interactive)
            if refused is not None:
                log.info("refused %s from %s: %s", msg.member, msg.sender, refused[1])
                reply = Message.new_error(msg, *refused)
            else:
                result = self.methods[msg.member or ""](*msg.body)
                reply = Message.new_method_return(msg, "u", [result]) \
                    if msg.member == "AddForward" else Message.new_method_return(msg)
        except DBusError as e:
            reply = Message.new_error(msg, e.type, e.text)
        except Exception as e:
            log.exception("D-Bus %s failed", msg.member)
            reply = Message.new_error(msg, "org.freedesktop.DBus.Error.Failed",
                                      f"internal error in passtd ({type(e).__name__})")
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED and self.bus.connected:
            self.bus.send(reply)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
