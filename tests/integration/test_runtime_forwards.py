"""Forwards changed at run time carry real traffic at once, and removing one spares the
connections already made through it (passtctl over a private system bus with the real
policy, a tap guest behind the instance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from passtd.tools import lab
from tests.support.dbus_bus import PrivateBus

REPO = Path(__file__).resolve().parents[2]
NETPROG = str(REPO / "tests" / "support" / "netprog.py")

pytestmark = pytest.mark.netns


def passtctl(bus: PrivateBus, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "passtd.passtctl", "--bus-address", bus.address,
                           *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_runtime_forward_carries_traffic_and_removal_spares_live_connections(
        lab_host: lab.HostNamespace, tmp_path: Path, lab_logs) -> None:
    if lab.missing_requirements(["dbus-daemon"]):
        pytest.skip("dbus-daemon not installed")
    bus = PrivateBus.system_like(tmp_path / "bus").start()
    lab_logs.add("system bus", bus.log)
    state = tmp_path / "state"
    state.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBUS_")}
    env.update(DBUS_SYSTEM_BUS_ADDRESS=bus.address, PYTHONPATH=str(REPO),
               PASSTD_RUNTIME_DIR=str(state), PASSTD_STATE_DIR=str(state))
    prog = lab_host.start_program([sys.executable, "-m", "passtd", "run", "rt", "--socket",
                                   "{SOCK}", "--bus", "system", "-D", "none", "-S", "none"],
                                  name="rt", env=env)
    lab_logs.add("instance", prog.log)
    guest = lab.TapGuest(lab_host, prog.socket, name="rt", wire="whole")
    clients: list[subprocess.Popen[str]] = []
    try:
        guest.up()
        guest.spawn([sys.executable, NETPROG, "tcp-server", "--bind", "::", "--port", "22"],
                    log=guest.workdir / "srv.log")
        guest.wait_listening(22)
        lab.wait_for(lambda: passtctl(bus, "rt", "status").returncode == 0, 15,
                     "the instance on the bus")

        added = passtctl(bus, "--json", "rt", "forward", "add", "tcp", "12222:22")
        assert added.returncode == 0, added.stderr
        forward_id = json.loads(added.stdout)["id"]
        # at once: a 1 MiB exchange both ways through the new forward
        res = lab_host.run([sys.executable, NETPROG, "tcp-client", "--host", "127.0.0.1",
                            "--port", "12222", "--send", "1048576", "--reply", "1048576"],
                           capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr

        # a connection that stays open across the removal
        go_on = tmp_path / "go-on"
        live = subprocess.Popen(lab_host.nsenter_argv(
            [sys.executable, NETPROG, "tcp-client", "--host", "127.0.0.1", "--port", "12222",
             "--send", "4194304", "--reply", "4194304", "--pause-file", str(go_on)]),
            stdout=subprocess.PIPE, text=True)
        clients.append(live)
        assert live.stdout is not None and live.stdout.readline().strip() == "PAUSED"
        flows = json.loads(passtctl(bus, "rt", "flows", "--json").stdout)
        assert any(f["guest_port"] == 22 and f["origin"] == "host" for f in flows), flows

        removed = passtctl(bus, "rt", "forward", "remove", str(forward_id))
        assert removed.returncode == 0, removed.stderr
        refused = lab_host.run([sys.executable, "-c",
                                "import socket; socket.create_connection(('127.0.0.1', 12222), 5)"],
                               capture_output=True, text=True, timeout=30)
        assert "ConnectionRefusedError" in refused.stderr
        go_on.touch()
        out, _ = live.communicate(timeout=60)
        assert live.returncode == 0 and json.loads(out.splitlines()[-1])["ok"], out
        assert prog.alive()
    finally:
        for client in clients:
            lab.terminate(client)
        guest.down()
        status = prog.stop()
        bus.stop()
    assert status == 0, prog.log_text()
