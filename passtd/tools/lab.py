"""An isolated network lab: network namespaces, a dead-end uplink and tap guests.

Used by `passtd demo`, the benchmark and the integration tests to put a real Linux network
stack on the guest side of the program under test (passtd, or the reference passt) without
a VM and without any traffic leaving the machine.

Design
------
`HostNamespace` builds two namespaces joined by a veth pair:

    {prefix}-host  lo + eth0 198.51.100.2/24, 2001:db8::2/64; default routes via
                   198.51.100.1 and fe80::1; ping_group_range open (ping sockets).
                   The program under test and every host-side server run here.
    {prefix}-up    the other end (up0): a dead-end "router" owning 198.51.100.1,
                   2001:db8::1 and fe80::1. It answers pings to those and forwards
                   nothing (forwarding off), so anything else sent there is dropped.

`TapGuest` is a guest made of a namespace `{prefix}-guest[-name]` whose kernel is the
guest's stack: a persistent `tap0` is joined to the program's UNIX socket by a wire, either
qemu itself (`qemu-system-x86_64 -M none`, a hub joining `-netdev tap` and `-netdev stream`,
no guest CPU; qemu pads short frames to 60 bytes and splits frames under load) or
`passtd.tools.lab_wire` in one of its modes (whole, stream, pad, stream-pad). busybox udhcpc
configures IPv4 with an event script the lab writes itself; IPv6 comes from SLAAC.
tap0 is created persistent, so `disconnect()` / `connect()` (end the wire, start a new one)
keep the guest's addresses, as a VM keeps them when its qemu reconnects.

`start_program` runs the program under test with its socket in a directory user nobody can
write (passt drops privileges before binding) and returns once the socket listens. Logs,
sockets and scripts live in /run/passtd-lab/{prefix}, which `down()` removes.

Isolation guarantees
--------------------
* The host namespace's only interfaces are lo and eth0, a veth created directly inside the
  lab's namespaces (`ip link add ... netns`): no interface ever exists in the caller's
  namespace, not even for a moment. Its peer's namespace has no other link and does not
  forward. A guest's only link is tap0, whose other end is the wire, the UNIX socket and
  the program under test. Addresses are documentation prefixes.
* Every name (namespaces, work directory, sockets) derives from the prefix, and interface
  names are per namespace, so labs with different prefixes never collide. The prefix must
  be unique among labs running at the same time: `up()` first removes whatever a crashed
  run with the same prefix left behind.
* Every process the lab starts runs inside one of its namespaces, and `down()` ends every
  process found in them (by their /proc/PID/ns/net), not only those it remembers; it also
  runs at interpreter exit if the caller forgot, and is idempotent.

What it does not do
-------------------
No VM (tests/guestvm has a TCG guest), no DHCPv6 (busybox has no udhcpc6: IPv6 is SLAAC
only), no DNS: the udhcpc script records the offered servers but never writes
resolv.conf, and the lab never resolves names: each namespace gets a resolv.conf and hosts
of its own (`_isolate_names`) that answer nothing, at once. It is not a sandbox for the
program under test either: that runs as root with the machine's filesystem, only its
network is confined. Measuring CPU is left to the benchmark.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

LOG = logging.getLogger(__name__)

T = TypeVar("T")

# Addresses of the isolated "host" network: documentation prefixes only.
HOST_IP4 = "198.51.100.2"
PREFIX4 = 24
GW4 = "198.51.100.1"
HOST_IP6 = "2001:db8::2"
PREFIX6 = 64
# link-local, as on most LANs; also, with a global IPv6 gateway, passt 0.0~git20230309
# (Debian 12's) answers the guest's UDP from its link-local address instead
GW6 = "fe80::1"
UP_IP6 = "2001:db8::1"  # the global gateway address also exists upstream, for symmetry

TAP = "tap0"
# A VM's NIC is flow-controlled: when qemu stops taking frames its TX ring fills and the
# guest's queue stops, nothing is lost. This guest's NIC is a tap, which drops what its
# queue cannot hold: with tun's default of 1000 frames, guest->host bulk at MTU 1500 lost
# thousands of segments a run (passt collapsed to ~0 Gbit/s under the retransmissions).
# A deep queue makes the wire's backpressure act as a VM's would.
TAP_TXQUEUELEN = 20000
DEFAULT_MAC = "52:54:00:12:34:56"
WIRES = ("qemu", "whole", "stream", "pad", "stream-pad")

LAB_ROOT = Path("/run/passtd-lab")  # work directories (logs, sockets); tmpfs, root's own
NETNS_DIR = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")  # per-namespace files `ip netns exec` binds over /etc's
LAB_WIRE = Path(__file__).with_name("lab_wire.py")
BASE_TOOLS = ("ip", "sysctl", "busybox")

_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")
_GRACE = 1.0  # seconds between SIGTERM and SIGKILL


class LabError(RuntimeError):
    """The lab could not be set up (the message says what failed and shows its log)."""


# --- small helpers ---------------------------------------------------------------------


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str, *,
             interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something true and return that.

    Raises TimeoutError naming `what` after `timeout` seconds; an exception raised by the
    predicate (e.g. "the process died") propagates at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_socket(path: str | os.PathLike[str], timeout: float, *, listener_pid: int | None = None,
                ) -> None:
    """Wait until `path` is a UNIX socket; with `listener_pid`, also until it listens.

    The listening check reads /proc/PID/net/unix of a process in the socket's network
    namespace (UNIX sockets are listed per namespace), so it never connects: a probe
    connection would be taken by the program as its qemu.
    """
    wait_for(lambda: socket_ready(path, listener_pid), timeout, f"UNIX socket {path}")


def socket_ready(path: str | os.PathLike[str], listener_pid: int | None = None) -> bool:
    """Whether `path` is a UNIX socket (listening, as seen by `listener_pid`, if given)."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    return listener_pid is None or _unix_listening(listener_pid, os.fspath(path))


def missing_requirements(tools: Iterable[str] = ()) -> list[str]:
    """Why the lab cannot run here (empty when it can): root, /dev/net/tun, tools."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root (network namespaces, tap devices)")
    if not os.path.exists("/dev/net/tun"):
        reasons.append("/dev/net/tun is missing")
    reasons += [f"{t} not found in PATH" for t in (*BASE_TOOLS, *tools) if not shutil.which(t)]
    return reasons


def passtd_env() -> dict[str, str]:
    """os.environ with this copy of passtd importable, for a `python -m passtd` started
    from anywhere (e.g. inside a namespace, from a plain clone that is not installed)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


def terminate(proc: subprocess.Popen[Any], timeout: float = 5.0, *, group: bool = False,
              sig: int = signal.SIGTERM) -> int:
    """Send `proc` `sig` (its whole session with `group`), SIGKILL after `timeout`; reap
    it. `sig` is what lets it end: SIGTERM, or SIGCONT for one that was stopped."""
    if proc.poll() is None:
        _signal(proc, sig, group)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL, group)
            proc.wait(timeout)
    return proc.returncode


def _signal(proc: subprocess.Popen[Any], sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(proc.pid, sig)  # spawn() made it a session (and group) leader
        else:
            proc.send_signal(sig)


def _ip(*args: str) -> str:
    """Run `ip ARGS` (checked); return its stdout."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res.stdout


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                link = os.readlink(f"{fd_dir}/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    return inodes


def _unix_table(pid: int) -> list[list[str]]:
    """/proc/PID/net/unix rows: Num RefCount Protocol Flags Type St Inode [Path]."""
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            return [line.split() for line in f.readlines()[1:]]
    except OSError:
        return []


_SO_ACCEPTCON = 0x10000  # "Flags" of a listening socket
_SS_CONNECTED = "03"
_SOCK_STREAM = "0001"


def _unix_listening(pid: int, path: str) -> bool:
    return any(len(row) > 7 and row[7] == path and int(row[3], 16) & _SO_ACCEPTCON
               for row in _unix_table(pid))


def _unix_connected(pid: int) -> bool:
    """Whether process `pid` holds a connected UNIX stream socket (the wire's link)."""
    inodes = _socket_inodes(pid)
    return any(row[6] in inodes and row[4] == _SOCK_STREAM and row[5] == _SS_CONNECTED
               for row in _unix_table(pid) if len(row) > 6)


# --- namespaces ------------------------------------------------------------------------


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_pids(name: str) -> list[int]:
    """Live processes whose network namespace is the named one (like `ip netns pids`)."""
    try:
        ns = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return []
    me = os.getpid()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")  # fails for zombies: nothing to kill
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino):
            pids.append(int(entry.name))
    return pids


def _kill_netns_processes(name: str) -> None:
    for sig, grace in ((signal.SIGTERM, _GRACE), (signal.SIGKILL, 2.0)):
        pids = netns_pids(name)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not netns_pids(name), grace, f"processes in {name} to end")
    left = netns_pids(name)
    if left:
        LOG.warning("processes %s survive SIGKILL in %s", left, name)


def _delete_netns(name: str) -> None:
    _kill_netns_processes(name)
    if netns_exists(name):
        _ip("netns", "del", name)
    shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


def _isolate_names(name: str) -> None:
    """The namespace's own /etc/resolv.conf and /etc/hosts (`ip netns exec` binds the files
    of /etc/netns/NAME over /etc's): names resolve nowhere, and fast.

    A lookup behind the lab's dead end would wait for the host's DNS server for seconds
    (python's http.server asks getfqdn() before it listens); here it asks the namespace's
    own loopback, where nothing listens on port 53 (a test may put a recorder there), and
    /etc/hosts knows only localhost. Nothing in the lab depends on the host's resolv.conf
    or /etc/hosts.
    """
    etc = NETNS_ETC / name
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text(
        "# passtd lab: no name server (lookups fail at once on the namespace's loopback)\n"
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")


class Netns:
    """A network namespace the lab created, and the processes it started there."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self._procs: list[subprocess.Popen[bytes]] = []

    def nsenter_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside this namespace.

        `ip netns exec` rather than `nsenter --net`: it also remounts /sys, so tools that
        read /sys/class/net see this namespace's interfaces. It execs `argv`, so the pid
        of the wrapper is the pid of the command.
        """
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside the namespace; text output captured, 60 s timeout by
        default (override with the usual keywords)."""
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(self.nsenter_argv(argv), **kw)

    def spawn(self, argv: Sequence[str], *, log: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` in the background inside the namespace, in its own session, output
        appended to `log` (default: a file named after the command in the work directory).
        The process is ended by down() if still running."""
        if log is None:
            log = self.workdir / f"{Path(argv[0]).name}.{len(self._procs)}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.nsenter_argv(argv), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        self._procs.append(proc)
        LOG.debug("%s: started %s (pid %d, log %s)", self.name, " ".join(argv), proc.pid, log)
        return proc

    def ip_json(self, *args: str) -> list[dict[str, Any]]:
        """`ip -j ARGS` in this namespace, parsed."""
        out = _ip("-n", self.name, "-j", *args)
        return json.loads(out) if out.strip() else []

    def listening(self, port: int, *, udp: bool = False) -> bool:
        """Whether some socket in the namespace listens on TCP `port` (bound to UDP `port`)."""
        proto = "udp" if udp else "tcp"
        res = self.run(["cat", f"/proc/net/{proto}", f"/proc/net/{proto}6"], timeout=10)
        for line in res.stdout.splitlines():
            fields = line.split()
            if len(fields) < 4 or ":" not in fields[1] or not fields[0].endswith(":"):
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            # TCP_LISTEN is 0A; a bound UDP socket is 07 (TCP_CLOSE in the shared table)
            if local_port == port and fields[3] == ("07" if udp else "0A"):
                return True
        return False

    def wait_listening(self, port: int, timeout: float = 10.0, *, udp: bool = False) -> None:
        wait_for(lambda: self.listening(port, udp=udp), timeout,
                 f"{'UDP' if udp else 'TCP'} port {port} in {self.name}", interval=0.1)

    def _sysctl(self, *settings: str) -> None:
        res = self.run(["sysctl", "-qw", *settings], timeout=10)
        if res.returncode != 0:
            raise LabError(f"sysctl {settings} in {self.name}: {res.stderr.strip()}")

    def _create(self) -> None:
        _ip("netns", "add", self.name)
        _isolate_names(self.name)
        _ip("-n", self.name, "link", "set", "lo", "up")

    def _reap(self) -> None:
        for proc in self._procs:
            terminate(proc, 2.0, group=True)
        self._procs.clear()


# --- the host side ---------------------------------------------------------------------


@dataclass
class Program:
    """The program under test, started by `HostNamespace.start_program`."""

    name: str
    argv: list[str]
    socket: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, wait (SIGKILL after `timeout`); return the exit status (-N: signal N)."""
        return terminate(self.proc, timeout)


class HostNamespace(Netns):
    """`{prefix}-host` behind the dead end `{prefix}-up` (see the module docstring)."""

    def __init__(self, prefix: str = "pdlab") -> None:
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"lab prefix {prefix!r}: use letters, digits, '.', '_', '-'")
        super().__init__(f"{prefix}-host", LAB_ROOT / prefix)
        self.prefix = prefix
        self.up_name = f"{prefix}-up"
        self.sockdir = self.workdir / "sock"  # 1777: passt binds its socket as nobody
        self.ip4, self.prefix4, self.gw4 = HOST_IP4, PREFIX4, GW4
        self.ip6, self.prefix6, self.gw6 = HOST_IP6, PREFIX6, GW6
        self.up_ip6 = UP_IP6
        self.guests: list[TapGuest] = []

    def __enter__(self) -> HostNamespace:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def socket_path(self, name: str) -> Path:
        """Where a program's UNIX socket goes (a directory anyone may create sockets in)."""
        return self.sockdir / f"{name}.sock"

    def up(self) -> HostNamespace:
        missing = missing_requirements()
        if missing:
            raise LabError("cannot build the lab: " + "; ".join(missing))
        self.down()  # whatever a crashed run with this prefix left
        # whatever the umask: passt, as user nobody, must reach and write the socket directory
        for directory, mode in ((LAB_ROOT, 0o755), (self.workdir, 0o755), (self.sockdir, 0o1777)):
            directory.mkdir(exist_ok=directory is LAB_ROOT)
            os.chmod(directory, mode)
        atexit.register(self.down)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        LOG.info("lab %s up: %s (%s/%d, %s/%d) via %s", self.prefix, self.name, self.ip4,
                 self.prefix4, self.ip6, self.prefix6, self.up_name)
        return self

    def _build(self) -> None:
        upstream = Netns(self.up_name, self.workdir)
        for ns in (self, upstream):
            ns._create()
            # no DAD on this fixed, collision-free link: addresses usable at once
            ns._sysctl("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        upstream._sysctl("net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0")
        self._sysctl("net.ipv4.ping_group_range=0 2147483647")
        _ip("link", "add", "eth0", "netns", self.name, "type", "veth",
            "peer", "name", "up0", "netns", self.up_name)
        h, u = ("-n", self.name), ("-n", self.up_name)
        _ip(*h, "addr", "add", f"{self.ip4}/{self.prefix4}", "dev", "eth0")
        _ip(*h, "addr", "add", f"{self.ip6}/{self.prefix6}", "dev", "eth0", "nodad")
        _ip(*u, "addr", "add", f"{self.gw4}/{self.prefix4}", "dev", "up0")
        _ip(*u, "addr", "add", f"{self.gw6}/64", "dev", "up0", "nodad")
        _ip(*u, "addr", "add", f"{self.up_ip6}/{self.prefix6}", "dev", "up0", "nodad")
        _ip(*h, "link", "set", "eth0", "up")
        _ip(*u, "link", "set", "up0", "up")
        _ip(*h, "route", "add", "default", "via", self.gw4, "dev", "eth0")
        _ip(*h, "-6", "route", "add", "default", "via", self.gw6, "dev", "eth0")

    def down(self) -> None:
        """End every process in the lab's namespaces, delete them and the work directory.

        Idempotent; also removes what a crashed run with the same prefix left behind,
        guests included.
        """
        for guest in list(self.guests):
            guest.down()
        names = [self.name, self.up_name, *self._stale_guest_namespaces()]
        for name in names:
            _kill_netns_processes(name)
        self._reap()
        for name in names:
            _delete_netns(name)
        shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.down)

    def _stale_guest_namespaces(self) -> list[str]:
        base = f"{self.prefix}-guest"
        try:
            names = os.listdir(NETNS_DIR)
        except FileNotFoundError:
            return []
        return [n for n in names if n == base or n.startswith(base + "-")]

    def start_program(self, argv: Sequence[str], *, name: str = "prog", timeout: float = 10.0,
                      env: dict[str, str] | None = None) -> Program:
        """Start the program under test with "{SOCK}" in `argv` replaced by its socket path;
        return once that socket listens. Raises LabError (with the program's log) if the
        program exits or the socket does not appear in time."""
        sock = self.socket_path(name)
        sock.unlink(missing_ok=True)
        argv = [a.replace("{SOCK}", str(sock)) for a in argv]
        log = self.workdir / f"{name}.log"
        prog = Program(name, argv, sock, self.spawn(argv, log=log, env=env), log)

        def listening() -> bool:
            if not prog.alive():
                raise LabError(f"{name} ({' '.join(argv)}) exited with status "
                               f"{prog.proc.returncode} before listening on {sock}:\n"
                               f"{_tail(log)}")
            return socket_ready(sock, prog.pid)

        try:
            wait_for(listening, timeout, f"{name} to listen on {sock}")
        except TimeoutError as e:
            prog.stop()
            raise LabError(f"{e}; log:\n{_tail(log)}") from None
        return prog


# --- guests ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DhcpLease:
    """What busybox udhcpc was given (its event script's variables)."""

    address: str
    prefix_len: int
    router: str | None
    dns: tuple[str, ...]
    mtu: int | None
    lease_time: int | None
    server_id: str | None
    raw: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> DhcpLease:
        raw = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        routers = raw.get("router", "").split()

        def num(key: str) -> int | None:
            return int(raw[key]) if raw.get(key, "").isdigit() else None

        return cls(address=raw["ip"], prefix_len=num("mask") or 24,
                   router=routers[0] if routers else None,
                   dns=tuple(raw.get("dns", "").split()), mtu=num("mtu"),
                   lease_time=num("lease"), server_id=raw.get("serverid") or None, raw=raw)


# busybox udhcpc event script. Applies address, default route and MTU, records the lease
# for the lab; never touches DNS (resolv.conf), since the lab must not resolve names.
UDHCPC_SCRIPT = r"""#!/bin/sh
# written by passtd.tools.lab: udhcpc event script (address, route, MTU; never DNS)
case "$1" in
deconfig)
	ip -4 addr flush dev "$interface"
	ip link set "$interface" up
	;;
bound|renew)
	[ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
	ip -4 addr flush dev "$interface"
	ip addr add "$ip/${mask:-24}" dev "$interface"
	for r in $router; do
		ip route replace default via "$r" dev "$interface"
		break
	done
	{
		printf 'ip=%s\n' "$ip"
		printf 'mask=%s\n' "$mask"
		printf 'router=%s\n' "$router"
		printf 'dns=%s\n' "$dns"
		printf 'mtu=%s\n' "$mtu"
		printf 'lease=%s\n' "$lease"
		printf 'serverid=%s\n' "$serverid"
		printf 'domain=%s\n' "$domain"
		printf 'search=%s\n' "$search"
	} >"$LAB_LEASE_FILE"
	;;
esac
exit 0
"""


class TapGuest(Netns):
    """A guest namespace whose tap0 is wired to the program's UNIX socket.

    `wire` is one of WIRES (see the module docstring); `chunk` caps the stream wires'
    sends at that many bytes; `mtu` overrides the MTU after DHCP; `dhcp=False` leaves
    IPv4 unconfigured; `v6wait=0` does not wait for SLAAC.

    Attributes after `up()`: ip4, prefix4, gw4 (from DHCP; None without), ip6, prefix6,
    gw6 (SLAAC; None if the program offers no IPv6 within `v6wait`), mtu, mac, dns,
    lease (a DhcpLease or None), wire_proc, and `logs` (label -> path).
    """

    def __init__(self, host: HostNamespace, socket_path: str | os.PathLike[str], *,
                 name: str | None = None, wire: str = "qemu", mac: str = DEFAULT_MAC,
                 mtu: int | None = None, dhcp: bool = True, v6wait: float = 10.0,
                 chunk: int | None = None, lose: int | None = None) -> None:
        if wire not in WIRES:
            raise ValueError(f"wire {wire!r}: one of {', '.join(WIRES)}")
        if chunk is not None and not wire.startswith("stream"):
            raise ValueError("chunk applies to the stream wires only")
        if lose is not None and (wire == "qemu" or lose < 2):
            raise ValueError("lose applies to the lab's own wires, every N >= 2 frames")
        if name is not None and not _PREFIX_RE.fullmatch(name):
            raise ValueError(f"guest name {name!r}: use letters, digits, '.', '_', '-'")
        suffix = f"-{name}" if name else ""
        super().__init__(f"{host.prefix}-guest{suffix}", host.workdir / f"guest{suffix}")
        self.host = host
        self.guest_name = name
        self.socket = Path(socket_path)
        self.wire = wire
        self.chunk = chunk
        self.lose = lose  # lab wires: drop every lose-th frame from the guest
        self.mac = mac
        self.want_mtu = mtu
        self.dhcp = dhcp
        self.v6wait = v6wait
        self.iface = TAP
        self.wire_proc: subprocess.Popen[bytes] | None = None
        self._clear()

    def _clear(self) -> None:
        self.ip4: str | None = None
        self.prefix4: int | None = None
        self.gw4: str | None = None
        self.ip6: str | None = None
        self.prefix6: int | None = None
        self.gw6: str | None = None
        self.mtu: int | None = None
        self.dns: tuple[str, ...] = ()
        self.lease: DhcpLease | None = None

    def __enter__(self) -> TapGuest:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    @property
    def wire_log(self) -> Path:
        return self.workdir / "wire.log"

    @property
    def dhcp_log(self) -> Path:
        return self.workdir / "udhcpc.log"

    @property
    def logs(self) -> dict[str, Path]:
        """Log files worth showing when something failed."""
        return {f"{self.name} wire ({self.wire})": self.wire_log,
                f"{self.name} udhcpc": self.dhcp_log}

    @property
    def gw6_scoped(self) -> str | None:
        """gw6 as socket APIs want it: link-local addresses need the interface."""
        if self.gw6 and self.gw6.lower().startswith("fe80:"):
            return f"{self.gw6}%{self.iface}"
        return self.gw6

    def up(self) -> TapGuest:
        """Create the namespace and tap0, connect the wire, configure IPv4 (DHCP) and wait
        for SLAAC. Raises LabError (with logs) on failure, after cleaning up."""
        if any(g is not self and g.name == self.name for g in self.host.guests):
            raise LabError(f"guest {self.name} already exists in this lab")
        if not self.host.workdir.is_dir():
            raise LabError(f"lab {self.host.prefix} is not up")
        tool = "qemu-system-x86_64" if self.wire == "qemu" else None
        if tool and not shutil.which(tool):
            raise LabError(f"wire {self.wire}: {tool} not found in PATH")
        self.down()
        self.host.guests.append(self)
        try:
            self._setup()
        except BaseException:
            self.down()
            raise
        LOG.info("guest %s up: ip4 %s gw4 %s ip6 %s gw6 %s mtu %s", self.name, self.ip4,
                 self.gw4, self.ip6, self.gw6, self.mtu)
        return self

    def _setup(self) -> None:
        self.workdir.mkdir(parents=True)
        self._create()
        self._sysctl("net.ipv4.ping_group_range=0 2147483647")
        # persistent: the tap outlives its wire, so disconnect/connect keep the addresses
        _ip("-n", self.name, "tuntap", "add", "dev", TAP, "mode", "tap")
        _ip("-n", self.name, "link", "set", TAP, "address", self.mac)
        _ip("-n", self.name, "link", "set", TAP, "txqueuelen", str(TAP_TXQUEUELEN))
        _ip("-n", self.name, "link", "set", TAP, "up")
        self.connect()
        if self.dhcp:
            self._run_dhcp()
        if self.want_mtu is not None:
            _ip("-n", self.name, "link", "set", TAP, "mtu", str(self.want_mtu))
        self._wait_slaac()
        (link,) = self.ip_json("link", "show", "dev", TAP)
        self.mtu = int(link["mtu"])

    def down(self) -> None:
        """End the wire and every process in the namespace, delete it. Idempotent."""
        if self.wire_proc is not None:
            terminate(self.wire_proc, 2.0)
            self.wire_proc = None
        _kill_netns_processes(self.name)
        self._reap()
        _delete_netns(self.name)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self in self.host.guests:
            self.host.guests.remove(self)
        self._clear()

    def connect(self, timeout: float = 10.0) -> None:
        """Start a wire to the socket; return once it is connected. The namespace and its
        addresses stay as they are (no new DHCP)."""
        if self.wire_proc is not None and self.wire_proc.poll() is None:
            raise LabError(f"guest {self.name}: the wire is already connected")
        proc = self.wire_proc = self.spawn(self._wire_argv(), log=self.wire_log)

        def connected() -> bool:
            if proc.poll() is not None:
                raise LabError(f"wire {self.wire} of {self.name} exited with status "
                               f"{proc.returncode}:\n{_tail(self.wire_log)}")
            return _unix_connected(proc.pid)

        try:
            wait_for(connected, timeout, f"the {self.wire} wire to connect to {self.socket}")
        except TimeoutError as e:
            terminate(proc)
            raise LabError(f"{e}; wire log:\n{_tail(self.wire_log)}") from None

    def disconnect(self, timeout: float = 5.0) -> int | None:
        """End the wire (the program sees its qemu go away); return its exit status."""
        if self.wire_proc is None:
            return None
        status = terminate(self.wire_proc, timeout)
        self.wire_proc = None
        return status

    def _wire_argv(self) -> list[str]:
        sock = str(self.socket)
        if self.wire == "qemu":
            qsock = sock.replace(",", ",,")  # qemu's option syntax escapes commas by doubling
            return ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-no-user-config",
                    "-display", "none",
                    "-netdev", f"tap,id=t0,ifname={TAP},script=no,downscript=no",
                    "-netdev", f"stream,id=s0,server=off,addr.type=unix,addr.path={qsock}",
                    "-netdev", "hubport,id=h0,hubid=0,netdev=t0",
                    "-netdev", "hubport,id=h1,hubid=0,netdev=s0"]
        # -I: stdlib only, and the package directory must not shadow stdlib modules
        argv = [sys.executable, "-I", str(LAB_WIRE), "--tap", TAP, "--socket", sock,
                "--mode", self.wire, "--pidfile", str(self.workdir / "wire.pid")]
        if self.chunk is not None:
            argv += ["--chunk", str(self.chunk)]
        if self.lose is not None:
            argv += ["--lose", str(self.lose)]
        return argv

    def _run_dhcp(self) -> None:
        script = self.workdir / "udhcpc.script"
        script.write_text(UDHCPC_SCRIPT)
        script.chmod(0o755)
        lease_file = self.workdir / "lease"
        env = {**os.environ, "LAB_LEASE_FILE": str(lease_file)}
        argv = ["busybox", "udhcpc", "-i", TAP, "-f", "-q", "-n", "-t", "5", "-T", "2",
                "-A", "1", "-O", "mtu", "-s", str(script)]
        with open(self.dhcp_log, "ab") as log:
            res = self.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=40)
        if res.returncode != 0 or not lease_file.exists():
            raise LabError(f"DHCP on {self.name} failed (udhcpc status {res.returncode}):\n"
                           f"{_tail(self.dhcp_log)}\nwire log:\n{_tail(self.wire_log)}")
        self.lease = DhcpLease.parse(lease_file.read_text())
        self.ip4, self.prefix4 = self.lease.address, self.lease.prefix_len
        self.gw4, self.dns = self.lease.router, self.lease.dns

    def _wait_slaac(self) -> None:
        """Wait up to v6wait for a usable (non-tentative) global address from SLAAC."""

        def usable_address() -> tuple[str, int] | None:
            for link in self.ip_json("-6", "addr", "show", "dev", TAP, "scope", "global"):
                for a in link.get("addr_info", []):
                    # filtered-out addresses still show up, as empty objects
                    if "local" in a and not a.get("tentative") and not a.get("dadfailed"):
                        return str(a["local"]), int(a["prefixlen"])
            return None

        try:
            self.ip6, self.prefix6 = wait_for(usable_address, self.v6wait,
                                              f"a SLAAC address on {self.name}", interval=0.1)
        except TimeoutError:
            LOG.info("%s: no IPv6 address after %g s", self.name, self.v6wait)
        routes = self.ip_json("-6", "route", "show", "default", "dev", TAP)
        self.gw6 = next((r["gateway"] for r in routes if "gateway" in r), None)
