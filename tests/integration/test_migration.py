"""Live migration of a VM between two libvirt hosts, each with its own passtd.

Two hosts on one machine (tests/support/two_hosts.py): containers with their own systemd,
bus, libvirtd and this checkout's passtd, joined by a private link that carries libvirt's
migration, each on a network of its own (A 198.51.100.0/24, B 203.0.113.0/24). TCG guests
(tests/guestvm) attached to passtd with a forward 18025 -> 8000 serve on 8000 and, over and
over, fetch from their host's loopback through their gateway (TCP), ask a UDP echo there
and ping it; each line on the console carries the guest's own clock (/proc/uptime), so
the guest's network downtime is measured inside the guest.

- Pinned (`passtctl libvirt attach --pin` on A): the domain's metadata holds the guest's
  addresses and gateways, which travel with it; `virsh migrate --live` A -> B -> A: the
  guest keeps its lease and gateway, which B's passtd maps to B's loopback; the forward
  given at attach and one added at runtime (recorded in the live definition) answer on
  the destination; a connection the guest held open through the move is reset at the
  guest's next segment; the source's instance and socket are released; passtctl says
  where the instance runs. Then a migration to B while B's forward port is taken fails
  with the instance's reason and leaves the guest running, served, on A.
- Not pinned: the guest arrives on B with A's lease. B's passtd learns the address (the
  forward reaches the guest, its traffic to other hosts passes) and says in the journal
  what is wrong (FOREIGN_ADDRESS) and deprecates A's IPv6 prefix in its RAs; the old gateway
  does not reach B; when the guest renews its lease it gets B's, and B's loopback through
  B's gateway.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from passtd import libvirt as passtd_libvirt
from tests.support.libvirt_env import Lab
from tests.support.two_hosts import LINK_B, LINK_B6, Host, migrate, two_hosts

pytestmark = [pytest.mark.libvirt, pytest.mark.vm]

FORWARD, RUNTIME_FORWARD, GUEST_PORT = 18025, 18026, 8000
LOOPBACK_TCP, LOOPBACK_UDP, HELD, LINK_TCP = 18080, 18081, 18090, 18082
PINNED4, PINNED_GW4 = "198.51.100.2/24", "198.51.100.1"  # what A gives (--pin)
PING_INTERVAL = 0.05  # seconds, the guest's fast ping of its gateway


def guest_script(renew_after_failures: int = 0) -> str:
    """The guest: a server behind the forward; a connection to its host's loopback held
    open, a line a second (its end is reported with the error); and a loop of probes:
    TCP fetch, UDP echo and ping of the gateway, and a fetch from B's link address (a host
    other than the gateway); and a ping of the gateway every PING_INTERVAL, whose longest
    run of unanswered requests among its last 200 each probe line reports (`lost`, the
    guest's network downtime to that precision). `renew_after_failures`: after that many
    failed fetches in a row, renew the DHCP lease (as a guest's network manager would when
    told to); each round also says how many of its IPv6 addresses are deprecated."""
    renew = "" if not renew_after_failures else f"""
        echo "MIGTEST deprecated=$(ip -6 addr show dev eth0 | grep -c deprecated)"
        if [ "$f" = "${{f#host-}}" ]; then bad=$((bad + 1)); else bad=0; fi
        if [ "$bad" -ge {renew_after_failures} ]; then
            echo "MIGTEST renewing"; kill -USR1 "$(cat /run/passtd/udhcpc.pid)"; bad=0
            sleep 2; . /run/passtd/dhcp.env; PASSTD_GW4=$DHCP_GW4
        fi"""
    return f"""\
socat TCP6-LISTEN:{GUEST_PORT},ipv6only=0,reuseaddr,fork SYSTEM:'echo hello-from-guest' &
if passtd-net-wait 90; then
    . /run/passtd/net.env
    ping -i {PING_INTERVAL} $PASSTD_GW4 >/tmp/ping.log 2>&1 &
    (
        (while :; do echo tick; sleep 1; done) |
            socat -u - TCP4:$PASSTD_GW4:{HELD} 2>/tmp/held.err
        echo "MIGTEST held-ended up=$(cut -d' ' -f1 /proc/uptime) $(tr '\\n' ' ' </tmp/held.err)"
    ) &
    n=0 bad=0
    while :; do
        n=$((n + 1))
        f=$(socat -u -T 2 TCP4:$PASSTD_GW4:{LOOPBACK_TCP},connect-timeout=2 STDOUT 2>/dev/null)
        u=$(echo x | socat -T 1 - UDP4:$PASSTD_GW4:{LOOPBACK_UDP} 2>/dev/null)
        p=lost; ping -c 1 -W 1 $PASSTD_GW4 >/dev/null 2>&1 && p=ok
        o=$(socat -u -T 2 TCP4:{LINK_B}:{LINK_TCP},connect-timeout=2 STDOUT 2>/dev/null)
        o6=$(socat -u -T 2 TCP6:[{LINK_B6}]:{LINK_TCP},connect-timeout=2 STDOUT 2>/dev/null)
        l=$(tail -n 200 /tmp/ping.log | awk -F 'seq=' '/seq=/ {{ split($2, w, " ");
            if (seen && w[1] - last - 1 > most) most = w[1] - last - 1; last = w[1]; seen++ }}
            END {{ print most + 0 "/" seen + 0 }}')
        echo "MIGTEST n=$n up=$(cut -d' ' -f1 /proc/uptime) fetch=$f;udp=$u;ping=$p;other=$o;\
other6=$o6;lost=$l"{renew}
        sleep 0.2
    done
else
    echo "MIGTEST no network"
fi
sleep 3600
"""


@dataclass
class Probe:
    n: int
    up: float  # the guest's clock
    fetch: str
    udp: str
    ping: str
    other: str  # B's link address, IPv4
    other6: str  # and IPv6 (the guest's global address then known to its passtd)
    lost: int  # the longest run of unanswered pings among the last 200
    answered: int  # how many of them were answered


_PROBE = re.compile(r"^MIGTEST n=(\d+) up=([0-9.]+) fetch=(.*);udp=(.*);ping=(\w+);"
                    r"other=(.*);other6=(.*);lost=(\d+)/(\d+)$")


class ProbeLog:
    """Every probe of the guest, by number. Its console file is written anew by the
    destination's qemu at each migration, so a thread reads it every 0.1 s and keeps what
    it saw: the probes around a migration are kept too."""

    def __init__(self, host: Lab, name: str) -> None:
        self.host, self.name = host, name
        self.seen: dict[int, Probe] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.host.console(self.name).splitlines():
            m = _PROBE.search(line.strip("\x00 \t"))  # NULs: a file qemu wrote anew
            if m:
                probe = Probe(int(m[1]), float(m[2]), m[3].strip(), m[4].strip(), m[5],
                              m[6].strip(), m[7].strip(), int(m[8]), int(m[9]))
                with self.lock:
                    self.seen.setdefault(probe.n, probe)

    def _run(self) -> None:
        while not self.done.wait(0.1):
            self._read()

    def __call__(self) -> list[Probe]:
        self._read()
        with self.lock:
            return [self.seen[n] for n in sorted(self.seen)]

    def close(self) -> None:
        self.done.set()
        self.thread.join()


def last_n(probes: ProbeLog) -> int:
    return max((p.n for p in probes()), default=0)


def served_by(probes: ProbeLog, after: int, label: str) -> Probe | None:
    """The first probe after number `after` that reached `label`'s loopback every way."""
    return next((p for p in probes() if p.n > after and p.fetch == label
                 and p.udp == label and p.ping == "ok"), None)


@dataclass
class Downtime:
    """The guest's view of a migration: its fast pings of the gateway (the guest's clock
    stands still while libvirt pauses it, so what it sees is what its network lost)."""

    last_source: float  # the guest's clock at its last probe served by the source
    pings_lost: int  # the longest run of unanswered pings around the migration
    pings_lost_before: int  # ... before it (what the guest's own jitter costs)
    pings_answered: int  # of the last 200 pings at the first probe after the move


def guest_downtime(probes: ProbeLog, after: int, source: str, destination: str) -> Downtime:
    every = probes()
    seen = [p for p in every if p.n > after]
    first = next(p for p in seen if p.fetch == destination and p.udp == destination)
    last = max((p for p in seen if p.n < first.n and p.fetch == source), key=lambda p: p.n,
               default=None)
    return Downtime(last.up if last is not None else seen[0].up,
                    max(p.lost for p in seen if p.n >= first.n),
                    max((p.lost for p in every if p.n <= after), default=0), first.answered)


def libvirt_downtime(*hosts: Host, name: str) -> str:
    """libvirt's own figures for the last migration (`virsh domjobinfo --completed`): the
    time it took and the guest's pause, from the first of `hosts` that keeps them."""
    for host in hosts:
        res = host.virsh("domjobinfo", "--completed", name, check=False)
        found = {key: re.search(rf"{key}:\s*(\d+)\s*ms", res.stdout)
                 for key in ("Time elapsed", "Total downtime")}
        if all(found.values()):
            return ", ".join(f"{key.lower()} {m[1]} ms" for key, m in found.items() if m)
    return "not reported"


def forward_answers(host: Lab, port: int = FORWARD, family: int = 4) -> str:
    target = f"TCP4:127.0.0.1:{port}" if family == 4 else f"TCP6:[::1]:{port}"
    return host.ct.run(["socat", "-u", "-T", "5", target, "STDOUT"], check=False).stdout.strip()


def wait(predicate: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def runs_on(host: Host, name: str) -> tuple[str, float]:
    status = json.loads(host.passtctl(name, "status", "--json").stdout)
    return status["hostname"], status["started_at"]


def released(host: Host, name: str) -> bool:
    return (host.unit_state(passtd_libvirt.service_unit(name)) != "active"
            and not host.exists(f"/run/passtd/{name}.sock"))


@pytest.fixture(scope="module")
def hosts(lab_logs: Any) -> Iterator[tuple[Host, Host]]:
    with two_hosts("passtd-mig", lab_logs) as made:
        for host, label in zip(made, ("host-a", "host-b"), strict=True):
            ct = host.ct
            ct.spawn(["socat", f"TCP4-LISTEN:{LOOPBACK_TCP},bind=127.0.0.1,reuseaddr,fork",
                      f"SYSTEM:echo {label}"])
            ct.spawn(["socat", f"UDP4-RECVFROM:{LOOPBACK_UDP},bind=127.0.0.1,fork",
                      f"SYSTEM:echo {label}"])
            ct.spawn(["socat", f"TCP4-LISTEN:{HELD},bind=127.0.0.1,reuseaddr,fork",
                      "SYSTEM:cat >/dev/null"])
            ct.spawn(["socat", f"TCP6-LISTEN:{LINK_TCP},ipv6only=0,reuseaddr,fork",
                      f"SYSTEM:echo link-{label}"])
        yield made


@pytest.fixture
def probe_log() -> Iterator[Callable[[Lab, str], ProbeLog]]:
    made: list[ProbeLog] = []

    def make(host: Lab, name: str) -> ProbeLog:
        made.append(ProbeLog(host, name))
        return made[-1]

    yield make
    for log in made:
        log.close()


def test_pinned_guest_migrates_with_its_forwards_there_and_back(
        hosts: tuple[Host, Host], probe_log: Callable[[Lab, str], ProbeLog]) -> None:
    a, b = hosts
    name = "mig-pin"
    a.define(name, script=guest_script())
    attached = json.loads(a.passtctl("libvirt", "attach", name, "--forward",
                                     f"tcp:{FORWARD}:{GUEST_PORT}", "--pin", "--json").stdout)
    assert attached["pinned"]["ipv4"] == PINNED4, attached  # what A gives: its own network
    assert attached["pinned"]["gateway4"] == PINNED_GW4, attached
    a.virsh("start", name)
    probes = probe_log(a, name)
    a.wait_console(name, "PASSTD_NET ")
    wait(lambda: served_by(probes, 0, "host-a"), "the guest to be served by host A")
    assert wait(lambda: forward_answers(a), "the forward on A") == "hello-from-guest"
    # a runtime forward: recorded in the live definition, so that it migrates
    added = a.passtctl(name, "forward", "add", "tcp", f"{RUNTIME_FORWARD}:{GUEST_PORT}").stdout
    assert "live definition" in added, added
    assert forward_answers(a, RUNTIME_FORWARD) == "hello-from-guest"
    assert f"host='{RUNTIME_FORWARD}'" in a.virsh("dumpxml", name).stdout.replace('"', "'")
    assert str(RUNTIME_FORWARD) not in a.virsh("dumpxml", "--inactive", name).stdout

    where_before = runs_on(a, name)
    for source, destination, label in ((a, b, "host-b"), (b, a, "host-a")):
        before = last_n(probes)
        from_label = "host-a" if label == "host-b" else "host-b"
        seconds, _ = migrate(source, destination, name)
        assert "running" in destination.virsh("domstate", name).stdout
        assert name not in source.virsh("list", "--name").stdout
        # the destination's instance serves the guest: both forwards, loopback (TCP, UDP,
        # ping) through the unchanged gateway, another host
        for port in (FORWARD, RUNTIME_FORWARD):
            assert wait(lambda p=port, d=destination: forward_answers(d, p),
                        f"forward {port} on {label}") == "hello-from-guest"
        probe = wait(lambda s=before, want=label: served_by(probes, s, want),
                     f"the guest to be served by {label}")
        assert (probe.other, probe.other6) == ("link-host-b", "link-host-b"), probe
        # and through the forward over IPv6, to the guest's (pinned prefix) address
        assert wait(lambda d=destination: forward_answers(d, FORWARD, 6),
                    f"the forward over IPv6 on {label}") == "hello-from-guest"
        downtime = guest_downtime(probes, before, from_label, label)
        if label == "host-b":  # the connection the guest held to A: reset at its next tick
            ended = wait(lambda: [ln for ln in a.console(name).splitlines()
                                  if "MIGTEST held-ended" in ln], "the held connection's end",
                         timeout=15)
            assert "reset" in ended[0].lower(), ended  # a reset, not an orderly close
            held_up = float(ended[0].split("up=", 1)[1].split()[0])
            reset_after = held_up - downtime.last_source  # by the guest's clock
            assert reset_after < 5, (ended, downtime)
        # the source's instance and socket are released
        wait(lambda s=source: released(s, name), "the source to release passtd")
        assert not source.ct.run(["ss", "-Hltn", f"sport = :{FORWARD}"]).stdout.strip()
        where = runs_on(destination, name)  # passtctl says where it runs, and since when
        assert (where[0], where_before[0]) == (label, from_label)
        assert where[1] > where_before[1], (where, where_before)
        where_before = where
        print(f"[migration] {from_label} -> {label}: virsh migrate --live {seconds:.2f} s, "
              f"libvirt: {libvirt_downtime(source, destination, name=name)}; in the "
              f"guest, pings of its gateway every {PING_INTERVAL * 1000:.0f} ms: at most "
              f"{downtime.pings_lost} in a row unanswered around the move "
              f"({downtime.pings_lost_before} before it; {downtime.pings_answered} of the "
              f"last 200 answered)" + (f"; its held connection reset {reset_after:.2f} s "
                                       "after its last probe served by the source"
                                       if label == "host-b" else ""))
        assert downtime.pings_answered >= 40, downtime  # the pinger ran, and was answered
        assert downtime.pings_lost * PING_INTERVAL < 2.0, downtime
    # the NIC never went: the guest's own loop went on, it never set its network up again
    assert not [line for line in a.console(name).splitlines()
                if line.startswith("PASSTD_NET ") or "MIGTEST no network" in line]

    # B's forward port taken: the migration fails with the reason, the guest stays on A
    squatter = b.ct.spawn(["socat", f"TCP4-LISTEN:{FORWARD},reuseaddr,fork",
                           "SYSTEM:echo squatter"])
    try:
        wait(lambda: forward_answers(b) == "squatter", "the squatter on B", timeout=10)
        before = last_n(probes)
        _, res = migrate(a, b, name, check=False)
        assert res.returncode != 0, res
        assert "passtd instance cannot start" in res.stderr and str(FORWARD) in res.stderr, \
            res.stderr
        print(f"[migration] to a host whose forward port is taken: {res.stderr.strip()}")
        assert "running" in a.virsh("domstate", name).stdout
        assert name not in b.virsh("list", "--all", "--name").stdout
        assert released(b, name)
        wait(lambda: served_by(probes, before, "host-a"), "the guest still served on A")
        assert forward_answers(a) == "hello-from-guest"
    finally:
        os.killpg(squatter.pid, signal.SIGKILL)  # nsenter and socat: a session of their own
        squatter.wait()
    wait(lambda: not b.ct.run(["ss", "-Hltn", f"sport = :{FORWARD}"]).stdout.strip(),
         "the squatter's port to be free")
    a.virsh("destroy", name)


def test_unpinned_guest_arriving_with_a_lease_from_another_host(
        hosts: tuple[Host, Host], probe_log: Callable[[Lab, str], ProbeLog]) -> None:
    a, b = hosts
    name = "mig-free"
    a.define(name, script=guest_script(renew_after_failures=4))
    a.passtctl("libvirt", "attach", name, "--forward", f"tcp:{FORWARD}:{GUEST_PORT}")
    a.virsh("start", name)
    probes = probe_log(a, name)
    net = a.wait_console(name, "PASSTD_NET ")
    assert f"ip4={PINNED4.split('/')[0]} " in net, net  # A's lease: A's own address
    wait(lambda: served_by(probes, 0, "host-a"), "the guest to be served by host A")
    before = last_n(probes)
    seconds, _ = migrate(a, b, name)
    try:
        # the forward reaches the address the guest uses; its traffic to others passes
        assert wait(lambda: forward_answers(b), "the forward on B") == "hello-from-guest"
        wait(lambda: any(p.n > before and p.other == p.other6 == "link-host-b"
                         for p in probes()), "the guest to reach host B's addresses")
        assert wait(lambda: forward_answers(b, FORWARD, 6), "the forward over IPv6 on B") \
            == "hello-from-guest"
        # B's RAs deprecate the prefix the guest brought from A: new connections use B's
        wait(lambda: "MIGTEST deprecated=1" in a.console(name),
             "the guest's address from A's prefix to be deprecated")
        # B says what is wrong, and how to avoid it
        def foreign_address_said() -> str | None:
            text = b.ct.journal("-u", passtd_libvirt.service_unit(name), "-o", "cat",
                                "MESSAGE_ID=4955805edfcb4b1aace54b3526db7df5")
            return text if "198.51.100.2" in text else None

        said = wait(foreign_address_said, "FOREIGN_ADDRESS in B's journal")
        assert "198.51.100.2" in said and "--pin" in said, said
        # its old gateway is not B: until it renews, and then it gets B's lease
        renewed = wait(lambda: "MIGTEST renewing" in a.console(name), "the guest to renew")
        assert renewed
        probe = wait(lambda: served_by(probes, before, "host-b"),
                     "the renewed guest to be served by host B")
        print(f"[migration] unpinned guest A -> B in {seconds:.2f} s: forward and other hosts "
              f"at once; B's loopback after renewing its lease (probe {probe.n}); B's "
              f"journal: {said.strip().splitlines()[0]}")
        assert forward_answers(b) == "hello-from-guest"  # the new address, learnt again
    finally:
        b.virsh("destroy", name, check=False)
