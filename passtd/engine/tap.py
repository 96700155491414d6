"""The tap side: qemu's stream framing, in and out.

Design: qemu's `-netdev stream` (and `-netdev socket`) put a 4-byte big-endian length in
front of every Ethernet frame. Input is read into one large preallocated buffer;
`next_frame` walks the complete frames in place (offsets, no copies) and whatever follows
the last complete frame, a cut length word or a cut frame, is moved to the front before
the next read. qemu under load writes frames in arbitrary pieces, and any split must
survive: the reference passt (2023) was seen to lose its framing there under qemu, we
must not.

A length below 14 (an Ethernet header) or above 65535 means the stream is not what we
think it is: `FramingError`, and the loop drops that client (never the process).

Output collects frames (each with its length prefix) as a list of buffers for one
sendmsg(). Whatever the socket does not take is copied into a backlog, so callers may
reuse their buffers right after a flush; while a backlog exists the tap is congested and
the loop stops producing bulk data until qemu drains it. Small control frames (ACKs,
ARP, DHCP) still queue behind the backlog, up to a bound; beyond it they are dropped and
counted, as a full NIC queue would.

Not done here: the socket I/O itself (loop.py), vhost-user.
"""

from __future__ import annotations

import mmap
import struct
from typing import Final

MIN_FRAME: Final = 14
MAX_FRAME: Final = 65535
_LEN: Final = struct.Struct("!I")
IOV_MAX: Final = 1024


def with_prefix(frame: bytes) -> bytes:
    """The frame as qemu reads it: its length first."""
    return _LEN.pack(len(frame)) + frame


class FramingError(Exception):
    """The byte stream from qemu does not carry valid frame lengths."""


class FrameReader:
    """Reassembles length-prefixed frames from a byte stream into one buffer."""

    def __init__(self, size: int = 8 << 20) -> None:
        if size < MAX_FRAME + 4:
            raise ValueError("buffer smaller than one frame")
        self.frames_read = 0  # since the start (a counter: statistics)
        # anonymous memory: pages become resident only as far as reads ever reach
        self.buf = mmap.mmap(-1, size)
        self.mem = memoryview(self.buf)
        self.start = 0  # first unconsumed byte
        self.end = 0  # end of valid data
        self.frame_len = 0  # of the frame `next_frame` gave last

    def space(self) -> memoryview:
        """Where the next read goes; moves a leftover partial frame to the front first."""
        if self.start:
            rest = self.end - self.start
            if rest:
                self.mem[:rest] = self.mem[self.start : self.end]
            self.start = 0
            self.end = rest
        return self.mem[self.end :]

    def commit(self, nbytes: int) -> None:
        self.end += nbytes

    def next_frame(self) -> int:
        """The offset in `buf` of the next complete frame, consumed, its length in
        `frame_len`; -1 when no complete frame is left.

        Between two frames the consumer may take further frames itself (`skip`). (A
        method, not a generator: resuming a generator and boxing its (offset, length)
        cost more than a request's own parse.)
        """
        pos = self.start
        if self.end - pos < 4:
            return -1
        (length,) = _LEN.unpack_from(self.buf, pos)
        if length < MIN_FRAME or length > MAX_FRAME:
            self.start = self.end = 0
            raise FramingError(f"frame length {length} out of range {MIN_FRAME}..{MAX_FRAME}")
        if self.end - pos - 4 < length:
            return -1
        self.start = pos + 4 + length
        self.frames_read += 1
        self.frame_len = length
        return pos + 4

    def skip(self, pos: int, count: int) -> None:
        """The consumer took the `count` complete frames up to `pos` (tcp_run.gather)."""
        self.start = pos
        self.frames_read += count

    def reset(self) -> None:
        self.start = self.end = 0


class TapOutput:
    """Frames queued for qemu, flushed with sendmsg; keeps what the socket refused."""

    def __init__(self, backlog_limit: int = 16 << 20) -> None:
        self.iov: list[bytes | bytearray | memoryview] = []
        self.backlog = bytearray()
        self.backlog_limit = backlog_limit
        self.dropped = 0  # frames refused while the backlog was full
        self.frames_queued = 0

    @property
    def congested(self) -> bool:
        return bool(self.backlog)

    def pending(self) -> bool:
        return bool(self.iov or self.backlog)

    def prefixed(self, frame: bytes) -> None:
        """Queue one frame that starts with its length prefix."""
        if len(self.backlog) > self.backlog_limit:
            self.dropped += 1
            return
        self.frames_queued += 1
        self.iov.append(frame)

    def framed(self, data: memoryview, count: int) -> None:
        """Queue `count` frames that already carry their length prefixes (a tcp_buf
        batch)."""
        self.frames_queued += count
        self.iov.append(data)

    def take(self) -> list[bytes | bytearray | memoryview]:
        """The buffers for the next sendmsg: the backlog first, at most IOV_MAX in all
        (without a backlog, the queue itself: no copy for the common flush)."""
        if self.backlog:
            return [self.backlog, *self.iov[: IOV_MAX - 1]]
        if len(self.iov) <= IOV_MAX:
            return self.iov
        return self.iov[:IOV_MAX]

    def sent(self, batch: list[bytes | bytearray | memoryview], nbytes: int) -> bool:
        """`nbytes` of `batch` (from `take`) went out. False when the socket is full.

        On a short send, the rest of the batch and everything queued after it is copied
        into the backlog: callers reuse their buffers as soon as the flush returns.
        """
        size = 0
        for buf in batch:
            size += len(buf)
        if batch is self.iov and nbytes == size:  # all of it: the common case
            self.iov = []
            return True
        queued = len(batch)
        if self.backlog:
            queued -= 1
            self.backlog = bytearray()
        rest = self.iov[queued:]
        self.iov = []
        if nbytes == size:
            self.iov = rest
            return True
        backlog = bytearray()
        skip = nbytes
        for buf in batch:
            if skip >= len(buf):
                skip -= len(buf)
                continue
            backlog += memoryview(buf)[skip:]
            skip = 0
        for buf in rest:
            backlog += buf
        self.backlog = backlog
        return False

    def drop_all(self) -> None:
        """The client went away: nothing queued can reach it."""
        self.iov.clear()
        self.backlog = bytearray()
