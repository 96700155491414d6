"""Real systemd for tests: the host's own root file system booted in systemd-nspawn.

Design: in a private mount namespace, `/` is bind-mounted
(non-recursively) onto a work directory and `systemd-nspawn --boot --volatile=overlay`
boots it: the host tree is the read-only lower layer, a tmpfs the upper one. Everything a
test writes inside (/etc, /run, unit files, policies) vanishes at power-off and the host is
never modified; every package installed on the host is there. systemd 252 runs as the
container's PID 1 with its journal, the system bus and whatever units the tests install.

    with Container("passtd-t") as ct:           # boots, waits for running|degraded
        ct.install_file("units/passtd@.socket", "/usr/local/lib/systemd/system/")
        ct.systemctl("daemon-reload")
        ct.systemctl("start", "passtd@vm1.socket")
        ct.run(["ls", "-l", "/run/passtd"]).stdout
        ct.busctl("list")                       # from the host, on the container's bus
        ct.host_path("/run/passtd/vm1.sock")    # the same file seen from the host

Network: `--private-network` gives the container a network namespace with only `lo`.
`network=True` (the default) adds a veth pair *inside* it, eth0 198.51.100.2/24 and
2001:db8::2/64 with default routes via 198.51.100.1 and fe80::1 (documentation
addresses); its peer `deadend0` has no address and nothing behind it. Programs that look
for a default route (passtd, passt) find one, and whatever they send there goes nowhere:
no interface of the machine is involved and no traffic leaves the container. `uplink=`
gives other documentation addresses (two hosts on different networks,
tests/support/two_hosts.py).

Running things inside: `run`/`sh`/`spawn` use `nsenter -t PID1 -a` (all the container's
namespaces, a clean environment). Processes the harness starts are ended at power-off
with the container. Host files the tests need go in with `bind=`/`bind_ro=` (nspawn puts
a tmpfs on the container's /tmp, so anything under the host's /tmp must be bound), or are
copied with `install_file`/`write_file` (through /proc/PID1/root).

Units not needed are masked on the container's command line (`systemd.mask=`):
`UNNEEDED_UNITS` always (postgresql, timers, ...), and `LIBVIRT_UNITS` unless the caller
keeps them (`mask=UNNEEDED_UNITS` boots with libvirtd and its sockets, as the host enables
them). A boot takes about a second, a power-off half a second.

Failures: `journal()` returns the container's journal; `journal_log()` is a live view for
the integration conftest's LabLogs (read at report time, while the container runs); and
when a `with` block exits on an exception the journal is saved to the work directory,
which is then kept (its path is logged). Power-off also runs at interpreter exit, kills
nspawn by PID if the container does not stop, and removes what nspawn leaves on the host
(/run/systemd/nspawn/*/MACHINE). `remove_stale()` cleans up after a killed test run.

What it does not do: no image building (the host's packages are what is tested), no
host-side networking, no machined registration (`machinectl` does not see it), and no
isolation of the file system from the host beyond copy-on-write: /proc, /sys and bound
directories are the host's.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from passtd.tools.lab import terminate

LOG = logging.getLogger(__name__)

WORK_ROOT = Path(tempfile.gettempdir()) / "passtd-ct"
# The tree containers boot: the host's own root, or PASSTD_CT_ROOT (e.g. a Debian 13 tree
# made with debootstrap, passtd installed in it by its setup.sh), to check another release's
# systemd from this host.
ROOT = Path(os.environ.get("PASSTD_CT_ROOT") or "/")
NSPAWN_RUN = Path("/run/systemd/nspawn")  # what nspawn leaves on the host, per machine
REQUIRED_TOOLS = ("systemd-nspawn", "unshare", "nsenter", "mount", "ip", "busctl")

# Units the host enables that no test needs (masking postgresql.service also keeps its
# generated postgresql@VERSION-main.service from starting).
UNNEEDED_UNITS = (
    "postgresql.service", "e2scrub_reap.service", "systemd-pstore.service",
    "systemd-timesyncd.service", "apt-daily.timer", "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer", "e2scrub_all.timer", "fstrim.timer", "logrotate.timer",
    "man-db.timer",
)
LIBVIRT_UNITS = (
    "libvirtd.service", "libvirtd.socket", "libvirtd-ro.socket", "libvirtd-admin.socket",
    "libvirt-guests.service", "virtlogd.service", "virtlogd.socket", "virtlogd-admin.socket",
    "virtlockd.service", "virtlockd.socket", "virtlockd-admin.socket",
)
DEFAULT_MASK = UNNEEDED_UNITS + LIBVIRT_UNITS

# the dead-end network inside the container (documentation prefixes only)
IFNAME, PEER_IFNAME = "eth0", "deadend0"
IP4, PREFIX4, GW4 = "198.51.100.2", 24, "198.51.100.1"
IP6, PREFIX6, GW6 = "2001:db8::2", 64, "fe80::1"


@dataclass(frozen=True)
class Uplink:
    """The addresses of a container's dead end (documentation prefixes only)."""

    ip4: str = IP4
    prefix4: int = PREFIX4
    gw4: str = GW4
    ip6: str = IP6
    prefix6: int = PREFIX6
    gw6: str = GW6

INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}

_MACHINE_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,40}")
_NAME_PID_RE = re.compile(r".*-p(\d+)-\d+")  # machine names end in -p<owner pid>-<n>
_counter = 0


class ContainerError(RuntimeError):
    """The container could not boot, or a command inside failed (the message says how)."""


def missing_requirements() -> list[str]:
    """Why containers cannot run here (empty: they can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("needs root (systemd-nspawn, mount namespaces)")
    tools = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if tools:
        missing.append(f"missing tools: {', '.join(tools)} "
                       "(apt-get install systemd-container util-linux iproute2)")
    return missing


def _machine_name(name: str) -> str:
    global _counter
    _counter += 1
    machine = f"{name}-p{os.getpid()}-{_counter}"
    if not _MACHINE_RE.fullmatch(machine):
        raise ValueError(f"container name {name!r}: use lower-case letters, digits and '-'")
    return machine


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of the processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "PID (COMM) STATE PPID ...": COMM may contain spaces and parentheses
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            found.append((int(entry), comm))
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _remove_nspawn_leftovers(machine: str) -> None:
    """nspawn's per-machine directories on the host, then its empty parents."""
    if not NSPAWN_RUN.is_dir():
        return
    for sub in NSPAWN_RUN.iterdir():
        target = sub / machine
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists() or target.is_symlink():
            target.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            sub.rmdir()  # only if empty: another container may be running
    for parent in (NSPAWN_RUN, NSPAWN_RUN.with_name("nspawn-root")):
        with contextlib.suppress(OSError):
            parent.rmdir()


class JournalLog:
    """The container's journal as a "log file" for tests/conftest.py's LabLogs: it has the
    `read_text()` LabLogs calls when a test failed, and reads the journal at that moment."""

    def __init__(self, container: Container, *args: str, lines: int = 400) -> None:
        self.container = container
        self.args = args
        self.lines = lines

    def read_text(self, errors: str = "strict") -> str:
        del errors  # journalctl's output is decoded with "replace" anyway
        if not self.container.running:
            raise FileNotFoundError("the container is not running")
        return self.container.journal(*self.args, lines=self.lines)

    def __str__(self) -> str:
        return shlex.join(["journalctl", *self.args]) + f" in {self.container.machine}"


class Container:
    """A booted copy-on-write container of the host (see the module docstring)."""

    def __init__(self, name: str = "passtd-ct", *, mask: Iterable[str] = DEFAULT_MASK,
                 bind: Iterable[str | tuple[str, str]] = (),
                 bind_ro: Iterable[str | tuple[str, str]] = (),
                 network: bool = True, uplink: Uplink = Uplink(),
                 unified_cgroup: bool = False,
                 boot_timeout: float = 60.0, nspawn_args: Sequence[str] = ()) -> None:
        """`bind`/`bind_ro`: host paths (seen at the same path inside) or (host, inside)
        pairs; `unified_cgroup`: a pure cgroup2 hierarchy inside (what systemd >= 256
        requires) instead of the host's hybrid one; `nspawn_args`: more nspawn options."""
        self.uplink = uplink
        self.machine = _machine_name(name)
        self.mask = tuple(mask)
        self.binds = [self._bind_arg("--bind", b) for b in bind]
        self.binds += [self._bind_arg("--bind-ro", b) for b in bind_ro]
        self.network = network
        self.unified_cgroup = unified_cgroup
        self.boot_timeout = boot_timeout
        self.nspawn_args = list(nspawn_args)
        self.workdir = WORK_ROOT / self.machine
        self.console_log = self.workdir / "console.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self.keep_workdir = False
        self._spawned: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def _bind_arg(option: str, bind: str | tuple[str, str]) -> str:
        host, inside = (bind, bind) if isinstance(bind, str) else bind
        if not os.path.isabs(host) or not os.path.isabs(inside) or ":" in host + inside:
            raise ValueError(f"{option} {bind!r}: absolute paths without ':' expected")
        return f"{option}={host}:{inside}"

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Container:
        return self.boot()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and self.running:
            self.save_journal()
        self.poweroff()

    @property
    def running(self) -> bool:
        return self.nspawn is not None and self.nspawn.poll() is None and self.pid1 is not None

    def boot(self) -> Container:
        """Start the container and wait until systemd reports running or degraded."""
        missing = missing_requirements()
        if missing:
            raise ContainerError("cannot boot a container: " + "; ".join(missing))
        WORK_ROOT.mkdir(mode=0o700, exist_ok=True)
        self.workdir.mkdir()
        root = self.workdir / "root"
        root.mkdir()
        nspawn = [
            "systemd-nspawn", "--quiet", "-D", str(root), "--volatile=overlay", "--boot",
            "--register=no", "--keep-unit", "--private-network", "--link-journal=no",
            f"--machine={self.machine}", "--console=pipe", *self.binds, *self.nspawn_args,
            # what follows goes to the container's systemd as its "kernel command line"
            *(f"systemd.mask={unit}" for unit in self.mask),
        ]
        # the bind mount of / exists only in this private mount namespace, and vanishes
        # with it when nspawn exits
        argv = ["unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", 'mount --bind "$1" "$0" && shift && exec "$@"', str(root), str(ROOT),
                *nspawn]
        env = dict(os.environ)
        if self.unified_cgroup:
            env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
        atexit.register(self.poweroff)
        started = time.monotonic()
        with open(self.console_log, "wb") as console:
            # unshare and sh exec: this pid is nspawn's
            self.nspawn = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console,
                                           stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
        try:
            self.pid1 = self._wait_pid1(started + self.boot_timeout)
            self._wait_running(started + self.boot_timeout)
            if self.network:
                self._setup_network()
        except BaseException:
            if self.pid1 is not None:
                self.save_journal()
            self.keep_workdir = True
            self.poweroff()
            raise
        LOG.info("container %s up (PID 1 is host pid %d) in %.2f s", self.machine, self.pid1,
                 time.monotonic() - started)
        return self

    def _failed_boot(self, what: str) -> ContainerError:
        return ContainerError(f"container {self.machine}: {what}; console:\n"
                              f"{self.console_text()[-4000:]}")

    def _wait_pid1(self, deadline: float) -> int:
        assert self.nspawn is not None
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise self._failed_boot(f"systemd-nspawn exited ({self.nspawn.returncode})")
            # nspawn's child execs systemd, which is the container's PID 1
            for pid, comm in _children(self.nspawn.pid):
                if comm == "systemd":
                    return pid
            time.sleep(0.05)
        raise self._failed_boot("systemd did not start")

    def _wait_running(self, deadline: float) -> None:
        state = "?"
        while time.monotonic() < deadline:
            assert self.nspawn is not None
            if self.nspawn.poll() is not None:
                raise self._failed_boot(f"systemd-nspawn exited ({self.nspawn.returncode})")
            res = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
            state = res.stdout.strip()
            if state in ("running", "degraded"):
                if state == "degraded":
                    failed = self.run(["systemctl", "--failed", "--no-legend"], check=False)
                    LOG.warning("container %s is degraded: %s", self.machine,
                                failed.stdout.strip())
                return
            time.sleep(0.1)
        raise self._failed_boot(f"not running after {self.boot_timeout:.0f} s (state {state})")

    def _setup_network(self) -> None:
        """The dead-end veth pair inside the container (see the module docstring)."""
        up = self.uplink
        for args in (
            ["link", "add", IFNAME, "type", "veth", "peer", "name", PEER_IFNAME],
            ["addr", "add", f"{up.ip4}/{up.prefix4}", "dev", IFNAME],
            ["addr", "add", f"{up.ip6}/{up.prefix6}", "dev", IFNAME, "nodad"],
            ["link", "set", IFNAME, "up"],
            ["link", "set", PEER_IFNAME, "up"],
            ["route", "add", "default", "via", up.gw4, "dev", IFNAME],
            ["-6", "route", "add", "default", "via", up.gw6, "dev", IFNAME],
        ):
            self.run(["ip", *args])

    def poweroff(self, timeout: float = 20.0) -> None:
        """Power the container off (kill nspawn if it does not stop in time) and clean up.
        Idempotent; also runs at interpreter exit."""
        atexit.unregister(self.poweroff)
        nspawn = self.nspawn
        if nspawn is not None and nspawn.poll() is None:
            if self.pid1 is not None:
                self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=10)
            else:
                nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container to power off
            try:
                nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                LOG.warning("container %s did not power off in %.0f s: killing nspawn",
                            self.machine, timeout)
                nspawn.kill()  # its PID 1 dies with it, and the namespaces with that
                nspawn.wait()
        for proc in self._spawned:
            # what they ran died with the container, but nsenter (outside it) may be left
            # stopped: it stops itself when its child stops, and systemd-shutdown stops
            # every process (SIGSTOP) before killing it; stopped, it never reaps the child
            terminate(proc, 1.0, sig=signal.SIGCONT)
        self._spawned.clear()
        self.pid1 = None
        _remove_nspawn_leftovers(self.machine)
        if self.keep_workdir:
            LOG.warning("container %s: logs kept in %s", self.machine, self.workdir)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def remove_stale(prefix: str) -> None:
        """Power off containers (and remove leftovers) that a killed run of a harness with
        this name prefix left behind: their machine name carries the owner's pid."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            argv = _cmdline(int(entry))
            if not argv or Path(argv[0]).name != "systemd-nspawn":
                continue
            machine = next((a.split("=", 1)[1] for a in argv
                            if a.startswith("--machine=")), "")
            m = _NAME_PID_RE.fullmatch(machine)
            if machine.startswith(prefix + "-") and m and not Path(f"/proc/{m[1]}").exists():
                LOG.warning("stopping stale container %s (nspawn pid %s)", machine, entry)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)
        if NSPAWN_RUN.is_dir():
            for sub in NSPAWN_RUN.iterdir():
                for leftover in sub.iterdir() if sub.is_dir() else ():
                    m = _NAME_PID_RE.fullmatch(leftover.name)
                    if leftover.name.startswith(prefix + "-") and m and \
                            not Path(f"/proc/{m[1]}").exists():
                        _remove_nspawn_leftovers(leftover.name)
        if WORK_ROOT.is_dir():
            for workdir in WORK_ROOT.iterdir():
                m = _NAME_PID_RE.fullmatch(workdir.name)
                if workdir.name.startswith(prefix + "-") and m and \
                        not Path(f"/proc/{m[1]}").exists():
                    shutil.rmtree(workdir, ignore_errors=True)

    # -- running things inside ---------------------------------------------------------------

    def _require_running(self) -> int:
        if self.pid1 is None or self.nspawn is None or self.nspawn.poll() is not None:
            raise ContainerError(f"container {self.machine} is not running")
        return self.pid1

    def nsenter_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside the container (all its namespaces, cwd /)."""
        return ["nsenter", "-t", str(self._require_running()), "-a", "--wd=/", "--", *argv]

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        return {**INSIDE_ENV, **(env or {})}

    def run(self, argv: Sequence[str], *, check: bool = True, input: str | None = None,
            timeout: float = 60.0, env: Mapping[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside; text output captured. `check`: raise ContainerError (with
        the output) on a non-zero status. `env` adds to a clean environment."""
        res = subprocess.run(self.nsenter_argv(argv), input=input, capture_output=True,
                             text=True, errors="replace", timeout=timeout, env=self._env(env),
                             stdin=None if input is not None else subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise ContainerError(f"in {self.machine}: {shlex.join(argv)} exited with "
                                 f"{res.returncode}\nstdout: {res.stdout.strip()}\n"
                                 f"stderr: {res.stderr.strip()}")
        return res

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside (keywords as for run())."""
        return self.run(["sh", "-ec", script], **kw)

    def spawn(self, argv: Sequence[str], *, log: Path | None = None,
              env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` inside in the background, output to `log` (default: a file in the
        work directory); it ends with the container at the latest."""
        if log is None:
            log = self.workdir / f"{Path(argv[0]).name}.{len(self._spawned)}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.nsenter_argv(argv), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, env=self._env(env),
                                    start_new_session=True)
        self._spawned.append(proc)
        return proc

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def unit_properties(self, unit: str, *names: str) -> dict[str, str]:
        """`systemctl show` of these properties of `unit`."""
        out = self.systemctl("show", unit, *(f"--property={n}" for n in names)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_unit(self, unit: str, states: Iterable[str] = ("active",),
                  timeout: float = 30.0) -> str:
        """Wait until `unit`'s ActiveState is one of `states`; returns it."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.unit_properties(unit, "ActiveState").get("ActiveState", "?")
            if state in wanted:
                return state
            time.sleep(0.1)
        raise ContainerError(f"{unit} is {state}, not {'/'.join(sorted(wanted))}, after "
                             f"{timeout:.0f} s; its journal:\n{self.journal('-u', unit)}")

    def journal(self, *args: str, lines: int = 400) -> str:
        """The container's journal of this boot (journalctl ARGS), last `lines` lines."""
        res = self.run(["journalctl", "--no-pager", "-b", "-o", "short-precise",
                        "-n", str(lines), *args], check=False, timeout=30)
        return res.stdout + (f"\n(journalctl: {res.stderr.strip()})" if res.returncode else "")

    def journal_log(self, *args: str, lines: int = 400) -> JournalLog:
        return JournalLog(self, *args, lines=lines)

    def save_journal(self) -> Path:
        """Write the whole journal and the unit states to the work directory and keep it."""
        path = self.workdir / "journal.txt"
        try:
            text = self.journal(lines=100000)
            text += "\n\n" + self.systemctl("list-units", "--all", "--no-legend",
                                            check=False).stdout
        except (ContainerError, subprocess.SubprocessError) as e:
            text = f"(journal unavailable: {e})"
        path.write_text(text)
        self.keep_workdir = True
        return path

    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- files and the bus, from the host ----------------------------------------------------

    def host_path(self, inside: str) -> Path:
        """The host's view of a path inside the container (through /proc/PID1/root): read,
        write, or connect to a UNIX socket there."""
        if not inside.startswith("/"):
            raise ValueError(f"{inside!r}: an absolute path inside the container expected")
        return Path(f"/proc/{self._require_running()}/root{inside}")

    def write_file(self, inside: str, text: str | bytes, mode: int = 0o644) -> None:
        path = self.host_path(inside)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, str):
            text = text.encode()
        path.write_bytes(text)
        path.chmod(mode)

    def install_file(self, source: str | os.PathLike[str], inside: str,
                     mode: int = 0o644) -> None:
        """Copy a host file in; `inside` ending in / is a directory (name kept)."""
        if inside.endswith("/"):
            inside += Path(source).name
        self.write_file(inside, Path(source).read_bytes(), mode)

    @property
    def bus_address(self) -> str:
        """The container's system bus, for `busctl --address=` or dbus-fast, from the host."""
        return f"unix:path={self.host_path('/run/dbus/system_bus_socket')}"

    def busctl(self, *args: str, check: bool = True,
               timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """busctl ARGS on the container's system bus, run on the host (as root)."""
        argv = ["busctl", f"--address={self.bus_address}", "--no-pager", *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise ContainerError(f"{shlex.join(argv)} exited with {res.returncode}: "
                                 f"{res.stderr.strip()}")
        return res
