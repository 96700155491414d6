"""A run of one flow's in-order guest segments, taken in one step: the bulk of guest->host.

Design: under guest->host bulk traffic a read from qemu holds dozens to thousands of
segments of one flow, each the next in sequence, each carrying the same ACK and window.
`TcpConn.on_segment` has a fast branch for exactly those (tcp.py); the loop (loop.py)
still paid its per-frame work for each: the frame walk, an unpack, the flow lookup, the
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
pure-Python `gather_python` here, which is the reference (tests/unit/test_tcp_run.py
compares them on generated and on mangled frames; PASSTD_NATIVE=0 selects it). Why C:
per segment the walk is ~1.5 us of interpreter time, which at MTU 1500 made guest->host
cost twice passt's CPU per Gbit/s (docs/BENCHMARK.md, "In-order runs in C").

Not done here: anything that changes a flow (ACKs, windows, FIN, holes: on_segment),
checksum verification (never done, checksum.py says why), pcap (with a capture running
the loop takes every frame itself, so the capture sees each one).
"""

from __future__ import annotations

import contextlib
import struct
from typing import TYPE_CHECKING, Final

from . import NATIVE_WANTED
from .packet import ETH_P_IP, ETH_P_IPV6, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from .tap import MAX_FRAME, MIN_FRAME
from .tcp_seg import SEQ_MASK

if TYPE_CHECKING:
    from .tap import FrameReader
    from .tcp import TcpConn

_LEN: Final = struct.Struct("!I")
_TCP: Final = struct.Struct("!4sIIBBH")  # ports, seq, ack, data offset, flags, window
_FRAG: Final = struct.Struct("!H")
ROOM: Final = 4 + 54  # a length word and the smallest IPv4/TCP frame: less left, nothing to gather


def _headers(mem: memoryview, off: int, length: int) -> tuple[bytes, int, int] | None:
    """(addresses + ports, TCP header offset, payload end) of a frame the fast path may
    take, None for any other. Frame offsets as in tap.py (after the length word)."""
    ethertype = mem[off + 12] << 8 | mem[off + 13]
    if ethertype == ETH_P_IP and length >= 54 and mem[off + 14] == 0x45 and mem[off + 23] == 6:
        total = mem[off + 16] << 8 | mem[off + 17]
        (frag,) = _FRAG.unpack_from(mem, off + 20)
        if frag & 0x3FFF or total + 14 > length:
            return None
        tcp_at, end, thl_room = off + 34, off + 14 + total, total - 20
        key = bytes(mem[off + 26 : off + 34]) + bytes(mem[tcp_at : tcp_at + 4])
    elif ethertype == ETH_P_IPV6 and length >= 74 and mem[off + 14] >> 4 == 6 \
            and mem[off + 20] == 6:
        plen = mem[off + 18] << 8 | mem[off + 19]
        if plen + 54 > length:
            return None
        tcp_at, end, thl_room = off + 54, off + 54 + plen, plen
        key = bytes(mem[off + 22 : off + 54]) + bytes(mem[tcp_at : tcp_at + 4])
    else:
        return None
    thl = (mem[tcp_at + 12] >> 4) << 2
    if thl < 20 or thl > thl_room:
        return None
    return key, tcp_at, end


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
    head = _headers(mem, first, len(mem) - first) if 0 <= first <= len(mem) - MIN_FRAME \
        else None
    if head is None:
        raise ValueError("the run's first frame is not a TCP segment the fast path takes")
    run_key = head[0]
    count = nbytes = 0
    last = -1
    while end - pos >= 4:
        (length,) = _LEN.unpack_from(mem, pos)
        if length < MIN_FRAME or length > MAX_FRAME or end - pos - 4 < length:
            break
        off = pos + 4
        frame = _headers(mem, off, length)
        if frame is None or frame[0] != run_key:
            break
        _key, tcp_at, data_end = frame
        _ports, f_seq, f_ack, doff, flags, f_window = _TCP.unpack_from(mem, tcp_at)
        data = tcp_at + ((doff >> 4) << 2)
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


gather = gather_python
ENGINE = "python"  # which one this process runs
if NATIVE_WANTED:
    with contextlib.suppress(ImportError):  # not built here: the pure-Python path
        from ._tcp_run import gather as _native_gather

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
