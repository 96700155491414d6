"""Captures (--pcap) against a real guest: a capture problem costs the capture, never the
traffic, the file is created safely, and its size is capped.

Each test starts its own instance in the lab's host namespace. The full filesystem is a
tiny tmpfs mounted in a mount namespace of the instance's own (tests/support/mounts.py).
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

import pytest
from scapy.utils import rdpcap

from passtd.tools import lab
from tests.support.mounts import with_private_mounts
from tests.support.qemu_stub import QemuStub

NETPROG = str(Path(__file__).resolve().parents[1] / "support" / "netprog.py")
BASE_ARGS = ["--bus", "none", "-D", "none", "-S", "none"]
MIB = 1 << 20
NOBODY = 65534

pytestmark = pytest.mark.netns


def capture_lines(prog: lab.Program, capture: Path) -> list[str]:
    """What the instance logged about the capture (programs of a module share log files)."""
    return [line for line in prog.log_text().splitlines() if f"pcap {capture}" in line]


def healthy(prog: lab.Program) -> None:
    assert prog.alive(), prog.log_text()
    assert "Traceback" not in prog.log_text(), prog.log_text()[-4000:]


def serves_dhcp(prog: lab.Program) -> None:
    with QemuStub(prog.socket) as stub:
        stub.dhcp_offer()


def exchange(guest: lab.TapGuest, size: int) -> None:
    res = guest.run([sys.executable, NETPROG, "tcp-client", "--host", guest.gw4 or "",
                     "--port", "18080", "--send", str(size), "--reply", str(size),
                     "--timeout", "30"], capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture
def capdir(lab_host: lab.HostNamespace) -> Path:
    """A directory of root's own for this test's captures (0700)."""
    return Path(tempfile.mkdtemp(prefix="captures-", dir=lab_host.workdir))


def test_a_full_filesystem_costs_the_capture_not_the_traffic(
        program_factory, program_argv, guest_factory, host_server, capdir: Path) -> None:
    host_server([sys.executable, NETPROG, "tcp-server", "--bind", "127.0.0.1", "--port", "18080"],
                port=18080)
    capture = capdir / "capture.pcap"
    argv = with_private_mounts(f"mount -t tmpfs -o size=256k,mode=0700 tmpfs {capdir}",
                               program_argv("full", [*BASE_ARGS, "--pcap", str(capture)]))
    prog = program_factory(argv=argv, name="full")
    guest = guest_factory(prog, wire="whole")
    exchange(guest, 2 * MIB)  # the capture fills up on the way
    exchange(guest, 2 * MIB)  # and traffic goes on after it stopped
    lines = capture_lines(prog, capture)
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    healthy(prog)
    seen = Path(f"/proc/{prog.pid}/root") / str(capture).lstrip("/")
    assert 0 < seen.stat().st_size <= 256 << 10
    assert len(rdpcap(str(seen))) > 0  # cut back to whole records: still a capture


def test_the_size_limit_stops_the_capture(program_factory, guest_factory, host_server,
                                          capdir: Path) -> None:
    host_server([sys.executable, NETPROG, "tcp-server", "--bind", "127.0.0.1", "--port", "18080"],
                port=18080)
    capture = capdir / "capture.pcap"
    prog = program_factory([*BASE_ARGS, "--pcap", str(capture), "--limit", "pcap_size=100000"])
    guest = guest_factory(prog, wire="whole")
    exchange(guest, MIB)
    lines = capture_lines(prog, capture)
    assert len(lines) == 1 and "size limit" in lines[0], lines
    # it stopped at the first record that would not fit: one frame, at most, short
    assert 100000 - (16 + 65535 + 14) < capture.stat().st_size <= 100000
    assert len(rdpcap(str(capture))) > 0
    exchange(guest, MIB)
    assert capture.stat().st_size <= 100000
    healthy(prog)


def test_the_capture_is_private(program_factory, capdir: Path) -> None:
    """Mode 0600, whatever the umask, and an earlier capture of ours is started anew."""
    capture = capdir / "capture.pcap"
    capture.write_bytes(b"an old capture" * 1000)
    capture.chmod(0o644)
    prog = program_factory([*BASE_ARGS, "--pcap", str(capture)])
    serves_dhcp(prog)
    prog.stop()
    assert stat.S_IMODE(capture.stat().st_mode) == 0o600
    assert b"an old capture" not in capture.read_bytes()
    assert len(rdpcap(str(capture))) > 0
    capture.unlink()
    prog = program_factory(["--pcap", str(capture), *BASE_ARGS], name="fresh")
    serves_dhcp(prog)
    assert stat.S_IMODE(capture.stat().st_mode) == 0o600


@pytest.mark.parametrize("what", ["symlink", "someone else's file", "directory", "fifo"])
def test_what_is_not_our_capture_file_is_refused(program_factory, capdir: Path,
                                                 what: str) -> None:
    """The capture is refused, with a log line saying why; the thing at the path is left
    as it was; the guest's traffic is served all the same."""
    capture = capdir / "capture.pcap"
    victim = capdir / "victim"
    victim.write_bytes(b"precious")
    if what == "symlink":
        capture.symlink_to(victim)
    elif what == "someone else's file":
        capture.write_bytes(b"precious")
        os.chown(capture, NOBODY, NOBODY)
    elif what == "directory":
        capture.mkdir()
    else:
        os.mkfifo(capture)
    prog = program_factory([*BASE_ARGS, "--pcap", str(capture)])
    serves_dhcp(prog)
    lines = capture_lines(prog, capture)
    assert len(lines) == 1 and "not capturing" in lines[0], lines
    assert victim.read_bytes() == b"precious"
    if what == "someone else's file":
        assert capture.read_bytes() == b"precious"
    healthy(prog)


@pytest.mark.parametrize("mode", [0o777, 0o1777])
def test_a_world_writable_directory_is_refused(program_factory, capdir: Path, mode: int) -> None:
    shared = capdir / "shared"
    shared.mkdir()
    shared.chmod(mode)
    capture = shared / "capture.pcap"
    prog = program_factory([*BASE_ARGS, "--pcap", str(capture)])
    serves_dhcp(prog)
    lines = capture_lines(prog, capture)
    assert len(lines) == 1 and "writable by everyone" in lines[0], lines
    assert not capture.exists()
    healthy(prog)
