"""libvirtd under real systemd, with this checkout's passtd installed: shared by the tests
that run TCG guests under libvirt (tests/integration/test_libvirt.py,
test_faults_systemd.py).

`libvirt_lab(prefix, label, lab_logs)` boots one container (tests/support/container.py) with
systemd, the system bus and libvirtd (not masked), installs this checkout's units, D-Bus
policy and libvirt hook, binds the checkout's `passtd` package over the venv's copy (so
the hook, the service and passtctl all run the code under test), and restarts libvirtd
(it looks for hooks when it starts) with `cgroup_controllers = [ ]` (the container's
cgroup controllers are read-only). It yields a `Lab`: the container, a host directory
bound into it (consoles, domain XML, files the tests exchange with the container), and
helpers for domains.

Guests (tests/guestvm) run in serve mode; everything they say goes to their console, a
file in that shared directory. Their network: passtd gives them the container's dead-end
veth address 198.51.100.2 and gateway 198.51.100.1, which leads to the container's
loopback; nothing leaves the container's private network namespace.

`require_libvirt_lab()` skips the calling test with the reason when this cannot run here.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.guestvm.vm import QEMU, ensure_image, libvirt_domain_xml
from tests.support.container import UNNEEDED_UNITS, Container, missing_requirements

REPO = Path(__file__).resolve().parents[2]
VENV = Path("/opt/passtd/venv")
UNIT_DIR = "/usr/local/lib/systemd/system/"
POLICY = REPO / "dbus" / "org.passtd.Passtd1.conf"
HOOK = REPO / "libvirt-hook" / "passtd"
HOOK_INSIDE = "/etc/libvirt/hooks/qemu.d/passtd"
PASSTCTL = "/usr/local/bin/passtctl"
GUEST_IP4, GUEST_GW4 = "198.51.100.2", "198.51.100.1"  # tests/support/container.py's dead end
BOOT_TIMEOUT = 120.0


def installed_package() -> Path | None:
    """The venv's copy of the passtd package (the checkout's is bound over it)."""
    found = sorted(VENV.glob("lib/python3*/site-packages/passtd"))
    return found[-1] if found else None


def require_libvirt_lab() -> Path:
    """Skip unless a libvirt lab can run here; returns the venv's passtd package."""
    missing = missing_requirements()
    if missing:
        pytest.skip("libvirt container: " + "; ".join(missing))
    for tool in (QEMU, "virsh", "libvirtd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (setup.sh installs it)")
    package = installed_package()
    if package is None or not (VENV / "bin" / "passtctl").exists():
        pytest.skip("passtd is not installed in /opt/passtd/venv: run ./setup.sh --no-demo")
    try:
        import libvirt  # noqa: F401  (passtctl libvirt needs it inside, from the same venv)
    except ImportError:
        pytest.skip("libvirt-python is not installed: run ./setup.sh --no-demo")
    try:
        grp.getgrnam("passtd")
        pwd.getpwnam("libvirt-qemu")
    except KeyError as e:
        pytest.skip(f"{e.args[0]}: run ./setup.sh --no-demo")
    return package


class Lab:
    """The container, the directory shared with it, and helpers for the domains."""

    def __init__(self, ct: Container, shared: Path) -> None:
        self.ct = ct
        self.shared = shared

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ct.run(["virsh", "-q", *args], check=check, timeout=120)

    def passtctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ct.run([PASSTCTL, *args], check=check)

    def define(self, name: str, *, script: str | None = None,
               metadata: str | None = None) -> None:
        """Define a plain domain (no NIC), with `metadata` (XML) if given."""
        console = self.console_path(name)
        console.unlink(missing_ok=True)
        xml = libvirt_domain_xml(name, console_log=str(console), script=script)
        if metadata is not None:
            root = ET.fromstring(xml)
            holder = ET.Element("metadata")
            holder.append(ET.fromstring(metadata))
            root.insert(1, holder)
            xml = ET.tostring(root, encoding="unicode")
        path = self.shared / f"{name}.xml"
        path.write_text(xml)
        self.virsh("define", str(path))

    def console_path(self, name: str) -> Path:
        return self.shared / f"{name}.console.log"

    def console(self, name: str) -> str:
        try:
            return self.console_path(name).read_text(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def wait_console(self, name: str, marker: str, timeout: float = BOOT_TIMEOUT) -> str:
        """The first console line of domain `name` containing `marker`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.console(name).splitlines():
                if marker in line:
                    return line
            time.sleep(0.2)
        raise AssertionError(f"no {marker!r} on {name}'s console after {timeout:.0f} s:\n"
                             f"{self.console(name)[-4000:]}")

    def unit_state(self, unit: str) -> str:
        return self.ct.unit_properties(unit, "ActiveState")["ActiveState"]

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.ct.host_path(path))

    def time_hook(self, domain_xml: str, *calls: tuple[str, ...],
                  runs: int = 5) -> list[list[float]]:
        """Seconds each call of the installed hook took (`runs` rounds of `calls`, each
        the hook's arguments), as libvirtd calls it: timed inside the container, without
        nsenter's own cost. Every call must succeed silently."""
        probe = (
            "import json, subprocess, sys, time\n"
            "xml = sys.stdin.buffer.read()\n"
            "rounds = []\n"
            f"for _ in range({runs}):\n"
            "    rounds.append([])\n"
            "    for args in json.loads(sys.argv[1]):\n"
            "        t = time.monotonic()\n"
            f"        r = subprocess.run([{HOOK_INSIDE!r}, *args], input=xml,\n"
            "                           capture_output=True,\n"
            "                           env={'LC_ALL': 'C', 'PATH': '/usr/bin:/bin'})\n"
            "        assert r.returncode == 0 and not r.stdout and not r.stderr, r\n"
            "        rounds[-1].append(time.monotonic() - t)\n"
            "print(json.dumps(rounds))\n")
        res = self.ct.run(["python3", "-c", probe, json.dumps(calls)], input=domain_xml)
        return json.loads(res.stdout)


def install_passtd(ct: Container) -> None:
    """This checkout's units, D-Bus policy and libvirt hook in a booted container, as
    setup.sh installs them (libvirtd must be restarted after: it looks for hooks when it
    starts); libvirt's qemu without cgroup controllers (the container's are read-only)."""
    for unit in ("passtd@.socket", "passtd@.service"):
        ct.install_file(REPO / "units" / unit, UNIT_DIR)
    ct.install_file(POLICY, "/usr/share/dbus-1/system.d/")
    hook = HOOK.read_text().split("\n", 1)[1]  # run by the venv's python, as setup.sh does
    ct.write_file(HOOK_INSIDE, f"#!{VENV}/bin/python3 -I\n{hook}", 0o755)
    ct.sh("echo 'cgroup_controllers = [ ]' >> /etc/libvirt/qemu.conf")
    ct.systemctl("daemon-reload")
    ct.systemctl("reload", "dbus.service")
    groups = ct.run(["id", "-nG", "libvirt-qemu"]).stdout.split()
    assert "passtd" in groups, f"libvirt-qemu is not in group passtd ({groups}): " \
        "setup.sh adds it"


@contextmanager
def libvirt_lab(prefix: str, label: str, lab_logs: Any) -> Iterator[Lab]:
    """The booted container with libvirtd and this checkout's passtd (module docstring).

    `prefix` names the container and its shared directory (a killed run's leftovers with
    that prefix are removed first); `label` starts the timing line printed once it is up;
    `lab_logs` (the integration conftest's) shows the container's journal on failures.
    """
    package = require_libvirt_lab()
    ensure_image()  # before the boot: the container's overlay shows the host's files
    Container.remove_stale(prefix)
    shared = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    shared.chmod(0o755)  # qemu (libvirt-qemu) opens the console and initramfs there
    try:
        with Container(prefix, mask=UNNEEDED_UNITS, bind=[str(shared)],
                       bind_ro=[(str(REPO / "passtd"), str(package))]) as ct:
            started = time.monotonic()
            install_passtd(ct)
            ct.systemctl("restart", "libvirtd.service")
            print(f"\n[{label}] container up, units, policy and hook installed, libvirtd "
                  f"restarted in {time.monotonic() - started:.2f} s")
            lab_logs.add("container journal", ct.journal_log())
            try:
                yield Lab(ct, shared)
            finally:
                lab_logs.discard("container journal")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def connect_and_hold(lab: Lab, port: int, out: Path,
                     seconds: int = 40) -> subprocess.Popen[bytes]:
    """A client in the container on 127.0.0.1:`port`, what it reads going to `out`; it
    stays connected as long as the guest's server holds the connection (or `seconds`)."""
    return lab.ct.spawn(["timeout", str(seconds), "socat", "-u", f"TCP4:127.0.0.1:{port}",
                         f"OPEN:{out},creat,trunc"])


def wait_text(path: Path, text: str, timeout: float = 30.0) -> None:
    """Wait until the file at `path` contains `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    content = path.read_text(errors="replace") if path.exists() else "(no file)"
    raise AssertionError(f"no {text!r} in {path} after {timeout:.0f} s: {content!r}")
