"""The lab's wire: join a tap device to a passt-style UNIX stream socket.

    python -m passtd.tools.lab_wire --tap tap0 --socket SOCK [--mode MODE] [--pidfile F]
                              [--chunk N] [--sndbuf BYTES]

On the socket every frame is prefixed by its length as a 4-byte big-endian integer
(qemu's `-netdev stream` framing). Frames from the socket are reassembled from whatever
pieces the reads return and written to the tap one by one. Frames from the tap go to the
socket according to the mode:

* `whole` (default): verbatim, and each frame is handed to the kernel in one piece only
  once the socket's send buffer has room for all of it, so a reader normally never sees
  a frame cut in two. (The kernel still queues frames above ~32 KiB as two buffers; a
  reader racing with it can get the first one alone.)
* `stream`: batches of frames go out as one byte stream with plain non-blocking sends,
  so a full send buffer cuts frames anywhere, length words included, as a busy qemu
  does. `--chunk N` caps every send at N bytes to provoke such splits without load.
* `pad`: as `whole`, but frames shorter than 60 bytes are zero-padded to 60, as qemu's
  tap/hub path and real Ethernet do.
* `stream-pad`: both.

The wire exits 0 when the socket closes (or on SIGTERM), 2 if the program sends an
impossible frame length (the stream cannot be resynchronised). Frames the tap refuses
are dropped and counted, as a NIC would. Standard library only, so that the lab can run
it with `python -I` from any interpreter.

Not done: no other framing (vhost-user, qemu's dgram netdev), no traffic shaping, no
reconnection: the lab starts a new wire instead.
"""

from __future__ import annotations

import argparse
import collections
import errno
import fcntl
import os
import select
import signal
import socket
import struct
import sys
import termios
from collections.abc import Iterable, Sequence

MODES = ("whole", "stream", "pad", "stream-pad")
ETH_ZLEN = 60  # minimum Ethernet frame without FCS: what qemu pads to
MAX_FRAME = 65535 + 14  # a 64 KiB IP packet plus the Ethernet header
READ_SIZE = 1 << 17  # > MAX_FRAME: one tap read returns one whole frame

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SO_SNDBUFFORCE = 32  # Linux; not exported by the socket module. Root may exceed wmem_max.

TAP_BATCH = 64  # frames read from the tap per wake-up
QUEUE_LIMIT = 4 << 20  # bytes queued for the socket before the tap is left unread
DROPPED_ERRNOS = (errno.EAGAIN, errno.EIO, errno.EINVAL, errno.ENOBUFS)


class StreamCorrupt(Exception):
    """The socket sent a length no Ethernet frame can have."""


class Stopped(Exception):
    """SIGTERM or SIGINT arrived."""


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


def pad_frame(frame: bytes) -> bytes:
    """Zero-pad `frame` to the Ethernet minimum, as qemu does for frames from a tap."""
    return frame + bytes(ETH_ZLEN - len(frame)) if len(frame) < ETH_ZLEN else frame


def encode(frames: Iterable[bytes]) -> bytes:
    """Length-prefix `frames` for the socket."""
    return b"".join(struct.pack("!I", len(f)) + f for f in frames)


class FrameReader:
    """Reassembles frames from socket reads that may end anywhere, even inside a length."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the frames they complete."""
        self._buf += data
        frames, off, end = [], 0, len(self._buf)
        while end - off >= 4:
            (length,) = struct.unpack_from("!I", self._buf, off)
            if length > MAX_FRAME:
                raise StreamCorrupt(f"frame length {length} (at most {MAX_FRAME})")
            if end - off - 4 < length:
                break
            if length:
                frames.append(bytes(self._buf[off + 4:off + 4 + length]))
            off += 4 + length
        del self._buf[:off]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still waiting for the rest."""
        return len(self._buf)


class WholeSender:
    """Sends whole frames: one send() per frame, once the buffer has room for it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._head_sent = 0  # bytes of _queue[0] already sent (only after a short send)

    @property
    def queued(self) -> int:
        return self._queued

    def add(self, messages: Sequence[bytes]) -> None:
        self._queue.extend(messages)
        self._queued += sum(map(len, messages))

    def _unsent_in_kernel(self) -> int:
        buf = fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        unsent: int = struct.unpack("i", buf)[0]
        return unsent

    def flush(self) -> None:
        free: int | None = None  # estimated room in the send buffer
        while self._queue:
            msg = self._queue[0]
            if self._head_sent == 0:
                # the kernel charges buffer overhead on top of the data: leave a margin
                need = len(msg) + len(msg) // 4 + 4096
                if free is None or free < need:
                    in_kernel = self._unsent_in_kernel()
                    free = self._sndbuf - in_kernel
                    if free < need and in_kernel > 0:
                        return  # wait for POLLOUT, then the whole frame fits
            try:
                sent = self._sock.send(memoryview(msg)[self._head_sent:])
            except BlockingIOError:
                return
            if free is not None:
                free -= sent
            self._head_sent += sent
            self._queued -= sent
            if self._head_sent < len(msg):
                return
            self._queue.popleft()
            self._head_sent = 0


class StreamSender:
    """Sends the frames as one byte stream; short sends cut them anywhere."""

    def __init__(self, sock: socket.socket, chunk: int | None) -> None:
        self._sock = sock
        self._chunk = chunk
        self._buf = bytearray()
        self._sent = 0  # offset of the first unsent byte in _buf

    @property
    def queued(self) -> int:
        return len(self._buf) - self._sent

    def add(self, messages: Sequence[bytes]) -> None:
        self._buf += b"".join(messages)

    def flush(self) -> None:
        view = memoryview(self._buf)
        try:
            while self._sent < len(self._buf):
                end = len(self._buf) if self._chunk is None else self._sent + self._chunk
                try:
                    self._sent += self._sock.send(view[self._sent:end])
                except BlockingIOError:
                    return
        finally:
            view.release()
            if self._sent == len(self._buf) or self._sent > QUEUE_LIMIT:
                del self._buf[:self._sent]
                self._sent = 0


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def read_tap(tap: int, pad: bool) -> list[bytes]:
    """Up to TAP_BATCH frames from the tap, length-prefixed (and padded with `pad`)."""
    out = []
    for _ in range(TAP_BATCH):
        try:
            frame = os.read(tap, READ_SIZE)
        except BlockingIOError:
            break
        if pad:
            frame = pad_frame(frame)
        out.append(struct.pack("!I", len(frame)) + frame)
    return out


class Wire:
    def __init__(self, tap: int, sock: socket.socket, mode: str, chunk: int | None,
                 lose: int | None = None) -> None:
        self.tap = tap
        self.lose = lose  # drop every lose-th frame from the guest (a lossy link, for tests)
        self.read_from_tap = 0
        self.sock = sock
        self.pad = mode.endswith("pad")
        self.sender = StreamSender(sock, chunk) if mode.startswith("stream") else \
            WholeSender(sock)
        self.reader = FrameReader()
        self.to_tap = 0
        self.dropped = 0
        self.to_socket = 0

    def write_tap(self, frames: list[bytes]) -> None:
        for frame in frames:
            try:
                os.write(self.tap, frame)
                self.to_tap += 1
            except OSError as e:
                if e.errno not in DROPPED_ERRNOS:
                    raise
                self.dropped += 1

    def run(self) -> int:
        """Forward until the socket closes (return 0) or its stream is corrupt (raise)."""
        poller = select.poll()
        skfd = self.sock.fileno()
        tap_polled = True
        poller.register(self.tap, select.POLLIN)
        poller.register(skfd, select.POLLIN)
        while True:
            want_tap = self.sender.queued < QUEUE_LIMIT
            if want_tap != tap_polled:
                if want_tap:
                    poller.register(self.tap, select.POLLIN)
                else:
                    poller.unregister(self.tap)
                tap_polled = want_tap
            busy = self.sender.queued > 0
            poller.modify(skfd, select.POLLIN | (select.POLLOUT if busy else 0))
            for fd, ev in poller.poll(100 if busy else None):
                if fd == self.tap:
                    messages = read_tap(self.tap, self.pad)
                    if self.lose:
                        first = self.read_from_tap
                        self.read_from_tap += len(messages)
                        messages = [m for i, m in enumerate(messages, first + 1)
                                    if i % self.lose]
                    self.to_socket += len(messages)
                    self.sender.add(messages)
                    continue
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    try:
                        data = self.sock.recv(1 << 20)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        return 0
                    self.write_tap(self.reader.feed(data))
            if self.sender.queued:
                try:
                    self.sender.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m passtd.tools.lab_wire",
                                 description="Join a tap device to a passt-style UNIX socket.")
    ap.add_argument("--tap", default="tap0", help="tap device (created if absent)")
    ap.add_argument("--socket", required=True, help="UNIX stream socket to connect to")
    ap.add_argument("--mode", choices=MODES, default="whole")
    ap.add_argument("--pidfile", help="write our pid here once connected")
    ap.add_argument("--chunk", type=int, help="stream modes: send at most N bytes at a time")
    ap.add_argument("--lose", type=int, metavar="N",
                    help="drop every Nth frame the guest sends (a lossy link)")
    ap.add_argument("--sndbuf", type=int, default=1 << 20,
                    help="socket send buffer to ask for (default 1 MiB)")
    args = ap.parse_args(argv)
    if args.chunk is not None and (args.chunk < 1 or not args.mode.startswith("stream")):
        ap.error("--chunk takes a positive size and applies to the stream modes only")

    tap = open_tap(args.tap)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, args.sndbuf)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.sndbuf)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setblocking(False)
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    wire = Wire(tap, sock, args.mode, args.chunk, args.lose)
    try:
        status, why = wire.run(), "socket closed"
    except Stopped as e:
        status, why = 0, str(e)
    except StreamCorrupt as e:
        status, why = 2, f"{e}: stream out of sync"
    print(f"lab_wire: {why}; {wire.to_socket} frames to the socket, {wire.to_tap} to the "
          f"tap, {wire.dropped} refused by the tap", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
