"""Port forwards at run time: rules, their listening sockets, and their counters.

Design: a forward is one `ForwardRule` (fwd.py's grammar) with the sockets listening for
it, passt-style: one dual-stack socket per port unless the rule names an address or a
family is disabled. `Forwards` opens and closes them, enforces `limits.max_listeners` and
"no two forwards overlap", and hands what the listeners receive to the engine: accepted
TCP connections (`on_accept`) and readable UDP listeners (`on_datagrams`); the socket
halves make flows of them. A listener that cannot accept (EMFILE) rests ACCEPT_PAUSE
instead of spinning, while flows closing free descriptors.

A forward's connections outlive it: removing a forward closes its listeners only (inbound
UDP flows answer through the listener, so the engine ends those). Counters: connections
accepted, and bytes of the flows through it that have ended (`flow_closed`); live flows
add theirs when listed (`describe`).

A restart hands the listeners to the next process (handover.py): `inherit` gives it the
previous process's forwards, and `add` of a rule among them takes that forward back, id,
counters and listening sockets (which never stopped listening: connections that came
meanwhile wait in their backlog) instead of opening new ones; `drop_unclaimed` closes
those of rules the new configuration no longer has.

Not done here: flows (the socket halves), the spec grammar (fwd.py), who may add forwards
(the D-Bus API).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from . import events
from .addrs import NetConfig
from .flow import Flow
from .fwd import ForwardRule, format_rule
from .mainloop import MainLoop
from .sockets import HostSockets, family_of

log = logging.getLogger("passtd.engine")

PeerAddress = tuple[Any, ...]  # what accept() returns: (host, port[, flowinfo, scope])
LISTEN_BACKLOG: Final = 1024
UDP_BUFFER: Final = 4 << 20  # a burst of datagrams must not overflow a listener's receive queue
ACCEPT_BATCH: Final = 64  # connections accepted per wakeup of a listener
ACCEPT_PAUSE: Final = 0.5  # seconds a listener rests after accept() ran out of descriptors


class ForwardError(Exception):
    """A forward cannot be opened or changed; `kind` names the D-Bus error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "InvalidArgument" | "AddressInUse" | "AccessDenied" | "NotFound"


class Forward:
    """One forward rule with its listening sockets and counters."""

    def __init__(self, forward_id: int, rule: ForwardRule, origin: str,
                 listeners: list[socket.socket] | None = None) -> None:
        self.id = forward_id
        self.rule = rule
        self.origin = origin  # "config" | "runtime"
        self.listeners: list[socket.socket] = listeners if listeners is not None else []
        self.connections = 0
        self.refused = 0  # connections (datagrams, for UDP) it could not take to the guest
        self.from_guest_closed = 0  # bytes of flows through it that have ended, each way
        self.to_guest_closed = 0

    def __repr__(self) -> str:
        return f"Forward({self.id}, {self.rule!r}, {self.origin!r})"

    def describe(self, live: tuple[int, int] = (0, 0)) -> dict[str, Any]:
        """The forward as ListForwards shows it; `live`: bytes from and to the guest of
        its flows that have not ended."""
        rule = self.rule
        from_guest, to_guest = self.from_guest_closed + live[0], self.to_guest_closed + live[1]
        return {
            "id": self.id,
            "protocol": rule.proto,
            "address": rule.address or "",
            "host_port": rule.first,
            "host_port_last": rule.last,
            "guest_port": rule.to_first,
            "origin": self.origin,
            "spec": format_rule(rule),
            "listeners": len(self.listeners),
            "connections": self.connections,
            "refused": self.refused,
            "bytes": from_guest + to_guest,
            "bytes_from_guest": from_guest,
            "bytes_to_guest": to_guest,
        }


class Forwards:
    def __init__(self, loop: MainLoop, net: NetConfig, sockets: HostSockets,
                 max_listeners: int,
                 on_accept: Callable[[Forward, socket.socket, socket.socket, PeerAddress,
                                      float], None],
                 on_datagrams: Callable[[Forward, socket.socket], None],
                 settle: Callable[[float], None], drop_log: Callable[..., None]) -> None:
        self.loop = loop
        self.net = net
        self.sockets = sockets
        self.max_listeners = max_listeners
        self._on_accept = on_accept  # (forward, listener, accepted socket, peer, now)
        self._on_datagrams = on_datagrams
        self._settle = settle
        self._drop_log = drop_log
        self._by_id: dict[int, Forward] = {}
        self._next_id = 1
        self._listener_count = 0
        self._inherited: dict[ForwardRule, Forward] = {}  # from the previous process

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Forward]:
        return iter(list(self._by_id.values()))

    def get(self, forward_id: int) -> Forward | None:
        return self._by_id.get(forward_id)

    def add(self, rule: ForwardRule, origin: str) -> Forward:
        """Open a forward; its listeners accept when this returns. ForwardError if it
        overlaps another or a socket cannot be opened (nothing is left open then)."""
        for fwd in self._by_id.values():
            if fwd.rule.overlaps(rule):
                raise ForwardError("AddressInUse",
                                   f"{rule.proto} {format_rule(rule)} overlaps forward {fwd.id} "
                                   f"({format_rule(fwd.rule)})")
        inherited = self._inherited.pop(rule, None)
        if inherited is not None:
            inherited.origin = origin
            self._by_id[inherited.id] = inherited
            for sock in inherited.listeners:
                self._watch(inherited, sock)
            log.info("forward %d: %s %s -> guest (%s, %d listening sockets kept across the "
                     "restart)", inherited.id, rule.proto, format_rule(rule), origin,
                     len(inherited.listeners),
                     extra=events.fields(events.FORWARD_ADDED, forward_id=inherited.id))
            return inherited
        fwd = Forward(self._next_id, rule, origin)
        try:
            self._open_listeners(fwd)
        except ForwardError:
            self._close_listeners(fwd)
            raise
        except OSError as e:  # socket() itself failed: EMFILE, no IPv6 in this kernel...
            self._close_listeners(fwd)
            raise ForwardError("InvalidArgument", f"{rule.proto} {format_rule(rule)}: cannot open "
                                                  f"a listening socket: {e.strerror}") from e
        self._next_id += 1
        self._by_id[fwd.id] = fwd
        log.info("forward %d: %s %s -> guest (%s, %d listening sockets)", fwd.id, rule.proto,
                 format_rule(rule), origin, len(fwd.listeners),
                 extra=events.fields(events.FORWARD_ADDED, forward_id=fwd.id))
        return fwd

    def remove(self, forward_id: int) -> Forward:
        """Close a forward's listeners; connections made through it live on."""
        fwd = self._by_id.pop(forward_id, None)
        if fwd is None:
            raise ForwardError("NotFound", f"no forward with id {forward_id}")
        self._close_listeners(fwd)
        log.info("forward %d removed: %s %s", fwd.id, fwd.rule.proto, format_rule(fwd.rule),
                 extra=events.fields(events.FORWARD_REMOVED, forward_id=fwd.id))
        return fwd

    def close(self) -> None:
        self.drop_unclaimed()
        for fwd in self._by_id.values():
            self._close_listeners(fwd)

    # -- across a restart (handover.py) -------------------------------------------------------

    @property
    def next_id(self) -> int:
        return self._next_id

    def inherit(self, forwards: list[Forward], next_id: int) -> None:
        """The previous process's forwards, with their listening sockets: `add` takes
        them back by rule. Ids of new forwards start after all of theirs."""
        self._next_id = max(self._next_id, next_id, *(fwd.id + 1 for fwd in forwards))
        for fwd in forwards:
            self._inherited[fwd.rule] = fwd

    def drop_unclaimed(self) -> None:
        """Close the inherited listeners that no forward took back."""
        for fwd in self._inherited.values():
            log.info("forward %d (%s %s) is not in the configuration any more: its listening "
                     "sockets close", fwd.id, fwd.rule.proto, format_rule(fwd.rule))
            for sock in fwd.listeners:
                sock.close()
        self._inherited.clear()

    def takes_udp_port(self, port: int) -> bool:
        """Whether a UDP forward listens on `port` (a guest flow must not hold it)."""
        return any(fwd.rule.proto == "udp" and fwd.rule.first <= port <= fwd.rule.last
                   for fwd in self._by_id.values())

    def flow_closed(self, flow: Flow) -> None:
        fwd = self._by_id.get(flow.forward_id) if flow.forward_id is not None else None
        if fwd is not None:
            fwd.from_guest_closed += flow.bytes_from_guest
            fwd.to_guest_closed += flow.bytes_to_guest

    def describe(self, flows: Iterable[Flow]) -> list[dict[str, Any]]:
        live: dict[int, tuple[int, int]] = {}
        for flow in flows:
            if flow.forward_id is not None:
                before = live.get(flow.forward_id, (0, 0))
                live[flow.forward_id] = (before[0] + flow.bytes_from_guest,
                                         before[1] + flow.bytes_to_guest)
        return [fwd.describe(live.get(fwd.id, (0, 0))) for fwd in self._by_id.values()]

    # -- listening sockets --------------------------------------------------------------------

    def _listen_addresses(self, rule: ForwardRule) -> list[tuple[int, str, bool]]:
        """(family, address, v6only) sockets a rule needs: passt listens on :: and 0.0.0.0."""
        if rule.address is not None:
            family = 6 if ":" in rule.address else 4
            if (family == 4 and self.net.ip4 is None) or (family == 6 and self.net.ip6 is None):
                raise ForwardError("InvalidArgument",
                                   f"address {rule.address}: IPv{family} is disabled")
            return [(family, rule.address, True)]
        if self.net.ip6 is None:
            return [(4, "0.0.0.0", False)]
        if self.net.ip4 is None:
            return [(6, "::", True)]
        return [(6, "::", False)]  # one dual-stack socket takes both families

    def _open_listeners(self, fwd: Forward) -> None:
        rule = fwd.rule
        stream = rule.proto == "tcp"
        targets = self._listen_addresses(rule)
        failures: list[str] = []
        for port in rule.ports():
            for family, address, v6only in targets:
                if self._listener_count >= self.max_listeners:
                    raise ForwardError("InvalidArgument",
                                       f"{rule.proto} {format_rule(rule)}: listener limit "
                                       f"reached (limits.max_listeners = {self.max_listeners})")
                try:
                    sock = self._listener(family, address, port, v6only, stream, rule.ifname)
                except OSError as e:
                    if rule.weak and e.errno not in (errno.EMFILE, errno.ENFILE):
                        failures.append(f"{port}: {e.strerror}")
                        continue
                    kind = {errno.EADDRINUSE: "AddressInUse", errno.EACCES: "AccessDenied",
                            errno.EPERM: "AccessDenied"}.get(e.errno or 0, "InvalidArgument")
                    hint = " (ports below 1024 need CAP_NET_BIND_SERVICE)" \
                        if kind == "AccessDenied" and port < 1024 else ""
                    raise ForwardError(kind, f"cannot listen on {rule.proto} {address} port "
                                             f"{port}: {e.strerror}{hint}") from e
                fwd.listeners.append(sock)
                self._watch(fwd, sock)
        if rule.weak and not fwd.listeners:
            raise ForwardError("AddressInUse",
                               f"{rule.proto} {format_rule(rule)}: no port could be bound")
        if failures:
            log.debug("forward %s: %d ports skipped (%s ...)", format_rule(rule), len(failures),
                      failures[0])

    def _listener(self, family: int, address: str, port: int, v6only: bool, stream: bool,
                  ifname: str | None) -> socket.socket:
        af = family_of(family)
        sock = self.sockets.stream(af) if stream else self.sockets.datagram(af)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if af == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            if ifname:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            if not stream:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_BUFFER)
            sock.bind((address, port))
            if stream:
                sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        return sock

    def _watch(self, fwd: Forward, sock: socket.socket) -> None:
        self._listener_count += 1
        self.loop.add_reader(sock.fileno(), self._accept if fwd.rule.proto == "tcp"
                             else self._on_datagrams, fwd, sock)

    def _close_listeners(self, fwd: Forward) -> None:
        for sock in fwd.listeners:
            self.loop.remove_reader(sock.fileno())
            sock.close()
            self._listener_count -= 1
        fwd.listeners.clear()

    def _accept(self, fwd: Forward, lsock: socket.socket) -> None:
        now = self.loop.time()
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                # EMFILE, ENFILE, ENOBUFS: the connection stays queued and the listener
                # readable: rest instead of spinning
                self._drop_log(logging.WARNING, "accept",
                               "forward %d: cannot accept (%s): pausing it for %g s", fwd.id,
                               e.strerror, ACCEPT_PAUSE)
                self.loop.remove_reader(lsock.fileno())
                self.loop.call_later(ACCEPT_PAUSE, self._resume, fwd, lsock)
                break
            self._on_accept(fwd, lsock, sock, peer, now)
        self._settle(now)

    def _resume(self, fwd: Forward, lsock: socket.socket) -> None:
        if self._by_id.get(fwd.id) is fwd and lsock in fwd.listeners:
            self.loop.add_reader(lsock.fileno(), self._accept, fwd, lsock)
