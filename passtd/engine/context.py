"""What the parts of one engine share: settings, the flow table, readiness, and a few calls.

Design: the engine is one dispatcher (loop.py) and parts named after what they own: the
qemu link (link.py), forwards and listeners (forwards.py), and one socket half per
protocol (tcp_sock.py, udp_sock.py, icmp_sock.py). None of them imports another; they
meet here. `EngineContext` carries the shared state (settings, flow table, what the guest
was seen using, the link) and the engine's own services as plain callables (`schedule`,
`close_flow`, `settle`, `changed`, `buffers_used`), which the engine fills in. A part
keeps its own state private and offers the engine a few methods; the engine wires them.

`Readiness` keeps the registrations of flow sockets with the loop's poller (poller.py), once
per fd: epoll registrations are the one piece of loop state several parts touch.

Not done here: any protocol or I/O decision.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from . import events
from .addrs import GuestSeen, NetConfig
from .flow import A_CLOSE, Flow, FlowTable
from .link import GuestLink
from .mainloop import MainLoop, Timer
from .poller import Poller
from .settings import EngineSettings
from .sockets import HostSockets

log = logging.getLogger("passtd.engine")


# What the drop log's categories count as, for the statistics: a guest frame that does not
# parse; something the guest may not do (or that passtd does not carry); a queue that was
# full; a limit (flows, descriptors, ping_group_range); an error of a host socket.
# Categories not listed (notes, not drops) are not counted as drops.
DROP_REASONS: Final = {
    "malformed": "malformed", "malformed-tcp": "malformed", "bad-tcp4": "malformed",
    "bad-tcp6": "malformed",
    "spoofed": "policy", "martian": "policy", "udp-dst": "policy", "proto": "policy",
    "ethertype": "policy", "icmp-type": "policy", "refused qemu connections": "policy",
    "udp-full": "backlog",
    "flow-limit": "limits", "socket": "limits", "accept": "limits", "ping-socket": "limits",
    "sockopt": "limits",
    "udp-send": "host_errors", "udp-recv": "host_errors", "udp-listen": "host_errors",
    "udp-connect": "host_errors", "ping-send": "host_errors", "ping-recv": "host_errors",
}
DROP_KINDS: Final = ("malformed", "policy", "backlog", "limits", "host_errors")


class RateLimitedLog:
    """At most `burst` log lines per `period` seconds per category, then a summary; and
    how many times each category happened (`counts`: what was dropped or refused, by
    reason, for the statistics), logged or not."""

    def __init__(self, burst: int = 10, period: float = 10.0) -> None:
        self.burst = burst
        self.period = period
        self._state: dict[str, list[float | int]] = {}
        self.counts: dict[str, int] = {}

    def drops(self) -> dict[str, int]:
        """The counts by DROP_REASONS' kinds (every kind, zero or not)."""
        out = dict.fromkeys(DROP_KINDS, 0)
        for category, count in self.counts.items():
            kind = DROP_REASONS.get(category)
            if kind is not None:
                out[kind] += count
        return out

    def __call__(self, level: int, category: str, msg: str, *args: Any,
                 extra: dict[str, Any] | None = None) -> None:
        self.counts[category] = self.counts.get(category, 0) + 1
        if not log.isEnabledFor(level):
            return
        now = time.monotonic()
        state = self._state.setdefault(category, [now, 0, 0])
        if now - state[0] > self.period:
            if state[2]:
                log.log(level, "%s: %d more suppressed", category, state[2])
            state[:] = [now, 0, 0]
        if state[1] < self.burst:
            state[1] += 1
            log.log(level, msg, *args, extra=extra)
        else:
            state[2] += 1


class BufferTrim:
    """Megabytes of frame buffers stay resident after a burst of traffic: once the
    instance has been quiet for DELAY seconds, `trim` hands them back to the kernel
    (MADV_DONTNEED: the next use gets zero pages). One wakeup after traffic, none while
    idle."""

    DELAY = 10.0

    def __init__(self, loop: MainLoop, trim: Callable[[], object]) -> None:
        self.loop = loop
        self._trim = trim
        self._used_at = 0.0  # when the big I/O buffers last held data
        self._handle: Timer | None = None

    def used(self, now: float) -> None:
        """Note traffic through the big buffers; give their pages back once it stops."""
        self._used_at = now
        if self._handle is None:
            self._handle = self.loop.call_at(now + self.DELAY, self._expired)

    def _expired(self) -> None:
        self._handle = None
        if self.loop.time() - self._used_at < self.DELAY:
            self._handle = self.loop.call_at(self._used_at + self.DELAY, self._expired)
            return
        self._trim()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Readiness:
    """Reader and writer callbacks on flow sockets, registered once per descriptor."""

    def __init__(self, poller: Poller) -> None:
        self.poller = poller
        self._reading: set[int] = set()
        self._writing: set[int] = set()

    def read(self, flow: Flow, callback: Callable[..., Any], edge: bool = False) -> None:
        """`edge`: called when new data arrives only (poller.py), not while data stays."""
        fd = flow.sock.fileno()
        if fd not in self._reading:
            self._reading.add(fd)
            self.poller.add_reader(fd, callback, (flow,), edge)

    def stop_reading(self, flow: Flow) -> None:
        fd = flow.sock.fileno()
        if fd in self._reading:
            self._reading.discard(fd)
            self.poller.remove_reader(fd)

    def write(self, flow: Flow, callback: Callable[..., Any]) -> None:
        fd = flow.sock.fileno()
        if fd not in self._writing:
            self._writing.add(fd)
            self.poller.add_writer(fd, callback, (flow,))

    def stop_writing(self, flow: Flow) -> None:
        if flow.sock is None:
            return
        fd = flow.sock.fileno()
        if fd in self._writing:
            self._writing.discard(fd)
            self.poller.remove_writer(fd)

    def forget(self, flow: Flow) -> None:
        """The flow's socket is about to close."""
        self.stop_reading(flow)
        self.stop_writing(flow)

    def problems(self, flows: list[Flow]) -> list[str]:
        """Flows without a socket, registrations for descriptors of no flow (the fuzz
        targets check)."""
        out = [f"{flow!r} in the table without a socket" for flow in flows if flow.sock is None]
        stray = (self._reading | self._writing) - {flow.sock.fileno() for flow in flows
                                                   if flow.sock is not None}
        return out + ([f"readiness registered for fds {sorted(stray)} of no flow"]
                      if stray else [])


class SocketHalf(Protocol):
    """What the engine asks of each protocol's socket half (tcp_sock, udp_sock, icmp_sock)
    about one of its flows."""

    def timer(self, flow: Any, now: float) -> None:
        """The flow's deadline passed: run its `handle_timer` and act on the result."""

    def release(self, flow: Any) -> bool:
        """The flow is closing: forget it; whether its socket is the flow's own to close
        (not a listener it borrowed)."""

    def adopt(self, flow: Any, now: float) -> None:
        """A flow the previous process handed over (handover.py), with its socket set:
        watch it and carry on."""

    def reset(self, flow: Any, now: float) -> None:
        """End a flow a restart cannot carry, telling both sides where the protocol can;
        `flow.sock` is None where its socket did not arrive."""


class CloseFlow(Protocol):
    """The engine's `close_flow`: the flow ends now. `rst_peer`: reset the host peer
    rather than close gently; `after_flush`: close its socket only once the batch's frames
    went out (for a caller inside a callback, which settles)."""

    def __call__(self, flow: Flow, rst_peer: bool, after_flush: bool = False) -> None: ...


def _unset(*_args: Any, **_kwargs: Any) -> None:
    raise RuntimeError("EngineContext: the engine did not wire this call")


class EngineContext:
    """The shared state and engine services every part of one engine receives."""

    def __init__(self, settings: EngineSettings, loop: MainLoop,
                 link: GuestLink, sockets: HostSockets) -> None:
        self.settings = settings
        self.sockets = sockets
        self.net: NetConfig = settings.net
        self.loop = loop
        self.link = link
        self.flows = FlowTable(settings.max_flows)
        self.seen = GuestSeen()
        self.readiness = Readiness(loop.poller)
        self.drop_log = RateLimitedLog()
        # wall-clock time the instance started serving (a restart carries it: handover.py)
        self.started_at = time.time()
        # filled in by the engine (loop.py)
        self.schedule: Callable[[Flow], None] = _unset
        self.close_flow: CloseFlow = _unset
        self.settle: Callable[[float], None] = _unset
        self.changed: Callable[..., None] = _unset
        self.buffers_used: Callable[[float], None] = _unset

    @property
    def guest_mac(self) -> bytes:
        """Where frames for the guest go: the MAC it was seen using, or broadcast."""
        return self.seen.mac or b"\xff" * 6

    def expire_or_reschedule(self, flow: Flow, now: float) -> None:
        """The timer of a datagram flow (UDP, ping): it ends, or waits for its next
        deadline."""
        if flow.handle_timer(now) & A_CLOSE:
            self.close_flow(flow, rst_peer=False)
        else:
            self.schedule(flow)

    def flow_limit_reached(self, what: str) -> bool:
        """Whether the flow table is full; logs it (rate-limited) with what is refused."""
        if not self.flows.full:
            return False
        self.drop_log(logging.WARNING, "flow-limit", "flow limit (%d) reached: refusing %s",
                      self.flows.max_flows, what, extra=events.fields(events.LIMIT_REACHED))
        return True
