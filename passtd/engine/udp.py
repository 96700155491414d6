"""UDP flows: guest datagrams carried by connected host sockets, with conntrack-like expiry.

Design (passt's udp_flow.c): a flow is the 4-tuple seen from the guest. For a flow the
guest starts, the loop opens a host socket connect()ed to the target, so the kernel
delivers only that flow's replies to it. For a flow a host peer starts through a
forward, datagrams arrive on the forward's listening socket and the guest's replies leave
through that same socket with sendto() to the peer: the peer sees replies from the port it
wrote to.

Source ports. passt binds every such socket to the guest's own source port (the peer
sees the port the guest chose, which some protocols care about: SIP, IKE NAT-T, games),
and fails the flow when it cannot. That lets a guest squat host ports: a host service
that starts later cannot bind a port a guest flow holds, and a guest sweeping source
ports holds as many as it likes. We keep the port only where that is harmless
(`SourcePortRule`), never where the host may need it:
- below 1024: the host's system services (53, 123, 500...), even where the instance
  could bind them (CAP_NET_BIND_SERVICE);
- in the ephemeral range (ip_local_port_range): the host's own outgoing sockets draw
  from it;
- in ip_local_reserved_ports: the admin's way to keep a port for a service; also the
  way to keep one away from guests;
- a host port of a UDP forward (a forward added later takes its ports back from the
  guest flows holding them);
and for at most `limits.udp_preserved_ports` flows at a time. Elsewhere, and beyond that
cap, the socket takes a port the kernel chooses (an ephemeral one) instead of failing;
datagrams to the guest always carry its own port, whatever the host side used. The
sysctls are read when the instance starts. Nor do we set SO_REUSEADDR on these sockets
as passt does: with it, a guest flow could bind a port a host service holds with
SO_REUSEADDR too and, being connected, take that service's datagrams from its peer.

Expiry follows the kernel's conntrack defaults that passt copies: 30 s for one-way or
single request/response flows, 120 s once the flow looks like a stream (traffic both ways
and more than two datagrams in all). Every datagram restarts the clock.

This module keeps the flow's counters and deadline, and the source port rule; the loop
does the socket work and counts the ports held.

Not done here: passt's per-port socket maps (gone upstream too), multicast group joins,
UDP-Lite, and GSO/GRO batching.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from .flow import A_CLOSE, COUNTER_MAX, Flow, FlowKey

DEFAULT_TIMEOUT: Final = 30.0
DEFAULT_STREAM_TIMEOUT: Final = 120.0
FIRST_UNPRIVILEGED_PORT: Final = 1024


class SourcePortRule(NamedTuple):
    """Which guest source ports a flow may keep on the host (see the module docstring);
    the ports of forwards and the cap are the loop's to check."""

    ephemeral: tuple[int, int] = (32768, 60999)  # ip_local_port_range (Linux's default)
    reserved: tuple[tuple[int, int], ...] = ()  # ip_local_reserved_ports

    def allows(self, port: int) -> bool:
        first, last = self.ephemeral
        return (port >= FIRST_UNPRIVILEGED_PORT and not first <= port <= last
                and not any(low <= port <= high for low, high in self.reserved))


class UdpFlow(Flow):
    __slots__ = ("datagrams_from_guest", "datagrams_to_guest", "holds_guest_port",
                 "last_activity", "last_length", "stream_timeout", "timeout")

    @property
    def proto_name(self) -> str:
        return "udp"

    HANDOVER_FIELDS = (*Flow.HANDOVER_FIELDS, "datagrams_from_guest", "datagrams_to_guest",
                       "holds_guest_port", "last_activity", "last_length", "stream_timeout",
                       "timeout")
    HANDOVER_LIMITS = {**Flow.HANDOVER_LIMITS, "datagrams_from_guest": (0, COUNTER_MAX),
                       "datagrams_to_guest": (0, COUNTER_MAX), "last_length": (0, 0xFFFF)}

    def __init__(self, key: FlowKey, origin: str, now: float, timeout: float = DEFAULT_TIMEOUT,
                 stream_timeout: float = DEFAULT_STREAM_TIMEOUT) -> None:
        super().__init__(key, origin, now)
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.datagrams_from_guest = 0
        self.datagrams_to_guest = 0
        self.last_activity = now
        self.last_length = 0  # of the guest's last datagram, for ICMP errors quoting it
        self.holds_guest_port = False  # its host socket is bound to the guest's source port
        self._arm()

    @property
    def is_stream(self) -> bool:
        return (
            self.datagrams_from_guest > 0
            and self.datagrams_to_guest > 0
            and self.datagrams_from_guest + self.datagrams_to_guest > 2
        )

    def from_guest(self, nbytes: int, now: float) -> None:
        self.datagrams_from_guest += 1
        self.bytes_from_guest += nbytes
        self.last_length = nbytes
        self.last_activity = now
        self._arm()

    def to_guest(self, nbytes: int, now: float) -> None:
        self.datagrams_to_guest += 1
        self.bytes_to_guest += nbytes
        self.last_activity = now
        self._arm()

    def _arm(self) -> float:
        at = self.deadline = self.last_activity + (
            self.stream_timeout if self.is_stream else self.timeout
        )
        return at

    def handle_timer(self, now: float) -> int:
        """A_CLOSE when the flow has expired, else 0 (and the next deadline)."""
        return A_CLOSE if now >= self._arm() else 0

    def state_name(self) -> str:
        return "STREAM" if self.is_stream else "ACTIVE"
