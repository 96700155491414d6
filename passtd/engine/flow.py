"""The flow table: every guest<->host conversation (TCP connection, UDP flow, ping sequence).

Design: a flow is keyed from the guest's point of view, `(proto, guest_addr, guest_port,
peer_addr, peer_port)`, where `peer_addr` is the address as the guest sees it (the gateway
stands for host loopback). The same key serves frames from the guest (source, destination)
and traffic from the host (mapped back), so both directions find the flow with one dict
lookup. Each flow also has a small integer id for the D-Bus API and logs; ids grow
monotonically (wrapping at 2^32), so a listing never shows a recycled id for a new flow.

The table enforces the configured cap on flows: `full` tells the event loop to refuse a new
flow (RST, ICMP unreachable) rather than grow without bound.

A restart carries flows to the next process (handover.py): each flow class names in
`HANDOVER_FIELDS` the attributes that make it up, and `FlowTable.adopt` files a flow
under the id it already had.

Not done here: passt's fixed 2^17 static array and siphash (Python's dict already hashes
with SipHash and grows as needed), and flow migration to another host.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Final

GUEST: Final = "guest"  # the guest opened the flow
HOST: Final = "host"  # a host peer opened it, through a port forward
# counts (bytes, datagrams, retries), forward ids: none gets near
COUNTER_MAX: Final = (1 << 63) - 1
ID_MASK: Final = 0xFFFFFFFF  # flow ids wrap at 32 bits (D-Bus shows them as "u")

FlowKey = tuple[int, bytes, int, bytes, int]

A_CLOSE: Final = 1 << 7  # from handle_timer: the flow is over (tcp.A_CLOSE is the same bit)


def addr_text(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))


class Flow:
    """State every flow shares; protocol cores (tcp, udp, icmp) subclass it.

    `sock`, `sockaddr`, `read_pending`, `host_shut` and `timer_entry` belong to the socket
    halves and the timers (the protocol cores never use them): the host socket of the flow,
    the host address datagrams go to when the socket is not connected (ping sockets, replies
    through a UDP forward's listener), whether a read stopped before the socket was drained
    and whether the peer's FIN was seen (tcp_peek.py: Wakeups), and the flow's entry in the
    timer heap (timers.py).

    Timer contract, the same for every kind of flow: `deadline` says when `handle_timer`
    wants to run (None: never); `handle_timer(now)` returns actions, among which A_CLOSE
    ends the flow, and leaves the next `deadline`.
    """

    __slots__ = (
        "bytes_from_guest",
        "bytes_to_guest",
        "created",
        "deadline",
        "forward_id",
        "host_shut",
        "id",
        "key",
        "origin",
        "read_pending",
        "sock",
        "sockaddr",
        "timer_entry",
    )

    @property
    def proto_name(self) -> str:
        return "?"

    # what a restart carries to the next process (handover.py), beside the key, the
    # socket and `sockaddr`; every value is an int, a float, a bool, a str or None
    HANDOVER_FIELDS: ClassVar[tuple[str, ...]] = (
        "id", "created", "bytes_from_guest", "bytes_to_guest", "deadline", "forward_id")
    # the numbers a carried field may hold (bounds included; floats must also be finite):
    # the next process refuses a flow with any other, which its next segment, read or
    # timer would trip on (a shift by a negative count, a division by zero, a header
    # field too small for it)
    HANDOVER_LIMITS: ClassVar[Mapping[str, tuple[float, float]]] = {
        "id": (1, ID_MASK), "bytes_from_guest": (0, COUNTER_MAX),
        "bytes_to_guest": (0, COUNTER_MAX), "forward_id": (0, COUNTER_MAX),
    }

    def __init__(self, key: FlowKey, origin: str, now: float) -> None:
        self.id = 0
        self.key = key
        self.origin = origin
        self.created = now
        self.bytes_from_guest = 0
        self.bytes_to_guest = 0
        self.deadline: float | None = None  # when handle_timer() wants to run
        self.sock: Any = None
        self.sockaddr: tuple[Any, ...] | None = None
        self.read_pending = False
        self.host_shut = False
        self.timer_entry: list[Any] | None = None  # [deadline, seq, flow] in the timer heap
        self.forward_id: int | None = None

    @property
    def family(self) -> int:
        return 4 if len(self.key[1]) == 4 else 6

    @property
    def guest_addr(self) -> bytes:
        return self.key[1]

    @property
    def guest_port(self) -> int:
        return self.key[2]

    @property
    def peer_addr(self) -> bytes:
        return self.key[3]

    @property
    def peer_port(self) -> int:
        return self.key[4]

    def state_name(self) -> str:
        return "ACTIVE"

    def handle_timer(self, now: float) -> int:
        """The deadline passed: actions (A_CLOSE: the flow is over); the protocol cores
        implement it."""
        raise NotImplementedError

    def describe(self, now: float) -> dict[str, Any]:
        """The flow as ListFlows shows it."""
        return {
            "id": self.id,
            "protocol": self.proto_name,
            "state": self.state_name(),
            "origin": self.origin,
            "guest_address": addr_text(self.guest_addr),
            "guest_port": self.guest_port,
            "peer_address": addr_text(self.peer_addr),
            "peer_port": self.peer_port,
            "bytes_from_guest": self.bytes_from_guest,
            "bytes_to_guest": self.bytes_to_guest,
            "age_seconds": max(0.0, now - self.created),
        }

    def __repr__(self) -> str:
        g = f"{addr_text(self.guest_addr)}:{self.guest_port}"
        p = f"{addr_text(self.peer_addr)}:{self.peer_port}"
        return f"<{self.proto_name} flow {self.id} {self.origin} {g} <-> {p} {self.state_name()}>"


class FlowTable:
    def __init__(self, max_flows: int) -> None:
        self.max_flows = max_flows
        self._by_key: dict[FlowKey, Flow] = {}
        self._by_id: dict[int, Flow] = {}
        self._next_id = 1
        self.on_add: Callable[[Flow], None] | None = None  # a new flow (not an adopted one)
        self.opened = 0  # flows added since the start (a counter: statistics)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._by_id.values()))

    @property
    def by_key(self) -> dict[FlowKey, Flow]:
        """The key index itself, for the frame loop's one lookup per segment: read it,
        never change it (`add` and `remove` keep both indexes in step)."""
        return self._by_key

    def page(self, after_id: int, count: int) -> list[Flow]:
        """Up to `count` flows with ids above `after_id`, in id order: one page of a
        listing that must not hold the loop for long. The table's order is id order (ids
        grow as flows are added; after 2^32 flows they wrap, and a listing that spans the
        wrap may miss the flows opened during it). Costs a copy of the ids, at C speed."""
        ids = list(self._by_id)
        start = bisect.bisect_right(ids, after_id)
        by_id = self._by_id
        return [by_id[i] for i in ids[start : start + count]]

    def problems(self) -> list[str]:
        """Where the two indexes disagree (the fuzz targets check after every step)."""
        out = []
        if len(self._by_id) != len(self._by_key):
            out.append(f"{len(self._by_id)} flows by id, {len(self._by_key)} by key")
        out += [f"{flow!r} misfiled" for flow_id, flow in self._by_id.items()
                if flow.id != flow_id or self._by_key.get(flow.key) is not flow]
        return out

    @property
    def full(self) -> bool:
        return len(self._by_id) >= self.max_flows

    def get(self, key: FlowKey) -> Flow | None:
        return self._by_key.get(key)

    def by_id(self, flow_id: int) -> Flow | None:
        return self._by_id.get(flow_id)

    @property
    def next_id(self) -> int:
        """The id the next flow gets (a restart carries it over, so ids never repeat)."""
        return self._next_id

    @next_id.setter
    def next_id(self, value: int) -> None:
        self._next_id = value & ID_MASK

    def adopt(self, flow: Flow) -> bool:
        """File a flow under the id it already has (a restart's); False if that id or key
        is taken, or the id is 0."""
        if not flow.id or flow.id in self._by_id or flow.key in self._by_key:
            return False
        self._by_id[flow.id] = flow
        self._by_key[flow.key] = flow
        return True

    def add(self, flow: Flow) -> None:
        while self._next_id in self._by_id or self._next_id == 0:
            self._next_id = (self._next_id + 1) & ID_MASK
        flow.id = self._next_id
        self._next_id = (self._next_id + 1) & ID_MASK
        self._by_id[flow.id] = flow
        self._by_key[flow.key] = flow
        self.opened += 1
        if self.on_add is not None:
            self.on_add(flow)

    def remove(self, flow: Flow) -> None:
        if self._by_id.pop(flow.id, None) is flow and self._by_key.get(flow.key) is flow:
            del self._by_key[flow.key]
