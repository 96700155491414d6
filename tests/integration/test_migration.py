"""Live migration of a VM between two libvirt hosts, each with its own passtd.

Two hosts on one machine (tests/support/two_hosts.py): containers with their own systemd,
bus, libvirtd and this checkout's passtd, joined by a private link that carries libvirt's
migration. A TCG guest (tests/guestvm) attached to passtd with a forward 18025 -> 8000
serves on 8000 and fetches from its host's loopback through its gateway, over and over;
`virsh migrate --live` moves it A -> B -> A. The hosts are on different networks, so the
domain pins the guest's addresses and gateway in its passtd metadata (`passtctl libvirt
attach --ipv4 ... --gateway4 ...`), which travels with it: on B the guest keeps its
lease from A and its gateway, which B's passtd maps to B's loopback. What this shows:
the destination's hook starts passtd there, the guest answers through the forward on the
destination and reaches the destination's loopback through its unchanged gateway, the
source's instance and socket are released, the guest's NIC never goes away.

Not shown yet (issue 13): a guest that arrives with another host's lease and nothing
pinned, what happens to the guest's TCP connections, runtime forwards, a forward port
already taken on the destination.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from passtd import libvirt as passtd_libvirt
from tests.support.libvirt_env import Lab
from tests.support.two_hosts import Host, migrate, two_hosts

pytestmark = [pytest.mark.libvirt, pytest.mark.vm]

NAME = "mig-vm"
FORWARD, GUEST_PORT, LOOPBACK_PORT = 18025, 8000, 18080
# the guest's addresses on every host: A's network (B is on 203.0.113.0/24)
PINNED4, PINNED_GW4 = "198.51.100.2", "198.51.100.1"
PINNED6, PINNED_GW6 = "2001:db8::2", "fe80::1"
GUEST_SCRIPT = f"""\
socat TCP-LISTEN:{GUEST_PORT},reuseaddr,fork SYSTEM:'echo hello-from-guest' &
if passtd-net-wait 90; then
    . /run/passtd/net.env
    n=0
    while :; do
        n=$((n + 1))
        echo "MIGTEST n=$n fetch=$(socat -u -T 3 TCP4:$PASSTD_GW4:{LOOPBACK_PORT},\\
connect-timeout=3 STDOUT 2>&1)"
        sleep 0.5
    done
else
    echo "MIGTEST no network"
fi
sleep 3600
"""


@pytest.fixture(scope="module")
def hosts(lab_logs: Any) -> Iterator[tuple[Host, Host]]:
    with two_hosts("passtd-mig", lab_logs) as made:
        for host, text in zip(made, ("host-a", "host-b"), strict=True):
            host.ct.spawn(["socat", f"TCP4-LISTEN:{LOOPBACK_PORT},bind=127.0.0.1,reuseaddr,"
                           "fork", f"SYSTEM:echo {text}"])
        yield made


def fetches(host: Lab) -> list[tuple[int, str]]:
    """(number, what it got) of the guest's fetches on its console (the console file is
    written anew by the destination's qemu at each migration: numbers tell the order)."""
    out = []
    for line in host.console(NAME).splitlines():
        if "MIGTEST n=" in line and " fetch=" in line:
            number, got = line.split("MIGTEST n=", 1)[1].split(" fetch=", 1)
            if number.isdigit():
                out.append((int(number), got.strip()))
    return out


def fetched_from(host: Lab, after: int, label: str) -> bool:
    return any(n > after and got == label for n, got in fetches(host))


def forward_answers(host: Lab) -> str:
    res = host.ct.run(["socat", "-u", "-T", "5", f"TCP4:127.0.0.1:{FORWARD}", "STDOUT"],
                      check=False)
    return res.stdout.strip()


def wait(predicate: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_live_migration_there_and_back(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    a.define(NAME, script=GUEST_SCRIPT)
    a.passtctl("libvirt", "attach", NAME, "--forward", f"tcp:{FORWARD}:{GUEST_PORT}",
               "--ipv4", f"{PINNED4}/24", "--gateway4", PINNED_GW4,
               "--ipv6", f"{PINNED6}/64", "--gateway6", PINNED_GW6)
    a.virsh("start", NAME)
    a.wait_console(NAME, "PASSTD_NET ")
    wait(lambda: fetched_from(a, 0, "host-a"), "the guest to fetch from host A")
    assert wait(lambda: forward_answers(a), "the forward on A") == "hello-from-guest"

    def runs_on(host: Host) -> tuple[str, float]:
        status = json.loads(host.passtctl(NAME, "status", "--json").stdout)
        return status["hostname"], status["started_at"]

    where_before = runs_on(a)
    for source, destination, label in ((a, b, "host-b"), (b, a, "host-a")):
        seen = max((n for n, _ in fetches(a)), default=0)
        seconds, _ = migrate(source, destination, NAME)
        assert "running" in destination.virsh("domstate", NAME).stdout
        assert NAME not in source.virsh("list", "--name").stdout
        # the destination's instance serves the guest: its forward, its loopback
        assert wait(lambda d=destination: forward_answers(d), "the forward on the "
                    "destination") == "hello-from-guest"
        wait(lambda s=seen, want=label: fetched_from(a, s, want),
             f"the guest to fetch from {label}")
        # the source's instance and socket are released
        wait(lambda s=source: s.unit_state(passtd_libvirt.service_unit(NAME)) != "active"
             and not s.exists(f"/run/passtd/{NAME}.sock"), "the source to release passtd")
        assert not source.ct.run(["ss", "-Hltn", f"sport = :{FORWARD}"]).stdout.strip()
        where = runs_on(destination)  # passtctl says where the instance runs, and since when
        assert (where[0], where_before[0]) == (f"host-{label[-1]}",
                                               f"host-{'a' if label == 'host-b' else 'b'}")
        assert where[1] > where_before[1], (where, where_before)
        where_before = where
        print(f"[migration] {source.link_address} -> {destination.link_address}: virsh "
              f"migrate --live {seconds:.2f} s; the guest fetches from {label} and answers "
              f"through the forward there")
    # the NIC never went: the guest's own loop went on, it never set its network up again
    assert not [line for line in a.console(NAME).splitlines()
                if line.startswith("PASSTD_NET ") or "MIGTEST no network" in line]
    a.virsh("destroy", NAME)
