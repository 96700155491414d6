"""The frame loop's fast path in bytes: each guest segment's numbers and flow, and a run of
one flow's in-order segments taken in one step (the bulk of guest->host).

`segment`: what the loop (loop.py) makes of every guest frame before anything else. An
IPv4 frame without IP options or an IPv6 frame whose next header is TCP is a segment: its
flags, sequence and ACK numbers, window field, where its payload lies, and its flow, found
by the FlowKey (6, source, source port, destination, destination port). One whose headers
contradict themselves (a fragment, lengths beyond the frame, a TCP header length out of
range) is SEG_BAD4 or SEG_BAD6, which the loop drops with a log line; any other frame is
SEG_OTHER, for the loop's full parse (packet.parse_ip), which also takes IPv4 with options
and every segment whose flow is not known yet or that carries a SYN. Every request and
every connection pays it on each of their frames (in Python the header reads, a key
of 5, the lookup), so it has a C twin as `gather` does.

`gather`: under guest->host bulk traffic, a read from qemu holds dozens to thousands of
segments of one flow, each the next in sequence, each carrying the same ACK and window.
`TcpConn.on_segment` has a fast branch for exactly those (tcp.py); the loop (loop.py)
still paid its per-frame work for each: the frame walk, the parse, the flow lookup, the
call. Once a segment of a flow took that branch, `gather` walks the frames that follow it
in the read buffer and takes, without returning to the loop, every one that the branch
would take too:

  - a complete frame with a valid length word, an IPv4 header without options, not a
    fragment, or an IPv6 header with TCP as its next header (the loop's own fast-path
    checks), and the same addresses and ports as the run's first segment;
  - flags ACK without SYN, RST or FIN (PSH and the others do not matter to the branch);
  - the sequence number the run expects next, the run's ACK and window fields, payload.

It stops at the first frame that is anything else, which the loop then handles as ever
(so it never drops, answers or counts anything itself), and it appends a memoryview of
each payload to the run's `views` for the one sendmsg of the run. `TcpConn.in_order`
gives the run's numbers and `TcpConn.take_in_order` accounts what was taken, so the rule
stays in tcp.py; this module only applies it to bytes.

Two engines, the same results: `_tcp_run` (C, built by setup.sh like `_csum`) and the
pure-Python `segment_python` and `gather_python` here, which are the reference
(tests/unit/test_tcp_run.py compares them on generated and on mangled frames;
PASSTD_NATIVE=0 selects them). Why C: per segment the walk is ~1.5 us of interpreter time,
which at MTU 1500 made guest->host cost twice passt's CPU per Gbit/s (docs/BENCHMARK.md,
"In-order runs in C"); `segment` in Python is ~4k instructions a frame, a tenth of a
request's round trip (docs/BENCHMARK.md, "The frame's parse in C").

Not done here: anything that changes a flow (ACKs, windows, FIN, holes: on_segment),
checksum verification (never done, checksum.py says why), pcap (with a capture running
the loop takes every frame itself, so the capture sees each one).
"""

from __future__ import annotations

import contextlib
import struct
from typing import TYPE_CHECKING, Final

from . import NATIVE_WANTED
from .flow import Flow, FlowKey
from .packet import ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from .tap import MAX_FRAME, MIN_FRAME
from .tcp_seg import SEQ_MASK

if TYPE_CHECKING:
    from .tap import FrameReader
    from .tcp import TcpConn

_LEN: Final = struct.Struct("!I")
_TCP: Final = struct.Struct("!HHIIxBH")  # ports, seq, ack, (data offset), flags, window
_FRAG: Final = struct.Struct("!H")
ROOM: Final = 4 + 54  # a length word and the smallest IPv4/TCP frame: less left, nothing to gather


# what `segment` says a frame is
SEG_OTHER: Final = 0  # not an IPv4 (without options) or IPv6 TCP segment: the full parse
SEG_BAD4: Final = 1  # IPv4/TCP whose headers contradict themselves: dropped
SEG_BAD6: Final = 2  # IPv6/TCP likewise
SEG_TCP: Final = 3  # a segment, with its flow (None: no flow) and its numbers
GuestSegment = tuple[int, Flow | None, int, int, int, int, int, int]
_KIND_ONLY: Final[tuple[GuestSegment, ...]] = tuple(
    (kind, None, 0, 0, 0, 0, 0, 0) for kind in (SEG_OTHER, SEG_BAD4, SEG_BAD6))
_OTHER_AT: Final = (SEG_OTHER, 0, 0, 0, 0)
_BAD4_AT: Final = (SEG_BAD4, 0, 0, 0, 0)
_BAD6_AT: Final = (SEG_BAD6, 0, 0, 0, 0)


def _headers(mem: memoryview, off: int, length: int) -> tuple[int, int, int, int, int]:
    """(kind, offset of the addresses, of the TCP header, of the payload, payload end) of
    the frame at `off` (`length` bytes, at least an Ethernet header, inside `mem`): the one
    check of a segment's headers, for `segment` and `gather` alike. The addresses and the
    ports follow each other in both families, so the bytes from the addresses' offset to
    the TCP header's fifth byte name the flow. Kinds other than SEG_TCP come with zeros."""
    ethertype = mem[off + 12] << 8 | mem[off + 13]
    if ethertype == ETH_P_IP and length >= 54 and mem[off + 14] == 0x45 and mem[off + 23] == 6:
        total = mem[off + 16] << 8 | mem[off + 17]
        (frag,) = _FRAG.unpack_from(mem, off + 20)
        thl = (mem[off + 46] >> 4) << 2
        if frag & 0x3FFF or total + 14 > length or thl < 20 or thl + 20 > total:
            return _BAD4_AT
        return SEG_TCP, off + 26, off + 34, off + 34 + thl, off + 14 + total
    if ethertype == ETH_P_IPV6 and length >= 74 and mem[off + 20] == 6:
        plen = mem[off + 18] << 8 | mem[off + 19]
        thl = (mem[off + 66] >> 4) << 2
        if mem[off + 14] >> 4 != 6 or plen + 54 > length or thl < 20 or thl > plen:
            return _BAD6_AT
        return SEG_TCP, off + 22, off + 54, off + 54 + thl, off + 54 + plen
    return _OTHER_AT


def segment_python(mem: memoryview, off: int, length: int, flows: dict[FlowKey, Flow],
                   /) -> GuestSegment:
    """(kind, flow, flags, seq, ack, window field, payload offset, payload end) of the
    frame at `off` (after its length word, `length` bytes; offsets into `mem`), its flow
    looked up in `flows`; every kind but SEG_TCP comes with None and zeros."""
    if off < 0 or length < MIN_FRAME or length > len(mem) - off:
        raise ValueError("the frame must lie in the buffer and hold an Ethernet header")
    kind, addrs, tcp_at, data, end = _headers(mem, off, length)
    if kind != SEG_TCP:
        return _KIND_ONLY[kind]
    half = (tcp_at - addrs) >> 1
    sport, dport, seq, ack, flags, window = _TCP.unpack_from(mem, tcp_at)
    key = (IPPROTO_TCP, bytes(mem[addrs : addrs + half]), sport,
           bytes(mem[addrs + half : tcp_at]), dport)
    return SEG_TCP, flows.get(key), flags, seq, ack, window, data, end


def gather_python(mem: memoryview, first: int, pos: int, end: int, seq: int, ack: int,
                  window: int, views: list[memoryview], /) -> tuple[int, int, int, int]:
    """Take the segments at `pos`.. (length words first, valid data up to `end`) that
    continue the run whose first segment is the frame at `first`: next `seq`, the same
    `ack` and `window` fields. Appends their payloads to `views`; returns (position after
    the last frame taken, frames taken, payload bytes taken, offset of the last frame
    taken or -1)."""
    if not (0 <= seq <= SEQ_MASK and 0 <= ack <= SEQ_MASK and 0 <= window <= 0xFFFF):
        raise ValueError("seq and ack must be 32-bit, window 16-bit unsigned numbers")
    if pos < 0 or end < pos or end > len(mem):
        raise ValueError("pos and end must lie in the buffer, pos <= end")
    if not 0 <= first <= len(mem) - MIN_FRAME \
            or (head := _headers(mem, first, len(mem) - first))[0] != SEG_TCP:
        raise ValueError("the run's first frame is not a TCP segment the fast path takes")
    run_key = bytes(mem[head[1] : head[2] + 4])  # its addresses and ports
    count = nbytes = 0
    last = -1
    while end - pos >= 4:
        (length,) = _LEN.unpack_from(mem, pos)
        if length < MIN_FRAME or length > MAX_FRAME or end - pos - 4 < length:
            break
        off = pos + 4
        kind, addrs, tcp_at, data, data_end = _headers(mem, off, length)
        if kind != SEG_TCP or bytes(mem[addrs : tcp_at + 4]) != run_key:
            break
        _sport, _dport, f_seq, f_ack, flags, f_window = _TCP.unpack_from(mem, tcp_at)
        if flags & (TCP_SYN | TCP_RST | TCP_FIN | TCP_ACK) != TCP_ACK or f_seq != seq \
                or f_ack != ack or f_window != window or data_end == data:
            break
        views.append(mem[data:data_end])
        seq = (seq + data_end - data) & SEQ_MASK
        nbytes += data_end - data
        count += 1
        last = off
        pos = off + length
    return pos, count, nbytes, last


segment = segment_python
gather = gather_python
ENGINE = "python"  # which one this process runs
if NATIVE_WANTED:
    with contextlib.suppress(ImportError):  # not built here: the pure-Python path
        from ._tcp_run import gather as _native_gather
        from ._tcp_run import segment as _native_segment

        segment = _native_segment
        gather = _native_gather
        ENGINE = "native"


def extend(conn: TcpConn, reader: FrameReader, first: int, views: list[memoryview]) -> int:
    """The segment at `first` took on_segment's bulk branch: take the frames after it
    that continue it, and account them with the flow and the reader. The offset of the
    last frame taken (`first` when none)."""
    numbers = conn.in_order()
    if numbers is None:
        return first
    next_seq, ack, window = numbers
    pos, count, nbytes, last = gather(reader.mem, first, reader.start, reader.end, next_seq,
                                      ack, window, views)
    if not count:
        return first
    reader.skip(pos, count)
    conn.take_in_order(nbytes)
    return last
