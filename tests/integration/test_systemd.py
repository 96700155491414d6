"""passtd@.socket and passtd@.service under real systemd 252 (tests/support/container.py).

One container per module boots the host's root file system copy-on-write, with what
setup.sh installed on the host (the venv, /usr/local/bin/passtd, the user and group
passtd) and, installed inside the container only, this checkout's units and D-Bus policy;
the checkout's `passtd` package is bound over the venv's copy, so the service runs the code
under test even when setup.sh ran on an older checkout.

A qemu stand-in (tests/support/qemu_stub.py) connects from the host to the container's
/run/passtd/NAME.sock (through /proc/PID1/root) and asks for a DHCP lease: the lease is the
container's dead-end veth address, 198.51.100.2, router 198.51.100.1. Nothing leaves the
container's private network namespace.

Every test uses its own instance names, and stops its units at the end.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from passtd.tools import lab
from tests.support.container import ROOT as container_root_path
from tests.support.container import Container, missing_requirements
from tests.support.qemu_stub import QemuStub, dhcp_option

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
VENV = container_root_path / "opt/passtd/venv"  # in the tree the containers boot
UNIT_DIR = "/usr/local/lib/systemd/system"
UNITS = ("passtd@.socket", "passtd@.service")
POLICY = REPO / "dbus" / "org.passtd.Passtd1.conf"
POLICY_DIR = "/usr/share/dbus-1/system.d/"
BUS_PREFIX = "org.passtd.Passtd1."
OBJECT = "/org/passtd/Passtd1"
INTERFACE = "org.passtd.Passtd1.Instance"
STATE_DIR = "/run/passtd-state"
EXPOSURE_MAX = 2.0
GUEST_IP4, GUEST_GW4 = "198.51.100.2", "198.51.100.1"  # tests/support/container.py's dead end
CAP_NET_BIND_SERVICE = 10

HAVE_DBUS_API = (REPO / "passtd" / "dbus_api.py").exists()
needs_dbus_api = pytest.mark.skipif(not HAVE_DBUS_API, reason="passtd/dbus_api.py not there yet")


def account(db: str, name: str) -> list[str]:
    """The entry of `name` in the containers' /etc/passwd or /etc/group (their tree may be
    another one than the host's: tests/support/container.py's ROOT)."""
    for line in (container_root_path / "etc" / db).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    raise KeyError(f"no {name} in {db}")


def passtd_uid() -> int:
    return int(account("passwd", "passtd")[2])


def passtd_user_gid() -> int:
    return int(account("passwd", "passtd")[3])


def passtd_group_gid() -> int:
    return int(account("group", "passtd")[2])


def _installed_package() -> Path | None:
    found = sorted(VENV.glob("lib/python3*/site-packages/passtd"))
    return found[-1] if found else None


def require_installation() -> None:
    missing = missing_requirements()
    if missing:
        pytest.skip("systemd container: " + "; ".join(missing))
    problems = []
    if _installed_package() is None or not (container_root_path / "usr/local/bin/passtd").exists():
        problems.append("no /opt/passtd/venv or /usr/local/bin/passtd")
    for what, db in (("group", "group"), ("user", "passwd")):
        try:
            account(db, "passtd")
        except KeyError:
            problems.append(f"no {what} passtd")
    if problems:
        pytest.skip(f"passtd is not installed ({', '.join(problems)}): run ./setup.sh --no-demo")


@pytest.fixture(scope="module")
def ct(lab_logs: object) -> Iterator[Container]:
    require_installation()
    Container.remove_stale("passtd-sd")
    package = _installed_package()
    assert package is not None
    inside = "/" + str(package.relative_to(container_root_path))
    with Container("passtd-sd", bind_ro=[(str(REPO / "passtd"), inside)]) as box:
        for unit in UNITS:
            box.install_file(REPO / "units" / unit, f"{UNIT_DIR}/")
        if POLICY.exists():
            box.install_file(POLICY, POLICY_DIR)
        box.systemctl("daemon-reload")
        box.systemctl("reload", "dbus.service")
        lab_logs.add("container journal", box.journal_log())  # type: ignore[attr-defined]
        try:
            yield box
        finally:
            lab_logs.discard("container journal")  # type: ignore[attr-defined]


def escape(ct: Container, name: str) -> str:
    return ct.run(["systemd-escape", name]).stdout.strip()


class Instances:
    """Starts passtd@NAME units and qemu stand-ins; stops and closes them at the end."""

    def __init__(self, ct: Container) -> None:
        self.ct = ct
        self.units: list[str] = []
        self.clients: list[QemuStub] = []

    def socket(self, name: str) -> str:
        """Start passtd@NAME.socket; returns the escaped instance."""
        inst = escape(self.ct, name)
        self.units += [f"passtd@{inst}.socket", f"passtd@{inst}.service"]
        self.ct.systemctl("start", f"passtd@{inst}.socket")
        return inst

    def connect(self, name: str) -> QemuStub:
        client = QemuStub(self.ct.host_path(f"/run/passtd/{name}.sock"))
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        if self.units:
            self.ct.systemctl("stop", *self.units, check=False)
            self.ct.systemctl("reset-failed", *self.units, check=False)


@pytest.fixture
def instances(ct: Container) -> Iterator[Instances]:
    made = Instances(ct)
    yield made
    made.close()


def wait_ready(ct: Container, name: str) -> None:
    """Until the instance said READY=1 (its unit is active): that comes after its D-Bus
    export, while the guest may be served before it (the data path never waits for the
    bus)."""
    unit = f"passtd@{name}.service"
    lab.wait_for(lambda: props(ct, unit, "ActiveState")["ActiveState"] == "active", 15,
                 f"{unit} to be ready")


def props(ct: Container, unit: str, *names: str) -> dict[str, str]:
    return ct.unit_properties(unit, *names)


def assert_offer(client: QemuStub) -> None:
    offer = client.dhcp_offer()
    assert offer["BOOTP"].yiaddr == GUEST_IP4
    assert dhcp_option(offer, "router") == GUEST_GW4


def busctl_json(ct: Container, *args: str) -> object:
    return json.loads(ct.busctl("--json=short", *args).stdout)["data"]


def list_forwards(ct: Container, name: str) -> list[dict[str, object]]:
    (entries,) = busctl_json(ct, "call", bus_name(name), OBJECT, INTERFACE, "ListForwards")
    return [{key: value["data"] for key, value in entry.items()} for entry in entries]


def bus_name(name: str) -> str:
    from passtd.dbus_api import bus_name as make  # only when the API exists

    return make(name)


def listening_tcp(ct: Container, port: int) -> bool:
    out = ct.run(["ss", "-Hltn", f"sport = :{port}"]).stdout
    return bool(out.strip())


def wait(predicate: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    lab.wait_for(predicate, timeout, what, interval=0.1)


# -- the unit files ------------------------------------------------------------------------


def test_units_verify_without_any_warning(ct: Container) -> None:
    """systemd-analyze verify returns 0 even for unknown keys: its stderr must be empty."""
    res = ct.run(["systemd-analyze", "verify", f"{UNIT_DIR}/passtd@vm1.service",
                  f"{UNIT_DIR}/passtd@vm1.socket"], check=False)
    assert (res.returncode, res.stderr) == (0, "")


def test_security_exposure_is_ok(ct: Container) -> None:
    res = ct.run(["systemd-analyze", "security", "--no-pager", "passtd@vm1.service"],
                 check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\S+)", res.stdout)
    assert m, res.stdout + res.stderr
    exposed = "\n".join(line for line in res.stdout.splitlines() if line.startswith("✗"))
    assert float(m[1]) <= EXPOSURE_MAX, f"exposure {m[1]} {m[2]}; exposed:\n{exposed}"


# -- socket activation ---------------------------------------------------------------------


def test_socket_listens_and_service_waits(ct: Container, instances: Instances) -> None:
    inst = instances.socket("sock1")
    st = os.stat(ct.host_path("/run/passtd/sock1.sock"))
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, passtd_group_gid())
    assert props(ct, f"passtd@{inst}.socket", "ActiveState")["ActiveState"] == "active"
    assert props(ct, f"passtd@{inst}.service", "ActiveState")["ActiveState"] == "inactive"


def test_first_connection_starts_the_service(ct: Container, instances: Instances) -> None:
    inst = instances.socket("act1")
    unit = f"passtd@{inst}.service"
    client = instances.connect("act1")
    assert_offer(client)
    info = props(ct, unit, "ActiveState", "SubState", "Type", "StatusText", "MainPID")
    assert (info["ActiveState"], info["SubState"], info["Type"]) == \
        ("active", "running", "notify")
    assert info["StatusText"].startswith("guest connected"), info["StatusText"]
    # the sandbox: user passtd, no capabilities but CAP_NET_BIND_SERVICE in the bounding
    # set, no new privileges, a seccomp filter
    status_file = ct.host_path(f"/proc/{info['MainPID']}/status")  # the container's pid
    status = dict(line.split(":\t", 1) for line in status_file.read_text().splitlines()
                  if ":\t" in line)
    assert status["Uid"].split()[0] == str(passtd_uid())
    assert int(status["CapEff"], 16) == 0
    assert int(status["CapBnd"], 16) == 1 << CAP_NET_BIND_SERVICE
    assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2")


def test_same_user_cannot_read_an_instance(ct: Container, instances: Instances) -> None:
    """Instances share user passtd; PrivateUsers= is what keeps one (or anything else
    running as passtd) out of another's memory."""
    instances.socket("mem1")
    assert_offer(instances.connect("mem1"))
    pid = props(ct, "passtd@mem1.service", "MainPID")["MainPID"]
    probe = (f"import sys\ntry:\n    open('/proc/{pid}/mem', 'rb')\n"
             f"except PermissionError:\n    sys.exit(0)\nsys.exit('readable')")
    res = ct.run(["setpriv", "--reuid=passtd", "--regid=nogroup", "--clear-groups",
                  "python3", "-c", probe], check=False)
    assert res.returncode == 0, res.stderr


@needs_dbus_api
def test_instance_is_on_the_bus(ct: Container, instances: Instances) -> None:
    instances.socket("bus1")
    assert_offer(instances.connect("bus1"))
    wait_ready(ct, "bus1")  # (the guest may be served before the name is owned)
    names = busctl_json(ct, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                        "org.freedesktop.DBus", "ListNames")
    assert bus_name("bus1") in names[0]
    assert busctl_json(ct, "get-property", bus_name("bus1"), OBJECT, INTERFACE,
                       "Name") == "bus1"
    assert busctl_json(ct, "get-property", bus_name("bus1"), OBJECT, INTERFACE,
                       "GuestConnected") is True


@needs_dbus_api
def test_the_journal_has_fields_to_filter_on(ct: Container, instances: Instances) -> None:
    """Records go to the journal with fields (passtd/journal.py): `journalctl -u UNIT
    FORWARD_ID=N` and `journalctl MESSAGE_ID=...` find the events an admin looks for."""
    from passtd.engine import events

    inst = instances.socket("jrnl1")
    unit = f"passtd@{inst}.service"
    assert_offer(instances.connect("jrnl1"))
    wait_ready(ct, inst)
    (forward_id,) = busctl_json(ct, "call", bus_name("jrnl1"), OBJECT, INTERFACE,
                                "AddForward", "ssqq", "tcp", "", "2323", "23")
    ct.busctl("call", bus_name("jrnl1"), OBJECT, INTERFACE, "RemoveForward", "u",
              str(forward_id))

    def entries(*matches: str) -> list[dict[str, str]]:
        out = ct.run(["journalctl", "--no-pager", "-o", "json", "-u", unit, *matches]).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def present() -> bool:
        return len(entries(f"FORWARD_ID={forward_id}")) >= 2

    wait(present, "the forward's records in the journal")
    added, removed = entries(f"FORWARD_ID={forward_id}")[:2]
    assert added["MESSAGE_ID"] == events.FORWARD_ADDED, added
    assert removed["MESSAGE_ID"] == events.FORWARD_REMOVED, removed
    assert added["MESSAGE"].startswith(f"forward {forward_id}: tcp 2323:23"), added
    assert (added["PASSTD_INSTANCE"], added["PRIORITY"], added["SYSLOG_IDENTIFIER"]) == \
        ("jrnl1", "6", "passtd")
    (connected,) = entries(f"MESSAGE_ID={events.GUEST_CONNECTED}")
    assert connected["MESSAGE"].startswith("guest connected"), connected
    # every record of the instance carries its name, and says its level by PRIORITY
    records = entries()
    mine = [r for r in records if r.get("SYSLOG_IDENTIFIER") == "passtd"]
    assert mine and all(r["PASSTD_INSTANCE"] == "jrnl1" for r in mine)
    assert not any(r["MESSAGE"].startswith("INFO:") for r in mine)


POLKIT_ACTIONS = "/usr/share/polkit-1/actions/"
POLKIT_RULE = """polkit.addRule(function(action, subject) {
    if (action.id == "org.passtd.Passtd1.manage-forwards" && subject.isInGroup("vmadmins")) {
        return polkit.Result.YES;
    }
});
"""


@needs_dbus_api
def test_polkit_decides_who_changes_forwards(ct: Container, instances: Instances) -> None:
    """A real polkitd on the container's system bus: root may (without polkit), a user
    of the group a rules file names may, another user may not; reading stays open."""
    ct.install_file(REPO / "polkit" / "org.passtd.Passtd1.policy", POLKIT_ACTIONS)
    ct.write_file("/etc/polkit-1/rules.d/50-passtd-test.rules", POLKIT_RULE)
    ct.run(["groupadd", "-f", "vmadmins"])
    for user, groups in (("alice", ["-G", "vmadmins"]), ("bob", [])):
        ct.run(["sh", "-c", f"id {user} >/dev/null 2>&1 || useradd -M {' '.join(groups)} {user}"])
    inst = instances.socket("pk1")
    assert_offer(instances.connect("pk1"))
    wait_ready(ct, inst)
    dest = bus_name("pk1")

    def add(user: str, port: int) -> subprocess.CompletedProcess[str]:
        argv = ["busctl", "--json=short", "call", dest, OBJECT, INTERFACE, "AddForward", "ssqq",
                "tcp", "", str(port), "22"]
        if user != "root":
            argv = ["runuser", "-u", user, "--", *argv]
        return ct.run(argv, check=False)

    assert add("root", 2501).returncode == 0
    alice = add("alice", 2502)
    assert alice.returncode == 0, alice.stderr
    bob = add("bob", 2503)
    assert bob.returncode != 0, bob
    assert "not authorized" in bob.stderr or "authenticate" in bob.stderr, bob.stderr
    specs = {f["spec"] for f in list_forwards(ct, "pk1")}
    assert {"2501:22", "2502:22"} <= specs and "2503:22" not in specs
    # passtctl says so, with its exit status for a refusal
    res = ct.run(["runuser", "-u", "bob", "--", "/usr/local/bin/passtctl", "pk1", "forward",
                  "add", "tcp", "2504:22"], check=False)
    assert res.returncode == 4 and "access denied" in res.stderr, res
    # bob reads as everyone does
    assert ct.run(["runuser", "-u", "bob", "--", "/usr/local/bin/passtctl", "pk1",
                   "forwards"]).returncode == 0
    journal = ct.journal("-u", f"passtd@{inst}.service")
    assert "refused AddForward" in journal and "polkit is not available" not in journal


AUTH_SELF_RULE = """polkit.addRule(function(action, subject) {
    if (action.id == "org.passtd.Passtd1.manage-forwards" && subject.user == "carol") {
        return polkit.Result.AUTH_SELF;
    }
});
"""


@needs_dbus_api
def test_polkit_asking_for_a_password_without_an_agent(ct: Container,
                                                        instances: Instances) -> None:
    """polkit would let carol in once she authenticates: passtctl allowed interaction, but
    no agent speaks for her here, so she is told to authenticate (exit status 4)."""
    ct.install_file(REPO / "polkit" / "org.passtd.Passtd1.policy", POLKIT_ACTIONS)
    ct.write_file("/etc/polkit-1/rules.d/50-passtd-carol.rules", AUTH_SELF_RULE)
    ct.run(["sh", "-c", "id carol >/dev/null 2>&1 || useradd -M carol"])
    inst = instances.socket("pk2")
    assert_offer(instances.connect("pk2"))
    wait_ready(ct, inst)
    refused = ct.run(["runuser", "-u", "carol", "--", "/usr/local/bin/passtctl", "pk2",
                      "forward", "add", "tcp", "2507:22"], check=False)
    assert refused.returncode == 4, refused
    assert "must authenticate for org.passtd.Passtd1.manage-forwards" in refused.stderr
    # busctl without interaction gets the standard error for it
    res = ct.run(["runuser", "-u", "carol", "--", "busctl",
                  "--allow-interactive-authorization=no", "call", bus_name("pk2"), OBJECT,
                  INTERFACE, "AddForward", "ssqq", "tcp", "", "2508", "22"], check=False)
    assert res.returncode != 0, res
    assert "2507:22" not in {f["spec"] for f in list_forwards(ct, "pk2")}


@needs_dbus_api
def test_passtctl_list_shows_what_systemd_knows(ct: Container, instances: Instances) -> None:
    """An instance whose socket listens but whose service has not started (no qemu yet)
    is listed too, and one whose service failed, with their states."""
    instances.socket("lst1")  # listening: nothing connected yet
    instances.socket("lst2")
    assert_offer(instances.connect("lst2"))
    wait_ready(ct, "lst2")
    ct.write_file("/run/passtd/lst3.yaml", "mtu: nonsense\n")  # the service cannot start
    instances.socket("lst3")
    failing = instances.connect("lst3")
    wait(lambda: props(ct, "passtd@lst3.service", "ActiveState")["ActiveState"] == "failed",
         "passtd@lst3.service to fail")
    failing.close()
    listed = {row["name"]: row for row in json.loads(
        ct.run(["/usr/local/bin/passtctl", "--json", "list"]).stdout)}
    assert listed["lst1"]["state"] == "listening" and "guest_connected" not in listed["lst1"]
    assert listed["lst2"]["state"] == "running" and listed["lst2"]["guest_connected"] is True
    assert listed["lst3"]["state"] == "failed"
    table = ct.run(["/usr/local/bin/passtctl", "list"]).stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "GUEST", "FLOWS", "FORWARDS"]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert rows["lst1"] == ["listening", "-", "-", "-"]
    assert rows["lst2"][:2] == ["running", "connected"]
    assert rows["lst3"][0] == "failed"


def test_guest_ping_needs_ping_group_range(ct: Container, instances: Instances) -> None:
    """Ping sockets need the service's group (user passtd's, nogroup) in
    net.ipv4.ping_group_range, which Debian leaves closed ("1 0"; the unit's comment says
    so, and setup.sh opens it for that group in /etc/sysctl.d)."""
    inst = instances.socket("ping1")
    client = instances.connect("ping1")
    assert_offer(client)
    sysctl = "net.ipv4.ping_group_range"
    before = ct.run(["sysctl", "-n", sysctl]).stdout.split()
    gid = passtd_user_gid()
    try:
        ct.run(["sysctl", "-qw", f"{sysctl}=1 0"])  # Debian's default
        # the gateway address leads to the container's loopback
        assert client.ping(GUEST_IP4, GUEST_GW4, timeout=2) is None
        assert "cannot open a ping socket" in ct.journal("-u", f"passtd@{inst}.service")
        ct.run(["sysctl", "-qw", f"{sysctl}={gid} {gid}"])  # what setup.sh configures
        reply = client.ping(GUEST_IP4, GUEST_GW4)
        assert reply is not None and reply["IP"].src == GUEST_GW4
    finally:
        ct.run(["sysctl", "-qw", f"{sysctl}={before[0]} {before[1]}"])


# -- restarts ------------------------------------------------------------------------------


@needs_dbus_api
def test_restart_keeps_the_guest_and_runtime_forwards(ct: Container,
                                                      instances: Instances) -> None:
    inst = instances.socket("rst1")
    unit = f"passtd@{inst}.service"
    client = instances.connect("rst1")
    assert_offer(client)
    wait_ready(ct, inst)
    (forward_id,) = busctl_json(ct, "call", bus_name("rst1"), OBJECT, INTERFACE,
                                "AddForward", "ssqq", "tcp", "", "2222", "22")
    assert forward_id >= 1
    assert listening_tcp(ct, 2222)
    before = props(ct, unit, "MainPID")["MainPID"]

    ct.systemctl("restart", unit)

    after = props(ct, unit, "MainPID", "NFileDescriptorStore", "ActiveState", "StatusText")
    assert after["MainPID"] != before
    assert after["ActiveState"] == "active"
    assert after["NFileDescriptorStore"] == "1"  # qemu's connection, kept by systemd
    assert_offer(client)  # the same connection: qemu never reconnects
    assert after["StatusText"].startswith("guest connected"), after["StatusText"]
    forwards = list_forwards(ct, "rst1")
    assert [(f["spec"], f["origin"]) for f in forwards] == [("2222:22", "runtime")]
    assert listening_tcp(ct, 2222)


NETPROG = REPO / "tests" / "support" / "netprog.py"
MIB = 1 << 20
RESTARTS = int(os.environ.get("PASSTD_TEST_RESTARTS", "3"))  # 10 to measure the gap
# systemd refuses a fifth start within 10 s (StartLimitBurst): more restarts are spaced out,
# and the transfers slowed down to last through them
RESTART_PACE = 0.5 if RESTARTS <= 3 else 2.2
SLOW = f"{0.002 * max(1.0, RESTARTS / 3):.4f}"


def list_flows(ct: Container, name: str) -> list[dict[str, object]]:
    (entries,) = busctl_json(ct, "call", bus_name(name), OBJECT, INTERFACE, "ListFlows")
    return [{key: value["data"] for key, value in entry.items()} for entry in entries]


def exchange_result(log: Path) -> dict[str, object]:
    text = log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, text
    result: dict[str, object] = json.loads(lines[-1])
    assert result.get("ok"), text
    return result


@needs_dbus_api
def test_restart_keeps_live_connections(ct: Container, instances: Instances, guest_factory,
                                        lab_host: lab.HostNamespace) -> None:
    """`systemctl restart` during transfers both ways: every byte arrives (sha256), no
    reset anywhere, the same flow ids, connections made during the restarts are accepted.
    The guest is a real kernel (a lab tap namespace) on the container's qemu socket."""
    inst = instances.socket("live1")
    unit = f"passtd@{inst}.service"
    guest = guest_factory(ct.host_path("/run/passtd/live1.sock"), wire="whole")
    wait_ready(ct, inst)
    gid = passtd_user_gid()
    ct.run(["sysctl", "-qw", f"net.ipv4.ping_group_range={gid} {gid}"])
    busctl_json(ct, "call", bus_name("live1"), OBJECT, INTERFACE, "AddForward", "ssqq", "tcp",
                "", "18022", "22")
    ct.install_file(NETPROG, "/root/netprog.py")
    python = "/usr/bin/python3"
    ct.spawn([python, "/root/netprog.py", "tcp-server", "--bind", "127.0.0.1", "--port",
              "18080"])
    ct.spawn([python, "/root/netprog.py", "udp-echo", "--bind", "127.0.0.1", "--port",
              "18053"])
    guest.spawn([sys.executable, str(NETPROG), "tcp-server", "--bind", "::", "--port", "22"],
                log=guest.workdir / "srv22.log")
    guest.wait_listening(22)
    wait(lambda: listening_tcp(ct, 18080), "the host server")
    gw, work = GUEST_GW4, guest.workdir

    def netprog(where: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
        argv = [*args, "--timeout", "120"] if args[0] == "tcp-client" else list(args)
        if where == "guest":
            return guest.spawn([sys.executable, str(NETPROG), *argv], log=log)
        return ct.spawn([python, "/root/netprog.py", *argv], log=log)

    up = netprog("guest", "tcp-client", "--host", gw, "--port", "18080", "--send",
                 str(200 * MIB), "--reply", "1000", "--send-pause", SLOW, log=work / "up.log")
    down = netprog("guest", "tcp-client", "--host", gw, "--port", "18080", "--send", "1000",
                   "--reply", str(200 * MIB), "--read-chunk", "65536", "--read-pause", SLOW,
                   log=work / "down.log")
    inbound = netprog("host", "tcp-client", "--host", "127.0.0.1", "--port", "18022", "--send",
                      str(50 * MIB), "--reply", str(50 * MIB), "--read-chunk", "65536",
                      "--read-pause", SLOW, log=work / "in.log")
    udp = netprog("guest", "udp-burst", "--host", gw, "--port", "18053", "--count", "5000",
                  "--size", "200", "--burst", "10", log=work / "udp.log")
    ping = guest.spawn(["busybox", "ping", "-i", "0.05", "-c",
                        str(int(60 + 20 * RESTARTS * (1 + RESTART_PACE))), gw],
                       log=work / "ping.log")
    def flow_ids() -> dict[tuple[object, ...], object]:
        return {(f["protocol"], f["guest_port"], f["peer_address"], f["peer_port"]): f["id"]
                for f in list_flows(ct, "live1")}

    wait(lambda: len(flow_ids()) >= 5, "the flows to open")
    # new connections to the forward all through the restarts: none refused, none reset
    probe = netprog("host", "tcp-probe", "--host", "127.0.0.1", "--port", "18022", "--count",
                    str(int(20 * RESTARTS * (1 + RESTART_PACE))), "--interval", "0.03",
                    log=work / "probe.log")
    for n in range(RESTARTS):
        time.sleep(RESTART_PACE)
        before = flow_ids()
        ct.systemctl("restart", unit)
        after = flow_ids()
        kept = before.keys() & after.keys()
        assert all(before[key] == after[key] for key in kept), (before, after)
        assert n > 0 or len(kept) >= 5, (before, after)  # all five at the first restart
    for proc, log in ((up, "up.log"), (down, "down.log"), (inbound, "in.log"),
                      (probe, "probe.log")):
        proc.wait(300)
        exchange_result(work / log)
    udp.wait(120)
    ping.wait(120)
    udp_result = json.loads((work / "udp.log").read_text().splitlines()[-1])
    assert udp_result["corrupt"] == 0 and udp_result["echoed"] > 0.9 * udp_result["sent"]
    ping_text = (work / "ping.log").read_text()
    received = re.search(r"(\d+) packets received", ping_text)
    assert received and int(received.group(1)) >= 40 * RESTARTS, ping_text
    journal = ct.journal("-u", unit, lines=5000)
    took = re.findall(r"took over (\d+) flows", journal)
    assert len(took) == RESTARTS, journal[-3000:]
    assert not re.search(r"took over .* reset", journal), journal[-3000:]
    gaps = [int(ms) for ms in re.findall(r"first guest frame (\d+) ms after", journal)]
    print(f"restart gaps (ms): {gaps}")
    assert "Traceback" not in journal and "internal error" not in journal


def test_crash_restarts_and_keeps_the_guest(ct: Container, instances: Instances) -> None:
    inst = instances.socket("crash1")
    unit = f"passtd@{inst}.service"
    client = instances.connect("crash1")
    assert_offer(client)
    before = props(ct, unit, "MainPID")["MainPID"]

    ct.systemctl("kill", "--signal=SIGKILL", unit)  # Restart=on-failure

    def restarted() -> bool:
        info = props(ct, unit, "MainPID", "ActiveState", "NRestarts")
        return info["ActiveState"] == "active" and info["MainPID"] not in ("0", before) \
            and info["NRestarts"] == "1"

    wait(restarted, f"{unit} to be restarted")
    assert props(ct, unit, "NFileDescriptorStore")["NFileDescriptorStore"] == "1"
    assert_offer(client)


@needs_dbus_api
def test_stop_forgets_the_guest_and_runtime_forwards(ct: Container,
                                                     instances: Instances) -> None:
    """`stop` is not `restart`: the kept connection and the runtime forwards go."""
    inst = instances.socket("stop1")
    unit = f"passtd@{inst}.service"
    client = instances.connect("stop1")
    assert_offer(client)
    wait_ready(ct, inst)
    busctl_json(ct, "call", bus_name("stop1"), OBJECT, INTERFACE,
                "AddForward", "ssqq", "tcp", "", "2232", "22")
    assert ct.host_path(f"{STATE_DIR}/stop1/stop1.forwards.json").exists()

    ct.systemctl("stop", unit)

    assert props(ct, unit, "NFileDescriptorStore")["NFileDescriptorStore"] == "0"
    assert not ct.host_path(f"{STATE_DIR}/stop1").exists()
    assert client.closed_by_peer(timeout=5)
    assert not listening_tcp(ct, 2232)


# -- reload --------------------------------------------------------------------------------


def test_reload_refuses_a_broken_config_and_keeps_running(ct: Container,
                                                          instances: Instances) -> None:
    config = ct.host_path("/etc/passtd.yaml")
    original = config.read_bytes() if config.exists() else None
    try:
        ct.write_file("/etc/passtd.yaml", "instances:\n  rld1:\n    tcp_forwards: ['2223:23']\n")
        inst = instances.socket("rld1")
        unit = f"passtd@{inst}.service"
        client = instances.connect("rld1")
        assert_offer(client)
        assert listening_tcp(ct, 2223)
        pid = props(ct, unit, "MainPID")["MainPID"]

        ct.write_file("/etc/passtd.yaml", "instances:\n  rld1:\n    tcp_forwards: ['2224:24'\n")
        ct.systemctl("reload", unit)
        wait(lambda: "reload refused" in ct.journal("-u", unit, lines=20),
             "the refusal in the journal")
        info = props(ct, unit, "MainPID", "ActiveState", "StatusText")
        assert (info["MainPID"], info["ActiveState"]) == (pid, "active")
        assert info["StatusText"].startswith("reload failed"), info["StatusText"]
        assert listening_tcp(ct, 2223) and not listening_tcp(ct, 2224)
        assert_offer(client)

        # and a good one is applied
        ct.write_file("/etc/passtd.yaml", "instances:\n  rld1:\n    tcp_forwards: ['2224:24']\n")
        ct.systemctl("reload", unit)
        wait(lambda: listening_tcp(ct, 2224) and not listening_tcp(ct, 2223),
             "the reloaded forwards")
        assert props(ct, unit, "MainPID")["MainPID"] == pid
    finally:
        if original is None:
            config.unlink(missing_ok=True)
        else:
            ct.write_file("/etc/passtd.yaml", original)


def test_the_shipped_capture_place_works_in_the_sandbox(ct: Container,
                                                       instances: Instances) -> None:
    """etc/passtd.yaml's example puts captures in /var/log/passtd/NAME: the unit makes it
    the instance's own (0700), and the capture in it is private (0600)."""
    config = ct.host_path("/etc/passtd.yaml")
    original = config.read_bytes() if config.exists() else None
    try:
        ct.write_file("/etc/passtd.yaml",
                      "instances:\n  cap1:\n    pcap: /var/log/passtd/{name}/capture.pcap\n")
        inst = instances.socket("cap1")
        assert_offer(instances.connect("cap1"))
        capture = ct.host_path("/var/log/passtd/cap1/capture.pcap")
        wait(lambda: capture.exists() and capture.stat().st_size > 24, "the capture")
        uid = passtd_uid()
        st, directory = capture.stat(), capture.parent.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, uid)
        assert (stat.S_IMODE(directory.st_mode), directory.st_uid) == (0o700, uid)
        assert "not capturing" not in ct.journal("-u", f"passtd@{inst}.service", lines=50)
    finally:
        if original is None:
            config.unlink(missing_ok=True)
        else:
            ct.write_file("/etc/passtd.yaml", original)


# -- lifecycle and names -------------------------------------------------------------------


def test_stopping_the_socket_removes_it(ct: Container, instances: Instances) -> None:
    inst = instances.socket("gone1")
    assert_offer(instances.connect("gone1"))
    ct.systemctl("stop", f"passtd@{inst}.socket")
    assert not ct.host_path("/run/passtd/gone1.sock").exists()
    # the service needs its socket (Requires=): it stops with it
    assert props(ct, f"passtd@{inst}.service", "ActiveState")["ActiveState"] == "inactive"


def test_two_instances_in_parallel(ct: Container, instances: Instances) -> None:
    clients = {}
    for name in ("par1", "par2"):
        instances.socket(name)
        clients[name] = instances.connect(name)
    for client in clients.values():
        assert_offer(client)
    pids = {props(ct, f"passtd@{name}.service", "MainPID")["MainPID"] for name in clients}
    assert len(pids) == 2 and "0" not in pids
    if HAVE_DBUS_API:
        for name in clients:
            assert busctl_json(ct, "get-property", bus_name(name), OBJECT, INTERFACE,
                               "Name") == name


def test_instance_name_that_needs_escaping(ct: Container, instances: Instances) -> None:
    inst = instances.socket("my-vm")
    assert inst == "my\\x2dvm"
    assert ct.host_path("/run/passtd/my-vm.sock").exists()
    assert_offer(instances.connect("my-vm"))
    pid = props(ct, f"passtd@{inst}.service", "MainPID")["MainPID"]
    argv = ct.host_path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[-4:] == [b"run", b"--", b"my-vm", b""]
    assert ct.host_path(f"{STATE_DIR}/my-vm").is_dir()
    if HAVE_DBUS_API:
        assert busctl_json(ct, "get-property", bus_name("my-vm"), OBJECT, INTERFACE,
                           "Name") == "my-vm"


# raw unit instances (not what `systemd-escape NAME` gives for a valid NAME) and the %I
# they unescape to
BAD_INSTANCES = [(".", "."), ("..", ".."), ("\\x2e", "."), ("keep1-.", "keep1/."),
                 ("-keep1", "/keep1"), ("\\x2dx", "-x")]


@needs_dbus_api
def test_units_refuse_names_that_are_no_instance_names(ct: Container,
                                                       instances: Instances) -> None:
    """passtd@..service had /run/passtd-state itself as its state directory (RuntimeDirectory=
    passtd-state/%I) and deleted it at its stop, runtime forwards of every VM with it;
    passtd@keep1-..service had keep1's; passtd@-keep1.socket (%I "/keep1") took over
    /run/passtd/keep1.sock. The socket unit checks the name before it listens, and the
    service needs the socket: none of them starts, and another VM loses nothing."""
    inst = instances.socket("keep1")
    client = instances.connect("keep1")
    assert_offer(client)
    wait_ready(ct, inst)
    busctl_json(ct, "call", bus_name("keep1"), OBJECT, INTERFACE, "AddForward", "ssqq", "tcp",
                "", "2242", "22")
    state = ct.host_path(f"{STATE_DIR}/keep1/keep1.forwards.json")
    assert state.exists()
    keep1_socket = os.stat(ct.host_path("/run/passtd/keep1.sock")).st_ino

    started = {}
    for bad, _name in BAD_INSTANCES:
        units = [f"passtd@{bad}.socket", f"passtd@{bad}.service"]
        for unit in units:
            started[unit] = ct.systemctl("start", unit, check=False).returncode == 0
        ct.systemctl("stop", *reversed(units), check=False)
        ct.systemctl("reset-failed", *units, check=False)

    # another VM's runtime forwards and socket are still there
    assert state.exists(), "a unit with a bad name deleted keep1's runtime forwards"
    assert os.stat(ct.host_path("/run/passtd/keep1.sock")).st_ino == keep1_socket
    ct.systemctl("restart", f"passtd@{inst}.service")
    assert [(f["spec"], f["origin"]) for f in list_forwards(ct, "keep1")] == [
        ("2242:22", "runtime")]
    assert_offer(client)
    # none of the bad ones started, and each says why
    assert not any(started.values()), [unit for unit, ok in started.items() if ok]
    for bad, name in BAD_INSTANCES:
        journal = ct.journal("-u", f"passtd@{bad}.socket", lines=50)
        assert f"passtd: instance name {name!r}: must be 1 to 60 characters" in journal, journal
    for left in ("..sock", "...sock", "keep1", "-x.sock"):
        assert not os.path.lexists(ct.host_path(f"/run/passtd/{left}")), left
