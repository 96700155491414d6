"""Live flows across a restart: the state one process hands the next, and taking it back.

Design: when the instance restarts (systemctl restart, an upgrade, or `passtd run`
re-executing itself), the process that stops writes a state document (`write`) and hands
over, beside it, the host sockets the document numbers: every forward's listeners, then
every flow's own socket. The service carries both (systemd's FD store, or exec). The next
process reads the document before it opens anything (`read`), so that forwards take back
their listeners (they never stopped listening: connections that arrive meanwhile wait in
the backlog) and, once the forwards are set up, flows take back their sockets, ids,
sequence numbers, windows, counters and deadlines (`resume`). Deadlines are on the
monotonic clock, which both processes share.

Nothing is lost, because nothing of a flow's data lives in the process: host data the
guest has not acknowledged is still in the socket's receive queue (tcp_peek.py only
peeks), so a TCP flow rewinds to the last acknowledged byte and sends it again; guest
data is acknowledged only once the socket took it, so what the old process did not write
the guest sends again. Out-of-order data held for the guest is dropped (the guest
retransmits it), and every TCP flow sends the guest a window update (tcp.py's
`after_handover`). Datagrams that arrive meanwhile wait in their sockets.

The document is JSON:

    {"format": 1, "written_at": <monotonic seconds>, "started_at": <Unix time the
     instance first started>, "next_flow_id": <n>,
     "next_forward_id": <n>, "guest": {"mac": <hex>, "addr4": <hex>, ...},
     "forwards": [{"id", "origin", "rule": {ForwardRule's fields}, "connections",
                   "refused", "from_guest_closed", "to_guest_closed", "bytes_closed"
                   (their sum, as the first writers had only it), "listeners": [<socket
                   index>...]}],
     "flows": [{"proto", "origin", "key": [<guest addr hex>, <guest port>, <peer addr hex>,
                <peer port>], "socket": <index> | null, "listener": [<forward id>, <index
                among its listeners>] | null, "sockaddr": [...] | null,
                "fields": {<the flow class's HANDOVER_FIELDS>}}]}

Compatibility: a reader takes every `format` in FORMATS. Within a format, fields a reader
does not know are ignored and fields it misses keep the flow's defaults, so a newer
version adds fields without a new format; a change of meaning takes a new format, and the
reader keeps reading the old one (tests/unit/test_handover.py keeps a document of each
format as a fixture). A document that cannot be read (a format this version does not
know, corrupt) costs the flows only: their sockets close with a reset, the guest's next
segment of each meets a reset, and one line says so; a flow entry that does not make
sense costs that flow (a field of the wrong type, a float that is not finite, a number
outside what the flow's class allows: its HANDOVER_LIMITS).

Not done here: carrying the descriptors (the service), TCP_REPAIR (it needs
CAP_NET_ADMIN, and the kernel socket already holds all we need), flows that move to
another host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import struct
from collections.abc import Callable
from typing import Any, Final

from . import events, packet
from .context import EngineContext, SocketHalf
from .flow import GUEST, HOST, Flow, FlowKey
from .forwards import Forward, Forwards
from .fwd import ForwardRule, SpecError
from .icmp import PingFlow
from .tcp import TcpConn
from .udp import UdpFlow

log = logging.getLogger("passtd.engine")

FORMAT: Final = 1  # what this version writes
FORMATS: Final = {1}  # what it reads

_SCALARS: Final = (int, float, str, bool, type(None))


class HandoverError(Exception):
    """A state document that cannot be read."""


def _blank(proto: int, key: FlowKey, origin: str, created: float) -> Flow:
    """A flow of the kind `proto` names, with defaults its fields then replace."""
    if proto == packet.IPPROTO_TCP:
        return TcpConn(key, origin, created, 0, 0)
    if proto == packet.IPPROTO_UDP:
        return UdpFlow(key, origin, created)
    if proto in (packet.IPPROTO_ICMP, packet.IPPROTO_ICMPV6):
        return PingFlow(key, created)
    raise HandoverError(f"unknown protocol {proto}")


def _addr(text: Any, what: str) -> bytes:
    addr = bytes.fromhex(text) if isinstance(text, str) else b""
    if len(addr) not in (4, 16):
        raise HandoverError(f"bad {what} address {text!r}")
    return addr


def _hex(addr: bytes | None) -> str | None:
    return addr.hex() if addr is not None else None


def _port(value: Any) -> int:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise HandoverError(f"bad port {value!r}")
    return value


class Handover:
    """Writes the state of one engine, and takes back the state of the previous one."""

    def __init__(self, ctx: EngineContext, forwards: Forwards,
                 halves: dict[int, SocketHalf]) -> None:
        self.ctx = ctx
        self.forwards = forwards
        self.halves = halves
        self.written_at: float | None = None  # when the previous process wrote its state
        self._flows: list[Any] = []  # flow entries waiting for `resume`
        self._socks: list[socket.socket | None] = []

    # -- the process that stops ---------------------------------------------------------------

    def write(self, now: float, carry: Callable[[list[socket.socket]], int]) -> bytes:
        """The state document; `carry` takes the sockets it numbers and returns how many
        the next process will get (the first ones). Flows whose socket does not make it
        are reset here, both ways, and left out; so are forward listeners, which the
        next process then opens anew."""
        socks: list[socket.socket] = []

        def index(sock: socket.socket) -> int:
            socks.append(sock)
            return len(socks) - 1

        forwards = [(fwd, [index(sock) for sock in fwd.listeners]) for fwd in self.forwards]
        flows = [(flow, None if self._borrows_listener(flow) else index(flow.sock))
                 for flow in self.ctx.flows]
        carried = carry(socks)
        lost = [flow for flow, i in flows if i is not None and i >= carried]
        if lost:
            log.warning("the restart cannot carry %d of %d flows (no room for their "
                        "sockets): they are reset", len(lost), len(flows))
            for flow in lost:
                self.halves[flow.key[0]].reset(flow, now)
        seen = self.ctx.seen
        doc = {
            "format": FORMAT,
            "written_at": now,
            "started_at": self.ctx.started_at,
            "next_flow_id": self.ctx.flows.next_id,
            "next_forward_id": self.forwards.next_id,
            "guest": {"mac": _hex(seen.mac), "addr4": _hex(seen.addr4),
                      "addr6": _hex(seen.addr6), "addr6_ll": _hex(seen.addr6_ll)},
            "forwards": [self._forward_entry(fwd, listeners) for fwd, listeners in forwards
                         if all(i < carried for i in listeners)],
            "flows": [self._flow_entry(flow, i) for flow, i in flows
                      if flow.sock is not None and (i is None or i < carried)],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @staticmethod
    def _borrows_listener(flow: Flow) -> bool:
        """Inbound UDP flows answer through their forward's listener (udp_sock.py)."""
        return flow.key[0] == packet.IPPROTO_UDP and flow.origin == HOST

    @staticmethod
    def _forward_entry(fwd: Forward, listeners: list[int]) -> dict[str, Any]:
        return {"id": fwd.id, "origin": fwd.origin, "rule": fwd.rule._asdict(),
                "connections": fwd.connections, "refused": fwd.refused,
                "from_guest_closed": fwd.from_guest_closed,
                "to_guest_closed": fwd.to_guest_closed,
                "bytes_closed": fwd.from_guest_closed + fwd.to_guest_closed,
                "listeners": listeners}

    def _flow_entry(self, flow: Flow, sock_index: int | None) -> dict[str, Any]:
        listener = None
        if sock_index is None:
            fwd = self.forwards.get(flow.forward_id or 0)
            if fwd is not None and flow.sock in fwd.listeners:
                listener = [fwd.id, fwd.listeners.index(flow.sock)]
        proto, guest, gport, peer, pport = flow.key
        return {"proto": proto, "origin": flow.origin,
                "key": [guest.hex(), gport, peer.hex(), pport],
                "socket": sock_index, "listener": listener,
                "sockaddr": list(flow.sockaddr) if flow.sockaddr is not None else None,
                "fields": {name: getattr(flow, name) for name in type(flow).HANDOVER_FIELDS}}

    # -- the process that starts ----------------------------------------------------------------

    def read(self, data: bytes, socks: list[socket.socket | None]) -> bool:
        """Take the previous process's document and sockets (before any forward is
        opened). False, with the sockets closed and one log line, when it cannot be
        read."""
        self._socks = socks
        forwards: list[Forward | None] = []
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise HandoverError("not a JSON object")
            if doc.get("format") not in FORMATS:
                raise HandoverError(f"format {doc.get('format')!r}, this version reads "
                                    f"{sorted(FORMATS)}")
            next_flow_id, next_forward_id = doc.get("next_flow_id"), doc.get("next_forward_id")
            written_at, flows = doc.get("written_at"), doc.get("flows")
            guest, entries = doc.get("guest"), doc.get("forwards")
            if not (isinstance(next_flow_id, int) and isinstance(next_forward_id, int)
                    and isinstance(written_at, (int, float)) and isinstance(flows, list)
                    and isinstance(guest, dict) and isinstance(entries, list)):
                raise HandoverError("bad next_flow_id, next_forward_id, written_at, guest, "
                                    "forwards or flows")
            for entry in entries:
                forwards.append(self._forward(entry))
            kept = [fwd for fwd in forwards if fwd is not None]
            if len({fwd.id for fwd in kept}) < len(kept) \
                    or len({fwd.rule for fwd in kept}) < len(kept):
                raise HandoverError("two forwards with one id or one rule")
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, SpecError,
                HandoverError) as e:
            log.warning("the previous process's state cannot be read (%s): its %d flows are "
                        "reset", e, sum(1 for sock in socks if sock is not None))
            close_all(socks, reset=True)
            for fwd in forwards:
                close_all(list(fwd.listeners) if fwd is not None else [], reset=False)
            return False
        self._take_guest(guest)
        started_at = doc.get("started_at")
        if isinstance(started_at, (int, float)) and not isinstance(started_at, bool) \
                and 0 < started_at <= self.ctx.started_at:
            self.ctx.started_at = float(started_at)
        self.forwards.inherit(kept, next_forward_id)
        self.ctx.flows.next_id = max(self.ctx.flows.next_id, next_flow_id & 0xFFFFFFFF)
        self.written_at = float(written_at)
        self._flows = flows
        return True

    def _take_guest(self, guest: dict[str, Any]) -> None:
        """What the guest was seen using (what does not read is learnt again from its
        next frames)."""
        seen = self.ctx.seen
        for name, size in (("mac", 6), ("addr4", 4), ("addr6", 16), ("addr6_ll", 16)):
            text = guest.get(name)
            if isinstance(text, str) and len(text) == 2 * size:
                try:
                    setattr(seen, name, bytes.fromhex(text))
                except ValueError:
                    continue

    def _forward(self, entry: dict[str, Any]) -> Forward | None:
        """An inherited forward, or None where a listener did not arrive (the new process
        opens that forward anew, once the others are closed)."""
        rule = ForwardRule(**entry["rule"])
        listeners = [self._take(i) for i in entry["listeners"]]
        if any(sock is None for sock in listeners):
            close_all(listeners, reset=False)
            return None
        fwd = Forward(int(entry["id"]), rule, str(entry["origin"]),
                      [sock for sock in listeners if sock is not None])
        fwd.connections = int(entry.get("connections", 0))
        fwd.refused = int(entry.get("refused", 0))
        if "from_guest_closed" in entry:
            fwd.from_guest_closed = int(entry["from_guest_closed"])
            fwd.to_guest_closed = int(entry.get("to_guest_closed", 0))
        else:  # a writer without the split: its total counts as from the guest
            fwd.from_guest_closed = int(entry.get("bytes_closed", 0))
        return fwd

    def _take(self, index: Any) -> socket.socket | None:
        """The socket numbered `index`, once: taken out of the list."""
        pool = self._socks
        if not isinstance(index, int) or not 0 <= index < len(pool):
            return None
        sock, pool[index] = pool[index], None
        return sock

    def resume(self, now: float) -> None:
        """Take back the flows (after the forwards are set up, as inbound UDP flows answer
        through their listener), and close what nobody took."""
        if self.written_at is None:
            return
        self.forwards.drop_unclaimed()
        resumed = reset = 0
        for entry in self._flows:
            try:
                flow = self._flow(entry)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
                    HandoverError) as e:
                log.debug("a flow of the previous process cannot be taken back: %s", e)
                reset += 1
                continue
            half = self.halves[flow.key[0]]
            if flow.sock is not None and self.ctx.flows.adopt(flow):
                half.adopt(flow, now)
                resumed += 1
                continue
            reset += 1
            if flow.sock is None:
                half.reset(flow, now)  # the guest learns now, not at its next segment
            elif not self._borrows_listener(flow):
                close_all([flow.sock], reset=True)
        reset += sum(1 for sock in self._socks if sock is not None)
        close_all(self._socks, reset=True)
        self._flows, self._socks = [], []
        written_at = self.written_at
        log.info("took over %d flows and %d forwards from the previous process%s (state "
                 "written %.0f ms ago)", resumed, len(self.forwards), f", {reset} reset"
                 if reset else "", (now - written_at) * 1000,
                 extra=events.fields(events.FLOWS_TAKEN_OVER))
        if self.ctx.link.connected:  # the restart's gap, as the guest sees it
            self.ctx.link.input_watch = lambda at: log.info(
                "first guest frame %.0f ms after the previous process's last",
                (at - written_at) * 1000)

    def _flow(self, entry: dict[str, Any]) -> Flow:
        proto = entry["proto"]
        guest_hex, guest_port, peer_hex, peer_port = entry["key"]
        key = (proto, _addr(guest_hex, "guest"), _port(guest_port), _addr(peer_hex, "peer"),
               _port(peer_port))
        if len(key[1]) != len(key[3]):
            raise HandoverError("guest and peer addresses of different families")
        fields = entry["fields"]
        if entry["origin"] not in (GUEST, HOST):
            raise HandoverError(f"bad origin {entry['origin']!r}")
        flow = _blank(proto, key, entry["origin"], float(fields["created"]))
        limits = type(flow).HANDOVER_LIMITS
        for name in type(flow).HANDOVER_FIELDS:
            if name in fields:
                setattr(flow, name, _checked(name, fields[name], getattr(flow, name),
                                             limits.get(name)))
        sockaddr = entry.get("sockaddr")
        if sockaddr is not None:
            if not (isinstance(sockaddr, list) and len(sockaddr) in (2, 4)
                    and isinstance(sockaddr[0], str)
                    and all(isinstance(n, int) and not isinstance(n, bool) for n in sockaddr[1:])):
                raise HandoverError(f"bad sockaddr {sockaddr!r}")
            _port(sockaddr[1])
            flow.sockaddr = tuple(sockaddr)
        listener = entry.get("listener")
        if (listener is not None) != self._borrows_listener(flow):
            raise HandoverError("only inbound UDP flows answer through a forward's listener")
        if listener is not None:
            fwd = self.forwards.get(int(listener[0]))
            flow.sock = fwd.listeners[int(listener[1])] if fwd is not None else None
        else:
            flow.sock = self._take(entry["socket"])
        if flow.sock is not None:
            flow.sock.setblocking(False)
        return flow


def _checked(name: str, value: Any, default: Any,
             limits: tuple[float, float] | None) -> Any:
    """`value` for the field `name` if it has the type the field's default has (a number
    where the default is None, which stands for "no deadline" or "none yet"), is finite,
    and lies within the field's `limits` (the flow class's HANDOVER_LIMITS)."""
    if not isinstance(value, _SCALARS):
        raise HandoverError(f"{name}: {value!r}")
    if default is None:
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = type(value) is type(default)
    if ok and isinstance(value, float):
        ok = math.isfinite(value)
    if ok and limits is not None and value is not None:
        ok = limits[0] <= value <= limits[1]
    if not ok:
        raise HandoverError(f"{name}: {value!r}")
    return value


def close_all(socks: list[socket.socket | None], reset: bool) -> None:
    """Close sockets nobody took; with `reset`, a connected TCP socket's peer sees a reset
    (its flow is gone), not an end of stream it would take for a complete transfer."""
    for sock in socks:
        if sock is None:
            continue
        if reset:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    socks[:] = [None] * len(socks)
