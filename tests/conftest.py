"""Fixtures for the integration tests: the isolated lab (passtd.tools.lab), the program under test,
tap guests and host-side servers.

Integration fixtures need root, network namespaces and some tools; where those are missing
they skip the test with the reason, so tests/unit keeps running anywhere (nothing here runs
unless a test asks for these fixtures).

The program under test is passtd (`python -m passtd run NAME --socket {SOCK} ARGS...`), or
the command in $PASSTD_TEST_PROG with {SOCK} in it, e.g. the reference:

    PASSTD_TEST_PROG='passt -f -q -s {SOCK} --no-dhcp-dns --no-dhcp-search
                      -t 10022:22 -u 10023:23' python -m pytest tests/integration

$PASSTD_TEST_PROG is used verbatim (tests' extra arguments are not appended): it must
already forward what the tests expect (TCP 10022 -> 22, UDP 10023 -> 23).

Fixtures:
  lab_host (module)      a lab.HostNamespace, prefix pdt-<pid>-<worker>
  program_factory        (args=(), *, argv=None, name=None) -> lab.Program, stopped after
  guest_factory          (program_or_socket, **TapGuest options) -> lab.TapGuest, up; down after
  host_server            (argv, *, port, udp=False) -> Popen on the host side, ended after;
                         .tcp_echo(port, family=4), .udp_echo(port, family=4)
  lab_logs (session)     .add(label, path) / .watch({label: path}): logs for failure reports
  reference_program      True if $PASSTD_TEST_PROG is the reference passt (for xfail marks)
  program_argv, start_program (session): the same for module-scoped fixtures

When a test fails, the logs of the programs, wires and udhcpc runs it used are attached
to its report.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from passtd.tools import lab

# Property tests give the same verdict on every machine: the same examples (derandomize)
# and no per-example deadline, which a slow or busy machine would miss.
settings.register_profile("suite", deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

PROG_ENV = "PASSTD_TEST_PROG"
PREFIX_FAMILY = "pdt"  # test labs are named pdt-<pid>-<worker>


# --- logs attached to failure reports ----------------------------------------------------


class LabLogs:
    """Log files of what the running tests use; shown in the report of a failed test."""

    def __init__(self) -> None:
        self.active: dict[str, Path] = {}

    def add(self, label: str, path: Path) -> None:
        self.active[label] = path

    def discard(self, label: str) -> None:
        self.active.pop(label, None)

    @contextmanager
    def watch(self, logs: dict[str, Path]) -> Iterator[None]:
        """Show these logs for failures while the block runs."""
        for label, path in logs.items():
            self.add(label, path)
        try:
            yield
        finally:
            for label in logs:
                self.discard(label)

    def sections(self) -> list[tuple[str, str]]:
        out = []
        for label, path in self.active.items():
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue  # not written (yet): e.g. no DHCP run
            except OSError as e:
                text = f"({e})"
            out.append((f"log: {label} ({path})", text[-20000:] or "(empty)"))
        return out


_LOGS = LabLogs()


@pytest.fixture(scope="session")
def lab_logs() -> LabLogs:
    return _LOGS


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        report.sections.extend(_LOGS.sections())
    return report


# --- requirements ------------------------------------------------------------------------


def require(*tools: str) -> None:
    """Skip the test unless the lab can run here with `tools`."""
    missing = lab.missing_requirements(tools)
    if missing:
        pytest.skip("integration test: " + "; ".join(missing))


# --- the lab -----------------------------------------------------------------------------


def _remove_stale_labs() -> None:
    """Remove test labs left by killed pytest runs (their pid is in the prefix)."""
    try:
        names = os.listdir(lab.NETNS_DIR)
    except FileNotFoundError:
        return
    stale = set()
    for name in names:
        m = re.match(rf"({PREFIX_FAMILY}-(\d+)-[^-]+)-", name)
        if m and not Path(f"/proc/{m[2]}").exists():
            stale.add(m[1])
    for prefix in stale:
        lab.HostNamespace(prefix).down()


@pytest.fixture(scope="module")
def lab_host() -> Iterator[lab.HostNamespace]:
    """An isolated host namespace (per module, unique per pytest process and worker)."""
    require()
    _remove_stale_labs()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with lab.HostNamespace(f"{PREFIX_FAMILY}-{os.getpid()}-{worker}") as host:
        yield host


@pytest.fixture(scope="session")
def reference_program() -> bool:
    """Whether the program under test is the reference passt ($PASSTD_TEST_PROG), whose
    known bugs tests may mark as xfail (only then)."""
    argv = shlex.split(os.environ.get(PROG_ENV, ""))
    return bool(argv) and Path(argv[0]).name == "passt"


def program_under_test(name: str, args: Sequence[str] = ()) -> list[str]:
    """argv of the program under test ({SOCK} still in it): $PASSTD_TEST_PROG verbatim, or
    `passtd run NAME --socket {SOCK} ARGS`."""
    custom = os.environ.get(PROG_ENV)
    if custom:
        return shlex.split(custom)
    return [sys.executable, "-m", "passtd", "run", name, "--socket", "{SOCK}", *args]


def start_program(host: lab.HostNamespace, name: str, argv: Sequence[str],
                  timeout: float = 10.0) -> lab.Program:
    """Start `argv` in the host namespace (this checkout's passtd importable); fail the test
    with the program's log if it does not come up."""
    try:
        return host.start_program(argv, name=name, timeout=timeout, env=lab.passtd_env())
    except lab.LabError as e:
        pytest.fail(f"program under test did not start: {e}", pytrace=False)


@pytest.fixture(scope="session")
def program_argv() -> Callable[[str, Sequence[str]], list[str]]:
    """program_under_test, for fixtures of other scopes: (name, args) -> argv."""
    return program_under_test


@pytest.fixture(scope="session", name="start_program")
def start_program_fixture() -> Callable[..., lab.Program]:
    """start_program, for fixtures of other scopes: (host, name, argv, timeout=10)."""
    return start_program


# --- factories ---------------------------------------------------------------------------


class ProgramFactory:
    """Starts programs in the lab's host namespace; stops them at the end."""

    def __init__(self, host: lab.HostNamespace, logs: LabLogs) -> None:
        self.host = host
        self.logs = logs
        self.started: list[lab.Program] = []

    def __call__(self, args: Sequence[str] = (), *, argv: Sequence[str] | None = None,
                 name: str | None = None, timeout: float = 10.0) -> lab.Program:
        """Start `argv` (default: the program under test with `args`) and wait for its
        socket. Returns a handle with .socket, .proc, .log_text(), .stop()."""
        name = name or f"prog{len(self.started) + 1}"
        argv = list(argv) if argv is not None else program_under_test(name, args)
        prog = start_program(self.host, name, argv, timeout)
        self.started.append(prog)
        self.logs.add(f"program {name}", prog.log)
        return prog

    def close(self) -> None:
        for prog in self.started:
            prog.stop()
            self.logs.discard(f"program {prog.name}")


class GuestFactory:
    """Brings TapGuests up on a program's socket; takes them down at the end."""

    def __init__(self, host: lab.HostNamespace, logs: LabLogs) -> None:
        self.host = host
        self.logs = logs
        self.guests: list[lab.TapGuest] = []

    def __call__(self, socket: lab.Program | str | os.PathLike[str], **kw: Any) -> lab.TapGuest:
        """TapGuest(lab_host, socket, **kw).up(); `socket` may be a Program handle."""
        if kw.get("wire", "qemu") == "qemu":
            require("qemu-system-x86_64")
        path = socket.socket if isinstance(socket, lab.Program) else socket
        guest = lab.TapGuest(self.host, path, **kw)
        self.guests.append(guest)
        for label, log in guest.logs.items():
            self.logs.add(label, log)
        guest.up()
        return guest

    def close(self) -> None:
        for guest in self.guests:
            guest.down()
            for label in guest.logs:
                self.logs.discard(label)


class HostServers:
    """Servers in the lab host namespace (on its loopback), ended at the end of the test."""

    def __init__(self, host: lab.HostNamespace) -> None:
        self.host = host
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, argv: Sequence[str], *, port: int, udp: bool = False,
                 timeout: float = 10.0) -> subprocess.Popen[bytes]:
        """Start `argv` in the host namespace and wait until it listens on `port`."""
        require(argv[0])
        log = self.host.workdir / f"server-{'udp' if udp else 'tcp'}-{port}-{len(self.procs)}.log"
        proc = self.host.spawn(argv, log=log)
        self.procs.append(proc)
        try:
            self.host.wait_listening(port, timeout, udp=udp)
        except TimeoutError as e:
            pytest.fail(f"{shlex.join(argv)}: {e}; log:\n{log.read_text(errors='replace')}",
                        pytrace=False)
        return proc

    def tcp_echo(self, port: int, *, family: int = 4) -> subprocess.Popen[bytes]:
        """socat echoing every TCP connection on 127.0.0.1 or [::1], `port`."""
        listen = f"TCP4-LISTEN:{port},bind=127.0.0.1" if family == 4 else \
            f"TCP6-LISTEN:{port},bind=[::1],ipv6only=1"
        return self(["socat", f"{listen},reuseaddr,fork", "PIPE"], port=port)

    def udp_echo(self, port: int, *, family: int = 4) -> subprocess.Popen[bytes]:
        """socat echoing every UDP datagram on 127.0.0.1 or [::1], `port`."""
        listen = f"UDP4-RECVFROM:{port},bind=127.0.0.1" if family == 4 else \
            f"UDP6-RECVFROM:{port},bind=[::1],ipv6only=1"
        return self(["socat", f"{listen},fork", "PIPE"], port=port, udp=True)

    def close(self) -> None:
        for proc in self.procs:
            lab.terminate(proc, group=True)


@pytest.fixture
def program_factory(lab_host: lab.HostNamespace, lab_logs: LabLogs) -> Iterator[ProgramFactory]:
    factory = ProgramFactory(lab_host, lab_logs)
    yield factory
    factory.close()


@pytest.fixture
def guest_factory(lab_host: lab.HostNamespace, lab_logs: LabLogs) -> Iterator[GuestFactory]:
    factory = GuestFactory(lab_host, lab_logs)
    yield factory
    factory.close()


@pytest.fixture
def host_server(lab_host: lab.HostNamespace) -> Iterator[HostServers]:
    servers = HostServers(lab_host)
    yield servers
    servers.close()
