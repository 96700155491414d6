"""The test guest (tests/guestvm) boots, runs a script and gets its network from passt.

The network test runs the reference passt inside two throwaway namespaces, `pdvm-host` (the
host side passt sees: 198.51.100.2/24 and 2001:db8::2/64, default routes via 198.51.100.1 and
fe80::1) and `pdvm-up`, a dead end that owns those gateway addresses, answers pings and
forwards nothing. qemu stays in the machine's namespace: it only talks to passt's UNIX socket.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guestvm import GuestVM, ensure_image, libvirt_domain_xml
from tests.guestvm.vm import QEMU

pytestmark = pytest.mark.vm

HOST_NS = "pdvm-host"
UP_NS = "pdvm-up"
HOST_IP4, GW4 = "198.51.100.2", "198.51.100.1"
HOST_IP6, GW6 = "2001:db8::2", "fe80::1"
TCP_PORT = 18080
PASST_MTU = "65520"
SOCKET_WAIT_S = 10.0


def require_vm_host() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, /var/cache/passtd-tests)")
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed (apt-get install qemu-system-x86)")


@pytest.fixture(scope="module")
def kernel_version() -> str:
    require_vm_host()
    vmlinuz, _ = ensure_image()
    return (vmlinuz.parent / "kernel-version").read_text().strip()


def run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def delete_namespaces() -> None:
    for ns in (HOST_NS, UP_NS):
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)


@pytest.fixture(scope="module")
def isolated_host() -> Iterator[None]:
    """pdvm-host, whose only uplink is a veth to the dead-end pdvm-up."""
    require_vm_host()
    delete_namespaces()  # leftovers of an interrupted run
    try:
        for ns in (HOST_NS, UP_NS):
            run("ip", "netns", "add", ns)
            # Addresses usable at once: no duplicate address detection on the veth pair.
            run(*in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"))
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", HOST_NS, "link", "add", "eth0", "type", "veth",
            "peer", "name", "up0", "netns", UP_NS)  # fmt: skip
        run(*in_ns(UP_NS, "sysctl", "-qw", "net.ipv4.ip_forward=0",
                   "net.ipv6.conf.all.forwarding=0"))  # fmt: skip
        for addr in (f"{GW4}/24", "2001:db8::1/64", f"{GW6}/64"):
            run("ip", "-n", UP_NS, "addr", "add", addr, "dev", "up0")
        run("ip", "-n", UP_NS, "link", "set", "up0", "up")
        run("ip", "-n", HOST_NS, "addr", "add", f"{HOST_IP4}/24", "dev", "eth0")
        run("ip", "-n", HOST_NS, "addr", "add", f"{HOST_IP6}/64", "dev", "eth0")
        run("ip", "-n", HOST_NS, "link", "set", "eth0", "up")
        run("ip", "-n", HOST_NS, "route", "add", "default", "via", GW4)
        run("ip", "-n", HOST_NS, "-6", "route", "add", "default", "via", GW6, "dev", "eth0")
        # passt (as nobody) answers the guest's pings with ping sockets.
        run(*in_ns(HOST_NS, "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"))
        yield
    finally:
        delete_namespaces()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Passt:
    socket: str
    log: Path


@pytest.fixture(scope="module")
def reference_passt(isolated_host: None) -> Iterator[Passt]:
    """The reference passt in pdvm-host, and a TCP server on that namespace's 127.0.0.1."""
    if shutil.which("passt") is None:
        pytest.skip("the reference passt is not installed (apt-get install passt)")
    # passt drops to nobody before it binds the socket: the directory must let it.
    sock_dir = Path(tempfile.mkdtemp(prefix="pdvm-"))
    sock_dir.chmod(0o1777)
    sock = sock_dir / "passt.sock"
    log = sock_dir / "passt.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with log.open("wb") as out:
            procs.append(subprocess.Popen(
                in_ns(HOST_NS, "passt", "-f", "-q", "-s", str(sock),
                      "--no-dhcp-dns", "--no-dhcp-search"),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            ))  # fmt: skip
            procs.append(subprocess.Popen(
                in_ns(HOST_NS, "socat", f"TCP4-LISTEN:{TCP_PORT},bind=127.0.0.1,reuseaddr,fork",
                      "SYSTEM:read request; echo pdvm-reply-$request"),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            ))  # fmt: skip
        deadline = time.monotonic() + SOCKET_WAIT_S
        while not (sock.exists() and stat.S_ISSOCK(sock.stat().st_mode)):
            if time.monotonic() > deadline or procs[0].poll() is not None:
                pytest.fail(f"passt did not create {sock}:\n{log.read_text()}")
            time.sleep(0.05)
        yield Passt(str(sock), log)
    finally:
        for proc in procs:
            stop_process(proc)
        shutil.rmtree(sock_dir, ignore_errors=True)


def key_values(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_boot_without_network(kernel_version: str) -> None:
    script = 'uname -r\necho "$GREETING $(cat data.txt) $(cat /etc/pdvm)"\nexit 7\n'
    files = {"data.txt": b"from-file", "/etc/pdvm": b"absolute"}
    with GuestVM(None, script, env={"GREETING": "it's"}, files=files, timeout=120) as vm:
        assert vm.wait() == 7, vm.describe()
        assert vm.output.splitlines() == [kernel_version, "it's from-file absolute"]
        assert vm.net == {}
        print(f"boot without network: {vm.elapsed:.1f}s to power-off")


def test_libvirt_domain_xml(kernel_version: str, tmp_path: Path) -> None:
    console_log = tmp_path / "console.log"
    xml = libvirt_domain_xml(
        "pdvm-domain", extra_cmdline="passtd.v6_timeout=5", console_log=str(console_log),
        script="echo served\n",
    )
    domain = ET.fromstring(xml)
    assert domain.get("type") == "qemu"
    assert domain.findtext("name") == "pdvm-domain"
    initrd = Path(domain.findtext("os/initrd") or "")
    assert initrd.parent == tmp_path and initrd.stat().st_size > 0
    vmlinuz = Path(domain.findtext("os/kernel") or "")
    assert (vmlinuz.parent / "kernel-version").read_text().strip() == kernel_version
    assert "passtd.mode=serve" in (domain.findtext("os/cmdline") or "")
    assert domain.find("devices/interface") is None
    assert domain.find("devices/serial/source").get("path") == str(console_log)


NET_SCRIPT = f"""
ping -c 1 -W 5 "$PASSTD_GW4" >/dev/null 2>&1 && echo ping4=ok || echo ping4=fail
ping -6 -c 1 -W 5 "$PASSTD_GW6%$PASSTD_IFACE" >/dev/null 2>&1 && echo ping6=ok || echo ping6=fail
echo "tcp4=$(echo pdvm-request | socat -T 10 - TCP4:$PASSTD_GW4:{TCP_PORT})"
echo "route4=$(ip -4 route show default)"
echo "resolv=$(cat /etc/resolv.conf)"
"""


def test_network_from_reference_passt(reference_passt: Passt) -> None:
    with GuestVM(reference_passt.socket, NET_SCRIPT, timeout=180) as vm:
        vm.wait_for("PASSTD_NET ", 120)
        booted = vm.elapsed
        rc = vm.wait()
        passt_log = reference_passt.log.read_text()
        context = f"{vm.raw_output}\n{vm.describe()}\n--- passt ---\n{passt_log}"
        assert rc == 0, context
        net = vm.net
        # DHCP: passt hands out the host's own address, its gateway and its MTU, and no DNS.
        assert (net["ip4"], net["prefix"], net["gw4"]) == (HOST_IP4, "24", GW4), context
        assert net["mtu"] == PASST_MTU, context
        assert net["dns"] == "", context
        assert net["mac"] == "52:54:00:12:34:56", context
        # SLAAC: an address in the host's prefix, the router is the link-local gateway.
        assert net["ip6"].startswith("2001:db8::") and net["ip6"] != HOST_IP6, context
        assert net["gw6"] == GW6, context
        results = key_values(vm.output)
        assert results["ping4"] == "ok", context
        assert results["ping6"] == "ok", context
        assert results["tcp4"] == "pdvm-reply-pdvm-request", context
        assert results["route4"].startswith(f"default via {GW4}"), context
        assert results["resolv"] == "", context
        print(f"boot with passt: network at {booted:.1f}s, power-off at {vm.elapsed:.1f}s")


def test_static_addressing(reference_passt: Passt) -> None:
    knobs = f"passtd.net=static passtd.ip4={HOST_IP4}/24 passtd.gw4={GW4} passtd.mtu=1500"
    script = 'ping -c 1 -W 5 "$PASSTD_GW4" >/dev/null 2>&1 && echo ping4=ok || echo ping4=fail\n'
    with GuestVM(reference_passt.socket, script, extra_cmdline=knobs) as vm:
        assert vm.wait() == 0, vm.describe()
        assert (vm.net["ip4"], vm.net["gw4"], vm.net["mtu"]) == (HOST_IP4, GW4, "1500")
        assert key_values(vm.output)["ping4"] == "ok", f"{vm.raw_output}\n{vm.describe()}"
