"""Live flows across a re-execution of `passtd run` (SIGUSR2): nothing lost, nothing reset.

The guest is a real kernel (a tap namespace on the lab wire) and the transfers are
netprog.py's exchanges, checked byte for byte (sha256) both ways: a client in the guest
sends a lot to a host server, another receives a lot from one, a host client exchanges
both ways with a server in the guest through a forward, a UDP flow and a ping run, and
the instance re-executes itself three times meanwhile, while a host client keeps opening
new connections to the forward. A reset or a refusal anywhere fails the exchange that saw
it. (tests/integration/test_systemd.py does the same through
`systemctl restart`.)
"""

from __future__ import annotations

import json
import os
import re
import signal
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


def reexec(prog: lab.Program, times_before: int) -> None:
    """SIGUSR2, then wait until the new process took over."""
    os.kill(prog.pid, signal.SIGUSR2)
    lab.wait_for(lambda: prog.log_text().count("took over") > times_before, 20,
                 "the re-executed instance to take over")


def client(ns: lab.Netns, host: str, port: int, send: int, reply: int, log: Path,
           **extra: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, NETPROG, "tcp-client", "--host", host, "--port", str(port),
            "--send", str(send), "--reply", str(reply), "--timeout", "60"]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", value]
    return ns.spawn(argv, log=log)


def verdict(proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> dict[str, object]:
    proc.wait(timeout)
    text = log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, text
    result: dict[str, object] = json.loads(lines[-1])
    assert proc.returncode == 0 and result["ok"], text
    return result


def test_reexec_keeps_tcp_udp_and_ping_flows(program_factory, guest_factory, host_server,
                                             lab_host: lab.HostNamespace) -> None:
    prog = program_factory([*BASE_ARGS, "-t", "18022:22"])
    guest = guest_factory(prog, wire="whole")
    gw = guest.gw4 or ""
    host_server([sys.executable, NETPROG, "tcp-server", "--bind", "127.0.0.1", "--port",
                 "18080"], port=18080)
    host_server([sys.executable, NETPROG, "udp-echo", "--bind", "127.0.0.1", "--port",
                 "18053"], port=18053, udp=True)
    guest.spawn([sys.executable, NETPROG, "tcp-server", "--bind", "::", "--port", "22"],
                log=guest.workdir / "srv22.log")
    guest.wait_listening(22)
    work = guest.workdir
    # slow readers keep every transfer going across the restarts
    upload = client(guest, gw, 18080, 200 * MIB, 1000, work / "up.log")
    download = client(guest, gw, 18080, 1000, 40 * MIB, work / "down.log",
                      read_chunk="65536", read_pause="0.004")
    inbound = client(lab_host, "127.0.0.1", 18022, 20 * MIB, 20 * MIB,
                     lab_host.workdir / "in.log",
                     read_chunk="65536", read_pause="0.004")
    ping = guest.spawn(["busybox", "ping", "-i", "0.05", "-c", "100", gw], log=work / "ping.log")
    udp = guest.spawn([sys.executable, NETPROG, "udp-burst", "--host", gw, "--port", "18053",
                       "--count", "3000", "--size", "200", "--burst", "10"],
                      log=work / "udp.log")
    probe = lab_host.spawn([sys.executable, NETPROG, "tcp-probe", "--host", "127.0.0.1",
                            "--port", "18022", "--count", "60", "--interval", "0.03"],
                           log=lab_host.workdir / "probe.log")
    time.sleep(0.5)
    for n in range(3):
        reexec(prog, n)
        time.sleep(0.3)
    for proc, log in ((upload, work / "up.log"), (download, work / "down.log"),
                      (inbound, lab_host.workdir / "in.log"),
                      (probe, lab_host.workdir / "probe.log")):
        verdict(proc, log)
    ping.wait(30)
    udp.wait(60)
    udp_result = json.loads((work / "udp.log").read_text().splitlines()[-1])
    assert udp_result["corrupt"] == 0
    assert udp_result["echoed"] > udp_result["sent"] * 0.9, udp_result
    ping_text = (work / "ping.log").read_text()
    received = int(re.search(r"(\d+) packets received", ping_text).group(1))  # type: ignore[union-attr]
    assert received >= 90, ping_text
    log = prog.log_text()
    assert prog.alive(), log
    assert "Traceback" not in log and "internal error" not in log, log[-4000:]
    took = re.findall(r"took over (\d+) flows and (\d+) forwards", log)
    assert len(took) == 3 and all(int(flows) >= 3 for flows, _ in took), took
    assert " reset" not in "".join(re.findall(r"took over .*", log)), log[-3000:]
