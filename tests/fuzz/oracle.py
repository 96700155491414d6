"""Independent checks of what the engine sends to the guest.

Everything here is written from the RFCs, without importing passtd: a reply that our own
codecs built is verified by code that shares none of their mistakes. The checks are small
on purpose (they run after every fuzz execution): framing, Ethernet, the IPv4 header
checksum, the UDP/TCP/ICMP/ICMPv6 checksums over their pseudo-headers, and the option
areas of DHCP, DHCPv6 and NDP messages, walked to their end.

A violation raises `BadOutput` (an AssertionError, so a fuzz driver reports it as a bug).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


class BadOutput(AssertionError):
    """A frame we would send to the guest is not what it claims to be."""


def rfc1071(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum of `data` (0 when a buffer that includes its checksum is valid)."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass
class SentFrame:
    """One frame the engine sent, dissected by `check_frame`."""

    raw: bytes
    dst_mac: bytes
    src_mac: bytes
    ethertype: int
    family: int = 0  # 4, 6, or 0 for non-IP
    src: bytes = b""
    dst: bytes = b""
    proto: int = -1
    ttl: int = 0
    l4: bytes = b""


def split_stream(stream: bytes) -> tuple[list[bytes], bytes]:
    """Frames in a qemu-framed byte stream (4-byte big-endian lengths), and the rest."""
    frames = []
    pos = 0
    while len(stream) - pos >= 4:
        (length,) = struct.unpack_from("!I", stream, pos)
        if not 14 <= length <= 65535:
            raise BadOutput(f"frame length {length} sent to the guest")
        if len(stream) - pos - 4 < length:
            break
        frames.append(stream[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return frames, stream[pos:]


def check_frame(frame: bytes, our_mac: bytes | None = None) -> SentFrame:
    """Dissect one frame for the guest, raising BadOutput where it is not well formed."""
    if len(frame) < 14:
        raise BadOutput(f"frame of {len(frame)} bytes")
    dst_mac, src_mac, ethertype = struct.unpack_from("!6s6sH", frame)
    if our_mac is not None and src_mac != our_mac:
        raise BadOutput(f"source MAC {src_mac.hex(':')} is not ours")
    sent = SentFrame(frame, dst_mac, src_mac, ethertype)
    if ethertype == 0x0806:
        if len(frame) < 42:
            raise BadOutput("truncated ARP frame")
        return sent
    if ethertype == 0x0800:
        _check_ipv4(sent)
    elif ethertype == 0x86DD:
        _check_ipv6(sent)
    else:
        raise BadOutput(f"we sent ethertype 0x{ethertype:04x}")
    _check_l4(sent)
    return sent


def _check_ipv4(sent: SentFrame) -> None:
    frame = sent.raw
    if len(frame) < 34:
        raise BadOutput("truncated IPv4 frame")
    vihl = frame[14]
    if vihl != 0x45:
        raise BadOutput(f"IPv4 version/IHL byte 0x{vihl:02x}")
    (total,) = struct.unpack_from("!H", frame, 16)
    if total < 20 or 14 + total > len(frame):
        raise BadOutput(f"IPv4 total length {total} in a {len(frame)}-byte frame")
    if rfc1071(frame[14:34]) != 0:
        raise BadOutput("bad IPv4 header checksum")
    sent.family = 4
    sent.ttl = frame[22]
    sent.proto = frame[23]
    sent.src, sent.dst = frame[26:30], frame[30:34]
    sent.l4 = frame[34 : 14 + total]


def _check_ipv6(sent: SentFrame) -> None:
    frame = sent.raw
    if len(frame) < 54:
        raise BadOutput("truncated IPv6 frame")
    (vtcfl, plen, nh, hop) = struct.unpack_from("!IHBB", frame, 14)
    if vtcfl >> 28 != 6:
        raise BadOutput(f"IPv6 version {vtcfl >> 28}")
    if 54 + plen > len(frame):
        raise BadOutput(f"IPv6 payload length {plen} in a {len(frame)}-byte frame")
    sent.family = 6
    sent.ttl = hop
    sent.proto = nh
    sent.src, sent.dst = frame[22:38], frame[38:54]
    sent.l4 = frame[54 : 54 + plen]


def _pseudo(sent: SentFrame, proto: int) -> bytes:
    if sent.family == 4:
        return sent.src + sent.dst + struct.pack("!BBH", 0, proto, len(sent.l4))
    return sent.src + sent.dst + struct.pack("!IxxxB", len(sent.l4), proto)


def _check_l4(sent: SentFrame) -> None:
    l4, proto = sent.l4, sent.proto
    if proto == 17:
        if len(l4) < 8:
            raise BadOutput("truncated UDP header")
        (length, csum) = struct.unpack_from("!HH", l4, 4)
        if length != len(l4):
            raise BadOutput(f"UDP length {length} for {len(l4)} bytes")
        if csum == 0 and sent.family == 6:
            raise BadOutput("UDP over IPv6 without a checksum")
        if csum and rfc1071(_pseudo(sent, 17) + l4) != 0:
            raise BadOutput("bad UDP checksum")
    elif proto == 6:
        if len(l4) < 20 or (l4[12] >> 4) * 4 > len(l4) or l4[12] >> 4 < 5:
            raise BadOutput("bad TCP header length")
        if rfc1071(_pseudo(sent, 6) + l4) != 0:
            raise BadOutput("bad TCP checksum")
    elif proto == 1 and sent.family == 4:
        if len(l4) < 8 or rfc1071(l4) != 0:
            raise BadOutput("bad ICMP message or checksum")
    elif proto == 58 and sent.family == 6:
        if len(l4) < 8 or rfc1071(_pseudo(sent, 58) + l4) != 0:
            raise BadOutput("bad ICMPv6 message or checksum")
    else:
        raise BadOutput(f"IPv{sent.family} protocol {proto} sent to the guest")


# -- option areas -------------------------------------------------------------------------


def dhcp_options(area: bytes) -> list[tuple[int, bytes]]:
    """(code, value) of each DHCP option up to the end option, which must be there."""
    options = []
    i = 0
    while i < len(area):
        code = area[i]
        if code == 255:
            return options
        if code == 0:
            i += 1
            continue
        if i + 2 > len(area) or i + 2 + area[i + 1] > len(area):
            raise BadOutput(f"DHCP option {code} overruns the message")
        options.append((code, area[i + 2 : i + 2 + area[i + 1]]))
        i += 2 + area[i + 1]
    raise BadOutput("DHCP options without an end option")


def dhcpv6_options(area: bytes) -> list[tuple[int, bytes]]:
    """(code, value) of each DHCPv6 option; they must fill the area exactly."""
    options = []
    i = 0
    while i < len(area):
        if i + 4 > len(area):
            raise BadOutput("truncated DHCPv6 option header")
        code, length = struct.unpack_from("!HH", area, i)
        if i + 4 + length > len(area):
            raise BadOutput(f"DHCPv6 option {code} overruns the message")
        options.append((code, area[i + 4 : i + 4 + length]))
        i += 4 + length
    return options


def ndp_options(area: bytes) -> list[tuple[int, bytes]]:
    """(type, whole option) of each NDP option; lengths in units of 8, none zero."""
    options = []
    i = 0
    while i < len(area):
        if i + 2 > len(area) or area[i + 1] == 0 or i + area[i + 1] * 8 > len(area):
            raise BadOutput("bad NDP option length")
        options.append((area[i], area[i : i + area[i + 1] * 8]))
        i += area[i + 1] * 8
    return options
