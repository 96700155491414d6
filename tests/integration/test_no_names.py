"""The lab resolves no names (issue: the README's demo waited 10 s for a DNS server its
namespace cannot reach, python's http.server asking getfqdn() before it listened).

Each lab namespace gets a resolv.conf and hosts of its own (passtd.tools.lab), naming the
namespace's loopback as its name server; here a recorder listens there
(tests/support/name_recorder.py), so any lookup shows. First a control: a reverse lookup
is recorded (the recorder works, and the host's resolv.conf is not used). Then the demo's
web server and fetch, and the demo's program arguments, must cause none.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from passtd.tools import demo, lab

pytestmark = pytest.mark.netns

RECORDER = Path(__file__).resolve().parents[1] / "support" / "name_recorder.py"


def recorded(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_the_demo_s_servers_resolve_no_names(lab_host: lab.HostNamespace,
                                             tmp_path: Path) -> None:
    log = tmp_path / "queries.log"
    lab_host.spawn([sys.executable, str(RECORDER), str(log)], log=tmp_path / "recorder.out")
    lab_host.wait_listening(53, udp=True)
    # the control: a reverse lookup (what http.server's getfqdn does) reaches the recorder
    control = lab_host.run([sys.executable, "-c", "import socket; socket.getfqdn('::')"],
                           timeout=30)
    assert control.returncode == 0, control.stderr
    lab.wait_for(lambda: recorded(log), 5, "the control lookup to be recorded")
    log.write_text("")

    site = demo.write_page(tmp_path / "site", demo.HOST_PAGE)
    started = time.monotonic()
    demo.web_server(lab_host, "::", 18000, site)
    fetch = lab_host.run([sys.executable, "-c",
                          "import urllib.request; print(urllib.request.urlopen("
                          "'http://[::1]:18000/', timeout=10).read().decode())"], timeout=30)
    assert fetch.returncode == 0 and demo.HOST_PAGE in fetch.stdout, fetch.stderr
    assert recorded(log) == [], "the demo's web server or its fetch looked up a name"
    assert time.monotonic() - started < 60  # (a hang shows here, not as a verdict on speed)


def test_the_demo_runs_and_offers_the_guest_no_name_server() -> None:
    """The README's first command ends in `passtd demo`: every step passes, and the lease
    the guest got names no DNS server (the lab has none it could reach)."""
    missing = lab.missing_requirements(["socat", "qemu-system-x86_64"])
    if missing:
        pytest.skip("the demo needs " + "; ".join(missing))
    res = subprocess.run([sys.executable, "-m", "passtd", "demo"], capture_output=True,
                         text=True, timeout=600, env=lab.passtd_env())
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    lease = next(line for line in res.stdout.splitlines() if "router" in line and "DNS" in line)
    assert "DNS none" in lease, lease
