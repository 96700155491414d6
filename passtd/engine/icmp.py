"""ICMP and ICMPv6: echo through unprivileged ping sockets, and errors for the guest.

Design (passt's icmp.c): each echo identifier the guest uses is a flow with its own
"ping" socket (SOCK_DGRAM + IPPROTO_ICMP/ICMPV6), which needs no privilege, only
net.ipv4.ping_group_range covering our group. The socket is bound with the guest's
identifier as its port so the identifier survives; where the kernel will not allow that,
it picks one and replies are rewritten back to the guest's. Sequence numbers and payload
pass untouched. A flow expires after 60 s without traffic.

Errors we generate for the guest: destination unreachable (port unreachable when a UDP
peer refused, host/admin unreachable when we cannot or may not open a flow), quoting the
guest's packet as RFC 792 and RFC 4443 require (IP header + the first 8 bytes of L4).

Not done here: other ICMP types from the guest (dropped, as in passt), ICMP errors from
the host network for TCP (the host socket's error becomes a RST instead).
"""

from __future__ import annotations

import struct
from typing import Final

from . import packet
from .flow import A_CLOSE, Flow, FlowKey

ICMP_ECHO_REPLY: Final = 0
ICMP_DEST_UNREACH: Final = 3
ICMP_ECHO_REQUEST: Final = 8
ICMP_PORT_UNREACH: Final = 3
ICMP_HOST_UNREACH: Final = 1
ICMP_ADMIN_PROHIBITED: Final = 13

ICMPV6_DEST_UNREACH: Final = 1
ICMPV6_ECHO_REQUEST: Final = 128
ICMPV6_ECHO_REPLY: Final = 129
ICMPV6_PORT_UNREACH: Final = 4
ICMPV6_ADDR_UNREACH: Final = 3
ICMPV6_ADMIN_PROHIBITED: Final = 1

DEFAULT_TIMEOUT: Final = 60.0
_ECHO: Final = struct.Struct("!BBHHH")


class PingFlow(Flow):
    __slots__ = ("last_activity", "timeout")
    HANDOVER_FIELDS = (*Flow.HANDOVER_FIELDS, "last_activity", "timeout")

    def __init__(self, key: FlowKey, now: float, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(key, "guest", now)
        self.timeout = timeout
        self.last_activity = now
        self.deadline = now + timeout

    @property
    def proto_name(self) -> str:
        return "icmp" if self.key[0] == packet.IPPROTO_ICMP else "icmpv6"

    @property
    def echo_id(self) -> int:
        return self.key[2]

    def touch(self, nbytes: int, to_guest: bool, now: float) -> None:
        if to_guest:
            self.bytes_to_guest += nbytes
        else:
            self.bytes_from_guest += nbytes
        self.last_activity = now
        self.deadline = now + self.timeout

    def handle_timer(self, now: float) -> int:
        """A_CLOSE when the flow has expired, else 0 (and the next deadline)."""
        at = self.deadline = self.last_activity + self.timeout
        return A_CLOSE if now >= at else 0


def parse_echo_request(pkt: packet.Packet) -> tuple[int, int] | None:
    """(identifier, sequence) of an echo request, or None for any other ICMP message."""
    if len(pkt.l4) < _ECHO.size:
        raise packet.Malformed("truncated ICMP header")
    msg_type, code, _csum, ident, seq = _ECHO.unpack_from(pkt.l4, 0)
    wanted = ICMP_ECHO_REQUEST if pkt.family == 4 else ICMPV6_ECHO_REQUEST
    if msg_type != wanted or code != 0:
        return None
    return ident, seq


def echo_reply_frame(flow: PingFlow, reply: bytes | memoryview, our_mac: bytes,
                     guest_mac: bytes) -> bytes | None:
    """The ping socket's reply, with the guest's identifier, as a frame for the guest."""
    if len(reply) < _ECHO.size:
        return None
    msg_type, code, _csum, _ident, seq = _ECHO.unpack_from(reply, 0)
    body = struct.pack("!HH", flow.echo_id, seq) + bytes(reply[_ECHO.size :])
    if flow.family == 4:
        if msg_type != ICMP_ECHO_REPLY:
            return None
        msg = packet.icmp4_message(ICMP_ECHO_REPLY, code, body)
        proto = packet.IPPROTO_ICMP
    else:
        if msg_type != ICMPV6_ECHO_REPLY:
            return None
        msg = packet.icmp6_message(flow.peer_addr, flow.guest_addr, ICMPV6_ECHO_REPLY, code, body)
        proto = packet.IPPROTO_ICMPV6
    return packet.ip_frame(guest_mac, our_mac, flow.peer_addr, flow.guest_addr, proto, msg)


def unreachable_frame(family: int, code: int, our_addr: bytes, quoted: bytes,
                      our_mac: bytes, guest_mac: bytes, guest_addr: bytes) -> bytes:
    """Destination unreachable from `our_addr`, quoting the start of the guest's packet."""
    if family == 4:
        msg = packet.icmp4_message(ICMP_DEST_UNREACH, code, bytes(4) + quoted[:28])
        return packet.ip_frame(guest_mac, our_mac, our_addr, guest_addr, packet.IPPROTO_ICMP, msg)
    msg = packet.icmp6_message(our_addr, guest_addr, ICMPV6_DEST_UNREACH, code,
                               bytes(4) + quoted[: 1280 - 48])
    return packet.ip_frame(guest_mac, our_mac, our_addr, guest_addr, packet.IPPROTO_ICMPV6, msg)


def quote_udp(guest: bytes, peer: bytes, guest_port: int, peer_port: int, length: int) -> bytes:
    """The IP + UDP headers of a guest datagram, rebuilt for an ICMP error to quote."""
    udp = struct.pack("!HHHH", guest_port, peer_port, packet.UDP_HLEN + length, 0)
    return packet.ip_header(guest, peer, packet.IPPROTO_UDP, len(udp) + length) + udp
