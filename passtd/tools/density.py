"""`passtd bench --density N`: N instances on one host, connected and idle.

What an admin with many VMs per host wants to know: memory in all (by PSS: shared pages
counted once), per instance, how long a new instance takes to answer its guest, and
whether idle instances wake the host. Per program (passtd, and passt beside it):

- N instances start one after the other in the lab's host namespace (behind its dead
  end), as VMs starting one by one would start them, each on its own socket;
- a stand-in for qemu connects to each as soon as its socket is there and asks for the
  gateway (an ARP request): "first answer" is from the process's start to that answer
  (what a socket-activated instance costs a booting guest), "answer after connect" from
  the connection;
- with all N connected and idle: PSS and RSS of each (/proc/PID/smaps_rollup), their
  sum, and the context switches of all of them over an idle window (wakeups).

Not done here: guests with kernels (a connected qemu that sends nothing is what an idle
guest is to the instance), systemd's socket activation itself (the units' start is
measured by the systemd tests), the throughput matrix (bench.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .lab import HostNamespace, passtd_env, terminate

GUEST_MAC = bytes.fromhex("525400123456")
ANSWER_TIMEOUT = 20.0


@dataclass
class Instance:
    name: str
    proc: subprocess.Popen[bytes]
    started: float
    qemu: socket.socket | None = None
    connected_at: float | None = None
    answered_at: float | None = None


@dataclass
class DensityResult:
    program: str
    count: int
    pss_kib: list[int] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    first_answer_ms: list[float] = field(default_factory=list)
    after_connect_ms: list[float] = field(default_factory=list)
    wakeups_per_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def q(values: Sequence[float], p: float) -> float | None:
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else None

        return {
            "program": self.program, "instances": self.count, "answered": len(self.first_answer_ms),
            "pss_total_mib": sum(self.pss_kib) / 1024,
            "pss_median_mib": (statistics.median(self.pss_kib) / 1024) if self.pss_kib else None,
            "pss_max_mib": max(self.pss_kib, default=0) / 1024,
            "rss_median_mib": (statistics.median(self.rss_kib) / 1024) if self.rss_kib else None,
            "first_answer_ms_median": q(self.first_answer_ms, 0.5),
            "first_answer_ms_p95": q(self.first_answer_ms, 0.95),
            "first_answer_ms_max": max(self.first_answer_ms, default=None),
            "after_connect_ms_median": q(self.after_connect_ms, 0.5),
            "idle_wakeups_per_s": self.wakeups_per_s,
            "failures": self.failures[:5],
        }


def arp_request(src: bytes, dst: bytes) -> bytes:
    frame = (b"\xff" * 6 + GUEST_MAC + b"\x08\x06"
             + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, src, bytes(6), dst))
    frame = frame.ljust(60, b"\0")
    return struct.pack("!I", len(frame)) + frame


def _is_arp_reply(frame: bytes) -> bool:
    return len(frame) >= 42 and frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02"


def _pss_rss_kib(pid: int) -> tuple[int, int]:
    pss = rss = 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    return pss, rss


def _switches(pid: int) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
    return total


def _connect(inst: Instance, path: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        if inst.proc.poll() is not None:
            raise RuntimeError(f"{inst.name} exited ({inst.proc.returncode})")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            time.sleep(0.002)
            continue
        inst.qemu, inst.connected_at = sock, time.monotonic()
        return
    raise TimeoutError(f"{inst.name}: no socket at {path}")


def _await_answer(inst: Instance, deadline: float) -> None:
    assert inst.qemu is not None
    sock = inst.qemu
    buf = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            raise RuntimeError(f"{inst.name} closed the qemu connection")
        buf += data
        while len(buf) >= 4:
            (length,) = struct.unpack_from("!I", buf)
            if len(buf) < 4 + length:
                break
            frame, buf = buf[4 : 4 + length], buf[4 + length :]
            if _is_arp_reply(frame):
                inst.answered_at = time.monotonic()
                return
    raise TimeoutError(f"{inst.name}: no ARP answer")


def run_density(program: str, argv: Sequence[str], count: int, idle_seconds: float,
                progress: Any) -> DensityResult:
    """N instances of `argv` ({SOCK}, {NAME}), measured as the module docstring says."""
    result = DensityResult(program, count)
    host = HostNamespace(f"pddens-{program}"[:20])
    instances: list[Instance] = []
    request = arp_request(socket.inet_aton(host.ip4), socket.inet_aton(host.gw4))
    try:
        host.up()
        for i in range(count):
            name = f"d{i}"
            path = str(host.socket_path(name))
            command = [a.replace("{SOCK}", path).replace("{NAME}", name) for a in argv]
            started = time.monotonic()
            proc = subprocess.Popen(host.nsenter_argv(command), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL,
                                    stderr=open(host.workdir / f"{name}.log", "ab"),  # noqa: SIM115
                                    env=passtd_env(), start_new_session=True)
            inst = Instance(name, proc, started)
            instances.append(inst)
            try:
                _connect(inst, path, started + ANSWER_TIMEOUT)
                assert inst.qemu is not None
                inst.qemu.sendall(request)
                _await_answer(inst, started + ANSWER_TIMEOUT)
            except (OSError, RuntimeError, TimeoutError) as e:
                result.failures.append(str(e))
                continue
            assert inst.connected_at is not None and inst.answered_at is not None
            result.first_answer_ms.append((inst.answered_at - started) * 1000)
            result.after_connect_ms.append((inst.answered_at - inst.connected_at) * 1000)
            if (i + 1) % 25 == 0:
                progress(f"density {program}: {i + 1}/{count} instances up")
        time.sleep(2.0)  # what each does once connected (passtd: nothing; RAs, leases...)
        before = sum(_switches(inst.proc.pid) for inst in instances)
        time.sleep(idle_seconds)
        after = sum(_switches(inst.proc.pid) for inst in instances)
        result.wakeups_per_s = (after - before) / idle_seconds
        for inst in instances:
            pss, rss = _pss_rss_kib(inst.proc.pid)
            if pss:
                result.pss_kib.append(pss)
                result.rss_kib.append(rss)
    finally:
        for inst in instances:
            if inst.qemu is not None:
                inst.qemu.close()
            terminate(inst.proc, 5.0, group=True)
        host.down()
    return result


def render(results: Sequence[DensityResult], count: int) -> list[str]:
    out = [f"### Density: {count} instances, each with qemu connected, idle", "",
           "| program | answered | PSS total MiB | PSS median MiB | PSS max MiB | RSS median MiB "
           "| first answer ms (median / p95 / max) | answer after connect ms | idle wakeups/s "
           "(all) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        s = result.summary()

        def f(x: float | None, digits: int = 1) -> str:
            return "-" if x is None else f"{x:.{digits}f}"

        out.append(f"| {s['program']} | {s['answered']}/{s['instances']} | "
                   f"{f(s['pss_total_mib'])} | {f(s['pss_median_mib'])} | {f(s['pss_max_mib'])} "
                   f"| {f(s['rss_median_mib'])} | {f(s['first_answer_ms_median'], 0)} / "
                   f"{f(s['first_answer_ms_p95'], 0)} / {f(s['first_answer_ms_max'], 0)} | "
                   f"{f(s['after_connect_ms_median'], 2)} | {f(s['idle_wakeups_per_s'], 2)} |")
    return out
