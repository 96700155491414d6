"""Host data for the guest: peeked from the socket into frame slots, dropped once acknowledged.

Design (passt's tcp_buf.c): what the host peer sends stays in the socket's receive queue
until the guest acknowledges it, so we keep no copy. `read` peeks (MSG_PEEK, with
SO_PEEK_OFF keeping the position after what was already sent; kernels before 6.9 lack it
for TCP and re-peek from the last acknowledged byte into a scratch area) straight into the
preallocated frame slots of tcp_buf.py, as much as the guest's window and qemu's socket
take, and the link sends the frames in one sendmsg. `drop_acknowledged` removes what the
guest acknowledged with MSG_TRUNC (no copy). A retransmission rewinds the peek offset.

Wakeups: the socket stays readable while unacknowledged data sits in it, so its reader is
edge-triggered (poller.py): it runs when something new arrives (or EOF), never because
what the guest has not acknowledged is still queued, and without a system call to say
so (an SO_RCVLOWAT of bytes in flight + 1 did that before: two setsockopt and a read
that found nothing per request/response round trip). The price is the rule edge
triggering sets: a read that stops before the socket is drained (the guest's window is
full, qemu's socket is, or the read rounds are spent) must come back by itself, as no
event will say the data is there. Such a flow is marked `read_pending`: the guest's next
ACK or window update reads again (A_RESUME, tcp_sock.py); room towards qemu resumes the
flows that waited for it (link.py); spent rounds read again in the loop's next turn. A
read that found the socket drained clears the mark, and A_RESUME then reads nothing. The
end of the stream is the one thing a read that finds data cannot see: the edge that
brings the peer's FIN says so (EPOLLRDHUP, `host_shut`), and from then on a short read
peeks once more, to find the end.

Not done here: TCP decisions (tcp.py answers `send_budget`, `on_sent`, `on_host_eof`),
which flow to read when (tcp_sock.py).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import select
import socket
import struct
from collections.abc import Callable
from typing import Final

from .context import EngineContext
from .link import TAP_SLACK, TRIM_WORTHY
from .tcp import TcpConn
from .tcp_buf import TcpFrameBatch
from .tcp_seg import seq_diff

log = logging.getLogger("passtd.engine")

SO_PEEK_OFF: Final = 42
SO_MEMINFO: Final = 55
_MEMINFO: Final = struct.Struct("9I")
SK_MEMINFO_SNDBUF: Final = 3
SK_MEMINFO_WMEM_QUEUED: Final = 5
READ_ROUNDS: Final = 4  # batches read from one socket per wakeup before yielding to other flows
DISCARD_AREA: Final = 16 << 20


def probe_peek_off() -> bool:
    """SO_PEEK_OFF on TCP needs Linux 6.9; older kernels re-peek sent data instead."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        except OSError:
            log.info("kernel lacks SO_PEEK_OFF for TCP: host data is peeked again "
                     "from the last acknowledged byte (one extra copy)")
            return False
    return True


def free_space(sock: socket.socket) -> int:
    """Room in a socket's send buffer: the window we offer the guest."""
    try:
        info = _MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size))
    except OSError:
        return 0
    room: int = info[SK_MEMINFO_SNDBUF] - info[SK_MEMINFO_WMEM_QUEUED]
    return max(0, room)


class HostData:
    def __init__(self, ctx: EngineContext, on_readable: Callable[[TcpConn], None]) -> None:
        self.ctx = ctx
        self._on_readable = on_readable  # a flow's socket has data the guest has not seen
        self.batches = {4: TcpFrameBatch(4), 6: TcpFrameBatch(6)}
        # acknowledged data is dropped with MSG_TRUNC into this; the kernel never writes
        # it for TCP, so its pages stay unmapped (without SO_PEEK_OFF: the re-peek lands here)
        self.scratch = memoryview(mmap.mmap(-1, DISCARD_AREA))
        self.peek_off = probe_peek_off()
        self._edge_callback = self._edge  # (bound once: await_data runs after every read)

    def prepare(self, sock: socket.socket) -> None:
        """A new flow's socket: peeks continue after what the guest already has."""
        if self.peek_off:
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)

    def adopt(self, conn: TcpConn) -> None:
        """A flow from the previous process: what its socket holds is unknown, read it;
        a passtd before edge triggering left an SO_RCVLOWAT on it, which would hold back
        the wakeups for data below it."""
        conn.read_pending = True
        with contextlib.suppress(OSError):
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def rewind(self, sock: socket.socket) -> None:
        """Retransmit: the next peek starts at the last acknowledged byte."""
        if self.peek_off:
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)

    def read(self, conn: TcpConn, now: float) -> int:
        """Send the guest what it has room for; the TCP actions that result (EOF, error),
        for the socket half to execute."""
        ctx, link = self.ctx, self.ctx.link
        sock = conn.sock
        batch = self.batches[conn.family]
        mss = conn.mss_to_guest
        views = batch.views(mss)
        conn.read_pending = True  # until a read finds the socket drained
        for _ in range(READ_ROUNDS):
            budget = conn.send_budget()
            if budget <= 0:
                # read_pending stays set: the guest's next ACK or window update reads
                # again (A_RESUME); if registered, new data runs this, which stops here
                if not conn.zero_window:
                    conn.window_closed(now)
                    ctx.schedule(conn)
                return 0
            if budget > TAP_SLACK:
                # no more than qemu's socket takes: a short write costs a copy of the rest
                # (a small read is not worth the ioctl: its copy would be small too)
                frame = batch.head + mss
                need = min(-(-budget // mss), len(views)) * frame
                fits = link.room(need) // frame * mss
                if fits <= 0:
                    self.wait_for_room(conn)
                    return 0
                budget = min(budget, fits)
            count = min(len(views), -(-budget // mss))
            bufs = views[:count]
            want = count * mss
            if want > budget:
                bufs = [*bufs[:-1], bufs[-1][: budget - (count - 1) * mss]]
                want = budget
            in_flight = 0
            if not self.peek_off:
                in_flight = seq_diff(conn.snd_nxt, conn.snd_una)
                bufs = [self.scratch[:in_flight], *bufs]
            try:
                n: int = sock.recvmsg_into(bufs, 0, socket.MSG_PEEK)[0] - in_flight
            except (BlockingIOError, InterruptedError):
                conn.read_pending = False
                self.await_data(conn)
                return 0
            except OSError as e:
                log.debug("%r: read: %s", conn, e)
                return conn.on_host_error()
            if n <= 0:  # EOF: everything the peer sent is with the guest (or in flight)
                conn.read_pending = False
                ctx.readiness.stop_reading(conn)
                return conn.on_host_eof(now)
            if n > TRIM_WORTHY:
                ctx.buffers_used(now)
            frames = batch.build(n, mss, ctx.net.mac, ctx.guest_mac, conn.peer_addr,
                                 conn.guest_addr, conn.peer_port, conn.guest_port, conn.snd_nxt,
                                 conn.rcv_nxt, conn.wnd_to_guest >> conn.our_wscale)
            conn.on_sent(n, now)
            link.send_framed(frames, -(-n // mss), now)
            if n < want:
                if not conn.host_shut:
                    conn.read_pending = False  # drained: the next arrival is an edge
                    break
                # the peer shut its side (its FIN came with this data or before it): the
                # end is next, and no other edge will come to say so
                continue
            if link.congested:
                self.wait_for_room(conn)
                ctx.schedule(conn)
                return 0
        else:
            ctx.loop.call_soon(self._on_readable, conn)  # rounds spent: others go first
        self.await_data(conn)
        ctx.schedule(conn)
        return 0

    def wait_for_room(self, conn: TcpConn) -> None:
        """Park the flow until qemu's socket has room (or qemu is back)."""
        conn.read_pending = True
        self.ctx.readiness.stop_reading(conn)
        self.ctx.link.wait(conn)

    def await_data(self, conn: TcpConn) -> None:
        """Be woken for host data that arrives from now on (see Wakeups above)."""
        self.ctx.readiness.read(conn, self._edge_callback, edge=True)

    def _edge(self, conn: TcpConn, events: int) -> None:
        if events & select.EPOLLRDHUP:
            conn.host_shut = True
        self._on_readable(conn)

    def drop_acknowledged(self, conn: TcpConn) -> None:
        """Drop bytes the guest acknowledged from the receive queue (MSG_TRUNC: TCP
        discards without copying)."""
        left = conn.discard
        conn.discard = 0
        limit = len(self.scratch)
        while left > 0:
            try:
                n = conn.sock.recv_into(self.scratch, min(left, limit), socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.debug("%r: discard: %s", conn, e)
                break
            if n <= 0:
                break
            left -= n

    def trim(self) -> None:
        for batch in self.batches.values():
            batch.area.madvise(mmap.MADV_DONTNEED)
