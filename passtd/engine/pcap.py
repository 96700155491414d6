"""libpcap capture of every frame on the tap side, as passt's --pcap does.

Design: the classic format (magic a1b2c3d4, version 2.4, link type Ethernet, microsecond
timestamps) that Wireshark, tshark and tcpdump all read. Records gather in a buffer of
our own, written out at the end of every event-loop callback (or once a MiB is there), so
capturing costs one copy per frame on the data path; a buffer of our own, not a file
object, so that a failed write leaves nothing behind to be written later.

A capture problem costs the capture, never the traffic: a write that fails (ENOSPC, EIO,
EFBIG...) and the size limit (`limits.pcap_size`) both end the capture with one log line,
and the file is cut back to its last complete flush, so it stays a readable capture. At
the limit the capture stops rather than rotating: the file then holds the start of the
guest's life (DHCP, NDP, the first flows), no file is renamed or created while traffic
flows, and the disk a capture takes is known before it starts.

The file is opened so that the capture never becomes a way into someone else's files
(passtd may run as root, and captures hold the guest's traffic):
- not in a directory anyone may write (world-writable, sticky bit or not): another user
  could have put anything at that name, or take the capture's name once it is there;
- never through a symbolic link (O_NOFOLLOW), never into anything but a regular file
  that this process's user owns and that has no other name (no hard link): a file that
  is ours is started anew (a restart begins a new capture), anything else is left alone;
- mode 0600 (the guest's traffic is nobody else's business), also for an old file.
A capture that cannot be opened so is not taken: one error line, and the instance serves
its guest without it.

Not done here: rotation, snap lengths, pcapng, host-side sockets (only tap frames are
captured, as in passt).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import struct
from typing import Final

log = logging.getLogger("passtd.engine")

_GLOBAL: Final = struct.Struct("<IHHiIII")
_RECORD: Final = struct.Struct("<IIII")
LINKTYPE_ETHERNET: Final = 1
SNAPLEN: Final = 65535 + 14
BUFFER: Final = 1 << 20  # bytes gathered before a write(2), unless the loop flushes first


class CaptureRefused(Exception):
    """The capture file cannot be opened safely; the message says why."""


def open_capture_file(path: str) -> int:
    """A descriptor of `path`, emptied, for this process alone (see the module docstring);
    CaptureRefused (or OSError) if that cannot be had safely."""
    directory, name = os.path.split(path)
    dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if os.fstat(dir_fd).st_mode & stat.S_IWOTH:
            raise CaptureRefused(f"its directory {directory} is writable by everyone")
        try:
            # O_NONBLOCK: a FIFO without a reader must not hang the start
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CaptureRefused("it is a symbolic link") from None
            raise
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CaptureRefused("it exists and is not a regular file")
        if st.st_uid != os.geteuid():
            raise CaptureRefused(f"it exists and belongs to user {st.st_uid}")
        if st.st_nlink != 1:
            raise CaptureRefused("it has other names (hard links)")
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class PcapWriter:
    """One capture file; every method is safe to call after the capture stopped."""

    def __init__(self, fd: int, path: str, max_bytes: int) -> None:
        self._fd: int | None = fd
        self.path = path
        self.max_bytes = max_bytes
        self._buffer = bytearray()  # whole records not yet written
        self._size = 0  # of the capture: in the file and in the buffer
        self._flushed = 0  # bytes in the file, a whole number of records
        self._record(_GLOBAL.pack(0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET), b"")

    @classmethod
    def open(cls, path: str, max_bytes: int) -> PcapWriter | None:
        """The capture, or None (and an error logged) if it cannot be taken safely."""
        try:
            return cls(open_capture_file(path), path, max_bytes)
        except CaptureRefused as refused:
            log.error("pcap %s refused: %s; not capturing", path, refused)
        except OSError as e:
            log.error("pcap %s: cannot open it: %s; not capturing", path, e.strerror)
        return None

    @property
    def active(self) -> bool:
        return self._fd is not None

    def write(self, frame: bytes | bytearray | memoryview, now: float) -> None:
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        length = len(frame)
        self._record(_RECORD.pack(sec, usec, length, length), frame)

    def write_framed(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Record each frame of a run of length-prefixed frames (a tap output batch)."""
        mem = memoryview(data)
        pos = 0
        while pos + 4 <= len(mem):
            length = int.from_bytes(mem[pos : pos + 4], "big")
            self.write(mem[pos + 4 : pos + 4 + length], now)
            pos += 4 + length

    def _record(self, header: bytes, frame: bytes | bytearray | memoryview) -> None:
        if self._fd is None:
            return
        size = len(header) + len(frame)
        if self._size + size > self.max_bytes:
            self.flush()
            self._stop(f"size limit reached (limits.pcap_size = {self.max_bytes} bytes)")
            return
        self._buffer += header
        self._buffer += frame
        self._size += size
        if len(self._buffer) >= BUFFER:
            self.flush()

    def flush(self) -> None:
        """Write the buffer out; a failure ends the capture."""
        fd = self._fd
        if fd is None or not self._buffer:
            return
        data = memoryview(self._buffer)
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError as e:
            self._stop(f"cannot write ({e.strerror})")
            return
        finally:
            data.release()
        self._buffer.clear()
        self._flushed = self._size

    def _stop(self, why: str) -> None:
        """End the capture: the file keeps the records of its last complete flush (a
        record cut by a failed write would spoil the rest for readers)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self._buffer = bytearray()
        log.warning("pcap %s: %s: capture stopped, the guest's traffic goes on", self.path, why)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, self._flushed)
        os.close(fd)

    def close(self) -> None:
        self.flush()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
