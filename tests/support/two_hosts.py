"""Two libvirt hosts on one machine, for live migration: two containers joined by a link.

Each host is a container as tests/support/libvirt_env.py makes one: its own systemd,
system bus, libvirtd and this checkout's passtd (units, policy, hook), and its own
dead-end uplink (tests/support/container.py) on a network of its own: A 198.51.100.2/24
via .1 (TEST-NET-2), B UPLINK_B (TEST-NET-3), as real hosts in different places are.
The link: a veth pair made on the machine and moved at once into the two containers'
network namespaces, LINK_A and LINK_B (TEST-NET-1), LINK_A6 and LINK_B6, and nothing else
on it. On that link, each libvirtd listens on TCP 16509 without authentication
(libvirtd-tcp.socket, auth_tcp "none"): reachable only from the other container, and each
has a host_uuid of its own (libvirt refuses to migrate to "the same host", and both
containers boot the same machine's files). One directory of the machine is bound into
both at the same path: a guest's kernel, initramfs and console log must be at the same
path on both hosts, as on real hosts with shared storage.

    with two_hosts("pdmig", lab_logs) as (a, b):      # Hosts: libvirt_env.py's Labs
        a.define("vm"); a.passtctl("libvirt", "attach", "vm", ...); a.virsh("start", "vm")
        seconds, _ = migrate(a, b, "vm")               # virsh migrate --live over the link

Not done here: shared block storage (the test guests boot from files and have no disk).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tests.guestvm.vm import ensure_image
from tests.support.container import UNNEEDED_UNITS, Container, Uplink
from tests.support.libvirt_env import REPO, Lab, install_passtd, require_libvirt_lab

LINK_A, LINK_B = "192.0.2.1", "192.0.2.2"
LINK_PREFIX = 24
LINK_A6, LINK_B6 = "2001:db8:1::1", "2001:db8:1::2"  # the link's IPv6 (/64), no DAD wait
UPLINK_B = Uplink(ip4="203.0.113.2", gw4="203.0.113.1", ip6="2001:db8:b::2")
HOST_UUIDS = ("0f5e1c1e-8d3b-4c7a-9a52-1a0c3d7e5f01", "0f5e1c1e-8d3b-4c7a-9a52-1a0c3d7e5f02")


class Host(Lab):
    """One of the two hosts: a Lab, and its address on the link."""

    def __init__(self, ct: Container, shared: Path, link_address: str) -> None:
        super().__init__(ct, shared)
        self.link_address = link_address


def _name_host(ct: Container, name: str) -> None:
    """A host name of its own (both boot the machine's), resolved by the container's own
    /etc/hosts: libvirt looks its host name up while migrating, and a lookup that reaches
    DNS behind the dead end waits for its timeouts (tens of seconds)."""
    ct.run(["hostname", name])
    ct.sh(f"printf '{LINK_A} host-a\\n{LINK_B} host-b\\n' >> /etc/hosts")


def _listen_for_migrations(ct: Container, host_uuid: str) -> None:
    ct.sh(f"printf 'auth_tcp = \"none\"\\nhost_uuid = \"{host_uuid}\"\\n' "
          ">> /etc/libvirt/libvirtd.conf")
    ct.systemctl("stop", "libvirtd.service")
    ct.systemctl("start", "libvirtd-tcp.socket")
    ct.systemctl("start", "libvirtd.service")


def _link(a: Container, b: Container, names: tuple[str, str]) -> None:
    subprocess.run(["ip", "link", "add", names[0], "type", "veth", "peer", "name", names[1]],
                   check=True)
    for ct, name, address, address6 in ((a, names[0], LINK_A, LINK_A6),
                                        (b, names[1], LINK_B, LINK_B6)):
        subprocess.run(["ip", "link", "set", name, "netns", str(ct.pid1)], check=True)
        ct.run(["ip", "addr", "add", f"{address}/{LINK_PREFIX}", "dev", name])
        ct.run(["ip", "addr", "add", f"{address6}/64", "dev", name, "nodad"])
        ct.run(["ip", "link", "set", name, "up"])


@contextmanager
def two_hosts(prefix: str, lab_logs: Any) -> Iterator[tuple[Host, Host]]:
    """Hosts A and B (the module docstring), torn down at the end."""
    package = require_libvirt_lab()
    ensure_image()
    for side in ("a", "b"):
        Container.remove_stale(f"{prefix}-{side}")
    shared = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    shared.chmod(0o755)
    names = (f"{prefix}-la"[:15], f"{prefix}-lb"[:15])
    try:
        with ExitStack() as stack:
            hosts = []
            for side, host_uuid, address, uplink in zip(
                    ("a", "b"), HOST_UUIDS, (LINK_A, LINK_B), (Uplink(), UPLINK_B), strict=True):
                ct = stack.enter_context(Container(
                    f"{prefix}-{side}", mask=UNNEEDED_UNITS, bind=[str(shared)],
                    bind_ro=[(str(REPO / "passtd"), str(package))], uplink=uplink))
                _name_host(ct, f"host-{side}")
                install_passtd(ct)
                _listen_for_migrations(ct, host_uuid)
                lab_logs.add(f"host {side} journal", ct.journal_log())
                stack.callback(lab_logs.discard, f"host {side} journal")
                hosts.append(Host(ct, shared, address))
            _link(hosts[0].ct, hosts[1].ct, names)
            yield hosts[0], hosts[1]
    finally:
        subprocess.run(["ip", "link", "del", names[0]], capture_output=True, check=False)
        shutil.rmtree(shared, ignore_errors=True)


def migrate(source: Host, destination: Host, name: str,
            check: bool = True) -> tuple[float, subprocess.CompletedProcess[str]]:
    """`virsh migrate --live` of domain `name` from `source` to `destination` over the
    link: (seconds it took, virsh's result)."""
    address = destination.link_address
    started = time.monotonic()
    res = source.virsh("migrate", "--live", name, f"qemu+tcp://{address}/system",
                       "--migrateuri", f"tcp://{address}", check=check)
    return time.monotonic() - started, res
