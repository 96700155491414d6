"""Carrying an instance's sockets to the next process: systemd's FD store, or exec.

Why: a restart hands the next process every flow's socket and every forward's listener
(engine/handover.py has the state that goes with them), up to limits.max_flows +
limits.max_listeners descriptors. The FD store could take them one by one, but systemd
passes them back named in LISTEN_FDNAMES, one environment string, which the kernel caps
at 128 KiB (MAX_ARG_STRLEN): past about 65,000 one-letter names the next process would
not even start. So they travel in bundles: a UNIX datagram socket pair, the descriptors
sent through one end (SCM_RIGHTS, at most SCM_MAX_FD = 253 per message) and left unread
in the other end's queue, which keeps them open as long as it is open itself. That end
is one descriptor in the FD store (FDNAME flows-0, flows-1...) or across exec; the next
process reads the descriptors back in the order they were sent. The state document goes
in a memfd beside them (FDNAME state).

Limits: a bundle takes BUNDLE_MESSAGES messages (BUNDLE_FDS descriptors), well within
what its send buffer holds at the default net.core.wmem_default (about 270 messages).
Descriptors in flight count against the sending user's RLIMIT_NOFILE, and every
instance runs as the same user: instances that hand over at the same moment share that
budget. Past it (ETOOMANYREFS) `pack` stops and says how many went; the engine resets
the flows that did not.

`passtd run` has no FD store: on SIGUSR2 it re-executes itself (`reexec`) with the same
descriptors passed the way systemd passes them (LISTEN_FDS, LISTEN_FDNAMES), so the next
process takes them over with the same code.

Not done here: what the state says (engine/handover.py), when to hand over (service.py).
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import signal
import socket
import sys
from typing import NoReturn

log = logging.getLogger("passtd")

SCM_MAX_FD = 253  # descriptors one message may carry (the kernel's limit)
BUNDLE_MESSAGES = 64
BUNDLE_FDS = SCM_MAX_FD * BUNDLE_MESSAGES
FD_NAME_STATE = "state"
FD_NAME_BUNDLE = "flows-"  # + the bundle's number
STATE_MAX = 256 << 20  # a state document larger than this is not read (corrupt)


def pack(socks: list[socket.socket], max_bundles: int) -> tuple[list[socket.socket], int]:
    """Bundles carrying `socks` in order (the ends to keep), and how many of `socks`
    went: all of them unless the kernel or `max_bundles` refused more."""
    bundles: list[socket.socket] = []
    sent = 0
    while sent < len(socks) and len(bundles) < max_bundles:
        keep, feed = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        feed.setblocking(False)
        bundles.append(keep)
        try:
            for _ in range(BUNDLE_MESSAGES):
                chunk = socks[sent : sent + SCM_MAX_FD]
                if not chunk:
                    break
                fds = array.array("i", [sock.fileno() for sock in chunk])
                feed.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                sent += len(chunk)
        except OSError as e:
            log.warning("handing sockets over: %d of %d went (%s)", sent, len(socks), e)
            break
        finally:
            feed.close()
    return bundles, sent


def unpack(bundles: list[int]) -> list[socket.socket]:
    """The sockets in `bundles` (descriptors, in bundle order), in the order they were
    sent; the bundles are closed. A message the kernel truncated (no descriptor left in
    this process) ends the list there: what follows could not be numbered."""
    out: list[socket.socket] = []
    truncated = False
    for fd in bundles:
        bundle = socket.socket(fileno=fd)
        bundle.setblocking(False)
        while True:
            try:
                _data, ancillary, flags, _addr = bundle.recvmsg(
                    1, socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.warning("reading the sockets handed over: %s", e)
                truncated = True
                break
            fds = array.array("i")
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            received = [socket.socket(fileno=received_fd) for received_fd in fds]
            if truncated:
                for sock in received:
                    sock.close()
                continue
            out += received
            if flags & socket.MSG_CTRUNC:
                log.warning("some sockets handed over could not be received (descriptor "
                            "limit?): %d taken, the rest are closed", len(out))
                truncated = True
        bundle.close()
    return out


def write_memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        os.close(fd)
        raise
    return fd


def read_memfd(fd: int, limit: int = STATE_MAX) -> bytes:
    """The content of a memfd handed over (read from its start), then closed."""
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise OSError(f"{size} bytes, more than {limit}")
        chunks = []
        offset = 0
        while offset < size:
            chunk = os.pread(fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def take(fds: dict[str, list[int]]) -> tuple[bytes | None, list[socket.socket | None]]:
    """The state and the sockets a previous process handed over, taken out of `fds`
    (LISTEN_FDNAMES's groups): (None, []) when it handed over nothing."""
    state_fds = fds.pop(FD_NAME_STATE, [])
    names = sorted((name for name in fds if name.startswith(FD_NAME_BUNDLE)),
                   key=lambda name: int(name[len(FD_NAME_BUNDLE):] or 0)
                   if name[len(FD_NAME_BUNDLE):].isdigit() else 1 << 30)
    bundles = [fd for name in names for fd in fds.pop(name)]
    state = None
    for fd in state_fds:
        try:
            state = read_memfd(fd)
        except OSError as e:
            log.warning("cannot read the state the previous process handed over: %s", e)
    socks: list[socket.socket | None] = list(unpack(bundles))
    if state is None and socks:
        log.warning("the previous process handed over %d sockets without their state: "
                    "they are closed", len(socks))
    return state, socks


def bundle_names(count: int) -> list[str]:
    return [f"{FD_NAME_BUNDLE}{i}" for i in range(count)]


def reexec(named: list[tuple[str, int]], argv: list[str]) -> NoReturn:
    """Become a new `passtd` process (the executable as it is now on disk: an upgrade)
    with the descriptors `named` passed as systemd passes them: LISTEN_FDS from 3 on,
    LISTEN_FDNAMES, LISTEN_PID (exec keeps the pid). Everything else is close-on-exec."""
    first = 3
    # a signal's byte goes to the loop's wake-up descriptor (signal.set_wakeup_fd): once
    # the dup2s below put another socket (qemu's) on that number, it would land in there
    signal.set_wakeup_fd(-1)
    # out of the way of the target numbers first, then into place (inheritable)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, first + len(named)) for _name, fd in named]
    for i, fd in enumerate(moved):
        os.dup2(fd, first + i, inheritable=True)
    env = dict(os.environ)
    env.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(named)),
               LISTEN_FDNAMES=":".join(name for name, _fd in named))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)

