"""`passtd bench`: passtd against the reference passt, in the same run, on the lab.

    passtd bench [--time SEC] [--rounds N] [--only REGEX] [--programs passtd,passt]
                 [--json FILE] [--quick] [--wait-idle SEC] [--idle-time SEC]
                 [--wire WIRE] [--prog-passtd CMD] [--prog-passt CMD]

Design
------
Each program gets a lab of its own (passtd.tools.lab: an isolated host namespace behind a dead
end, one tap guest behind the same wire, `whole` by default) and the same forward, host
15201 -> guest 5201. Both stay up for the whole run, their servers too: `iperf3 -s` on
the host namespace (reached from the guest through the gateway address, which both map to
host loopback) and in the guest (reached through the forward), and the bench's own
ping-pong and accept-and-close servers (stdlib, below) on the host namespace.

Tests, named DIRECTION/IP/MTU or KIND/IP (what --only matches):

* g2h/4/65520 ... h2g/6/1500: bulk TCP, iperf3 with default options for --time seconds.
  g2h: the guest's `iperf3 -c <gateway>`; h2g: the host namespace's
  `iperf3 -c 127.0.0.1|::1 -p 15201`. Guest MTU 65520 is what both programs advertise;
  for 1500 the bench sets tap0's MTU, so the guest sends and announces MSS 1460 and both
  programs send it 1500-byte frames. Result: the receiver's Gbit/s.
* rr/4, rr/6: 1-byte ping-pong over one TCP connection, guest -> host loopback; result:
  the median round trip in microseconds.
* crr/4, crr/6: connect+close rate: the guest connects, the host server accepts and
  closes at once, the guest waits for that close and closes; result: connections/s.
* idle/no-guest, idle/guest, idle/after: each instance's RSS and wakeups per second
  over --idle-time seconds: before a guest connects, with a connected guest that is quiet
  (DHCP and SLAAC done, its tap0 counters still), and once more after all the tests.

Within a round every test runs once per program, back to back, and the programs' order
rotates from round to round, so a drift of the machine hits both alike. The tables show
medians over rounds, their range, and the passtd/passt ratios judged against TARGETS.

Measures. CPU is utime+stime of the whole process (/proc/PID/stat, threads included) over
the run's wall time, in % of one core; the same for the wire. "Other CPU" is the CPU that
processes outside the bench's namespaces used meanwhile (kernel threads and the bench
itself excluded; processes that end within the window are missed): the load of other users
of the machine, which perturbs a run. Wakeups are context switches, voluntary and
involuntary, summed over the instance's threads (/proc/PID/task/*/status): a process
asleep in epoll_wait without a timer has none, each return from the wait is one. The
guest kernel's TCP counters (GUEST_COUNTERS) around each run tell what the program did to
its TCP: retransmissions, out-of-order arrivals, bad checksums.

Output: progress on stderr, markdown tables on stdout, every run with --json. The exit
status is 0 once the tables are printed, whatever the targets say (a measurement); 1 when
the bench itself could not run (missing tool, a lab or a program that does not come up),
2 for bad usage.

Not done: the TCG VM flavour (emulation caps it near 1 Gbit/s, tests/guestvm), UDP
throughput, parallel streams, statistics beyond median and range. Targets are judged here
only, never by timed tests.

Traffic helpers: `python -m passtd.tools.bench {rr,crr,rr-server,crr-server} ...` are the small
stdlib programs the bench runs inside the lab's namespaces (one JSON line out).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from passtd import __version__

from .lab import (
    NETNS_DIR,
    HostNamespace,
    LabError,
    Netns,
    Program,
    TapGuest,
    missing_requirements,
    passtd_env,
)

PREFIX_FAMILY = "pdb"  # labs are named pdb-<pid>-<program>
IPERF_PORT = 5201  # iperf3 -s on the host namespace (g2h) and in the guest (h2g)
FORWARD_PORT = 15201  # host port both programs forward to guest IPERF_PORT
RR_PORT = 5301  # ping-pong server on the host namespace
CRR_PORT = 5302  # accept-and-close server on the host namespace
MTUS = (65520, 1500)
OURS, REFERENCE = "passtd", "passt"
PROGRAMS = (OURS, REFERENCE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20

IDLE_BUSY_PCT = 10.0  # --wait-idle: "quiet" is the machine below this (all cores = 100 %)
QUIET_FRAMES_S = 2.0  # a guest is quiet once its tap0 counters stood still this long
STALL_FRACTION = 0.1  # an iperf3 interval below this share of the run's rate is a stall
PERTURBED_OTHER_CPU = 20.0  # % of a core: above this, say the run was perturbed


def default_argv(program: str) -> list[str]:
    """The command of `program` ({SOCK}: its socket). passtd ignores /etc/passtd.yaml."""
    forward = f"{FORWARD_PORT}:{IPERF_PORT}"
    if program == OURS:
        return [sys.executable, "-m", "passtd", "run", "bench", "--config", "/dev/null",
                "--socket", "{SOCK}", "--bus", "none", "-D", "none", "-S", "none",
                "-t", forward]
    return ["passt", "-f", "-q", "-s", "{SOCK}", "--no-dhcp-dns", "--no-dhcp-search",
            "-t", forward]


# --- tests and targets -------------------------------------------------------------------


@dataclass(frozen=True)
class Test:
    """One cell of the matrix: kind g2h/h2g (bulk), rr or crr (latency)."""

    kind: str
    family: int
    mtu: int = MTUS[0]

    @property
    def bulk(self) -> bool:
        return self.kind in ("g2h", "h2g")

    @property
    def name(self) -> str:
        base = f"{self.kind}/{self.family}"
        return f"{base}/{self.mtu}" if self.bulk else base

    @property
    def unit(self) -> str:
        return {"rr": "µs", "crr": "conn/s"}.get(self.kind, "Gbit/s")


MATRIX = tuple([Test(d, f, m) for m in MTUS for d in ("g2h", "h2g") for f in (4, 6)]
               + [Test(k, f) for k in ("rr", "crr") for f in (4, 6)])
QUICK_MATRIX = (Test("g2h", 4), Test("h2g", 6, 1500), Test("rr", 4), Test("crr", 6))
IDLE_STATES = ("no-guest", "guest", "after")


@dataclass(frozen=True)
class Targets:
    """What passtd must reach, as passtd/passt ratios of medians of the same run (the
    targets of "Performance II"; docs/BENCHMARK.md lists them)."""

    bulk_ratio_min: tuple[tuple[int, float], ...] = ((65520, 1.0), (1500, 1.0))
    cpu_per_gbit_ratio_max: tuple[tuple[int, float], ...] = ((65520, 2.0), (1500, 1.5))
    rr_ratio_max: float = 1.2  # round-trip time
    crr_ratio_min: float = 0.9  # connections per second
    idle_rss_mib_max: float = 30.0  # < this, passtd alone
    idle_wakeups_max: float = 0.0  # per second, passtd alone

    def bulk_min(self, mtu: int) -> float:
        return dict(self.bulk_ratio_min)[mtu]

    def cpu_max(self, mtu: int) -> float:
        return dict(self.cpu_per_gbit_ratio_max)[mtu]


TARGETS = Targets()


# --- measuring: /proc ------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of the process, all its threads included (clock ticks)."""
    fields = _stat_fields(pid)
    return int(fields[11]) + int(fields[12]) if fields else None


def _status(pid: int, task: str = "") -> dict[str, str]:
    path = f"/proc/{pid}/task/{task}/status" if task else f"/proc/{pid}/status"
    try:
        with open(path) as f:
            return dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return {}


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB: resident now, and the peak."""
    status = _status(pid)
    return (int(status.get("VmRSS", "0 kB").split()[0]),
            int(status.get("VmHWM", "0 kB").split()[0]))


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches summed over the process's threads."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            status = _status(pid, task)
            total += sum(int(status.get(k, "0")) for k in
                         ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
    return total


def machine_jiffies() -> tuple[int, int, int]:
    """(busy, total, steal) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal, steal


def _netns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def foreign_ticks(own_namespaces: set[tuple[int, int]]) -> dict[int, int]:
    """CPU ticks of each user process outside `own_namespaces` (not this one either)."""
    me = os.getpid()
    ticks = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        ns = _netns_id(f"/proc/{pid}/ns/net")
        if ns is None or ns in own_namespaces:
            continue
        fields = _stat_fields(pid)
        if fields and fields[1] not in ("0", "2") and pid != 2:  # not kthreadd's children
            ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


@dataclass
class CpuWindow:
    """CPU use of given processes, of the machine and of other users over a window."""

    pids: dict[str, int]
    own_namespaces: set[tuple[int, int]]
    wall: float = 0.0
    ticks: dict[str, int | None] = field(default_factory=dict)
    machine: tuple[int, int, int] = (0, 0, 0)
    others: dict[int, int] = field(default_factory=dict)

    def start(self) -> CpuWindow:
        self.others = foreign_ticks(self.own_namespaces)
        self.machine = machine_jiffies()
        self.ticks = {k: cpu_ticks(pid) for k, pid in self.pids.items()}
        self.wall = time.monotonic()
        return self

    def stop(self) -> dict[str, float | None]:
        """% of one core for each of `pids` and "other"; % of the machine for "busy" and
        "steal"; "secs" is the window's length."""
        wall = time.monotonic() - self.wall
        ticks = {k: cpu_ticks(pid) for k, pid in self.pids.items()}
        machine = machine_jiffies()
        others = foreign_ticks(self.own_namespaces)

        def pct(delta_ticks: float) -> float:
            return 100.0 * delta_ticks / CLK_TCK / wall if wall > 0 else 0.0

        out: dict[str, float | None] = {}
        for k, t1 in ticks.items():
            t0 = self.ticks.get(k)
            out[k] = pct(t1 - t0) if t0 is not None and t1 is not None else None
        out["other"] = pct(sum(max(0, t - self.others.get(pid, 0)) for pid, t in others.items()))
        busy, total, steal = (b - a for a, b in zip(self.machine, machine, strict=True))
        out["busy"] = 100.0 * busy / total if total > 0 else None
        out["steal"] = 100.0 * steal / total if total > 0 else None
        out["secs"] = wall
        return out


def machine_busy_pct(seconds: float) -> float:
    """Whole-machine busy % (all cores = 100 %) over `seconds`."""
    b0, t0, _ = machine_jiffies()
    time.sleep(seconds)
    b1, t1, _ = machine_jiffies()
    return 100.0 * (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


# The guest kernel's view of the program: segments it retransmitted (the program lost or
# was late to acknowledge them), out-of-order segments it received (the program dropped or
# reordered some), segments with a bad checksum.
GUEST_COUNTERS = {"retr": "Tcp:RetransSegs", "ooo": "TcpExt:TCPOFOQueue",
                  "csum_errors": "Tcp:InCsumErrors"}


def parse_snmp(text: str, wanted: dict[str, str]) -> dict[str, int]:
    """Pick `wanted` ({label: "Section:Name"}) from /proc/net/snmp or netstat text, whose
    sections come as pairs of lines: names, then values."""
    values: dict[str, int] = {}
    lines = text.splitlines()
    for names, nums in zip(lines[::2], lines[1::2], strict=False):
        section, _, names = names.partition(":")
        if not nums.startswith(section + ":"):
            continue
        for name, num in zip(names.split(), nums.split()[1:], strict=False):
            values[f"{section}:{name}"] = int(num)
    return {label: values[key] for label, key in wanted.items() if key in values}


# --- one program, its lab, its guest, its servers ------------------------------------


class ProgramRig:
    """A program under test in a lab of its own, with a guest and the servers."""

    def __init__(self, program: str, argv: Sequence[str], prefix: str, wire: str) -> None:
        self.program = program
        self.argv = list(argv)
        self.wire = wire
        self.host = HostNamespace(prefix)
        self.prog: Program | None = None
        self.guest: TapGuest | None = None
        self.mtu: int | None = None
        self.restarts = 0

    def up(self) -> None:
        """The lab and the program (no guest yet)."""
        self.host.up()
        self.start_program()

    def start_program(self) -> None:
        self.prog = self.host.start_program(self.argv, name=self.program, timeout=20.0,
                                            env=passtd_env())

    def connect_guest(self) -> None:
        """Bring the guest up (DHCP, SLAAC) and start every server."""
        assert self.prog is not None
        guest = self.guest = TapGuest(self.host, self.prog.socket, wire=self.wire)
        guest.up()
        self.mtu = guest.mtu
        host = self.host
        host.spawn(["iperf3", "-s", "-p", str(IPERF_PORT)], log=host.workdir / "iperf3-s.log")
        guest.spawn(["iperf3", "-s", "-p", str(IPERF_PORT)], log=guest.workdir / "iperf3-s.log")
        for helper, port in (("rr-server", RR_PORT), ("crr-server", CRR_PORT)):
            host.spawn(_helper_argv(helper, "--port", str(port)),
                       log=host.workdir / f"{helper}.log", env=passtd_env())
        for ns, port in ((host, IPERF_PORT), (guest, IPERF_PORT), (host, RR_PORT),
                         (host, CRR_PORT)):
            ns.wait_listening(port, 10.0)

    def restart(self) -> None:
        """After the program died: a new program, a new guest, new servers."""
        self.restarts += 1
        if self.guest is not None:
            self.guest.down()
            self.guest = None
        self.host.down()
        self.up()
        self.connect_guest()

    def set_mtu(self, mtu: int) -> None:
        assert self.guest is not None
        if self.mtu == mtu:
            return
        res = self.guest.run(["ip", "link", "set", "dev", self.guest.iface, "mtu", str(mtu)])
        if res.returncode != 0:
            raise LabError(f"setting the MTU of {self.guest.name}: {res.stderr.strip()}")
        self.mtu = mtu

    def gateway(self, family: int) -> str:
        assert self.guest is not None
        gw = self.guest.gw4 if family == 4 else self.guest.gw6_scoped
        if not gw:
            raise LabError(f"the {self.program} guest has no IPv{family} gateway")
        return gw

    def namespaces(self) -> list[str]:
        names = [self.host.name, self.host.up_name]
        return [*names, self.guest.name] if self.guest else names

    def tap_frames(self) -> int | None:
        """Frames through the guest's tap0 so far, both ways."""
        if self.guest is None:
            return None
        try:
            (link,) = self.guest.ip_json("-s", "link", "show", "dev", self.guest.iface)
        except (LabError, ValueError):
            return None
        stats = link.get("stats64", {})
        return int(stats.get("rx", {}).get("packets", 0)) + int(
            stats.get("tx", {}).get("packets", 0))

    def guest_tcp_counters(self) -> dict[str, int]:
        """GUEST_COUNTERS of the guest's kernel (/proc/net/snmp and netstat)."""
        assert self.guest is not None
        res = self.guest.run(["cat", "/proc/net/snmp", "/proc/net/netstat"], timeout=10)
        return parse_snmp(res.stdout, GUEST_COUNTERS)

    def down(self) -> None:
        self.host.down()  # guests included


def _helper_argv(helper: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "passtd.tools.bench", helper, *args]


# --- runs ------------------------------------------------------------------------------


@dataclass
class Run:
    """One test, one program, one round."""

    test: str
    program: str
    round: int
    value: float | None = None  # Gbit/s, µs per round trip, or connections/s
    cpu: float | None = None  # the program, % of one core
    wire_cpu: float | None = None
    other_cpu: float | None = None  # % of one core
    machine_busy: float | None = None  # % of the whole machine
    steal: float | None = None
    secs: float | None = None
    retransmits: int | None = None  # iperf3's sender (g2h: the guest; h2g: host loopback)
    guest: dict[str, int] = field(default_factory=dict)  # GUEST_COUNTERS deltas
    stalls: int | None = None  # iperf3 intervals below STALL_FRACTION of the rate
    count: int | None = None  # round trips or connections
    errors: int | None = None  # failed connections (crr)
    error: str | None = None

    @property
    def cpu_per_unit(self) -> float | None:
        """CPU % per Gbit/s (bulk) or per 1000 transactions/s (rr, crr)."""
        if self.cpu is None or not self.value:
            return None
        if self.test.startswith("rr/"):
            return self.cpu / (1e9 / self.value / 1000)  # value is µs per round trip
        if self.test.startswith("crr/"):
            return self.cpu / (self.value / 1000)
        return self.cpu / self.value


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def _timed(rig: ProgramRig, run: Run, own: set[tuple[int, int]], ns: Netns,
           argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `argv` in `ns`, measuring CPU and the guest's TCP counters around it."""
    assert rig.prog is not None and rig.guest is not None and rig.guest.wire_proc is not None
    before = rig.guest_tcp_counters()
    window = CpuWindow({"prog": rig.prog.pid, "wire": rig.guest.wire_proc.pid}, own).start()
    try:
        return ns.run(argv, timeout=timeout, env=passtd_env())
    finally:
        cpu = window.stop()
        run.cpu, run.wire_cpu, run.other_cpu = cpu["prog"], cpu["wire"], cpu["other"]
        run.machine_busy, run.steal, run.secs = cpu["busy"], cpu["steal"], cpu["secs"]
        after = rig.guest_tcp_counters()
        run.guest = {k: after[k] - before[k] for k in after if k in before}


def run_bulk(rig: ProgramRig, test: Test, seconds: int, run: Run,
             own: set[tuple[int, int]]) -> None:
    """iperf3 with default options for `seconds`; fills `run`."""
    assert rig.guest is not None
    rig.set_mtu(test.mtu)
    if test.kind == "g2h":
        ns: Netns = rig.guest
        target, port = rig.gateway(test.family), IPERF_PORT
    else:
        ns, port = rig.host, FORWARD_PORT
        target = "127.0.0.1" if test.family == 4 else "::1"
    argv = ["iperf3", "-c", target, "-p", str(port), "-t", str(seconds), "-J"]
    res = _timed(rig, run, own, ns, argv, seconds + 30)
    try:
        out = json.loads(res.stdout)
    except ValueError:
        run.error = f"iperf3 status {res.returncode}: {_tail(res.stdout + res.stderr)}"
        return
    if "error" in out:
        run.error = f"iperf3: {out['error']}"
        return
    end = out.get("end", {})
    bps = end.get("sum_received", {}).get("bits_per_second")
    run.value = bps / 1e9 if bps is not None else None
    run.retransmits = end.get("sum_sent", {}).get("retransmits")
    rates = [i["sum"]["bits_per_second"] for i in out.get("intervals", [])]
    run.stalls = sum(1 for r in rates if bps and r < STALL_FRACTION * bps)


def run_latency(rig: ProgramRig, test: Test, seconds: int, run: Run,
                own: set[tuple[int, int]]) -> None:
    """The ping-pong (rr) or connect+close (crr) client in the guest; fills `run`."""
    assert rig.guest is not None
    rig.set_mtu(MTUS[0])
    port = RR_PORT if test.kind == "rr" else CRR_PORT
    argv = _helper_argv(test.kind, "--host", rig.gateway(test.family), "--port", str(port),
                        "--time", str(seconds))
    res = _timed(rig, run, own, rig.guest, argv, seconds + 60)
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        run.error = f"{test.kind} client status {res.returncode}: {_tail(res.stderr)}"
        return
    run.count, run.errors = out.get("count"), out.get("errors")
    run.value = out.get("median_us") if test.kind == "rr" else out.get("rate")
    if out.get("error"):
        run.error = out["error"]


@dataclass
class IdleSample:
    """One instance over an idle window."""

    state: str
    program: str
    rss_mib: float | None = None
    peak_rss_mib: float | None = None
    wakeups_per_s: float | None = None
    cpu: float | None = None  # % of one core
    guest_frames: int | None = None  # through tap0 during the window (None: no guest)
    secs: float | None = None
    error: str | None = None


def wait_guests_quiet(rigs: Sequence[ProgramRig], timeout: float) -> None:
    """Wait until no guest's tap0 counters moved for QUIET_FRAMES_S (or `timeout`)."""
    deadline = time.monotonic() + timeout
    last = [rig.tap_frames() for rig in rigs]
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = [rig.tap_frames() for rig in rigs]
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= QUIET_FRAMES_S:
            return


def measure_idle(rigs: Sequence[ProgramRig], state: str, seconds: float) -> list[IdleSample]:
    """RSS and wakeups of every rig's program over the same `seconds` window."""
    before = {}
    for rig in rigs:
        pid = rig.prog.pid if rig.prog and rig.prog.alive() else None
        if pid is not None:
            before[rig.program] = (context_switches(pid), cpu_ticks(pid), rig.tap_frames())
    began = time.monotonic()
    time.sleep(seconds)
    secs = time.monotonic() - began
    samples = []
    for rig in rigs:
        sample = IdleSample(state, rig.program, secs=secs)
        samples.append(sample)
        if rig.program not in before or rig.prog is None or not rig.prog.alive():
            sample.error = f"{rig.program} is not running"
            continue
        switches, ticks, frames = before[rig.program]
        pid = rig.prog.pid
        rss, peak = memory_kib(pid)
        sample.rss_mib, sample.peak_rss_mib = rss / 1024, peak / 1024
        sample.wakeups_per_s = (context_switches(pid) - switches) / secs
        ticks_now = cpu_ticks(pid)
        if ticks is not None and ticks_now is not None:
            sample.cpu = 100.0 * (ticks_now - ticks) / CLK_TCK / secs
        frames_now = rig.tap_frames()
        if frames is not None and frames_now is not None:
            sample.guest_frames = frames_now - frames
    return samples


# --- summaries and verdicts (pure) -----------------------------------------------------


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    n: int


def spread(values: Iterable[float | None]) -> Spread | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return Spread(statistics.median(vals), min(vals), max(vals), len(vals))


def ratio(ours: Spread | None, reference: Spread | None) -> float | None:
    if ours is None or reference is None or reference.median == 0:
        return None
    return ours.median / reference.median


@dataclass
class Row:
    """One test's summary over rounds."""

    test: Test
    value: dict[str, Spread | None]
    cpu: dict[str, Spread | None]
    cpu_per_unit: dict[str, Spread | None]
    guest_retr: dict[str, Spread | None]
    errors: dict[str, int]
    other_cpu_max: float | None
    ratio: float | None
    cpu_ratio: float | None
    target: str
    verdict: str


def judge(test: Test, value_ratio: float | None, cpu_ratio: float | None,
          compared: bool, targets: Targets = TARGETS) -> tuple[str, str]:
    """(target text, verdict) of one row: PASS, FAIL (what), n/a (no comparison)."""
    checks: dict[str, tuple[float | None, Callable[[float], bool]]]
    if test.bulk:
        low, high = targets.bulk_min(test.mtu), targets.cpu_max(test.mtu)
        text = f"ratio >= {low:g}, CPU/Gbit ratio <= {high:g}"
        checks = {"rate": (value_ratio, lambda r: r >= low),
                  "CPU": (cpu_ratio, lambda r: r <= high)}
    elif test.kind == "rr":
        text = f"ratio <= {targets.rr_ratio_max:g}"
        checks = {"latency": (value_ratio, lambda r: r <= targets.rr_ratio_max)}
    else:
        text = f"ratio >= {targets.crr_ratio_min:g}"
        checks = {"rate": (value_ratio, lambda r: r >= targets.crr_ratio_min)}
    if not compared:
        return text, "n/a"
    failed = [what for what, (r, ok) in checks.items() if r is None or not ok(r)]
    return text, "PASS" if not failed else f"FAIL ({', '.join(failed)})"


def summarize(tests: Sequence[Test], runs: Sequence[Run], programs: Sequence[str],
              targets: Targets = TARGETS) -> list[Row]:
    rows = []
    compared = OURS in programs and REFERENCE in programs
    for test in tests:
        mine = [r for r in runs if r.test == test.name]
        if not mine:
            continue
        by_prog = {p: [r for r in mine if r.program == p] for p in programs}
        value = {p: spread(r.value for r in rs if r.error is None) for p, rs in by_prog.items()}
        cpu = {p: spread(r.cpu for r in rs if r.error is None) for p, rs in by_prog.items()}
        per = {p: spread(r.cpu_per_unit for r in rs if r.error is None)
               for p, rs in by_prog.items()}
        retr = {p: spread(r.guest.get("retr") for r in rs if r.error is None)
                for p, rs in by_prog.items()}
        errors = {p: sum(1 for r in rs if r.error is not None) for p, rs in by_prog.items()}
        others = [r.other_cpu for r in mine if r.other_cpu is not None]
        value_ratio = ratio(value.get(OURS), value.get(REFERENCE)) if compared else None
        cpu_ratio = ratio(per.get(OURS), per.get(REFERENCE)) if compared else None
        target, verdict = judge(test, value_ratio, cpu_ratio if test.bulk else None,
                                compared, targets)
        if compared and errors.get(OURS) and verdict == "PASS":
            verdict = "FAIL (errors)"
        rows.append(Row(test, value, cpu, per, retr, errors, max(others, default=None),
                        value_ratio, cpu_ratio, target, verdict))
    return rows


def judge_idle(sample: IdleSample, targets: Targets = TARGETS) -> str:
    if sample.program != OURS:
        return "-"
    if sample.rss_mib is None or sample.wakeups_per_s is None:
        return "FAIL (not running)"
    failed = []
    if sample.rss_mib >= targets.idle_rss_mib_max:
        failed.append("RSS")
    if sample.wakeups_per_s > targets.idle_wakeups_max:
        failed.append("wakeups")
    return "PASS" if not failed else f"FAIL ({', '.join(failed)})"


# --- rendering -------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fmt_retr(s: Spread | None) -> str:
    """The guest's TCP retransmissions (median), or - where they were not read."""
    return "-" if s is None else f"{s.median:.0f}"


def _fmt_spread(s: Spread | None, digits: int, unit: str = "") -> str:
    if s is None:
        return "error"
    unit = f" {unit}" if unit else ""
    if s.n == 1:
        return f"{s.median:.{digits}f}{unit}"
    return f"{s.median:.{digits}f}{unit} ({s.low:.{digits}f}-{s.high:.{digits}f})"


def _pct(s: Spread | None) -> str:
    return "-" if s is None else f"{s.median:.0f}%"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render(meta: dict[str, Any], rows: Sequence[Row], idle: Sequence[IdleSample],
           runs: Sequence[Run], programs: Sequence[str]) -> str:
    compared = OURS in programs and REFERENCE in programs
    out = [f"## passtd bench: {meta['rounds']} round(s) x {meta['time']} s per run, "
           f"wire {meta['wire']}", ""]
    out += [f"* {p} {meta['versions'][p]}: `{meta['commands'][p]}`" for p in programs]
    out += [f"* machine: {meta['cpus']} CPUs, kernel {meta['kernel']}, "
            f"load average at start {meta['loadavg']}"]
    out += [f"* {p} died and was restarted {n} time(s): see the runs' errors (--json)"
            for p, n in meta.get("restarts", {}).items() if n]
    out += [""]
    bulk = [r for r in rows if r.test.bulk]
    if bulk:
        header = ["test"] + [f"{p} Gbit/s" for p in programs]
        header += ["ratio"] if compared else []
        header += [f"{p} CPU" for p in programs]
        header += ["CPU/Gbit ratio"] if compared else []
        header += [f"{p} guest retr" for p in programs]
        header += ["other CPU max", "target", "result"]
        lines = []
        for r in bulk:
            cells = [r.test.name] + [_fmt_spread(r.value[p], 2) for p in programs]
            cells += [_fmt(r.ratio)] if compared else []
            cells += [_pct(r.cpu[p]) for p in programs]
            cells += [_fmt(r.cpu_ratio)] if compared else []
            cells += [_fmt_retr(r.guest_retr[p]) for p in programs]
            cells += [_fmt(r.other_cpu_max, 0) + ("%" if r.other_cpu_max is not None else ""),
                      r.target, r.verdict]
            lines.append(cells)
        out += ["### Bulk TCP (iperf3), medians over rounds (min-max)", ""]
        out += [*_table(header, lines), ""]
    latency = [r for r in rows if not r.test.bulk]
    if latency:
        header = ["test"] + list(programs) + (["ratio"] if compared else [])
        header += [f"{p} CPU" for p in programs] + ["other CPU max", "target", "result"]
        lines = []
        for r in latency:
            digits = 1 if r.test.kind == "rr" else 0
            cells = [r.test.name] + [_fmt_spread(r.value[p], digits, r.test.unit)
                                     for p in programs]
            cells += [_fmt(r.ratio)] if compared else []
            cells += [_pct(r.cpu[p]) for p in programs]
            cells += [_fmt(r.other_cpu_max, 0) + ("%" if r.other_cpu_max is not None else ""),
                      r.target, r.verdict]
            lines.append(cells)
        out += ["### Request/response (rr: median round trip; crr: connect+close rate)", ""]
        out += [*_table(header, lines), ""]
    if idle:
        header = ["state"] + [f"{p} RSS MiB" for p in programs]
        header += [f"{p} wakeups/s" for p in programs]
        header += [f"{p} guest frames" for p in programs] + ["target", "result"]
        target = (f"{OURS} RSS < {TARGETS.idle_rss_mib_max:g} MiB, "
                  f"wakeups/s <= {TARGETS.idle_wakeups_max:g}")
        lines = []
        for state in IDLE_STATES:
            samples = {s.program: s for s in idle if s.state == state}
            if not samples:
                continue
            cells = [state]
            cells += [_fmt(getattr(samples.get(p), "rss_mib", None), 1) for p in programs]
            cells += [_fmt(getattr(samples.get(p), "wakeups_per_s", None), 1) for p in programs]
            cells += ["-" if getattr(samples.get(p), "guest_frames", None) is None
                      else str(samples[p].guest_frames) for p in programs]
            ours = samples.get(OURS)
            cells += [target, judge_idle(ours) if ours else "-"]
            lines.append(cells)
        out += [f"### Idle instance ({meta['idle_time']} s windows)", ""]
        out += [*_table(header, lines), ""]
    out += load_summary(runs)
    return "\n".join(out) + "\n"


def load_summary(runs: Sequence[Run]) -> list[str]:
    other = spread(r.other_cpu for r in runs)
    busy = spread(r.machine_busy for r in runs)
    steal = spread(r.steal for r in runs)
    if other is None:
        return []
    lines = [f"Machine load during the {other.n} runs: other CPU (processes outside the "
             f"bench, one core = 100%) median {other.median:.0f}%, max {other.high:.0f}%; "
             f"machine busy (all cores = 100%) median "
             f"{_fmt(busy.median if busy else None, 0)}%; "
             f"steal max {_fmt(steal.high if steal else None, 0)}%."]
    perturbed = [r for r in runs if r.other_cpu is not None and r.other_cpu > PERTURBED_OTHER_CPU]
    if perturbed:
        lines.append(f"{len(perturbed)} of {other.n} runs were perturbed (other CPU > "
                     f"{PERTURBED_OTHER_CPU:g}%; the column 'other CPU max' shows which "
                     f"tests): rerun on a quiet machine (--wait-idle) for firm figures.")
    return lines


# --- the command -----------------------------------------------------------------------


def progress(began: float, text: str) -> None:
    print(f"[{time.monotonic() - began:7.1f}s] {text}", file=sys.stderr, flush=True)


def _describe(run: Run, test: Test) -> str:
    if run.error:
        return f"ERROR {run.error}"
    digits = 2 if test.bulk else (1 if test.kind == "rr" else 0)
    text = f"{_fmt(run.value, digits)} {test.unit}  CPU {_fmt(run.cpu, 0)}%"
    text += f" (wire {_fmt(run.wire_cpu, 0)}%)"
    if test.bulk:
        text += f"  stalls {run.stalls}"
    if run.guest:
        text += "  guest " + " ".join(f"{k} {v}" for k, v in run.guest.items())
    if run.errors:
        text += f"  failed connections {run.errors}"
    return text + f"  other CPU {_fmt(run.other_cpu, 0)}%"


def _remove_stale_labs() -> None:
    """Remove labs left by killed benches (their pid is in the prefix)."""
    with contextlib.suppress(FileNotFoundError):
        stale = set()
        for name in os.listdir(NETNS_DIR):
            m = re.match(rf"({PREFIX_FAMILY}-(\d+)-[^-]+)-", name)
            if m and not Path(f"/proc/{m[2]}").exists():
                stale.add(m[1])
        for prefix in stale:
            HostNamespace(prefix).down()


def _parallel(rigs: Sequence[ProgramRig], action: Callable[[ProgramRig], None]) -> None:
    with concurrent.futures.ThreadPoolExecutor(len(rigs)) as pool:
        for future in [pool.submit(action, rig) for rig in rigs]:
            future.result()


def _own_namespaces(rigs: Sequence[ProgramRig]) -> set[tuple[int, int]]:
    ids = {_netns_id(str(NETNS_DIR / name)) for rig in rigs for name in rig.namespaces()}
    return {i for i in ids if i is not None}


def _version(program: str, argv: Sequence[str]) -> str:
    if program == OURS:
        return __version__
    try:
        res = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", Path(argv[0]).name],
                             capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return res.stdout.strip() or "?"


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="passtd bench",
        description="Benchmark passtd against the reference passt on isolated network "
                    "namespaces (root): bulk TCP both ways, IPv4/IPv6, guest MTU 65520 and "
                    "1500, request/response latency, idle RSS and wakeups. Progress on "
                    "stderr, markdown tables on stdout. See docs/BENCHMARK.md.")
    parser.add_argument("--time", type=int, default=10, metavar="SEC",
                        help="seconds per iperf3 and latency run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, metavar="N",
                        help="rounds of the whole matrix (default 3)")
    parser.add_argument("--only", metavar="REGEX",
                        help="run the tests whose name matches, e.g. 'g2h/4/65520', "
                             "'/1500', '^rr', 'idle'")
    parser.add_argument("--programs", default=",".join(PROGRAMS), metavar="LIST",
                        help="comma-separated, of passtd and passt (default: both)")
    parser.add_argument("--json", metavar="FILE", help="write every run and the summary here")
    parser.add_argument("--quick", action="store_true",
                        help="a short check that the bench works (CI): 1 round of 1 s runs, "
                             "a few tests")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SEC",
                        help=f"before each run, wait up to SEC for the machine to be below "
                             f"{IDLE_BUSY_PCT:g}%% busy")
    parser.add_argument("--idle-time", type=float, default=10.0, metavar="SEC",
                        help="length of each idle window (default 10)")
    parser.add_argument("--density", type=int, default=0, metavar="N",
                        help="instead of the matrix: N instances of each program, qemu "
                             "connected and idle: memory (PSS), time to the first answer, "
                             "idle wakeups (passtd/tools/density.py)")
    parser.add_argument("--wire", default="whole", choices=("whole", "qemu", "pad"),
                        help="lab wire between the guest's tap and the program (default "
                             "whole; qemu 7.2's hub crashes under guest->host bulk load)")
    for p in PROGRAMS:
        parser.add_argument(f"--prog-{p}", metavar="CMD",
                            help=f"command of {p}, {{SOCK}} for its socket, instead of: "
                                 f"{shlex.join(default_argv(p))}")
    args = parser.parse_args(argv)
    if args.quick:
        args.time, args.rounds, args.idle_time = 1, 1, 1.0
    args.programs = [p.strip() for p in args.programs.split(",") if p.strip()]
    unknown = set(args.programs) - set(PROGRAMS)
    if unknown or not args.programs or len(set(args.programs)) != len(args.programs):
        parser.error(f"--programs: a list of {', '.join(PROGRAMS)}")
    if args.density < 0:
        parser.error("--density: a number of instances")
    if args.time < 1 or args.rounds < 1 or args.idle_time <= 0:
        parser.error("--time, --rounds and --idle-time must be positive")
    return args


def density_argv(program: str) -> list[str]:
    """One of many instances ({NAME}, {SOCK}): no forward (they would share its port)."""
    if program == OURS:
        return [sys.executable, "-m", "passtd", "run", "{NAME}", "--config", "/dev/null",
                "--socket", "{SOCK}", "--bus", "none", "-D", "none", "-S", "none"]
    return ["passt", "-f", "-q", "-s", "{SOCK}", "--no-dhcp-dns", "--no-dhcp-search"]


def run_density_mode(args: argparse.Namespace) -> int:
    from .density import render as render_density
    from .density import run_density

    began = time.monotonic()
    results = []
    for program in args.programs:
        given = getattr(args, f"prog_{program}")
        argv = shlex.split(given) if given else density_argv(program)
        progress(began, f"density: starting {args.density} instances of {program}")
        results.append(run_density(program, argv, args.density, args.idle_time,
                                   lambda text: progress(began, text)))
    print("\n".join(render_density(results, args.density)))
    if args.json:
        Path(args.json).write_text(json.dumps([r.summary() for r in results], indent=1) + "\n")
    return 0 if all(not r.failures for r in results) else 1


def main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    if args.density:
        return run_density_mode(args)
    commands = {p: shlex.split(getattr(args, f"prog_{p}")) if getattr(args, f"prog_{p}")
                else default_argv(p) for p in args.programs}
    tools = ["iperf3", *(cmd[0] for cmd in commands.values() if cmd)]
    missing = missing_requirements(tools)
    if missing or not all(commands.values()):
        print("passtd bench: cannot run: " + "; ".join(missing or ["empty command"]),
              file=sys.stderr)
        return 1
    try:
        only = re.compile(args.only) if args.only else None
    except re.error as e:
        print(f"passtd bench: --only {args.only!r}: {e}", file=sys.stderr)
        return 2
    tests = [t for t in (QUICK_MATRIX if args.quick else MATRIX)
             if only is None or only.search(t.name)]
    idle_states = [s for s in IDLE_STATES if only is None or only.search(f"idle/{s}")]
    if not tests and not idle_states:
        print(f"passtd bench: no test matches {args.only!r}", file=sys.stderr)
        return 2

    meta: dict[str, Any] = {
        "time": args.time, "rounds": args.rounds, "wire": args.wire,
        "idle_time": args.idle_time, "cpus": os.cpu_count(), "kernel": platform.release(),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "commands": {p: shlex.join(c) for p, c in commands.items()},
        "versions": {p: _version(p, c) for p, c in commands.items()},
        "targets": dataclasses.asdict(TARGETS), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _remove_stale_labs()
    rigs = [ProgramRig(p, commands[p], f"{PREFIX_FAMILY}-{os.getpid()}-{p}", args.wire)
            for p in args.programs]
    runs: list[Run] = []
    idle: list[IdleSample] = []
    began = time.monotonic()
    status = 0
    try:
        try:
            progress(began, f"starting {', '.join(args.programs)} in their labs")
            _parallel(rigs, ProgramRig.up)
            if "no-guest" in idle_states:
                time.sleep(1.0)  # let the programs finish starting
                progress(began, f"idle window, no guest ({args.idle_time:g} s)")
                idle += measure_idle(rigs, "no-guest", args.idle_time)
            progress(began, "connecting the guests (DHCP, SLAAC) and starting servers")
            _parallel(rigs, ProgramRig.connect_guest)
            wait_guests_quiet(rigs, 15.0)  # SLAAC's last frames: before any measurement
            if "guest" in idle_states:
                progress(began, f"idle window, quiet guest ({args.idle_time:g} s)")
                idle += measure_idle(rigs, "guest", args.idle_time)
        except (LabError, TimeoutError, OSError, subprocess.SubprocessError) as e:
            print(f"passtd bench: setting up failed: {e}", file=sys.stderr)
            return 1
        run_rounds(rigs, tests, args, began, runs)
        if "after" in idle_states and tests:
            wait_guests_quiet(rigs, 15.0)
            progress(began, f"idle window, after the tests ({args.idle_time:g} s)")
            idle += measure_idle(rigs, "after", args.idle_time)
    except KeyboardInterrupt:
        print("passtd bench: interrupted; what was measured so far:", file=sys.stderr)
        for run in runs:
            if run.value is None and run.error is None:
                run.error = "interrupted"
        status = 130
    finally:
        for rig in rigs:
            rig.down()
    meta["restarts"] = {rig.program: rig.restarts for rig in rigs}
    rows = summarize(tests, runs, args.programs)
    print(render(meta, rows, idle, runs, args.programs), end="", flush=True)
    if args.json:
        report = {"meta": meta, "runs": [dataclasses.asdict(r) for r in runs],
                  "idle": [dataclasses.asdict(s) for s in idle],
                  "rows": [_row_json(r) for r in rows]}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return status


def _row_json(row: Row) -> dict[str, Any]:
    out = dataclasses.asdict(row)
    out["test"] = row.test.name
    return out


def run_rounds(rigs: Sequence[ProgramRig], tests: Sequence[Test], args: argparse.Namespace,
               began: float, runs: list[Run]) -> None:
    """Every test in every round, programs back to back, their order rotating; each run
    is appended to `runs` as it starts (so an interrupted bench keeps what it measured)."""
    # bulk tests grouped by MTU (fewer MTU changes), latency at the advertised MTU last
    ordered = sorted(tests, key=lambda t: (not t.bulk, MTUS.index(t.mtu)))
    for rnd in range(1, args.rounds + 1):
        shift = (rnd - 1) % len(rigs)
        order = [*rigs[shift:], *rigs[:shift]]
        for test in ordered:
            for rig in order:
                if args.wait_idle > 0:
                    _wait_idle(args.wait_idle, began)
                run = Run(test.name, rig.program, rnd)
                runs.append(run)
                measure(rig, test, run, args.time, rigs)
                progress(began, f"round {rnd}/{args.rounds} {test.name:<12} "
                                f"{rig.program:<7} {_describe(run, test)}")


def measure(rig: ProgramRig, test: Test, run: Run, seconds: int,
            rigs: Sequence[ProgramRig]) -> None:
    """One run; a program found dead is recorded as the run's error and restarted."""
    if rig.prog is None or not rig.prog.alive():
        run.error = "the program is not running"
        _try_restart(rig, run)
        return
    try:
        own = _own_namespaces(rigs)
        (run_bulk if test.bulk else run_latency)(rig, test, seconds, run, own)
    except (LabError, OSError, subprocess.SubprocessError) as e:
        run.error = f"{type(e).__name__}: {e}"
    if rig.prog is not None and not rig.prog.alive():
        run.error = (f"{rig.program} died (status {rig.prog.proc.returncode}): "
                     f"{_tail(rig.prog.log_text(), 3)}")
        _try_restart(rig, run)


def _try_restart(rig: ProgramRig, run: Run) -> None:
    if rig.restarts >= 3:
        return
    try:
        rig.restart()
    except (LabError, TimeoutError, OSError, subprocess.SubprocessError) as e:
        run.error = f"{run.error}; restarting failed: {e}"


def _wait_idle(limit: float, began: float) -> None:
    deadline = time.monotonic() + limit
    while machine_busy_pct(1.0) >= IDLE_BUSY_PCT:
        if time.monotonic() >= deadline:
            progress(began, f"machine still busy after {limit:g} s, running anyway")
            return


# --- traffic helpers: stdlib only, run inside the lab's namespaces --------------------


def _numeric_address(host: str, port: int) -> tuple[int, Any]:
    """(family, sockaddr) of a numeric address (never a name lookup)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)[0]
    return family, sockaddr


def _listener(port: int) -> socket.socket:
    """A dual-stack TCP listener on every address of the namespace."""
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::", port))
    srv.listen(1024)
    return srv


def serve_rr(port: int) -> None:
    """Echo every connection's bytes back, one connection at a time."""
    srv = _listener(port)
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    conn.sendall(data)


def serve_crr(port: int) -> None:
    """Accept and close at once."""
    srv = _listener(port)
    while True:
        conn, _ = srv.accept()
        conn.close()


def _quantile_us(samples_ns: list[int], q: float) -> float:
    ordered = sorted(samples_ns)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


RR_WARMUP = 100


def rr_client(host: str, port: int, seconds: float) -> dict[str, Any]:
    """1-byte ping-pong over one connection for `seconds`: round trips in µs."""
    family, sockaddr = _numeric_address(host, port)
    samples: list[int] = []
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sockaddr)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clock = time.perf_counter_ns
        for _ in range(RR_WARMUP):
            s.sendall(b"x")
            if not s.recv(1):
                return {"error": "the server closed during warm-up"}
        end = clock() + int(seconds * 1e9)
        while True:
            t0 = clock()
            s.sendall(b"x")
            if not s.recv(1):
                return {"error": "the server closed", "count": len(samples)}
            t1 = clock()
            samples.append(t1 - t0)
            if t1 >= end:
                break
    return {"count": len(samples), "median_us": _quantile_us(samples, 0.5),
            "p99_us": _quantile_us(samples, 0.99), "min_us": min(samples) / 1000}


CRR_MAX_ERRORS = 20


def crr_client(host: str, port: int, seconds: float) -> dict[str, Any]:
    """Connect, wait for the server's close, close; as often as possible for `seconds`."""
    family, sockaddr = _numeric_address(host, port)
    samples: list[int] = []
    errors = 0
    last_error = None
    clock = time.perf_counter_ns
    start = clock()
    end = start + int(seconds * 1e9)
    while clock() < end and errors < CRR_MAX_ERRORS:
        t0 = clock()
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(sockaddr)
                if s.recv(1):
                    raise OSError("the server sent data")
        except OSError as e:
            errors += 1
            last_error = str(e)
            continue
        samples.append(clock() - t0)
    elapsed = (clock() - start) / 1e9
    out: dict[str, Any] = {"count": len(samples), "errors": errors,
                           "rate": len(samples) / elapsed if elapsed > 0 else 0.0}
    if samples:
        out["median_us"] = _quantile_us(samples, 0.5)
    if errors >= CRR_MAX_ERRORS or not samples:
        out["error"] = f"{errors} failed connections, last: {last_error}"
    return out


def helper_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m passtd.tools.bench")
    sub = parser.add_subparsers(dest="helper", required=True)
    for name in ("rr-server", "crr-server"):
        sub.add_parser(name).add_argument("--port", type=int, required=True)
    for name in ("rr", "crr"):
        p = sub.add_parser(name)
        p.add_argument("--host", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--time", type=float, required=True)
    args = parser.parse_args(argv)
    if args.helper == "rr-server":
        serve_rr(args.port)
    elif args.helper == "crr-server":
        serve_crr(args.port)
    else:
        client = rr_client if args.helper == "rr" else crr_client
        try:
            out = client(args.host, args.port, args.time)
        except OSError as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)
        return 1 if "error" in out else 0
    return 0


if __name__ == "__main__":
    sys.exit(helper_main(sys.argv[1:]))
