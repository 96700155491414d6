"""ListFlows and ListFlowsPage: flow listings that never stall the guest's traffic.

Design: the D-Bus API shares the event loop with the data path, and a guest can hold
tens of thousands of flows (65,536 by default: UDP makes them cheap). Building one reply
for all of them held the loop for about 1.5 s, and anyone may call ListFlows. So:

- ListFlows answers at most LIST_MAX flows; above that it fails with
  `org.passtd.Passtd1.Error.TooManyFlows`, naming ListFlowsPage.
- ListFlowsPage(u after_id, u count) -> (aa{sv} flows, u next_id): up to `count` (at most
  LIST_MAX) flows with ids above `after_id`, in id order; `next_id` is the `after_id` of the
  next page, 0 once the listing is complete. Start with 0.
- A reply is built SLICE flows at a time, the loop running other work (the guest's
  frames) between slices, so a call holds the data path for well under a millisecond
  per slice whatever the flow count.
- Callers other than root are rate limited per uid: ROWS_PER_SECOND flow rows on
  average (BURST at once), else `org.passtd.Passtd1.Error.LimitExceeded` says when to come
  back; and one listing at a time per connection. Root is not limited.

The calls are served from a message handler ahead of dbus-fast's method dispatch: it
needs the caller (the message's sender, whose uid the bus tells) and answers later, after
its slices. The interface still declares both methods (dbus_api.py), for introspection
and for the signature checks.

Not done here: who may call (the bus policy file: everyone may list), the other methods.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from dbus_fast import DBusError, Message, MessageType
from dbus_fast.aio import MessageBus

log = logging.getLogger("passtd.dbus")

LIST_MAX = 512  # flows in one reply
SLICE = 128  # flows described per loop step
ROWS_PER_SECOND = 4096  # flow rows a non-root uid may receive, on average
BURST = 8192  # ... and at once
UID_CACHE = 1024  # senders whose uid is remembered


class RowBudget:
    """A token bucket of flow rows for one uid (sans-IO: the caller says `now`)."""

    def __init__(self, now: float) -> None:
        self.tokens = float(BURST)
        self.at = now

    def take(self, rows: int, now: float) -> float:
        """0.0 if `rows` may go now (and they are taken), else seconds to wait."""
        self.tokens = min(float(BURST), self.tokens + (now - self.at) * ROWS_PER_SECOND)
        self.at = now
        if rows <= self.tokens:
            self.tokens -= rows
            return 0.0
        return (rows - self.tokens) / ROWS_PER_SECOND


class FlowListing:
    def __init__(self, bus: MessageBus, path: str, interface: str, error_prefix: str,
                 engine: Callable[[], Any], entries: Callable[[list[dict[str, Any]]], Any],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.bus = bus
        self.path = path
        self.interface = interface
        self.error_prefix = error_prefix
        self.engine = engine  # the running engine's facade (raises DBusError if none)
        self.entries = entries  # engine dicts -> the API's a{sv} entries
        self.loop = loop
        self._uids: OrderedDict[str, int] = OrderedDict()
        self._budgets: dict[int, RowBudget] = {}
        self._busy: set[str] = set()  # senders with a listing in progress
        self._tasks: set[asyncio.Task[None]] = set()

    def handle(self, msg: Message) -> bool:
        """The bus's message handler: True when this call is ours to answer."""
        if msg.message_type is not MessageType.METHOD_CALL or msg.path != self.path \
                or msg.interface not in (self.interface, None):
            return False
        if not ((msg.member == "ListFlows" and msg.signature == "")
                or (msg.member == "ListFlowsPage" and msg.signature == "uu")):
            return False  # other methods, or a wrong signature: dbus-fast answers
        task = self.loop.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _serve(self, msg: Message) -> None:
        sender = msg.sender or ""
        if sender in self._busy:
            reply = Message.new_error(msg, self.error_prefix + "LimitExceeded",
                                      "one listing at a time per connection")
        else:
            self._busy.add(sender)
            try:
                reply = await self._listing(msg, sender)
            except _Refused as e:
                reply = Message.new_error(msg, self.error_prefix + e.kind, str(e))
            except DBusError as e:  # e.g. the instance is stopping
                reply = Message.new_error(msg, e.type, e.text)
            except Exception:  # a bug: logged here with its traceback, never sent
                log.exception("D-Bus %s failed", msg.member)
                reply = Message.new_error(msg, "org.freedesktop.DBus.Error.Failed",
                                          "internal error in passtd; see the instance's log")
            finally:
                self._busy.discard(sender)
        if self.bus.connected:
            self.bus.send(reply)

    async def _listing(self, msg: Message, sender: str) -> Message:
        engine = self.engine()
        if msg.member == "ListFlows":
            total = engine.flow_count
            if total > LIST_MAX:
                raise _Refused("TooManyFlows",
                               f"{total} flows: more than ListFlows returns ({LIST_MAX}); "
                               f"page through them with ListFlowsPage(after_id, count)")
            after, count = 0, LIST_MAX
        else:
            after, count = int(msg.body[0]), min(int(msg.body[1]), LIST_MAX)
        await self._charge(sender, min(count, engine.flow_count))
        rows: list[dict[str, Any]] = []
        while len(rows) < count:
            want = min(SLICE, count - len(rows))
            piece = self.engine().flow_page(after, want)
            rows += piece
            if len(piece) < want:
                break  # the end of the table
            after = piece[-1]["id"]
            await asyncio.sleep(0)  # the guest's frames go first
        entries = self.entries(rows)
        if msg.member == "ListFlows":
            return Message.new_method_return(msg, "aa{sv}", [entries])
        more = len(rows) == count and bool(self.engine().flow_page(after, 1))
        next_id = rows[-1]["id"] if rows and more else 0
        return Message.new_method_return(msg, "aa{sv}u", [entries, next_id])

    async def _charge(self, sender: str, rows: int) -> None:
        uid = await self._uid(sender)
        if uid == 0:
            return
        now = self.loop.time()
        budget = self._budgets.setdefault(uid, RowBudget(now))
        wait = budget.take(rows, now)
        if wait:
            raise _Refused("LimitExceeded",
                           f"flow listings are limited to {ROWS_PER_SECOND} rows per second "
                           f"for users other than root; try again in {wait:.1f} s")

    async def _uid(self, sender: str) -> int:
        uid = self._uids.get(sender)
        if uid is None:
            reply = await self.bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="GetConnectionUnixUser",
                signature="s", body=[sender]))
            if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
                raise _Refused("AccessDenied", "the bus does not say who is calling")
            uid = int(reply.body[0])
            self._uids[sender] = uid
            while len(self._uids) > UID_CACHE:
                self._uids.popitem(last=False)
        return uid

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


class _Refused(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
