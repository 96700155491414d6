"""`python -m passtd.tools.timeline PID`: where a running process's wakeups spend their time.

What the request/response figures of docs/BENCHMARK.md rest on, as a command: perf
records every system call entry and exit of the process for a moment (`perf record -e
raw_syscalls:sys_enter,raw_syscalls:sys_exit`, no symbols, no sampling), and the calls
are cut into wakeups, each from the return of the event loop's wait (epoll_wait) to its
next call. Wakeups that made the same calls in the same order, with the same byte counts
for reads and writes (a 78-byte SYN frame is not a 58-byte ACK), have the same shape; for
each of the commonest shapes a table gives, per call, the median time spent before it in
user space (the interpreter, and being preempted) and inside it (the kernel's work, and
whatever it waited for), and how long the wait before such a wakeup lasted.

Run it beside a benchmark, e.g. during `passtd bench --only crr/4 --time 20`, on the
instance (the process whose command line has `--socket /run/passtd-lab/`):

    python -m passtd.tools.timeline $(pgrep -f -- '--socket /run/passtd-lab/') --seconds 1

It needs perf (Debian's linux-perf) and the right to trace the process (root).

Not done here: names for system call numbers other than x86_64's common ones (others show
as NR n), threads (every call of the process counts as one sequence), call stacks (py-spy
or perf's sampling do that).
"""

from __future__ import annotations

import argparse
import itertools
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# x86_64's numbers of the calls an event loop and its sockets make
SYSCALL_NAMES = {
    0: "read", 1: "write", 3: "close", 7: "poll", 16: "ioctl", 19: "readv", 20: "writev",
    23: "select", 41: "socket", 42: "connect", 43: "accept", 44: "sendto", 45: "recvfrom",
    46: "sendmsg", 47: "recvmsg", 48: "shutdown", 49: "bind", 50: "listen", 54: "setsockopt",
    55: "getsockopt", 72: "fcntl", 202: "futex", 228: "clock_gettime", 232: "epoll_wait",
    233: "epoll_ctl", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait", 286: "timerfd_settime",
    288: "accept4", 299: "recvmmsg", 307: "sendmmsg", 441: "epoll_pwait2",
}
WAITS = {"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6"}
# calls whose result is a byte count worth telling shapes apart by
SIZED = {"read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg"}

_LINE = re.compile(r"\s*(\d+\.\d+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)(?: \(.*\))?"
                   r"(?:\s*=\s*(-?\d+))?")


@dataclass(frozen=True)
class Call:
    name: str
    enter: float  # seconds
    exit: float
    result: int

    @property
    def step(self) -> str:
        """The call as a shape knows it: with its byte count where that tells frames apart."""
        return f"{self.name} {self.result}" if self.name in SIZED else self.name


@dataclass
class Shape:
    """Wakeups that made the same calls: per call, median µs before it and inside it."""

    steps: tuple[str, ...]
    count: int
    before_us: list[float]
    inside_us: list[float]
    waited_us: float  # the wait that ended in such a wakeup


def calls_of(perf_script: Iterable[str]) -> list[Call]:
    """Pair each sys_enter with its sys_exit (`perf script -F time,event,trace` lines)."""
    out: list[Call] = []
    pending: tuple[int, float] | None = None
    for line in perf_script:
        m = _LINE.match(line)
        if m is None:
            continue
        at, kind, nr = float(m.group(1)), m.group(2), int(m.group(3))
        if kind == "enter":
            pending = (nr, at)
        elif pending is not None and pending[0] == nr and m.group(4) is not None:
            out.append(Call(SYSCALL_NAMES.get(nr, f"NR {nr}"), pending[1], at, int(m.group(4))))
            pending = None
    return out


@dataclass(frozen=True)
class Wakeup:
    wait: Call  # the wait that ended
    work: tuple[Call, ...]  # the calls up to the next wait
    next_wait: Call


def wakeups(calls: Sequence[Call]) -> list[Wakeup]:
    """Every return from a wait that was followed by work, and then by another wait."""
    out: list[Wakeup] = []
    waits = [i for i, call in enumerate(calls) if call.name in WAITS]
    for i, j in itertools.pairwise(waits):
        if j > i + 1:
            out.append(Wakeup(calls[i], tuple(calls[i + 1 : j]), calls[j]))
    return out


def shapes(found: Sequence[Wakeup], top: int = 4) -> list[Shape]:
    """The `top` commonest shapes among wakeups `found`, with their medians."""
    groups: dict[tuple[str, ...], list[Wakeup]] = {}
    for wakeup in found:
        groups.setdefault(tuple(c.step for c in wakeup.work), []).append(wakeup)
    out = []
    for key, items in sorted(groups.items(), key=lambda group: -len(group[1]))[:top]:
        # before each call: from the previous call's return (the wait's, for the first);
        # the last entry is the gap from the last call to the next wait
        before = [statistics.median(
            ((w.work[i].enter if i < len(w.work) else w.next_wait.enter)
             - (w.work[i - 1].exit if i else w.wait.exit)) * 1e6 for w in items)
            for i in range(len(key) + 1)]
        inside = [statistics.median((w.work[i].exit - w.work[i].enter) * 1e6 for w in items)
                  for i in range(len(key))]
        waited = statistics.median((w.wait.exit - w.wait.enter) * 1e6 for w in items)
        out.append(Shape(key, len(items), before, inside, waited))
    return out


def render(found: Sequence[Shape], total: int) -> list[str]:
    lines = []
    for n, shape in enumerate(found, 1):
        user, kernel = sum(shape.before_us), sum(shape.inside_us)
        lines += [f"### Wakeup shape {n}: {shape.count} of {total} wakeups, after a wait of "
                  f"{shape.waited_us:.0f} µs (medians)", "",
                  "| call | µs before it (user space) | µs in it (kernel) |", "|---|---|---|"]
        rows = zip(shape.steps, shape.before_us, shape.inside_us, strict=False)  # (+1 before)
        lines += [f"| {step} | {before:.0f} | {inside:.0f} |" for step, before, inside in rows]
        lines += [f"| (back to the wait) | {shape.before_us[-1]:.0f} | |",
                  f"| **in all** | **{user:.0f}** | **{kernel:.0f}** |", ""]
    return lines


def record(pid: int, seconds: float) -> list[str]:
    """`perf script` lines of the process's system calls over `seconds`."""
    perf = shutil.which("perf")
    if perf is None:
        raise SystemExit("timeline: perf is not installed (Debian: apt install linux-perf)")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        rec = subprocess.run([perf, "record", "-q", "-e", "raw_syscalls:sys_enter",
                              "-e", "raw_syscalls:sys_exit", "-p", str(pid), "-o", str(data),
                              "--", "sleep", str(seconds)], capture_output=True, text=True)
        if rec.returncode != 0 or not data.exists():
            why = rec.stderr.strip() or "is it running, and may this user trace it (root)?"
            raise SystemExit(f"timeline: perf record could not trace pid {pid} (status "
                             f"{rec.returncode}): {why}")
        script = subprocess.run([perf, "script", "-i", str(data), "-F", "time,event,trace"],
                                capture_output=True, text=True, check=False)
    return script.stdout.splitlines()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m passtd.tools.timeline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("pid", type=int, help="the process to trace (e.g. an instance)")
    parser.add_argument("--seconds", type=float, default=1.0, help="how long (default 1)")
    parser.add_argument("--shapes", type=int, default=4, help="how many shapes (default 4)")
    args = parser.parse_args(argv)
    found = wakeups(calls_of(record(args.pid, args.seconds)))
    if not found:
        print(f"timeline: no wakeup with work in {args.seconds:g} s of pid {args.pid}",
              file=sys.stderr)
        return 1
    print("\n".join(render(shapes(found, args.shapes), len(found))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
