"""org.passtd.Passtd1.Instance: one instance's control API on the system (or session) bus.

Design: every instance is its own process, so every instance owns its own bus name,
`org.passtd.Passtd1.<escaped NAME>` (see `bus_name`), and exports one object,
`/org/passtd/Passtd1`, with one interface:

  AddForward(s protocol, s address, q host_port, q guest_port) -> u id
  RemoveForward(u id)
  ListForwards() -> aa{sv}
  ListFlows() -> aa{sv}             (at most 512 flows, else Error.TooManyFlows)
  ListFlowsPage(u after_id, u count) -> (aa{sv} flows, u next_id)   (dbus_listing.py)
  GetStatistics() -> a{sv}          (counters since the process started, STATISTICS)
  properties (read-only, PropertiesChanged): Name s, GuestConnected b, GuestMac s,
  GuestAddresses as, Mtu u, FlowCount u, Hostname s, StartedAt t (µs since the epoch)
  signals: ForwardAdded(a{sv} forward), ForwardRemoved(a{sv} forward),
  FlowOpened(aa{sv} flows, u omitted), FlowClosed(aa{sv} flows, u omitted)

Access control: everyone may read (the bus policy, dbus/org.passtd.Passtd1.conf; flow
listings are rate limited per user); AddForward and RemoveForward reach us from anyone,
and root or whom polkit authorizes may change forwards (dbus_auth.py). Errors are
`org.passtd.Passtd1.Error.{InvalidArgument,AddressInUse,NotFound,AccessDenied,
TooManyFlows,LimitExceeded}` with a message for the admin; an unexpected exception in a
handler is logged with its traceback here and answered with the standard
`org.freedesktop.DBus.Error.Failed`; nothing a handler raises reaches the event loop or
ends the connection. Calls with the wrong signature never get here: dbus-fast answers
them with UnknownMethod.

PropertiesChanged is rate limited per property (`ChangeThrottle`): FlowCount changes at
every flow open and close, which must not turn into a signal storm on the system bus.
The first change of a quiet property is sent at once; later ones within the second are
folded into one signal at the end of it, carrying the value current *then*, so the last
signal always tells the final value.

Flow signals are batched the same way (`FlowBatch`), since a busy guest opens and closes
thousands of flows a second: the first opening (closing) after a quiet second is
signalled at once, later ones within the second are gathered into one FlowOpened
(FlowClosed) at its end. A signal describes at most FLOW_SIGNAL_MAX flows, as ListFlows
does (a closed flow with its final counters); `omitted` counts the others. So a guest
costs the bus at most two flow signals a second, whatever it does. Forward signals are
sent as they happen (only root and the configuration change forwards).

A bus daemon that restarts, or is not there yet when the instance starts, is reconnected
to in the background (`BusExport`): the object is exported and the name owned again.

Not done here: an ObjectManager (each instance is its own bus name; `passtctl list`
enumerates names).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any, Protocol, TypeVar

from dbus_fast import BusType, DBusError, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusSignature,
    DBusStr,
    DBusUInt16,
    DBusUInt32,
    DBusUInt64,
)
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal
from dbus_fast.signature import Variant

from .dbus_auth import Authorizer, ForwardGuard
from .dbus_listing import FlowListing
from .engine.forwards import ForwardError
from .engine.fwd import ForwardRule, SpecError
from .names import check_name, is_valid_name

log = logging.getLogger("passtd.dbus")

BUS_NAME_PREFIX = "org.passtd.Passtd1."
OBJECT_PATH = "/org/passtd/Passtd1"
INTERFACE = "org.passtd.Passtd1.Instance"
ERROR_PREFIX = "org.passtd.Passtd1.Error."
ERROR_KINDS = ("InvalidArgument", "AddressInUse", "NotFound", "AccessDenied")
ERROR_FAILED = "org.freedesktop.DBus.Error.Failed"  # the standard name for "a bug of ours"
DBUS_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"

CONNECT_TIMEOUT = 10.0  # seconds for connect + RequestName: READY=1 waits for them
RECONNECT_FIRST = 0.5  # seconds after losing the bus before the first reconnection
RECONNECT_MAX = 30.0  # ... doubling up to this
SIGNAL_INTERVAL = 1.0  # at most one PropertiesChanged per property per second
FLOW_SIGNAL_MAX = 64  # flows described in one FlowOpened or FlowClosed

# ListForwards / ListFlows entries: key -> D-Bus type. The engine's dicts may carry more
# (e.g. a forward's listener count); only these keys are the API.
FORWARD_FIELDS = {
    "id": "u",
    "protocol": "s",
    "address": "s",
    "host_port": "q",
    "host_port_last": "q",
    "guest_port": "q",
    "origin": "s",
    "spec": "s",
    "connections": "t",
    "refused": "t",
    "bytes": "t",
    "bytes_from_guest": "t",
    "bytes_to_guest": "t",
}
# GetStatistics: the engine's counters (engine/loop.py's `statistics`), and `drops`, a{st}
# by kind (engine/context.py's DROP_KINDS: malformed, policy, backlog, limits, host_errors)
STATISTICS = {
    "frames_from_guest": "t",
    "bytes_from_guest": "t",
    "frames_to_guest": "t",
    "bytes_to_guest": "t",
    "frames_dropped_to_guest": "t",
    "flows": "u",
    "flows_opened": "t",
}
FLOW_FIELDS = {
    "id": "u",
    "protocol": "s",
    "state": "s",
    "origin": "s",
    "guest_address": "s",
    "guest_port": "q",
    "peer_address": "s",
    "peer_port": "q",
    "bytes_from_guest": "t",
    "bytes_to_guest": "t",
    "age_seconds": "d",
}
PROPERTIES = frozenset({"Name", "GuestConnected", "GuestMac", "GuestAddresses", "Mtu",
                        "FlowCount", "Hostname", "StartedAt"})

DictList = Annotated[list[dict[str, Variant]], DBusSignature("aa{sv}")]
Dict = Annotated[dict[str, Variant], DBusSignature("a{sv}")]
FlowBatchSignal = Annotated[list[Any], DBusSignature("aa{sv}u")]
FlowPage = Annotated[list[Any], DBusSignature("aa{sv}u")]
StrList = Annotated[list[str], DBusSignature("as")]


# -- names ------------------------------------------------------------------------------------


def _is_alnum(byte: int) -> bool:
    return byte < 0x80 and chr(byte).isalnum()


def bus_name(instance_name: str) -> str:
    """The bus name an instance owns: `org.passtd.Passtd1.` + NAME escaped.

    NAME must be an instance name (passtd.names; InvalidName, a ValueError, otherwise).
    Every byte outside [A-Za-z0-9] becomes `_XX` (lowercase hex), as systemd escapes
    object paths, and so does a leading digit (a bus name element may not start with
    one): `vm-1` -> `vm_2d1`, `1vm` -> `_31vm`. `_` itself is escaped, so the mapping is
    reversible (`instance_name`). The longest name gives 19 + 3 * 60 characters, well
    within the 255 of a bus name.
    """
    out = []
    for i, byte in enumerate(check_name(instance_name).encode()):
        if _is_alnum(byte) and not (i == 0 and chr(byte).isdigit()):
            out.append(chr(byte))
        else:
            out.append(f"_{byte:02x}")
    return BUS_NAME_PREFIX + "".join(out)


def instance_name(name: str) -> str | None:
    """The instance name behind a bus name from `bus_name`, or None if it is not one."""
    if not name.startswith(BUS_NAME_PREFIX):
        return None
    escaped = name[len(BUS_NAME_PREFIX):]
    raw = bytearray()
    i = 0
    while i < len(escaped):
        char = escaped[i]
        if char == "_":
            hex_digits = escaped[i + 1 : i + 3]
            if len(hex_digits) != 2 or hex_digits != hex_digits.lower() \
                    or not all(c in "0123456789abcdef" for c in hex_digits):
                return None
            raw.append(int(hex_digits, 16))
            i += 3
        elif char.isascii() and char.isalnum() and not (i == 0 and char.isdigit()):
            raw.append(ord(char))
            i += 1
        else:
            return None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    # only instance names, in the canonical spelling: "_61" for "a" would name the same
    # instance twice
    return text if is_valid_name(text) and bus_name(text) == name else None


# -- PropertiesChanged rate limit (sans-IO: the caller passes the time) -------------------------


class ChangeThrottle:
    """Which changed properties to announce now, and when to announce the rest.

    A property announced less than `interval` ago is held back until its interval ends;
    repeated changes meanwhile fold into that one announcement.
    """

    def __init__(self, interval: float = SIGNAL_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}  # when each property was last announced
        self._held: set[str] = set()

    def changed(self, names: Iterable[str], now: float) -> set[str]:
        """Properties `names` changed at `now`: those to announce at once."""
        ready = set()
        for name in names:
            if name in self._held:
                continue
            last = self._last.get(name)
            if last is None or now - last >= self.interval:
                ready.add(name)
                self._last[name] = now
            else:
                self._held.add(name)
        return ready

    def wakeup(self) -> float | None:
        """When the earliest held-back property may be announced (None: nothing held)."""
        return min((self._last[n] + self.interval for n in self._held), default=None)

    def due(self, now: float) -> set[str]:
        """The held-back properties whose interval has ended at `now` (now announced)."""
        ready = {n for n in self._held if now - self._last[n] >= self.interval}
        self._held -= ready
        for name in ready:
            self._last[name] = now
        return ready


class FlowBatch:
    """Flow openings (or closings) gathered for one signal (see the module docstring):
    at most `limit` described, the rest counted. Sans-IO: the caller passes the time."""

    def __init__(self, interval: float = SIGNAL_INTERVAL, limit: int = FLOW_SIGNAL_MAX) -> None:
        self.interval = interval
        self.limit = limit
        self.flows: list[dict[str, Any]] = []
        self.omitted = 0
        self._last = -interval  # when the last signal went

    def add(self, describe: Callable[[], dict[str, Any]], now: float) -> bool:
        """One more flow; True when the batch may be signalled at once."""
        if len(self.flows) < self.limit:
            self.flows.append(describe())
        else:
            self.omitted += 1
        return now - self._last >= self.interval

    def wakeup(self) -> float | None:
        return self._last + self.interval if self.flows or self.omitted else None

    def take(self, now: float) -> tuple[list[dict[str, Any]], int]:
        out = (self.flows, self.omitted)
        self.flows, self.omitted, self._last = [], 0, now
        return out


# -- the interface ----------------------------------------------------------------------------


T = TypeVar("T")


def _guarded(call: str, handler: Callable[[], T]) -> T:
    """Run a handler; turn what it raises into the D-Bus error the caller gets.

    Errors the admin can act on carry the engine's message. Anything else is a bug of
    ours: logged here with its traceback (dbus-fast would log it outside passtd's logger)
    and answered with its class name only, as dbus-fast does, since any user may call
    ListFlows and an exception's text may show internals.
    """
    try:
        return handler()
    except DBusError:
        raise
    except ForwardError as e:
        kind = e.kind if e.kind in ERROR_KINDS else "InvalidArgument"
        raise DBusError(ERROR_PREFIX + kind, str(e)) from None
    except SpecError as e:
        raise DBusError(ERROR_PREFIX + "InvalidArgument", str(e)) from None
    except Exception as e:
        log.exception("D-Bus %s failed", call)
        raise DBusError(ERROR_FAILED, f"internal error in passtd ({type(e).__name__}); "
                                      "see the instance's log") from None


def _entries(items: Iterable[dict[str, Any]], fields: dict[str, str]) -> list[dict[str, Variant]]:
    return [{key: Variant(sig, item[key]) for key, sig in fields.items()} for item in items]


def _disconnection(bus: MessageBus) -> Awaitable[None]:
    """The end of the bus connection (dbus-fast leaves wait_for_disconnect untyped)."""
    waiter: Awaitable[None] = bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
    return waiter


class EngineView(Protocol):
    """What the API reads of a running engine (engine/loop.py's facade); nothing else of
    the engine is reachable from here."""

    @property
    def guest_connected(self) -> bool: ...
    @property
    def guest_mac(self) -> str: ...
    @property
    def mtu(self) -> int: ...
    @property
    def flow_count(self) -> int: ...
    @property
    def started_at(self) -> float: ...
    def guest_addresses(self) -> list[str]: ...
    def flow_page(self, after_id: int, count: int) -> list[dict[str, Any]]: ...
    def list_forwards(self) -> list[dict[str, Any]]: ...
    def statistics(self) -> dict[str, Any]: ...


class InstanceInterface(ServiceInterface):
    """The exported object; `instance` is a running service.Instance."""

    def __init__(self, instance: Any) -> None:
        super().__init__(INTERFACE)
        self.instance = instance

    @property
    def engine(self) -> EngineView:
        engine = self.instance.engine
        if engine is None:  # export() runs after the engine started; close() before it ends
            raise DBusError(ERROR_FAILED, "the instance is not running")
        view: EngineView = engine
        return view

    # methods: the names are the API's (D-Bus members are CamelCase)

    # AddForward and RemoveForward are answered by dbus_auth.ForwardGuard once the caller
    # is authorized (it needs the caller): these declarations serve introspection.

    def add_forward(self, protocol: str, address: str, host_port: int, guest_port: int) -> int:
        def add() -> int:
            if host_port == 0:
                raise SpecError("host_port 0 is not a port (1-65535)")
            rule = ForwardRule(protocol, address or None, None, host_port, host_port,
                               guest_port or host_port)
            return int(self.instance.add_runtime_forward(rule))

        return _guarded("AddForward", add)

    def remove_forward(self, forward_id: int) -> None:
        _guarded("RemoveForward", lambda: self.instance.remove_forward(forward_id))

    @dbus_method()
    def AddForward(self, protocol: DBusStr, address: DBusStr,
                   host_port: DBusUInt16, guest_port: DBusUInt16) -> DBusUInt32:
        return self.add_forward(protocol, address, host_port, guest_port)

    @dbus_method()
    def RemoveForward(self, forward_id: DBusUInt32):  # type: ignore[no-untyped-def]
        # no "-> None": dbus-fast reads return annotations as D-Bus signatures
        self.remove_forward(forward_id)

    @dbus_method()
    def ListForwards(self) -> DictList:
        return _guarded("ListForwards",
                        lambda: _entries(self.engine.list_forwards(), FORWARD_FIELDS))

    @dbus_method()
    def GetStatistics(self) -> Dict:
        def stats() -> dict[str, Variant]:
            counters = self.engine.statistics()
            out = {key: Variant(sig, counters[key]) for key, sig in STATISTICS.items()}
            out["drops"] = Variant("a{st}", dict(counters["drops"]))
            return out

        return _guarded("GetStatistics", stats)

    # ListFlows and ListFlowsPage are answered by dbus_listing.FlowListing, a message
    # handler ahead of this dispatch (it needs the caller, and answers after its slices):
    # declared here for introspection and the signature checks, never reached.

    @dbus_method()
    def ListFlows(self) -> DictList:
        raise DBusError(ERROR_FAILED, "ListFlows is served by the listing handler")

    @dbus_method()
    def ListFlowsPage(self, after_id: DBusUInt32, count: DBusUInt32) -> FlowPage:
        raise DBusError(ERROR_FAILED, "ListFlowsPage is served by the listing handler")

    # properties (read-only; dbus-fast refuses Set on them)

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> DBusStr:
        return str(self.instance.cfg.name)

    @dbus_property(access=PropertyAccess.READ)
    def GuestConnected(self) -> DBusBool:
        return bool(self.engine.guest_connected)

    @dbus_property(access=PropertyAccess.READ)
    def GuestMac(self) -> DBusStr:
        return self.engine.guest_mac

    @dbus_property(access=PropertyAccess.READ)
    def GuestAddresses(self) -> StrList:
        return list(self.engine.guest_addresses())

    @dbus_property(access=PropertyAccess.READ)
    def Mtu(self) -> DBusUInt32:
        return int(self.engine.mtu)

    @dbus_property(access=PropertyAccess.READ)
    def FlowCount(self) -> DBusUInt32:
        return self.engine.flow_count

    @dbus_property(access=PropertyAccess.READ)
    def Hostname(self) -> DBusStr:
        """Where the instance runs (after a migration: the destination)."""
        return socket.gethostname()

    @dbus_property(access=PropertyAccess.READ)
    def StartedAt(self) -> DBusUInt64:
        """Since when it serves this guest, in microseconds since the epoch, as systemd's
        timestamps (a restart keeps it)."""
        return int(self.engine.started_at * 1_000_000)

    def current(self, name: str) -> Any:
        """A property's value now (what PropertiesChanged carries)."""
        return getattr(self, name)

    # signals: calling one emits it with what it returns

    @dbus_signal()
    def ForwardAdded(self, forward: dict[str, Any]) -> Dict:
        return _entries([forward], FORWARD_FIELDS)[0]

    @dbus_signal()
    def ForwardRemoved(self, forward: dict[str, Any]) -> Dict:
        return _entries([forward], FORWARD_FIELDS)[0]

    @dbus_signal()
    def FlowOpened(self, flows: list[dict[str, Any]], omitted: int) -> FlowBatchSignal:
        return [_entries(flows, FLOW_FIELDS), omitted]

    @dbus_signal()
    def FlowClosed(self, flows: list[dict[str, Any]], omitted: int) -> FlowBatchSignal:
        return [_entries(flows, FLOW_FIELDS), omitted]


# -- the export -------------------------------------------------------------------------------


class BusExport:
    """The instance's connection to the bus, kept up: the service calls `export` and
    `close`, and the engine `properties_changed`.

    When the bus daemon goes away (a restart of dbus, a crash), the export reconnects by
    itself, RECONNECT_FIRST seconds after the loss and then doubling up to RECONNECT_MAX,
    exports the object and owns the name again; one log line when the bus is lost, one
    when it is back. The guest's traffic never waits for any of it. A refusal that
    retrying cannot fix (the policy refuses the name, another process owns it) ends the
    attempts with an error line.
    """

    def __init__(self, instance: Any, bus_type: BusType,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.interface = InstanceInterface(instance)
        self.name = bus_name(instance.cfg.name)
        self.bus_type = bus_type
        self.loop = loop
        self.bus: MessageBus | None = None
        self.listing: FlowListing | None = None
        self.guard: ForwardGuard | None = None
        self.throttle = ChangeThrottle()
        self.flow_batches = {"flow-opened": FlowBatch(), "flow-closed": FlowBatch()}
        self._flow_timer: asyncio.TimerHandle | None = None
        self._announced: dict[str, Any] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._watch: asyncio.Future[Any] | None = None
        self._reconnecting: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.bus is not None and self.bus.connected

    async def connect(self) -> None:
        """Connect, export the object, own the name (within CONNECT_TIMEOUT). Raises
        ConnectionError or TimeoutError (worth retrying), NameTakenError or
        PermissionError (not)."""
        bus = MessageBus(bus_type=self.bus_type)
        try:
            await asyncio.wait_for(_connect_and_own(bus, self.name, self.interface),
                                   CONNECT_TIMEOUT)
        except BaseException as e:
            with contextlib.suppress(Exception):  # also a socket left half-way through
                bus.disconnect()
            if isinstance(e, TimeoutError):
                raise TimeoutError(f"no answer from the bus within {CONNECT_TIMEOUT:g} s") \
                    from None
            raise
        self.listing = FlowListing(bus, OBJECT_PATH, INTERFACE, ERROR_PREFIX,
                                   lambda: self.interface.engine,
                                   lambda rows: _entries(rows, FLOW_FIELDS), self.loop)
        bus.add_message_handler(self.listing.handle)
        owner = os.getuid() if self.bus_type == BusType.SESSION else None
        self.guard = ForwardGuard(bus, OBJECT_PATH, INTERFACE,
                                  {"AddForward": self.interface.add_forward,
                                   "RemoveForward": self.interface.remove_forward},
                                  Authorizer(bus, self.interface.instance.cfg.name, owner),
                                  self.loop)
        bus.add_message_handler(self.guard.handle)
        self.bus = bus
        self._announced = {n: self.interface.current(n) for n in PROPERTIES}
        self._watch = asyncio.ensure_future(_disconnection(bus))
        self._watch.add_done_callback(self._disconnected)

    def keep_trying(self, why: str) -> None:
        """The bus is not there (yet): connect as soon as it is."""
        log.warning("D-Bus API not available on the %s bus yet (%s); retrying in the "
                    "background; the guest's networking is not affected", self._bus_text, why)
        self._start_reconnecting()

    @property
    def _bus_text(self) -> str:
        return "system" if self.bus_type == BusType.SYSTEM else "session"

    def properties_changed(self, names: set[str]) -> None:
        """Engine properties changed: announce them (rate limited). Never raises: it runs
        inside the data path's callbacks."""
        if self._closing:
            return
        try:
            now = self.loop.time()
            self._announce(self.throttle.changed(names & PROPERTIES, now))
            self._arm()
        except Exception:
            log.exception("cannot announce changed properties %s", sorted(names))

    def engine_events(self, events: list[tuple[str, Callable[[], dict[str, Any]]]]) -> None:
        """Flows or forwards came or went (engine/news.py's on_events, flows once per
        batch of the engine's): signal them, flows batched further. Never raises: it runs
        inside the data path's callbacks."""
        if self._closing or not self.connected:
            return
        now = None
        for kind, describe in events:
            try:
                if kind == "forward-added":
                    self.interface.ForwardAdded(describe())
                elif kind == "forward-removed":
                    self.interface.ForwardRemoved(describe())
                elif (batch := self.flow_batches.get(kind)) is not None:
                    now = self.loop.time() if now is None else now
                    if batch.add(describe, now):
                        self._signal_flows(kind, now)
            except Exception:
                log.exception("cannot signal %s", kind)
        if now is not None:
            try:
                self._arm_flows()
            except Exception:
                log.exception("cannot time the next flow signals")

    def _signal_flows(self, kind: str, now: float) -> None:
        flows, omitted = self.flow_batches[kind].take(now)
        signal = self.interface.FlowOpened if kind == "flow-opened" \
            else self.interface.FlowClosed
        signal(flows, omitted)

    def _arm_flows(self) -> None:
        if self._flow_timer is not None:  # (most calls, under many flows: checked first)
            return
        when = min((at for batch in self.flow_batches.values()
                    if (at := batch.wakeup()) is not None), default=None)
        if when is None:
            return
        self._flow_timer = self.loop.call_at(when, self._flush_flows)

    def _flush_flows(self) -> None:
        self._flow_timer = None
        if self._closing or not self.connected:
            return
        now = self.loop.time()
        for kind, batch in self.flow_batches.items():
            at = batch.wakeup()
            if at is not None and at <= now + 0.001:  # (timers may fire a hair early)
                self._signal_flows(kind, now)
        self._arm_flows()

    def _arm(self) -> None:
        when = self.throttle.wakeup()
        if when is None or (self._timer is not None and self._timer.when() <= when):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self._closing:
            return
        try:
            self._announce(self.throttle.due(self.loop.time()))
            self._arm()  # what is still held back (e.g. the timer fired a hair early)
        except Exception:
            log.exception("cannot announce changed properties")

    def _announce(self, names: set[str]) -> None:
        if not self.connected:
            return  # (a reconnection reads every value afresh)
        changed = {}
        for name in names:
            value = self.interface.current(name)
            if value != self._announced.get(name):  # changed and changed back: nothing new
                changed[name] = value
        if changed:
            self.interface.emit_properties_changed(changed)
            self._announced.update(changed)

    def _disconnected(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            return
        error = fut.exception()  # always retrieved
        why = (str(error) or type(error).__name__) if error else "the bus closed the connection"
        if self._closing:
            return
        if self.listing is not None:
            self.listing.close()
        log.warning("lost the D-Bus connection (%s): reconnecting in the background; the "
                    "guest's networking is not affected", why)
        self._start_reconnecting()

    def _start_reconnecting(self) -> None:
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = self.loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = RECONNECT_FIRST
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await self.connect()
            except (NameTakenError, PermissionError) as e:
                log.error("D-Bus API not available: %s; not retrying", e)
                return
            except Exception as e:
                log.debug("D-Bus reconnection failed (%s); next try in %g s", e, delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            log.info("D-Bus API back on the %s bus as %s", self._bus_text, self.name)
            return

    async def close(self) -> None:
        self._closing = True
        for timer in (self._timer, self._flow_timer):
            if timer is not None:
                timer.cancel()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self.listing is not None:
            self.listing.close()
        if self.guard is not None:
            self.guard.close()
        bus = self.bus
        if bus is not None and bus.connected:
            bus.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_disconnection(bus), 2.0)
        if self._watch is not None:
            self._watch.cancel()


class NameTakenError(Exception):
    """Another process owns this instance's bus name."""


async def export(instance: Any) -> BusExport:
    """Connect to the instance's bus (cfg.bus), export the object and own the name.

    A bus that is not reachable (yet) is retried in the background. Raises, with a
    message for the admin, when the policy refuses the name or another process owns it.
    """
    cfg = instance.cfg
    bus_type = BusType.SYSTEM if cfg.bus == "system" else BusType.SESSION
    exported = BusExport(instance, bus_type, asyncio.get_running_loop())
    try:
        await exported.connect()
    except (NameTakenError, PermissionError):
        raise
    except Exception as e:
        exported.keep_trying(str(e) or type(e).__name__)
        return exported
    log.info("D-Bus API on the %s bus as %s, object %s", cfg.bus, exported.name, OBJECT_PATH)
    return exported


async def _connect_and_own(bus: MessageBus, name: str, interface: InstanceInterface) -> None:
    try:
        await bus.connect()
    except Exception as e:  # OSError, AuthError...: say what failed, not only errno text
        raise ConnectionError(f"cannot connect to it: {e or type(e).__name__}") from e
    bus.export(OBJECT_PATH, interface)
    reply = await _request_name(bus, name)
    if reply == RequestNameReply.EXISTS:
        raise NameTakenError(f"{name} is already owned by another process: another instance "
                             f"named {interface.instance.cfg.name!r} is running")
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        raise NameTakenError(f"cannot own {name}: RequestName answered {reply.name}")


async def _request_name(bus: MessageBus, name: str) -> RequestNameReply:
    try:
        return await bus.request_name(name, NameFlag.DO_NOT_QUEUE)
    except DBusError as e:
        if e.type != DBUS_ACCESS_DENIED:
            raise
        raise PermissionError(
            f"the bus policy does not let this user own {name} (install "
            f"dbus/org.passtd.Passtd1.conf; run as root or user passtd): {e.text}") from e
