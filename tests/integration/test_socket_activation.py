"""Socket activation without systemd: `systemd-socket-activate` hands passtd its listening
socket, as passtd@.socket does, on a machine (or CI job) where systemd is not PID 1.

systemd-socket-activate binds the socket and execs passtd only when the first connection
arrives, with LISTEN_FDS=1 and LISTEN_FDNAMES=listen. passtd runs inside an isolated lab
namespace (passtd.tools.lab.HostNamespace: 198.51.100.2/24 behind a dead end), so the lease it
offers is that address; the qemu stand-in is the test process itself (a UNIX socket needs
no network). NOTIFY_SOCKET points at a datagram socket of the test, which receives what
systemd would (READY=1, STATUS=).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from passtd.tools import lab
from tests.support.qemu_stub import QemuStub, dhcp_option

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
TOOL = "systemd-socket-activate"


@pytest.fixture
def host() -> Iterator[lab.HostNamespace]:
    missing = lab.missing_requirements([TOOL])
    if missing:
        pytest.skip("; ".join(missing))
    with lab.HostNamespace(prefix="pdsa") as namespace:
        yield namespace


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def test_first_connection_starts_passtd(host: lab.HostNamespace) -> None:
    sock_path = host.socket_path("sa1")
    runtime_dir = host.workdir / "run"  # no /run/passtd/sa1.yaml, no state left behind
    runtime_dir.mkdir()
    config = host.workdir / "passtd.yaml"
    config.write_text("defaults:\n  log_level: debug\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = host.workdir / "notify.sock"
    notify.bind(str(notify_path))
    notify.settimeout(15)
    log = host.workdir / "sa1.log"
    # systemd-socket-activate passes on only PATH, TERM, USER, HOME and its -E variables
    proc = host.spawn([
        TOOL, "--listen", str(sock_path), "--fdname=listen",
        "-E", f"PYTHONPATH={REPO}", "-E", f"PASSTD_RUNTIME_DIR={runtime_dir}",
        "-E", f"NOTIFY_SOCKET={notify_path}",
        sys.executable, "-m", "passtd", "run", "sa1", "--config", str(config), "--bus", "none",
    ], log=log)
    try:
        lab.wait_socket(sock_path, 10, listener_pid=proc.pid)
        # nothing started yet: the process is still systemd-socket-activate
        assert Path(cmdline(proc.pid)[0]).name == TOOL
        assert proc.poll() is None

        with QemuStub(sock_path) as client:
            offer = client.dhcp_offer()
            assert offer["BOOTP"].yiaddr == host.ip4
            assert dhcp_option(offer, "router") == host.gw4
            # it execs: the same pid is now passtd
            assert cmdline(proc.pid)[1:5] == ["-m", "passtd", "run", "sa1"]
            status = notify.recv(4096).decode()
            while "READY=1" not in status:
                status = notify.recv(4096).decode()
            assert "STATUS=" in status, status
            text = log.read_text()
            assert "using the socket passed by systemd" in text, text

        # Accept=no: the listening socket stays with the instance, which serves the next
        # qemu (a VM restarted) itself
        with QemuStub(sock_path) as client:
            assert client.dhcp_offer()["BOOTP"].yiaddr == host.ip4
        assert proc.poll() is None
    finally:
        notify.close()
        lab.terminate(proc)
    assert proc.returncode == 0, log.read_text()
