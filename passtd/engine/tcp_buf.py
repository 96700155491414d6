"""Frames for host->guest TCP data: preallocated slots filled by one scatter read.

Design (passt's tcp_buf.c layout): a batch is a run of slots laid out back to back as
`[4-byte length][Ethernet][IP][TCP][payload of one MSS]`. The event loop peeks the host
socket with one recvmsg_into() straight into the payload areas of the slots, `build` then
writes all headers in place, and since full slots are contiguous the whole batch leaves
with a single send() on the qemu socket: one kernel copy in, one out, no Python objects
per frame beyond a struct call.

Two engines write the frames, the same bytes: `_tcp_buf.write_headers` and
`_tcp_buf.control_frame` (C, built by setup.sh like `_csum`) and their twins here,
`write_headers_python` and `control_frame_python`, the reference (tests/unit/
test_tcp_buf.py compares them; PASSTD_NATIVE=0 selects them). Why C: a reply of
request/response is one frame, and the Python loop's pack and checksum calls for it,
~5,700 instructions, ran between the instance's wakeup and its send to qemu, where every
microsecond is the round trip's (docs/BENCHMARK.md, "Before the send"). The Python loop
sums the payloads of full-size segments with one call over a strided view
(`checksum.sum_rows`); header and pseudo-header sums are small integer arithmetic, IPv4
header checksums start from a per-flow constant.

The slot area is an anonymous mmap, so pages a workload never touches (large MSS slots at
a small MTU) cost no resident memory.

Control segments (SYN-ACK, ACK, FIN, RST: no payload) are framed by `ControlFrames`, the
same layout with its options after the TCP header and the same arithmetic sums: a
connection sends three of them (crr), the SYN-ACK before the send the guest's connect()
waits for, and in Python each cost ~3,900 instructions (the C call ~1,000). Both keep
what a flow's frames repeat (`FlowHeader`) while frames go to the same flow.

Not done here: retransmission bookkeeping (tcp.py decides, the loop rewinds the peek).
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from typing import Final, Protocol

from . import NATIVE_WANTED, checksum
from .packet import ETH_HLEN, ETH_MIN_FRAME, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, TCP_ACK, TCP_PSH

BATCH_BYTES: Final = 4 << 20  # payload bytes per batch at most (bounds latency for other flows too)
MAX_FRAMES: Final = 1023  # recvmsg_into takes at most IOV_MAX (1024) buffers

# A frame's headers as few values as possible, as the number of values is what a pack
# costs (per reply of a request/response, most of building its frame): the bytes a flow
# keeps and the constants next to them go in as byte strings, built once per flow.
# IPv4: [length][Ethernet: MACs, type; IPv4: 0x45 0][total length][id 0, DF, TTL 255,
# TCP][header checksum][addresses, ports][seq][ack][data offset, flags][window][checksum]
# [urgent pointer]
_HDR4: Final = struct.Struct("!I16sH6sH12sIIHHHH")
# IPv6: [length][Ethernet; IPv6: version 6, flow label 0][payload length][TCP, hop limit
# 255, addresses, ports][seq][ack][data offset, flags][window][checksum][urgent pointer]
_HDR6: Final = struct.Struct("!I18sH38sIIHHHH")
_PORTS: Final = struct.Struct("!HH")
_AFTER_MACS4: Final = ETH_P_IP.to_bytes(2, "big") + b"\x45\x00"
_AFTER_MACS6: Final = ETH_P_IPV6.to_bytes(2, "big") + b"\x60\x00\x00\x00"
_IP4_MIDDLE: Final = b"\x00\x00\x40\x00\xff" + bytes([IPPROTO_TCP])
_IP6_BEFORE_ADDRS: Final = bytes([IPPROTO_TCP, 255])
_FLOW4: Final = 12  # an IPv4 flow's bytes (_flow_bytes): addresses and ports
_IP4_FIXED_SUM: Final = 0x4500 + 0x4000 + (255 << 8 | IPPROTO_TCP)  # of the constants above
HLEN4: Final = _HDR4.size - 4  # Ethernet + IPv4 + TCP: 54
HLEN6: Final = _HDR6.size - 4  # Ethernet + IPv6 + TCP: 74
_DOFF: Final = (20 // 4) << 4
_PADDING: Final = bytes(ETH_MIN_FRAME)


class FlowHeader:
    """What the frames of the flow framed last repeat, built once for them: the addresses'
    pseudo-header sum, the addresses and ports as header bytes, Ethernet with the IP
    header's first bytes. A flow keeps the same bytes objects, so an identity check tells
    a new flow (or a MAC learned anew)."""

    def __init__(self) -> None:
        self.src = self.dst = b""
        self.sport = self.dport = -1
        self.addr_sum = 0
        self.flow = b""
        self.src_mac = self.dst_mac = b""
        self.frame_start = b""

    def update(self, src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, sport: int,
               dport: int) -> None:
        if src is not self.src or dst is not self.dst or sport != self.sport \
                or dport != self.dport:
            if len(src) != len(self.src):  # another family: other bytes after the MACs
                self.src_mac = b""
            self.src, self.dst, self.sport, self.dport = src, dst, sport, dport
            self.addr_sum = checksum.pseudo(src, dst, 0, 0)
            self.flow = _flow_bytes(src, dst, sport, dport)
        if src_mac is not self.src_mac or dst_mac is not self.dst_mac:
            self.src_mac, self.dst_mac = src_mac, dst_mac
            self.frame_start = _frame_start_bytes(src_mac, dst_mac, 4 if len(src) == 4 else 6)


class TcpFrameBatch:
    """Slots for one address family; `views(mss)` gives the payload buffers to read into."""

    def __init__(self, family: int) -> None:
        # length prefix + headers before each payload
        self.head = (_HDR4 if family == 4 else _HDR6).size
        self.size = BATCH_BYTES + MAX_FRAMES * self.head
        self.area = mmap.mmap(-1, self.size)
        self.mem = memoryview(self.area)
        self._mss = 0
        self._views: list[memoryview] = []
        self._header = FlowHeader()  # of the flow read last

    def views(self, mss: int) -> list[memoryview]:
        """Payload areas for segments of `mss` bytes (cached while the MSS is the same)."""
        if mss != self._mss:
            stride = self.head + mss
            count = min(MAX_FRAMES, self.size // stride)
            head = self.head
            self._views = [self.mem[i * stride + head : (i + 1) * stride] for i in range(count)]
            self._mss = mss
        return self._views

    def build(self, nbytes: int, mss: int, src_mac: bytes, dst_mac: bytes, src: bytes,
              dst: bytes, sport: int, dport: int, seq: int, ack: int, window: int) -> memoryview:
        """Write headers for `nbytes` of payload already read into `views(mss)`.

        Returns the frames, length prefixes included, ready for one send().
        """
        header = self._header
        header.update(src_mac, dst_mac, src, dst, sport, dport)
        end = write_headers(self.mem, self.head, mss, nbytes, header.frame_start, header.flow,
                            header.addr_sum, seq, ack, window)
        return self.mem[:end]


def write_headers_python(mem: memoryview, head: int, mss: int, nbytes: int, start: bytes,
                         flow: bytes, addr_sum: int, seq: int, ack: int, window: int) -> int:
    """Write the headers of the frames holding `nbytes` of payload in slots of `head + mss`
    bytes (the last one shorter if `nbytes` is not a multiple of `mss`); the end of the
    last frame. `head` says the family (58: IPv4, 78: IPv6), `start` and `flow` are a
    FlowHeader's bytes, `addr_sum` the addresses' partial sum; every frame ACKs `ack` and
    offers `window`, the last one pushes. The reference for `_tcp_buf.write_headers`."""
    stride = head + mss
    full = nbytes // mss
    last = nbytes - full * mss
    count = full + (1 if last else 0)
    if full and mss % 4 == 0:
        sums = checksum.sum_rows(mem, head, stride, full, mss)
    else:
        sums = [checksum.partial(mem, i * stride + head, mss) for i in range(full)]
    if last:
        sums.append(checksum.partial(mem, full * stride + head, last))
    sport, dport = _PORTS.unpack_from(flow, len(flow) - 4)
    fixed = addr_sum + IPPROTO_TCP + sport + dport + (_DOFF << 8) + TCP_ACK + window
    fixed += (ack >> 16) + (ack & 0xFFFF)
    if head == _HDR4.size:
        ip_fixed = _IP4_FIXED_SUM + addr_sum
        for i in range(count):
            plen = mss if i < full else last
            seg_seq = (seq + i * mss) & 0xFFFFFFFF
            flags = TCP_ACK if i + 1 < count else TCP_ACK | TCP_PSH
            tcp_len = 20 + plen
            ip_len = 20 + tcp_len
            ip_csum = checksum.finish(ip_fixed + ip_len)
            tcp_csum = checksum.finish(
                fixed + tcp_len + (seg_seq >> 16) + (seg_seq & 0xFFFF) + sums[i]
                + (flags - TCP_ACK)
            )
            _HDR4.pack_into(mem, i * stride, ETH_HLEN + ip_len, start, ip_len, _IP4_MIDDLE,
                            ip_csum, flow, seg_seq, ack, _DOFF << 8 | flags, window, tcp_csum, 0)
    else:
        for i in range(count):
            plen = mss if i < full else last
            seg_seq = (seq + i * mss) & 0xFFFFFFFF
            flags = TCP_ACK if i + 1 < count else TCP_ACK | TCP_PSH
            tcp_len = 20 + plen
            tcp_csum = checksum.finish(
                fixed + tcp_len + (seg_seq >> 16) + (seg_seq & 0xFFFF) + sums[i]
                + (flags - TCP_ACK)
            )
            _HDR6.pack_into(mem, i * stride, ETH_HLEN + 40 + tcp_len, start, tcp_len, flow,
                            seg_seq, ack, _DOFF << 8 | flags, window, tcp_csum, 0)
    return (count - 1) * stride + head + (mss if last == 0 else last)


def control_frame_python(start: bytes, flow: bytes, addr_sum: int, seq: int, ack: int,
                         flags: int, window: int, options: bytes) -> bytes:
    """A segment without payload as one frame, its length prefix first: `start` and `flow`
    a FlowHeader's bytes (their lengths say the family), `addr_sum` the addresses' partial
    sum, `options` at most 40 bytes, a multiple of 4. Padded to the Ethernet minimum, as
    packet.ip_frame pads. The reference for `_tcp_buf.control_frame`."""
    sport, dport = _PORTS.unpack_from(flow, len(flow) - 4)
    tcp_len = 20 + len(options)
    doff = (tcp_len // 4) << 4
    total = (addr_sum + IPPROTO_TCP + tcp_len + sport + dport + (seq >> 16)
             + (seq & 0xFFFF) + (ack >> 16) + (ack & 0xFFFF) + (doff << 8) + flags + window)
    if options:
        total += checksum.partial(options)
    tcp_csum = checksum.finish(total)
    if len(flow) == _FLOW4:
        ip_len = 20 + tcp_len
        ip_csum = checksum.finish(_IP4_FIXED_SUM + ip_len + addr_sum)
        length = max(ETH_HLEN + ip_len, ETH_MIN_FRAME)
        head = _HDR4.pack(length, start, ip_len, _IP4_MIDDLE, ip_csum, flow, seq, ack,
                          doff << 8 | flags, window, tcp_csum, 0)
    else:
        length = ETH_HLEN + 40 + tcp_len
        head = _HDR6.pack(length, start, tcp_len, flow, seq, ack, doff << 8 | flags, window,
                          tcp_csum, 0)
    frame = head + options
    short = length + 4 - len(frame)
    return frame + _PADDING[:short] if short > 0 else frame


class _WriteHeaders(Protocol):
    def __call__(self, mem: memoryview, head: int, mss: int, nbytes: int, start: bytes,
                 flow: bytes, addr_sum: int, seq: int, ack: int, window: int, /) -> int: ...


class _ControlFrame(Protocol):
    def __call__(self, start: bytes, flow: bytes, addr_sum: int, seq: int, ack: int,
                 flags: int, window: int, options: bytes, /) -> bytes: ...


write_headers: _WriteHeaders = write_headers_python
control_frame: _ControlFrame = control_frame_python
ENGINE = "python"  # which one this process runs
if NATIVE_WANTED:
    with contextlib.suppress(ImportError):  # not built here: the pure-Python path
        from ._tcp_buf import control_frame as _native_control_frame
        from ._tcp_buf import write_headers as _native_write_headers

        write_headers = _native_write_headers
        control_frame = _native_control_frame
        ENGINE = "native"


def _frame_start_bytes(src_mac: bytes, dst_mac: bytes, family: int) -> bytes:
    """Ethernet and the IP header's first constant bytes."""
    return dst_mac + src_mac + (_AFTER_MACS4 if family == 4 else _AFTER_MACS6)


def _flow_bytes(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """Addresses and ports (IPv6: after the next header and hop limit)."""
    flow = src + dst + _PORTS.pack(sport, dport)
    return flow if len(src) == 4 else _IP6_BEFORE_ADDRS + flow


class ControlFrames:
    """TCP segments without payload, each as one frame."""

    def __init__(self) -> None:
        self._header = FlowHeader()  # of the flow framed last (crr: three frames each)

    def frame(self, src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, sport: int,
              dport: int, seq: int, ack: int, flags: int, window: int,
              options: bytes = b"") -> bytes:
        """The segment as one frame, its length prefix first (for link.send_prefixed);
        `options` a multiple of 4 bytes, as tcp_seg builds them."""
        header = self._header
        header.update(src_mac, dst_mac, src, dst, sport, dport)
        return control_frame(header.frame_start, header.flow, header.addr_sum,
                             seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags, min(window, 0xFFFF),
                             options)
