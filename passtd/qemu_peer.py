"""Who may be the guest's qemu: the process behind an accepted connection, by its cgroup.

Design: with `qemu_cgroup: PATH` (config.py; the libvirt hook sets it to the scope that
libvirt runs the domain's qemu in), an instance adopts a connection only from a process
in cgroup PATH or in a cgroup below it (libvirt moves qemu's threads into cgroups of its
own inside the scope). The process is the one SO_PEERCRED names: the one that called
connect(). Every other peer is refused: its connection is closed and the instance keeps
listening for the right one (the engine logs each refusal, rate limited).

The instance cannot read /proc/PID/cgroup of another user's process: the unit's
ProtectProc=invisible hides every process but its own, on purpose. So the question is
asked the other way round: is that pid listed in `cgroup.procs` of PATH or of a cgroup
below it? The cgroup file system stays readable in the sandbox (ProtectControlGroups=yes
makes it read-only), and pids there are those of our pid namespace, as SO_PEERCRED's.
Where it is: /sys/fs/cgroup with cgroup v2; with systemd's hybrid and legacy layouts (v1
controllers), systemd keeps every unit's processes in /sys/fs/cgroup/unified (a cgroup2
tree) and /sys/fs/cgroup/systemd (name=systemd) as well. The first of these roots that has
PATH answers.

It fails closed: a peer that is gone by the time it is looked up (its pid is in no
cgroup.procs), a pid that cannot be read, no cgroup file system at all (`ip netns exec`
mounts a sysfs of its own over /sys) are refusals. A PATH that does not exist is
`Undecided`: the engine holds such a connection and asks again (link.py) until the scope
shows who qemu is. Where libvirt runs qemu in no machined scope at all (seen with libvirt
11 in a container), the hook's "started" step drops `qemu_cgroup` and reloads the
instance (libvirt.started), which then adopts the connection it holds.

Not done here: pid reuse between connect() and the look-up (SO_PEERPIDFD would rule it
out; Debian 12's kernel lacks it), and other identities (user, SELinux or AppArmor label).
A connection kept in systemd's file-descriptor store across a restart is not looked at
again: only an earlier process of the same instance can have put it there, after its
own check.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence

from .engine.link import PeerVerdict, Undecided

CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd")
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process that connected `sock` (None if unknown)."""
    try:
        pid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            _UCRED.size))[0]
    except OSError:
        return None
    return pid if pid > 0 else None


def pids_below(directory: str) -> set[int]:
    """The pids in `cgroup.procs` of the cgroup at `directory` and of every one below it.

    A file that cannot be read counts as empty: the cgroups of a threaded subtree refuse
    reads of cgroup.procs (their threaded root lists the processes), and a cgroup may
    vanish while it is walked.
    """
    found: set[int] = set()
    for path, _dirs, files in os.walk(directory):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(path, "cgroup.procs"), encoding="ascii") as f:
                found.update(int(line) for line in f.read().split())
        except (OSError, ValueError):
            continue
    return found


class CgroupPeerCheck:
    """The engine's `accept_peer` for `qemu_cgroup`: None to accept a connection, else why
    it is refused (for the log)."""

    def __init__(self, path: str, roots: Sequence[str] = CGROUP_ROOTS) -> None:
        self.path = path
        self.roots = roots

    def __call__(self, sock: socket.socket) -> PeerVerdict:
        pid = peer_pid(sock)
        if pid is None:
            return f"its process is unknown (SO_PEERCRED), so not known to be in {self.path}"
        return self.refusal(pid)

    def refusal(self, pid: int) -> PeerVerdict:
        """None if process `pid` is in the cgroup or below it, else why not."""
        mounted = [r for r in self.roots if os.path.exists(os.path.join(r, "cgroup.procs"))]
        if not mounted:  # e.g. under `ip netns exec`, which mounts a sysfs of its own
            return (f"pid {pid}: no cgroup file system at {' or '.join(self.roots)}, so "
                    f"not known to be in cgroup {self.path}")
        for root in mounted:
            top = root + self.path
            if os.path.isdir(top):
                if pid in pids_below(top):
                    return None
                return f"pid {pid} is not in cgroup {self.path} (another process, or gone)"
        return Undecided(f"pid {pid}: cgroup {self.path} does not exist (yet)")
