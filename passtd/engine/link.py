"""The qemu link: the listening socket, the one qemu connection, frames in and out, pcap.

Design: qemu connects to the instance's UNIX stream socket and sends the guest's Ethernet
frames, each after a 4-byte big-endian length (tap.py frames and unframes them). The link
reads whole buffers into the `FrameReader` and hands them to the engine (`on_input`), and
queues frames for the guest in `TapOutput`, flushed with one sendmsg per batch. qemu only
ever drains its socket, so the room measured last (TIOCOUTQ) less what was sent since is a
floor: `room` skips the ioctl while the floor covers what a flow wants to send. Flows that
find no room park with `wait` and are handed back (`on_room`) once qemu has drained.

One guest per instance: a second qemu is refused while one is connected, and `accept_peer`
(the service's check of who the peer is, qemu_peer.py) may refuse any. It may also answer
`Undecided` (it cannot tell yet): such a connection is held, unread, and asked about again
every PEER_RECHECK seconds and whenever the check changes (`recheck_held`); the first one
accepted is adopted and the others held are closed. A connection can
outlive the process (systemd's FD store): `finish_output` completes a half-sent frame and
`partial_input` hands over a half-read one, so qemu's stream stays aligned.

A capture (pcap.py) sees every frame both ways; its failures cost the capture only.

Not done here: what the frames mean (loop.py), vhost-user.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import socket
import struct
import termios
from collections.abc import Callable
from typing import Final

from .flow import Flow
from .mainloop import MainLoop, Timer
from .pcap import PcapWriter
from .tap import FrameReader, FramingError, TapOutput, with_prefix

log = logging.getLogger("passtd.engine")

TAP_BUFFER: Final = 4 << 20  # qemu socket buffers (passt asks for INT_MAX/2; wmem_max caps it)
TAP_SLACK: Final = 64 << 10  # skb overhead the qemu socket's buffer accounting adds to our bytes
TAP_SEND_OVERHEAD: Final = 2048  # what one sendmsg may add to that accounting beyond its bytes
HANDOVER_TIMEOUT: Final = 1.0  # seconds to finish a frame half sent to qemu when stopping
TRIM_WORTHY: Final = 256 << 10  # a read this size dirties enough buffer pages to give back later
PEER_RECHECK: Final = 0.25  # seconds between two questions about a held connection
PEER_HELD_MAX: Final = 8  # connections held at once; more are refused (each costs a descriptor)
_OUTQ: Final = struct.Struct("i")
_OUTQ_ARG: Final = bytes(_OUTQ.size)


class Undecided:
    """`accept_peer`'s answer when it cannot tell yet: why (for the log)."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why

    def __str__(self) -> str:
        return self.why


# accept_peer's answer: None accepts the connection, a str refuses it (why, for the log)
PeerVerdict = str | Undecided | None


def peer_pid(sock: socket.socket) -> str:
    """The pid of the process on the other end of a UNIX socket, for logs."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return str(struct.unpack("3i", creds)[0])
    except OSError:
        return "?"


class GuestLink:
    def __init__(self, loop: MainLoop, pcap_path: str | None,
                 pcap_size: int, on_input: Callable[[float], None],
                 on_client: Callable[[socket.socket | None, str], None],
                 on_room: Callable[[list[Flow]], None], settle: Callable[[float], None],
                 buffers_used: Callable[[float], None],
                 refused: Callable[[str], None]) -> None:
        self.loop = loop
        self.reader = FrameReader()
        self.out = TapOutput()
        self.pcap = PcapWriter.open(pcap_path, pcap_size) if pcap_path else None
        self.listener: socket.socket | None = None
        self.client: socket.socket | None = None
        # asked before a qemu connection is adopted: None to accept it, else why not
        self.accept_peer: Callable[[socket.socket], PeerVerdict] | None = None
        self._on_input = on_input  # frames are in the reader: process them (may raise
        # FramingError: the client is dropped)
        self._on_client = on_client  # (sock, "") connected, (None, why) gone
        self._on_room = on_room  # flows that waited for room towards qemu
        self._settle = settle
        self._buffers_used = buffers_used
        self._refused = refused  # a rate-limited warning about a refused connection
        self._held: list[tuple[socket.socket, str]] = []  # (sock, why undecided)
        self._recheck: Timer | None = None
        self._sndbuf = 0
        self._room_floor = 0  # the last TIOCOUTQ reading's room, less what we sent since
        self._watching = False  # add_writer on the qemu socket is on
        self._waiters: dict[Flow, None] = {}
        self.input_watch: Callable[[float], None] | None = None  # called once, at the next read
        self.bytes_read = self.bytes_sent = 0  # on the qemu stream, length prefixes included

    # -- connection ---------------------------------------------------------------------------

    def listen(self, listener: socket.socket) -> None:
        self.listener = listener
        listener.setblocking(False)
        self.loop.add_reader(listener.fileno(), self._accept)

    @property
    def connected(self) -> bool:
        return self.client is not None

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("accept on the qemu socket failed: %s", e)
            return
        if self.client is not None:
            log.warning("refusing a second qemu client (pid %s): one guest per instance",
                        peer_pid(sock))
            sock.close()
            return
        verdict = self.accept_peer(sock) if self.accept_peer is not None else None
        if isinstance(verdict, Undecided) and len(self._held) >= PEER_HELD_MAX:
            self._refused(f"{verdict}; {PEER_HELD_MAX} connections wait for a verdict already")
            sock.close()
        elif isinstance(verdict, Undecided):
            log.info("holding a connection on the qemu socket: %s", verdict)
            self._held.append((sock, verdict.why))
            self._arm_recheck()
        elif verdict is not None:
            self._refused(verdict)
            sock.close()
        else:
            self._adopt_among_held(sock)

    def _arm_recheck(self) -> None:
        if self._recheck is None and self._held:
            self._recheck = self.loop.call_later(PEER_RECHECK, self.recheck_held)

    def recheck_held(self) -> None:
        """Ask again about held connections (also at once, when `accept_peer` changed):
        adopt the first one accepted, close the refused ones, keep the undecided."""
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        still: list[tuple[socket.socket, str]] = []
        for sock, why in self._held:
            verdict = self.accept_peer(sock) if self.accept_peer is not None else None
            if verdict is None:
                self._held = [h for h in self._held if h[0] is not sock]
                self._adopt_among_held(sock)
                return
            if isinstance(verdict, Undecided):
                still.append((sock, why))
            else:
                self._refused(verdict)
                sock.close()
        self._held = still
        self._arm_recheck()

    def _adopt_among_held(self, sock: socket.socket) -> None:
        """Adopt `sock`; connections still held lose: one guest per instance."""
        others, self._held = self._held, []
        self.adopt(sock)
        for other, why in others:
            self._refused(f"{why}; another connection is the guest's qemu")
            other.close()

    def adopt(self, sock: socket.socket, partial: bytes = b"") -> None:
        """Serve the guest behind `sock` (freshly accepted, or kept across a restart);
        `partial`: the start of a frame the previous process had read."""
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, TAP_BUFFER)
        self.client = sock
        self._sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self._room_floor = 0
        self._watching = False
        self.reader.reset()
        if partial:
            self.reader.space()[: len(partial)] = partial
            self.reader.commit(len(partial))
        self.out.drop_all()
        self.loop.add_reader(sock.fileno(), self._readable)
        self._on_client(sock, "")
        if self._waiters:  # flows that waited for qemu send now, not at the next event
            self._wake_waiters()
            self._settle(self.loop.time())

    def drop_client(self, why: str) -> None:
        sock = self.client
        if sock is None:
            return
        self.loop.remove_reader(sock.fileno())
        self.loop.remove_writer(sock.fileno())
        self._watching = False
        sock.close()
        self.client = None
        self.reader.reset()
        self.out.drop_all()
        self._on_client(None, why)

    def partial_input(self) -> bytes:
        """The start of a frame qemu has not finished writing (for the next process)."""
        return bytes(self.reader.buf[self.reader.start : self.reader.end])

    def close(self) -> None:
        """Stop serving; the service keeps (or closes) the qemu socket itself."""
        if self._recheck is not None:
            self._recheck.cancel()
        for sock, _why in self._held:
            sock.close()
        self._held = []
        if self.client is not None:
            self.loop.remove_reader(self.client.fileno())
            self.loop.remove_writer(self.client.fileno())
            self._finish_output(self.client)
            self.client = None
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
        if self.pcap:
            self.pcap.close()

    def _finish_output(self, sock: socket.socket) -> None:
        """Send what qemu has part of, so that its reader is between two frames."""
        if not self.out.backlog:
            return
        try:
            sock.settimeout(HANDOVER_TIMEOUT)
            sock.sendall(self.out.backlog)
        except OSError as e:
            log.warning("qemu's connection may be left inside a frame: %s", e)
        finally:
            self.out.drop_all()
            with contextlib.suppress(OSError):
                sock.setblocking(False)

    # -- frames in ----------------------------------------------------------------------------

    def _readable(self) -> None:
        sock = self.client
        if sock is None:
            return
        try:
            n = sock.recv_into(self.reader.space())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.drop_client(str(e))
            return
        if n == 0:
            self.drop_client("qemu closed the connection")
            return
        self.reader.commit(n)
        self.bytes_read += n
        now = self.loop.time()
        if self.input_watch is not None:
            watch, self.input_watch = self.input_watch, None
            watch(now)
        if n > TRIM_WORTHY:
            self._buffers_used(now)
        try:
            self._on_input(now)
        except FramingError as bad:
            log.warning("dropping qemu client: %s", bad)
            self.drop_client("bad framing")
        self._settle(now)

    # -- frames out ---------------------------------------------------------------------------

    def send(self, frame: bytes, now: float) -> None:
        """Queue one frame for the guest (flushed when the engine settles)."""
        self.send_prefixed(with_prefix(frame), now)

    def send_prefixed(self, frame: bytes, now: float) -> None:
        """Queue one frame that starts with its length prefix (tcp_buf.ControlFrames)."""
        if self.client is None:
            return
        if self.pcap:
            self.pcap.write_framed(frame, now)
        self.out.prefixed(frame)

    def send_framed(self, frames: memoryview, count: int, now: float) -> None:
        """Queue `count` frames that already carry their length prefixes (tcp_buf.py's
        slots), and flush: the slots are reused by the next read."""
        if self.pcap:
            self.pcap.write_framed(frames, now)
        self.out.framed(frames, count)
        self.flush()

    @property
    def congested(self) -> bool:
        return self.client is None or self.out.congested

    def room(self, need: int) -> int:
        """Bytes the qemu socket takes right now without a short write (and a copy), or
        at least `need` of them."""
        if self._room_floor >= need:
            return self._room_floor
        assert self.client is not None
        queued = _OUTQ.unpack(fcntl.ioctl(self.client.fileno(), termios.TIOCOUTQ, _OUTQ_ARG))[0]
        self._room_floor = self._sndbuf - queued - TAP_SLACK
        return self._room_floor

    def flush(self) -> None:
        out = self.out
        sock = self.client
        if sock is None:
            out.drop_all()
            return
        while out.pending():
            batch = out.take()
            try:
                n = sock.send(batch[0]) if len(batch) == 1 else sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self.drop_client(str(e))
                return
            self._room_floor -= n + TAP_SEND_OVERHEAD
            self.bytes_sent += n
            if not out.sent(batch, n):
                self._watch(True)
                break

    def end_batch(self) -> None:
        """The end of a callback: flush what is queued, and the capture."""
        if self.out.pending():
            self.flush()
        if self.pcap:
            self.pcap.flush()
            if not self.pcap.active:  # it stopped (full disk, size limit): forget it
                self.pcap = None

    # -- flows waiting for room ---------------------------------------------------------------

    def wait(self, flow: Flow) -> None:
        """Park a flow until qemu's socket has room (or qemu is back)."""
        self._waiters[flow] = None
        if self.client is not None:
            self._watch(True)

    def forget(self, flow: Flow) -> None:
        self._waiters.pop(flow, None)

    def waiting(self) -> list[Flow]:
        return list(self._waiters)

    def _wake_waiters(self) -> None:
        waiters, self._waiters = list(self._waiters), {}
        if waiters:
            self._on_room(waiters)

    def _watch(self, on: bool) -> None:
        if on != self._watching and self.client is not None:
            if on:
                self.loop.add_writer(self.client.fileno(), self._writable)
            else:
                self.loop.remove_writer(self.client.fileno())
            self._watching = on

    def _writable(self) -> None:
        """qemu drained its socket: send the backlog, wake the flows that waited."""
        self._watch(False)
        self.flush()
        if not self.out.congested:
            self._wake_waiters()
        self._settle(self.loop.time())

    # -- memory -------------------------------------------------------------------------------

    def trim(self) -> None:
        """Give the frame reader's pages back to the kernel, unless a frame is half read."""
        if self.reader.start == self.reader.end:
            self.reader.reset()
            self.reader.buf.madvise(mmap.MADV_DONTNEED)
