"""Packet codecs: Ethernet, IPv4, IPv6, UDP, TCP and ICMP headers, parsed and built.

Design: addresses travel through the engine as packed `bytes` (4 or 16 long): they hash
fast as flow-table keys and go straight into headers; text forms appear only in logs and
on the D-Bus API. `parse_ip` turns one guest frame into a `Packet` view for the control
paths (ARP, DHCP, NDP, ICMP, first segments of flows). The bulk TCP paths do not build
`Packet` objects; they unpack the fixed headers in place (see loop.py and tcp_buf.py).

Everything we send carries TTL/hop limit 255, IPv4 DF set and ID 0, as passt does, so a
guest's ping shows ttl=255.

Deliberately not handled: IP options beyond skipping them, IPv4/IPv6 fragments (dropped:
we never reassemble), IPv6 extension headers other than skipping hop-by-hop, routing and
destination options, jumbograms.
"""

from __future__ import annotations

import struct
from typing import Final

from . import checksum

ETH_HLEN: Final = 14
ETH_P_IP: Final = 0x0800
ETH_P_ARP: Final = 0x0806
ETH_P_IPV6: Final = 0x86DD
ETH_BROADCAST: Final = b"\xff" * 6
ETH_MIN_FRAME: Final = 60  # 802.3 minimum without FCS: we pad frames for the guest to this

IPPROTO_ICMP: Final = 1
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
IPPROTO_ICMPV6: Final = 58
IPV6_EXT_SKIPPABLE: Final = (0, 43, 60)  # hop-by-hop, routing, destination options
IPV6_FRAGMENT: Final = 44

IPV4_HLEN: Final = 20
IPV6_HLEN: Final = 40
UDP_HLEN: Final = 8
TCP_HLEN: Final = 20

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10

ETH: Final = struct.Struct("!6s6sH")
IPV4: Final = struct.Struct("!BBHHHBBH4s4s")
IPV6: Final = struct.Struct("!IHBB16s16s")
UDP: Final = struct.Struct("!HHHH")
TCP: Final = struct.Struct("!HHIIBBHHH")
ICMP_ECHO: Final = struct.Struct("!BBHHH")

IP4_ANY: Final = bytes(4)
IP4_BROADCAST: Final = b"\xff" * 4
IP6_ANY: Final = bytes(16)
IP6_ALL_NODES: Final = bytes.fromhex("ff020000000000000000000000000001")
IP6_ALL_ROUTERS: Final = bytes.fromhex("ff020000000000000000000000000002")


class Malformed(ValueError):
    """A guest frame that cannot be what it claims to be. Dropped with a debug log."""


class Packet:
    """One IP packet from a guest frame; `l4` is exactly the L4 bytes (padding trimmed)."""

    __slots__ = ("dst", "dst_mac", "family", "l4", "proto", "src", "src_mac", "ttl")

    def __init__(self, src_mac: bytes, dst_mac: bytes, family: int, src: bytes, dst: bytes,
                 proto: int, ttl: int, l4: memoryview) -> None:
        self.src_mac = src_mac
        self.dst_mac = dst_mac
        self.family = family  # 4 or 6
        self.src = src
        self.dst = dst
        self.proto = proto
        self.ttl = ttl
        self.l4 = l4

    def __repr__(self) -> str:
        return (f"Packet(IPv{self.family} {self.src.hex()} -> {self.dst.hex()}, proto "
                f"{self.proto}, ttl {self.ttl}, {len(self.l4)} bytes of L4)")


def parse_eth(frame: bytes | bytearray | memoryview) -> tuple[bytes, bytes, int]:
    """(dst_mac, src_mac, ethertype); VLAN tags are not ours to handle."""
    if len(frame) < ETH_HLEN:
        raise Malformed("frame shorter than an Ethernet header")
    return ETH.unpack_from(frame, 0)


def parse_ip(frame: memoryview) -> Packet:
    """Parse an IPv4 or IPv6 frame, trimming link-layer padding past the IP length."""
    dst_mac, src_mac, ethertype = parse_eth(frame)
    if ethertype == ETH_P_IP:
        return _parse_ipv4(frame, dst_mac, src_mac)
    if ethertype == ETH_P_IPV6:
        return _parse_ipv6(frame, dst_mac, src_mac)
    raise Malformed(f"ethertype 0x{ethertype:04x} is not IP")


def _parse_ipv4(frame: memoryview, dst_mac: bytes, src_mac: bytes) -> Packet:
    if len(frame) < ETH_HLEN + IPV4_HLEN:
        raise Malformed("truncated IPv4 header")
    vihl, _tos, total, _ident, frag, ttl, proto, _csum, src, dst = IPV4.unpack_from(
        frame, ETH_HLEN
    )
    if vihl >> 4 != 4:
        raise Malformed(f"IPv4 ethertype with IP version {vihl >> 4}")
    hlen = (vihl & 0xF) * 4
    if hlen < IPV4_HLEN or total < hlen:
        raise Malformed(f"IPv4 header length {hlen}, total length {total}")
    if ETH_HLEN + total > len(frame):
        raise Malformed(f"IPv4 total length {total} exceeds frame ({len(frame) - ETH_HLEN})")
    if frag & 0x3FFF:  # MF set or a fragment offset: we do not reassemble
        raise Malformed("IPv4 fragment")
    l4 = frame[ETH_HLEN + hlen : ETH_HLEN + total]
    return Packet(src_mac, dst_mac, 4, src, dst, proto, ttl, l4)


def _parse_ipv6(frame: memoryview, dst_mac: bytes, src_mac: bytes) -> Packet:
    if len(frame) < ETH_HLEN + IPV6_HLEN:
        raise Malformed("truncated IPv6 header")
    vtcfl, plen, nh, hop, src, dst = IPV6.unpack_from(frame, ETH_HLEN)
    if vtcfl >> 28 != 6:
        raise Malformed(f"IPv6 ethertype with IP version {vtcfl >> 28}")
    end = ETH_HLEN + IPV6_HLEN + plen
    if plen == 0 or end > len(frame):
        raise Malformed(f"IPv6 payload length {plen} does not fit the frame")
    off = ETH_HLEN + IPV6_HLEN
    while nh in IPV6_EXT_SKIPPABLE:
        if off + 8 > end:
            raise Malformed("truncated IPv6 extension header")
        nh, hdr_units = frame[off], frame[off + 1]
        off += (hdr_units + 1) * 8
    if nh == IPV6_FRAGMENT:
        raise Malformed("IPv6 fragment")
    if off > end:
        raise Malformed("IPv6 extension headers exceed the payload")
    return Packet(src_mac, dst_mac, 6, src, dst, nh, hop, frame[off:end])


def parse_udp(pkt: Packet) -> tuple[int, int, memoryview]:
    """(source port, destination port, payload) of a UDP packet."""
    if len(pkt.l4) < UDP_HLEN:
        raise Malformed("truncated UDP header")
    sport, dport, length, _csum = UDP.unpack_from(pkt.l4, 0)
    if length < UDP_HLEN or length > len(pkt.l4):
        raise Malformed(f"UDP length {length} does not fit ({len(pkt.l4)} bytes)")
    return sport, dport, pkt.l4[UDP_HLEN:length]


# -- building ------------------------------------------------------------------------------


def eth_header(dst_mac: bytes, src_mac: bytes, ethertype: int) -> bytes:
    return ETH.pack(dst_mac, src_mac, ethertype)


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, ttl: int = 255) -> bytes:
    hdr = bytearray(IPV4.pack(0x45, 0, IPV4_HLEN + payload_len, 0, 0x4000, ttl, proto, 0, src, dst))
    struct.pack_into("!H", hdr, 10, checksum.checksum(hdr))
    return bytes(hdr)


def ipv6_header(src: bytes, dst: bytes, nh: int, payload_len: int, flow_label: int = 0) -> bytes:
    return IPV6.pack(0x60000000 | (flow_label & 0xFFFFF), payload_len, nh, 255, src, dst)


def ip_header(src: bytes, dst: bytes, proto: int, payload_len: int) -> bytes:
    if len(src) == 4:
        return ipv4_header(src, dst, proto, payload_len)
    return ipv6_header(src, dst, proto, payload_len)


def ip_frame(dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, proto: int,
             l4: bytes) -> bytes:
    """A complete Ethernet frame around an L4 message whose checksum is already set."""
    ethertype = ETH_P_IP if len(src) == 4 else ETH_P_IPV6
    frame = eth_header(dst_mac, src_mac, ethertype) + ip_header(src, dst, proto, len(l4)) + l4
    if len(frame) < ETH_MIN_FRAME:
        frame += bytes(ETH_MIN_FRAME - len(frame))
    return frame


def udp_message(src: bytes, dst: bytes, sport: int, dport: int,
                payload: bytes | memoryview) -> bytes:
    """UDP header + payload with the checksum (never 0: 0xffff stands for it) filled in."""
    length = UDP_HLEN + len(payload)
    hdr = UDP.pack(sport, dport, length, 0)
    csum = checksum.finish(
        checksum.pseudo(src, dst, IPPROTO_UDP, length) + checksum.partial(hdr)
        + checksum.partial(payload)
    )
    return UDP.pack(sport, dport, length, csum or 0xFFFF) + bytes(payload)


def icmp4_message(msg_type: int, code: int, body: bytes | memoryview) -> bytes:
    """ICMPv4 message; `body` is everything after the checksum field."""
    head = bytes((msg_type, code, 0, 0))
    csum = checksum.finish(checksum.partial(head) + checksum.partial(body))
    return bytes((msg_type, code)) + csum.to_bytes(2, "big") + bytes(body)


def icmp6_message(src: bytes, dst: bytes, msg_type: int, code: int,
                  body: bytes | memoryview) -> bytes:
    """ICMPv6 message; the checksum covers the IPv6 pseudo-header."""
    length = 4 + len(body)
    head = bytes((msg_type, code, 0, 0))
    csum = checksum.finish(
        checksum.pseudo6(src, dst, IPPROTO_ICMPV6, length)
        + checksum.partial(head)
        + checksum.partial(body)
    )
    return bytes((msg_type, code)) + csum.to_bytes(2, "big") + bytes(body)


def is_ipv4_multicast_or_broadcast(addr: bytes) -> bool:
    return addr[0] >= 224 or addr == IP4_BROADCAST


def is_ipv4_loopback(addr: bytes) -> bool:
    return addr[0] == 127


def is_ipv6_loopback(addr: bytes) -> bool:
    return addr == bytes(15) + b"\x01"


def is_ipv6_link_local(addr: bytes) -> bool:
    return addr[0] == 0xFE and addr[1] & 0xC0 == 0x80


def is_ipv6_multicast(addr: bytes) -> bool:
    return addr[0] == 0xFF


_V4_MAPPED: Final = bytes(10) + b"\xff\xff"


def is_ipv6_v4_mapped(addr: bytes) -> bool:
    """::ffff:a.b.c.d: never valid on the wire (RFC 4291 2.5.5.2), and a host socket given
    one would reach the IPv4 address behind it (loopback included)."""
    return addr[:12] == _V4_MAPPED
