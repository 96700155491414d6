"""The libvirt integration end to end: hook, passtctl libvirt, a TCG guest, under real libvirtd.

One container per module (tests/support/container.py, set up by
tests/support/libvirt_env.py) boots the host's root file system with systemd, the system bus
and libvirtd (not masked here), and gets this checkout's units, D-Bus policy and libvirt
hook; the checkout's `passtd` package is bound over the venv's copy, so the hook, the
service and passtctl all run the code under test. libvirtd is restarted after that (it looks
for hooks when it starts), with `cgroup_controllers = [ ]` (the container's cgroup
controllers are read-only).

The guest (tests/guestvm, TCG) boots in serve mode with a script; its console, where
everything it says goes, is a file in a host directory bound into the container. Its
network: passtd gives it the container's dead-end veth address 198.51.100.2 and gateway
198.51.100.1, which leads to the container's loopback; nothing leaves the container's
private network namespace.

Timings of the steps are printed (pytest -s shows them; -v -rP too).
"""

from __future__ import annotations

import json
import re
import stat
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import yaml

from passtd import libvirt as passtd_libvirt
from tests.guestvm.vm import parse_net_line
from tests.support.libvirt_env import (
    GUEST_GW4,
    GUEST_IP4,
    HOOK,
    HOOK_INSIDE,
    VENV,
    Lab,
    connect_and_hold,
    installed_package,
    libvirt_lab,
    wait_text,
)

pytestmark = [pytest.mark.libvirt, pytest.mark.vm]

LOOPBACK_PORT = 18080
PLAIN_HOOK_MAX_S = 0.25  # what a domain without passtd may cost per hook call (CI slack)

# The guest: a server on port 22 that greets and holds the connection (so that the host
# can list it), and one request to the host's loopback through the gateway.
GUEST_SCRIPT = f"""\
socat TCP-LISTEN:22,reuseaddr,fork SYSTEM:'echo hello-from-guest; sleep 30' &
if passtd-net-wait 90; then
    . /run/passtd/net.env
    echo "LVTEST outbound=$(socat -u -T 10 TCP4:$PASSTD_GW4:{LOOPBACK_PORT} STDOUT 2>&1)"
else
    echo "LVTEST no network"
fi
sleep 3600
"""


def _ms(seconds: Iterable[float]) -> str:
    return ", ".join(f"{s * 1000:.0f}" for s in seconds) + " ms"


@pytest.fixture(scope="module")
def lab(lab_logs: object) -> Iterator[Lab]:
    with libvirt_lab("passtd-lv", "libvirt", lab_logs) as made:
        yield made


def _inactive_xml(lab: Lab, name: str) -> ET.Element:
    return ET.fromstring(lab.virsh("dumpxml", "--inactive", name).stdout)


def _metadata_forwards(domain: ET.Element) -> list[tuple[str, str, str | None]]:
    tag = f"{{{passtd_libvirt.NAMESPACE}}}"
    return [(f.get("proto", ""), f.get("host", ""), f.get("guest"))
            for f in domain.iterfind(f"metadata/{tag}network/{tag}forward")]


def _qemu_args(domain: ET.Element) -> list[str]:
    tag = f"{{{passtd_libvirt.QEMU_NAMESPACE}}}"
    return [a.get("value", "") for a in domain.iterfind(f"{tag}commandline/{tag}arg")]


def _instance_stopped(lab: Lab, name: str) -> None:
    for unit in (passtd_libvirt.socket_unit(name), passtd_libvirt.service_unit(name)):
        assert lab.unit_state(unit) in ("inactive", "failed"), unit
    assert not lab.exists(f"/run/passtd/{name}.sock")
    assert not lab.exists(f"/run/passtd/{name}.yaml")


def _boot_and_check(lab: Lab, name: str, label: str) -> None:
    """Start domain `name`, wait for its DHCP lease and its outbound request; print times."""
    lab.console_path(name).unlink(missing_ok=True)
    started = time.monotonic()
    lab.virsh("start", name)
    start_s = time.monotonic() - started
    assert lab.unit_state(passtd_libvirt.socket_unit(name)) == "active"
    assert lab.exists(f"/run/passtd/{name}.sock")
    net = parse_net_line(lab.wait_console(name, "PASSTD_NET "))
    net_s = time.monotonic() - started
    assert (net["ip4"], net["prefix"], net["gw4"]) == (GUEST_IP4, "24", GUEST_GW4), net
    outbound = lab.wait_console(name, "LVTEST ")
    assert outbound.endswith("LVTEST outbound=hello-from-host-loopback"), \
        f"{outbound}\n{lab.console(name)[-3000:]}"
    print(f"[libvirt] {label}: virsh start {start_s:.2f} s, guest DHCP lease "
          f"{net['ip4']}/{net['prefix']} gw {net['gw4']} at {net_s:.1f} s, outbound to the "
          f"host's loopback through the gateway at {time.monotonic() - started:.1f} s")


# -- the whole chain -------------------------------------------------------------------------


def test_attach_start_forward_flows_destroy_and_start_again(lab: Lab) -> None:
    name = "lv-vm1"  # its units are passtd@lv\x2dvm1.*, its socket /run/passtd/lv-vm1.sock
    lab.define(name, script=GUEST_SCRIPT)
    loopback_server = lab.ct.spawn([
        "socat", f"TCP4-LISTEN:{LOOPBACK_PORT},bind=127.0.0.1,reuseaddr,fork",
        "SYSTEM:echo hello-from-host-loopback"])
    try:
        # attach: metadata + netdev + NIC, idempotent
        t = time.monotonic()
        out = lab.passtctl("libvirt", "attach", name, "--forward", "tcp:2222:22").stdout
        print(f"[libvirt] passtctl libvirt attach in {time.monotonic() - t:.2f} s:\n{out}")
        assert "attached to passtd" in out
        first = lab.virsh("dumpxml", "--inactive", name).stdout
        again = lab.passtctl("libvirt", "attach", name, "--forward", "tcp:2222:22").stdout
        assert "nothing changed" in again
        assert lab.virsh("dumpxml", "--inactive", name).stdout == first
        domain = ET.fromstring(first)
        assert _metadata_forwards(domain) == [("tcp", "2222", "22")]
        args = _qemu_args(domain)
        assert args[:3] == ["-netdev", passtd_libvirt.netdev_value(name), "-device"]
        assert args[3].startswith("virtio-net-pci,id=passtd0-nic,netdev=passtd0,mac=52:54:00:")

        _boot_and_check(lab, name, "first start")
        runtime = lab.ct.host_path(f"/run/passtd/{name}.yaml")
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o644
        assert "2222:22" in runtime.read_text()

        # running: attach is refused, politely
        refused = lab.passtctl("libvirt", "attach", name, check=False)
        assert refused.returncode == 1 and "is running" in refused.stderr, refused

        # the host reaches the guest through the forward; flows lists that connection
        inbound = lab.shared / "inbound-2222.txt"
        client = connect_and_hold(lab, 2222, inbound)
        try:
            wait_text(inbound, "hello-from-guest")
            flows = json.loads(lab.passtctl(name, "flows", "--json").stdout)
            live = [f for f in flows if f["protocol"] == "tcp" and f["guest_port"] == 22]
            assert live, flows
            table = lab.passtctl(name, "flows").stdout
            print(f"[libvirt] passtctl {name} flows, with the host connected to the guest "
                  f"through 2222:\n{table}")
        finally:
            client.terminate()

        # a forward added at runtime: recorded in the live definition (it would migrate
        # with the domain); with --persist in the persistent one too
        def live() -> list[tuple[str, str, str | None]]:
            return _metadata_forwards(ET.fromstring(lab.virsh("dumpxml", name).stdout))

        added = lab.passtctl(name, "forward", "add", "tcp", "2224:22").stdout
        assert "recorded in libvirt domain" in added and "live definition" in added, added
        assert live() == [("tcp", "2222", "22"), ("tcp", "2224", "22")]
        assert _metadata_forwards(_inactive_xml(lab, name)) == [("tcp", "2222", "22")]
        forward_id = added.split()[1]
        removed = lab.passtctl(name, "forward", "remove", forward_id).stdout
        assert "recorded in libvirt domain" in removed, removed
        assert live() == [("tcp", "2222", "22")]
        added = lab.passtctl(name, "forward", "add", "tcp", "2223:22", "--persist").stdout
        assert "persistent definition" in added and "live definition" in added, added
        assert _metadata_forwards(_inactive_xml(lab, name)) == [
            ("tcp", "2222", "22"), ("tcp", "2223", "22")]
        assert live() == [("tcp", "2222", "22"), ("tcp", "2223", "22")]

        # destroy: the instance stops, its socket and runtime file go
        t = time.monotonic()
        lab.virsh("destroy", name)
        print(f"[libvirt] virsh destroy (release hook included) in {time.monotonic() - t:.2f} s")
        _instance_stopped(lab, name)

        # a second start: a fresh instance, with the persisted forward from the metadata
        _boot_and_check(lab, name, "second start")
        forwards = json.loads(lab.passtctl(name, "forwards", "--json").stdout)
        assert sorted((f["spec"], f["origin"]) for f in forwards) == [
            ("2222:22", "config"), ("2223:22", "config")], forwards
        inbound = lab.shared / "inbound-2223.txt"
        client = connect_and_hold(lab, 2223, inbound)
        try:
            wait_text(inbound, "hello-from-guest")
        finally:
            client.terminate()
        lab.virsh("destroy", name)
        _instance_stopped(lab, name)
    finally:
        loopback_server.terminate()
        lab.virsh("destroy", name, check=False)


# -- what the hook leaves alone, and how it refuses ------------------------------------------


def test_domain_without_passtd_is_left_alone(lab: Lab) -> None:
    name = "lvplain"
    lab.define(name)
    xml = lab.virsh("dumpxml", name).stdout
    rounds = lab.time_hook(xml, (name, "prepare", "begin", "-"))
    times = [r[0] for r in rounds]
    print(f"[libvirt] hook on a domain without passtd, prepare: {_ms(times)}")
    assert min(times) < PLAIN_HOOK_MAX_S, times
    started = time.monotonic()
    lab.virsh("start", name)
    print(f"[libvirt] virsh start of a plain domain in {time.monotonic() - started:.2f} s")
    try:
        assert lab.virsh("domstate", name).stdout.strip() == "running"
        loaded = lab.ct.systemctl("list-units", "--all", "--plain", "--no-legend",
                                  "passtd@*").stdout
        assert name not in loaded, loaded
        assert not lab.exists(f"/run/passtd/{name}.yaml")
        assert not lab.exists(f"/run/passtd/{name}.sock")
    finally:
        lab.virsh("destroy", name, check=False)
    assert lab.virsh("domstate", name).stdout.strip() == "shut off"


def test_invalid_metadata_blocks_the_start_with_the_reason(lab: Lab) -> None:
    name = "lvbad"
    ns = passtd_libvirt.NAMESPACE
    lab.define(name, metadata=f"<passtd:network xmlns:passtd='{ns}' mtu='9'>"
                              "<passtd:forward proto='tcp' host='2290' guest='22'/>"
                              "</passtd:network>")
    res = lab.virsh("start", name, check=False)
    print(f"[libvirt] virsh start of a domain with mtu='9' in its metadata:\n{res.stderr}")
    assert res.returncode != 0
    assert "Hook script execution failed" in res.stderr
    assert f"passtd: domain {name}: its passtd metadata is refused: mtu: must be 0 or " \
           "between 68 and 65520, got 9" in res.stderr
    assert lab.virsh("domstate", name).stdout.strip() == "shut off"
    _instance_stopped(lab, name)


def test_qemu_user_without_access_blocks_the_start(lab: Lab) -> None:
    """qemu 7.2 would start with a dead NIC (its stream netdev fails silently): the hook
    refuses instead when qemu's user may not connect to the socket."""
    name = "lvnoaccess"
    ns = passtd_libvirt.NAMESPACE
    lab.define(name, metadata=f"<passtd:network xmlns:passtd='{ns}'/>")
    lab.ct.run(["gpasswd", "-d", "libvirt-qemu", "passtd"])
    try:
        res = lab.virsh("start", name, check=False)
    finally:
        lab.ct.run(["gpasswd", "-a", "libvirt-qemu", "passtd"])
    print(f"[libvirt] virsh start while libvirt-qemu is not in group passtd:\n{res.stderr}")
    assert res.returncode != 0
    assert f"passtd: domain {name}: qemu runs as libvirt-qemu, which may not connect to " \
           f"/run/passtd/{name}.sock" in res.stderr
    assert lab.virsh("domstate", name).stdout.strip() == "shut off"
    _instance_stopped(lab, name)


@pytest.mark.parametrize("name", ["-lvx", "lv:x", "lv x"])
def test_a_domain_name_that_is_no_instance_name_blocks_the_start(lab: Lab, name: str) -> None:
    """libvirt accepts these domain names (and "." too, now and then); as an instance name,
    "-lvx" made `passtd run -lvx` (no instance: the VM ran with a dead NIC), and ":" is
    refused as well (systemd 254 and later split RuntimeDirectory= at a colon). The hook
    refuses the start, and virsh says why."""
    ns = passtd_libvirt.NAMESPACE
    lab.define(name, metadata=f"<passtd:network xmlns:passtd='{ns}'/>")
    try:
        res = lab.virsh("start", "--", name, check=False)
        print(f"[libvirt] virsh start of domain {name!r}:\n{res.stderr}")
        assert res.returncode != 0
        assert f"passtd: domain {name!r} cannot have a passtd instance: instance name " \
               f"{name!r}: must be 1 to 60 characters of A-Z a-z 0-9 _ . -, starting with " \
               "a letter or a digit; rename the domain (virsh domrename)" in res.stderr
        assert lab.virsh("domstate", "--", name).stdout.strip() == "shut off"
        loaded = lab.ct.systemctl("list-units", "--all", "--plain", "--no-legend",
                                  "passtd@*").stdout
        assert passtd_libvirt.systemd_escape(name) not in loaded, loaded
    finally:
        lab.virsh("destroy", "--", name, check=False)
        lab.virsh("undefine", "--", name, check=False)


# -- only the domain's own qemu ------------------------------------------------------------------

PEER_DOMAIN = "lv-peer"
IMPOSTOR_HOOK = "/etc/libvirt/hooks/qemu.d/zz-passtd-test-impostor"


def _impostor_hook(shared: Path) -> str:
    """A second hook, run after passtd's (libvirt runs them in alphabetical order): on
    "prepare begin" of PEER_DOMAIN, when the instance's socket listens and qemu does not
    exist yet, a process in a unit of its own connects to that socket and stays until the
    instance hangs up (at most 60 s idle); it records its pid, and when it was hung up."""
    return f"""#!/bin/sh
[ "$1" = {PEER_DOMAIN} ] && [ "$2" = prepare ] && [ "$3" = begin ] || exit 0
cat > /dev/null
cat > {shared}/impostor.sh <<'END'
socat -T 60 -u UNIX-CONNECT:/run/passtd/{PEER_DOMAIN}.sock OPEN:/dev/null &
echo $! > {shared}/impostor.pid
wait
touch {shared}/impostor.gone
END
systemd-run --quiet --collect --unit=passtd-test-impostor -- /bin/sh {shared}/impostor.sh
while [ ! -s {shared}/impostor.pid ]; do sleep 0.05; done
sleep 0.5  # connected by then: before qemu exists
exit 0
"""


def _cgroup_of(lab: Lab, pid: int) -> str:
    """A process's cgroup as the container sees it (its own cgroup namespace): the
    cgroup2 line of /proc/PID/cgroup, else name=systemd's."""
    lines = lab.ct.run(["cat", f"/proc/{pid}/cgroup"]).stdout.splitlines()
    paths = {tree: path for _, tree, path in (line.split(":", 2) for line in lines)}
    return paths[""] if paths.get("", "/") != "/" else paths["name=systemd"]


def test_only_the_domain_s_own_qemu_is_adopted(lab: Lab) -> None:
    """Every qemu of the host may open every instance's socket (group passtd). An instance
    the hook started adopts only its domain's qemu, found by its cgroup (the scope
    systemd-machined made for it): a process in another scope that connects first is
    refused, with a log line, and the guest gets its lease from the same instance."""
    shared = lab.shared
    lab.ct.write_file(IMPOSTOR_HOOK, _impostor_hook(shared), 0o755)
    lab.ct.systemctl("restart", "libvirtd.service")  # it looks for hooks when it starts
    lab.define(PEER_DOMAIN, script=GUEST_SCRIPT)
    lab.passtctl("libvirt", "attach", PEER_DOMAIN)
    service = passtd_libvirt.service_unit(PEER_DOMAIN)
    try:
        lab.virsh("start", PEER_DOMAIN)
        qemu = int(lab.ct.host_path(f"/run/libvirt/qemu/{PEER_DOMAIN}.pid").read_text())
        if not _cgroup_of(lab, qemu).startswith("/machine.slice/"):
            pytest.skip("libvirt runs qemu without a machined scope here (seen with libvirt "
                        "11 in a nested container): nothing tells the domain's qemu apart")
        net = parse_net_line(lab.wait_console(PEER_DOMAIN, "PASSTD_NET "))
        assert (net["ip4"], net["gw4"]) == (GUEST_IP4, GUEST_GW4), net

        impostor = int((shared / "impostor.pid").read_text())
        lab_wait = time.monotonic() + 10
        while not (shared / "impostor.gone").exists():
            assert time.monotonic() < lab_wait, "the impostor's connection was kept"
            time.sleep(0.1)
        journal = lab.ct.journal("-u", service, lines=100)
        print(f"[libvirt] an impostor in another unit connected first, was held until the "
              f"domain's qemu came, then hung up on; {service}:\n{journal}")
        assert re.search(f"holding a connection on the qemu socket: pid {impostor}:", journal)
        refusals = [line for line in journal.splitlines() if "refusing a connection" in line]
        assert len(refusals) == 1, journal
        assert re.search(f"refusing a connection on the qemu socket: pid {impostor}[ :]",
                         refusals[0]), refusals
        connected = [line for line in journal.splitlines() if "guest connected" in line]
        assert connected and connected[0].endswith(f"guest connected (qemu pid {qemu})"), \
            journal  # the impostor never was the guest
        assert lab.unit_state(service) == "active"
        # the hook named the scope libvirt did put qemu in
        scope = _cgroup_of(lab, qemu)
        runtime = lab.ct.host_path(f"/run/passtd/{PEER_DOMAIN}.yaml").read_text()
        assert yaml.safe_load(runtime).get("qemu_cgroup") == scope, (runtime, scope)
        assert scope.startswith("/machine.slice/machine-qemu"), scope
    finally:
        lab.virsh("destroy", PEER_DOMAIN, check=False)
        lab.ct.run(["rm", "-f", IMPOSTOR_HOOK])
        lab.ct.systemctl("restart", "libvirtd.service")


# -- attach and detach against libvirt --------------------------------------------------------


def test_attach_refuses_a_conflicting_netdev_and_detach_undoes_attach(lab: Lab) -> None:
    name = "lvedit"
    lab.define(name)
    plain = lab.virsh("dumpxml", "--inactive", name).stdout

    out = lab.passtctl("libvirt", "attach", name, "--forward", "udp:127.0.0.1/5353",
                       "--mtu", "1500", "--json").stdout
    attached = json.loads(out)
    assert attached["changed"] and attached["settings"] == {
        "mtu": 1500, "udp_forwards": ["127.0.0.1/5353"]}
    assert attached["mac"].startswith("52:54:00:")
    # what the hook costs a passtd domain (its socket is started and stopped; no qemu)
    xml = lab.virsh("dumpxml", "--inactive", name).stdout
    rounds = lab.time_hook(xml, (name, "prepare", "begin", "-"), (name, "release", "end", "-"),
                           runs=3)
    print(f"[libvirt] hook on a passtd domain: prepare {_ms(r[0] for r in rounds)}, "
          f"release {_ms(r[1] for r in rounds)}")
    _instance_stopped(lab, name)
    overlapping = lab.passtctl("libvirt", "attach", name, "--forward", "udp:5353:53",
                               check=False)
    assert overlapping.returncode == 2 and "overlaps" in overlapping.stderr, overlapping

    detached = lab.passtctl("libvirt", "detach", name).stdout
    assert "detached from passtd" in detached
    assert lab.virsh("dumpxml", "--inactive", name).stdout == plain
    assert "nothing changed" in lab.passtctl("libvirt", "detach", name).stdout

    # a netdev somebody else wired under our id
    domain = ET.fromstring(plain)
    qemu = passtd_libvirt.QEMU_NAMESPACE
    commandline = ET.SubElement(domain, f"{{{qemu}}}commandline")
    for value in ("-netdev", "user,id=passtd0"):
        ET.SubElement(commandline, f"{{{qemu}}}arg", value=value)
    path = lab.shared / f"{name}-foreign.xml"
    path.write_text(ET.tostring(domain, encoding="unicode"))
    lab.virsh("define", str(path))
    before = lab.virsh("dumpxml", "--inactive", name).stdout
    refused = lab.passtctl("libvirt", "attach", name, check=False)
    assert refused.returncode == 1, refused
    assert "already has a netdev with id passtd0 that is not passtd's" in refused.stderr
    assert lab.virsh("dumpxml", "--inactive", name).stdout == before

    missing = lab.passtctl("libvirt", "attach", "no-such-domain", check=False)
    assert missing.returncode == 3 and "no libvirt domain 'no-such-domain'" in missing.stderr


def test_persist_refuses_a_domain_without_passtd(lab: Lab) -> None:
    """--persist checks before it adds: no passtd domain, no forward (and no instance
    is needed to find that out: the check comes first)."""
    name = "lvplain2"
    lab.define(name)
    res = lab.passtctl(name, "forward", "add", "tcp", "2250:22", "--persist", check=False)
    assert res.returncode == 1, res
    assert f"domain {name} is not a passtd domain" in res.stderr
    res = lab.passtctl("no-such-vm", "forward", "add", "tcp", "2251:22", "--persist",
                       check=False)
    assert res.returncode == 3 and "no libvirt domain 'no-such-vm'" in res.stderr, res


def test_hook_is_the_checkout_s(lab: Lab) -> None:
    """The installed hook is this checkout's, and imports this checkout's passtd."""
    inside = lab.ct.host_path(HOOK_INSIDE).read_text()
    assert inside.split("\n", 1)[1] == HOOK.read_text().split("\n", 1)[1]
    res = lab.ct.run([f"{VENV}/bin/python3", "-I", "-c",
                      "import passtd.libvirt as m; print(m.NAMESPACE, m.__file__)"])
    namespace, module = res.stdout.split()
    assert namespace == passtd_libvirt.NAMESPACE
    assert module.startswith(str(installed_package())), res.stdout
