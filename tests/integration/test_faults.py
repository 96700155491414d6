"""Faults an instance must survive with a real guest: qemu going away mid-transfer and coming
back, the host peer resetting, and a guest that stops reading for a minute.

(Restarts under load with systemd's FD store and reloads of a broken configuration are in
test_systemd.py and test_libvirt.py, which run real systemd.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from passtd.tools import lab

NETPROG = str(Path(__file__).resolve().parents[1] / "support" / "netprog.py")
BASE_ARGS = ["--bus", "none", "-D", "none", "-S", "none"]
MIB = 1 << 20

pytestmark = pytest.mark.netns


def netprog_bg(ns: lab.Netns, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(ns.nsenter_argv([sys.executable, NETPROG, *args]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen[str], timeout: float) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert out, err
    return json.loads(out.splitlines()[-1])


def test_qemu_leaves_mid_transfer_and_the_transfer_resumes(program_factory, guest_factory,
                                                           lab_host: lab.HostNamespace) -> None:
    """The wire dies in the middle of 64 MiB each way and comes back 3 s later: the guest's
    and passtd's retransmissions carry the same connections on, byte for byte."""
    prog = program_factory([*BASE_ARGS, "-t", "10022:22"])
    guest = guest_factory(prog, wire="whole")
    guest.spawn([sys.executable, NETPROG, "tcp-server", "--bind", "::", "--port", "22"],
                log=guest.workdir / "srv.log")
    guest.wait_listening(22)
    client = netprog_bg(lab_host, "tcp-client", "--host", "127.0.0.1", "--port", "10022",
                        "--send", str(64 * MIB), "--reply", str(64 * MIB), "--timeout", "120",
                        # 5 ms per 64 KiB: 5 s of sending, so the outage falls inside it (at
                        # full speed the whole exchange can end between two looks at it)
                        "--send-pause", "0.005")

    def going() -> bool:
        if client.poll() is not None:
            raise AssertionError(f"the client ended before the outage: {client.communicate()}")
        return _flow_bytes(prog) > 8 * MIB

    try:
        lab.wait_for(going, 60, "the transfer to get going")
    except TimeoutError as e:  # what a stall looked like, for the next one to be diagnosed
        raise AssertionError(f"{e}\nclient exit: {client.poll()}\ninstance's sockets:\n"
                             f"{_sockets(prog)}\ninstance's log:\n{prog.log_text()[-4000:]}"
                             ) from None
    guest.disconnect()
    time.sleep(3)
    guest.connect()
    out = finished(client, 300)
    assert out["ok"], out
    assert prog.alive()


def _flow_bytes(prog: lab.Program) -> int:
    """Bytes the guest received so far, from the instance's socket queues (ss)."""
    total = 0
    for word in _sockets(prog, "established").split():
        if word.startswith("bytes_acked:"):
            total = max(total, int(word.split(":")[1]))
    return total


def _sockets(prog: lab.Program, *state: str) -> str:
    """`ss -tin` in the instance's namespace (queues, windows, bytes acknowledged)."""
    states = ["state", *state] if state else []
    return subprocess.run(["ss", "-N", _netns_of(prog.pid), "-tin", *states],
                          capture_output=True, text=True).stdout


def _netns_of(pid: int) -> str:
    for name in lab.NETNS_DIR.iterdir():
        if name.stat().st_ino == Path(f"/proc/{pid}/ns/net").stat().st_ino:
            return name.name
    raise AssertionError(f"no named namespace holds pid {pid}")


RESETTING_SERVER = """
import socket, struct
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 18096))
srv.listen(8)
while True:
    conn, _ = srv.accept()
    conn.recv(1)  # the guest's handshake is complete: a reset before it reads as refused
    conn.sendall(b"x" * 1_000_000)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # a RST, with data still unread by the client
"""

RESET_CLIENT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 18096), timeout=10)
s.sendall(b"?")
t = time.monotonic()
got = 0
try:
    while True:
        data = s.recv(65536)
        if not data:
            print("EOF", got); break
        got += len(data)
        time.sleep(0.001)
except ConnectionResetError:
    print("RESET", got, round(time.monotonic() - t, 2))
"""


def test_host_peer_reset_reaches_the_guest_as_a_reset(program_factory, guest_factory,
                                                      host_server) -> None:
    host_server([sys.executable, "-c", RESETTING_SERVER], port=18096)
    prog = program_factory(BASE_ARGS)
    guest = guest_factory(prog, wire="whole")
    res = guest.run([sys.executable, "-c", RESET_CLIENT, guest.gw4 or ""], capture_output=True,
                    text=True, timeout=60)
    assert res.stdout.startswith("RESET"), res.stdout + res.stderr
    assert float(res.stdout.split()[2]) < 5  # promptly, not after some timeout
    assert prog.alive()


def test_guest_stops_reading_for_a_minute(program_factory, guest_factory, host_server) -> None:
    """Zero window for 60 s: nothing lost, nothing reset, and the instance holds no data."""
    host_server([sys.executable, NETPROG, "tcp-server", "--bind", "127.0.0.1", "--port", "18080"],
                port=18080)
    prog = program_factory(BASE_ARGS)
    guest = guest_factory(prog, wire="whole")
    out = guest.run([sys.executable, NETPROG, "tcp-client", "--host", guest.gw4 or "",
                     "--port", "18080", "--send", "1000", "--reply", str(32 * MIB),
                     "--read-delay", "60", "--timeout", "120"],
                    capture_output=True, text=True, timeout=240)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["ok"], result
    assert prog.alive()


def test_guest_vanishes_mid_connection(program_factory, guest_factory,
                                      lab_host: lab.HostNamespace, tmp_path: Path) -> None:
    """The guest and its wire disappear while a forwarded connection is open and busy: the
    instance keeps its state consistent and serves the next guest at once."""
    prog = program_factory([*BASE_ARGS, "-t", "10022:22"])
    guest = guest_factory(prog, wire="whole")
    guest.spawn([sys.executable, NETPROG, "tcp-server", "--bind", "::", "--port", "22"],
                log=guest.workdir / "srv.log")
    guest.wait_listening(22)
    go_on = tmp_path / "go-on"
    peer = netprog_bg(lab_host, "tcp-client", "--host", "127.0.0.1", "--port", "10022",
                      "--send", str(32 * MIB), "--reply", "0", "--pause-file", str(go_on))
    assert peer.stdout is not None and peer.stdout.readline().strip() == "PAUSED"
    guest.down()  # wire, tap and the guest's kernel state: gone
    go_on.touch()  # the peer sends on, into a guest that is no more
    time.sleep(1)
    again = guest_factory(prog, wire="whole", name="next")
    assert again.ip4 == lab_host.ip4
    ping = again.run(["busybox", "ping", "-c", "1", "-W", "3", again.gw4 or ""],
                     capture_output=True, timeout=15)
    assert ping.returncode == 0
    peer.kill()
    peer.wait()
    assert prog.alive()
    assert "Traceback" not in prog.log_text()


def test_lossy_link_loses_no_data(program_factory, guest_factory, host_server) -> None:
    """One frame in 200 from the guest lost on the way: losses are repaired by fast
    retransmissions (what follows a gap is held, and duplicate ACKs are exact), rarely by
    a timeout (only a lost retransmission needs one), and 8 MiB arrive intact both ways.
    (The reference passt drops what follows a gap: at this loss rate it crawls.)"""
    host_server([sys.executable, NETPROG, "tcp-server", "--bind", "127.0.0.1", "--port", "18080"],
                port=18080)
    prog = program_factory(BASE_ARGS)
    guest = guest_factory(prog, wire="whole", lose=200, mtu=1500)
    guest.run(["nstat", "-n"])
    out = guest.run([sys.executable, NETPROG, "tcp-client", "--host", guest.gw4 or "",
                     "--port", "18080", "--send", str(8 * MIB), "--reply", str(8 * MIB)],
                    capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout.splitlines()[-1])["ok"], out.stdout + out.stderr
    counters = guest.run(["nstat", "-a", "TcpExtTCPTimeouts", "TcpExtTCPFastRetrans"],
                         capture_output=True, text=True).stdout
    count = {line.split()[0]: int(line.split()[1]) for line in counters.splitlines()[1:]}
    assert count.get("TcpExtTCPFastRetrans", 0) > 0, counters  # there were losses
    assert count.get("TcpExtTCPTimeouts", 0) * 4 < count["TcpExtTCPFastRetrans"], counters
    assert prog.alive()
