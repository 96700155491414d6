"""UDP flows: guest datagrams carried by connected host sockets, with conntrack-like expiry.

Design (passt's udp_flow.c): a flow is the 4-tuple seen from the guest. For a flow the
guest starts, the loop opens a host socket bound to the guest's own source port when it
can (so the peer sees the port the guest chose) and connect()ed to the target, so the
kernel delivers only that flow's replies to it. For a flow a host peer starts through a
forward, datagrams arrive on the forward's listening socket and the guest's replies leave
through that same socket with sendto() to the peer: the peer sees replies from the port it
wrote to.

Expiry follows the kernel's conntrack defaults that passt copies: 30 s for one-way or
single request/response flows, 120 s once the flow looks like a stream (traffic both ways
and more than two datagrams in all). Every datagram restarts the clock.

This module keeps the flow's counters and deadline; the loop does the socket work.

Not done here: passt's per-port socket maps (gone upstream too), multicast group joins,
UDP-Lite, and GSO/GRO batching.
"""

from __future__ import annotations

from .flow import Flow, FlowKey

DEFAULT_TIMEOUT = 30.0
DEFAULT_STREAM_TIMEOUT = 120.0


class UdpFlow(Flow):
    __slots__ = ("datagrams_from_guest", "datagrams_to_guest", "last_activity", "last_length",
                 "stream_timeout", "timeout")

    proto_name = "udp"

    def __init__(self, key: FlowKey, origin: str, now: float, timeout: float = DEFAULT_TIMEOUT,
                 stream_timeout: float = DEFAULT_STREAM_TIMEOUT) -> None:
        super().__init__(key, origin, now)
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.datagrams_from_guest = 0
        self.datagrams_to_guest = 0
        self.last_activity = now
        self.last_length = 0  # of the guest's last datagram, for ICMP errors quoting it
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

    def _arm(self) -> None:
        self.deadline = self.last_activity + (
            self.stream_timeout if self.is_stream else self.timeout
        )

    def handle_timer(self, now: float) -> bool:
        """True when the flow has expired (the loop then closes it)."""
        self._arm()
        return now >= self.deadline

    def state_name(self) -> str:
        return "STREAM" if self.is_stream else "ACTIVE"
