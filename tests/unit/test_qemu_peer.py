"""Who may be the guest's qemu (passtd/qemu_peer.py, the engine's accept_peer).

The matcher reads cgroup trees laid out as the kernel shows them (cgroup v2, and systemd's
hybrid layout with its cgroup2 tree in unified/ and name=systemd in systemd/), built here
in a temporary directory, and this machine's own cgroup file system; the engine refuses
and adopts real connections on a real listening socket. Under real systemd and libvirt:
tests/integration/test_libvirt.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from passtd.engine import link
from passtd.engine.addrs import Ip4Config, NetConfig
from passtd.engine.link import Undecided
from passtd.engine.loop import Engine
from passtd.engine.mainloop import MainLoop
from passtd.engine.settings import EngineSettings
from passtd.qemu_peer import CGROUP_ROOTS, CgroupPeerCheck, peer_pid, pids_below
from tests.support.engine_harness import run_for

SCOPE = "/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope"
OTHER = "/machine.slice/machine-qemu\\x2d2\\x2dvm2.scope"
QEMU, VCPU_THREAD_OWNER, STRANGER = 4242, 4243, 5151


def cgroup(root: Path, path: str, procs: list[int] | None, *, threaded: bool = False) -> Path:
    """A cgroup directory at `path` below `root` with these processes in cgroup.procs
    (None: a file that cannot be read, as in a threaded cgroup)."""
    directory = root / path.lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    procs_file = directory / "cgroup.procs"
    if threaded:
        procs_file.mkdir()  # reading it fails (EISDIR), as EOPNOTSUPP does in the kernel
    else:
        procs_file.write_text("".join(f"{pid}\n" for pid in procs or []))
    return directory


@pytest.fixture
def v2(tmp_path: Path) -> Path:
    """A cgroup v2 host: libvirt's scope with qemu moved into libvirt/emulator (its vcpu
    cgroups threaded), and another domain's scope."""
    root = tmp_path / "v2"
    cgroup(root, "/", [1])
    cgroup(root, SCOPE, [])
    cgroup(root, f"{SCOPE}/libvirt", [QEMU])
    cgroup(root, f"{SCOPE}/libvirt/emulator", [], threaded=True)
    cgroup(root, f"{SCOPE}/libvirt/vcpu0", [], threaded=True)
    cgroup(root, OTHER, [STRANGER])
    return root


@pytest.fixture
def hybrid(tmp_path: Path) -> Path:
    """systemd's hybrid layout (this machine's, and Debian 12 in a container): v1
    controllers, name=systemd in systemd/ and a cgroup2 tree in unified/."""
    fs = tmp_path / "hybrid"
    (fs / "memory").mkdir(parents=True)
    for tree in ("systemd", "unified"):
        cgroup(fs / tree, "/", [1])
        cgroup(fs / tree, SCOPE, [QEMU])
        cgroup(fs / tree, OTHER, [STRANGER])
    return fs


def roots(fs: Path) -> tuple[str, ...]:
    return tuple(str(fs) + root.removeprefix("/sys/fs/cgroup") for root in CGROUP_ROOTS)


def test_pids_below_reads_the_whole_subtree(v2: Path) -> None:
    assert pids_below(str(v2 / SCOPE.lstrip("/"))) == {QEMU}
    assert pids_below(str(v2)) == {1, QEMU, STRANGER}
    assert pids_below(str(v2 / "nonexistent")) == set()


@pytest.mark.parametrize("layout", ["v2", "hybrid"])
def test_the_domain_s_qemu_and_nobody_else(layout: str, request: pytest.FixtureRequest) -> None:
    fs = request.getfixturevalue(layout)
    check = CgroupPeerCheck(SCOPE, roots(fs))
    assert check.refusal(QEMU) is None
    assert check.refusal(STRANGER) == (
        f"pid {STRANGER} is not in cgroup {SCOPE} (another process, or gone)")
    assert check.refusal(1) is not None  # the cgroup above is not below
    assert CgroupPeerCheck(OTHER, roots(fs)).refusal(QEMU) is not None
    assert CgroupPeerCheck("/", roots(fs)).refusal(QEMU) is None  # the root: everyone


def test_a_scope_that_is_not_there_is_undecided(v2: Path) -> None:
    check = CgroupPeerCheck("/machine.slice/machine-qemu\\x2d9\\x2dvm9.scope", roots(v2))
    verdict = check.refusal(QEMU)
    assert isinstance(verdict, Undecided)
    assert str(verdict) == (f"pid {QEMU}: cgroup /machine.slice/machine-qemu\\x2d9"
                       "\\x2dvm9.scope does not exist (yet)")


def test_no_cgroup_file_system_refuses(tmp_path: Path) -> None:
    empty = str(tmp_path / "sysfs-fs-cgroup")  # as under `ip netns exec`: nothing mounted
    assert CgroupPeerCheck(SCOPE, (empty,)).refusal(QEMU) == (
        f"pid {QEMU}: no cgroup file system at {empty}, so not known to be in cgroup {SCOPE}")


def test_this_machine_s_cgroups() -> None:
    """This process, looked up in the real cgroup file system where its own
    /proc/self/cgroup says it is (whichever layout the machine has)."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    paths = {tree: path for _, tree, path in (line.split(":", 2) for line in lines)}
    mine = paths.get("") or paths.get("name=systemd")
    if mine is None or not any(os.path.isdir(r + mine) for r in CGROUP_ROOTS):
        pytest.skip("no cgroup file system with this process's cgroup at /sys/fs/cgroup")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert CgroupPeerCheck(mine)(ours) is None
        assert peer_pid(ours) == os.getpid()
        refusal = CgroupPeerCheck(mine.rstrip("/") + "/passtd-test-nonexistent.scope")(ours)
        assert refusal is not None and f"pid {os.getpid()}" in str(refusal)


def test_a_socket_without_a_peer_is_refused() -> None:
    lonely = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with lonely:
        assert peer_pid(lonely) is None
        assert "process is unknown" in (CgroupPeerCheck("/")(lonely) or "")


# -- the engine: refuse, keep listening, adopt the right one ------------------------------------


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[tuple[Engine, MainLoop, str]]:
    loop = MainLoop()
    settings = EngineSettings(net=NetConfig(ip4=Ip4Config(bytes([198, 51, 100, 2]), 24,
                                                          bytes([198, 51, 100, 1]))))
    engine = Engine(settings, loop=loop)
    path = str(tmp_path / "vm1.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    engine.start(listener)
    try:
        yield engine, loop, path
    finally:
        engine.close()
        listener.close()
        loop.close()


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    sock.connect(path)
    return sock


def test_the_engine_refuses_a_stranger_and_adopts_the_domain_s_qemu(
        engine: tuple[Engine, MainLoop, str], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    eng, loop, path = engine
    cgroup(tmp_path / "fs", "/", [])
    scope = cgroup(tmp_path / "fs", SCOPE, [])  # our own pid is not in it (yet)
    eng.accept_peer = CgroupPeerCheck(SCOPE, (str(tmp_path / "fs"),))
    caplog.set_level(logging.INFO, logger="passtd.engine")

    stranger = connect(path)
    run_for(loop, 0.05)
    assert stranger.recv(1) == b"", "a stranger's connection was kept"
    assert not eng.guest_connected
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"refusing a connection on the qemu socket: pid {os.getpid()} is not in cgroup "
        f"{SCOPE} (another process, or gone); still waiting for the guest's qemu"]

    (scope / "cgroup.procs").write_text(f"{os.getpid()}\n")  # now "the domain's qemu"
    qemu = connect(path)
    run_for(loop, 0.05)
    assert eng.guest_connected
    for sock in (stranger, qemu):
        sock.close()


def test_refusals_are_logged_at_a_bounded_rate(
        engine: tuple[Engine, MainLoop, str],
        caplog: pytest.LogCaptureFixture) -> None:
    eng, loop, path = engine
    eng.accept_peer = CgroupPeerCheck("/passtd-test-nonexistent.scope", ())
    caplog.set_level(logging.INFO, logger="passtd.engine")
    for _ in range(25):
        sock = connect(path)
        run_for(loop, 0.01)
        assert sock.recv(1) == b""
        sock.close()
    refused = [r for r in caplog.records if "refusing a connection" in r.getMessage()]
    assert len(refused) == 10 and not eng.guest_connected


def test_a_connection_is_held_until_its_scope_appears_then_adopted(
        engine: tuple[Engine, MainLoop, str], tmp_path: Path) -> None:
    """The scope may not exist yet when a connection comes: held, unread, asked again."""
    eng, loop, path = engine
    cgroup(tmp_path / "fs", "/", [])
    eng.accept_peer = CgroupPeerCheck(SCOPE, (str(tmp_path / "fs"),))
    qemu = connect(path)
    run_for(loop, 0.05)
    assert not eng.guest_connected
    cgroup(tmp_path / "fs", SCOPE, [os.getpid()])  # libvirt made the scope, qemu is in it
    run_for(loop, 2 * link.PEER_RECHECK)
    assert eng.guest_connected
    qemu.close()


def test_an_impostor_held_first_is_refused_once_the_scope_shows_it_is_not_qemu(
        engine: tuple[Engine, MainLoop, str], tmp_path: Path) -> None:
    eng, loop, path = engine
    cgroup(tmp_path / "fs", "/", [])
    eng.accept_peer = CgroupPeerCheck(SCOPE, (str(tmp_path / "fs"),))
    impostor = connect(path)  # before the scope exists
    run_for(loop, 0.05)
    cgroup(tmp_path / "fs", SCOPE, [1])  # the scope appears, with another process in it
    run_for(loop, 2 * link.PEER_RECHECK)
    assert impostor.recv(1) == b"" and not eng.guest_connected
    impostor.close()


def test_a_held_connection_is_adopted_once_the_check_is_dropped(
        engine: tuple[Engine, MainLoop, str], tmp_path: Path) -> None:
    """Where libvirt runs qemu in no machined scope, the hook's "started" step drops
    qemu_cgroup and reloads the instance (libvirt.started): the connection it held is the
    guest's qemu from then on."""
    eng, loop, path = engine
    cgroup(tmp_path / "fs", "/", [])
    eng.accept_peer = CgroupPeerCheck(SCOPE, (str(tmp_path / "fs"),))
    qemu = connect(path)
    run_for(loop, 4 * link.PEER_RECHECK)
    assert not eng.guest_connected  # held: the scope may still come
    eng.accept_peer = None  # the reload
    assert eng.guest_connected
    qemu.close()


def test_no_more_than_a_few_connections_are_held(
        engine: tuple[Engine, MainLoop, str], tmp_path: Path) -> None:
    eng, loop, path = engine
    cgroup(tmp_path / "fs", "/", [])
    eng.accept_peer = CgroupPeerCheck(SCOPE, (str(tmp_path / "fs"),))
    socks = []
    for _ in range(link.PEER_HELD_MAX + 3):
        socks.append(connect(path))
        run_for(loop, 0.01)
    refused = 0
    for sock in socks:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            refused += sock.recv(1) == b""
        sock.close()
    assert refused == 3 and not eng.guest_connected
