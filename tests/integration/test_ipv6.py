"""IPv6 as the guest's kernel sees it: RA and SLAAC, DHCPv6, link-local peers, -4 and -6.

DHCPv6 is exercised from the guest namespace with a real UDP socket on tap0 (busybox has no
DHCPv6 client): scapy only builds the request and decodes the answer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from passtd.tools import lab

NETPROG = str(Path(__file__).resolve().parents[1] / "support" / "netprog.py")
BASE_ARGS = ["--bus", "none", "-S", "example.test"]
DNS6 = "2001:db8::53"

pytestmark = pytest.mark.netns

# Runs in the guest namespace: one DHCPv6 exchange on tap0, the answer decoded by scapy.
DHCPV6_CLIENT = r"""
import json, socket, sys
from scapy.layers.dhcp6 import (DHCP6_Advertise, DHCP6_InfoRequest, DHCP6_Reply,
    DHCP6_Request, DHCP6_Solicit, DHCP6OptClientId, DHCP6OptDNSDomains, DHCP6OptDNSServers,
    DHCP6OptIA_NA, DHCP6OptIAAddress, DHCP6OptServerId, DHCP6OptStatusCode, DUID_LL)
kind, ask_for = sys.argv[1], sys.argv[2]
client = DHCP6OptClientId(duid=DUID_LL(lladdr="52:54:00:12:34:56"))
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"tap0")
sock.bind(("::", 546))
sock.settimeout(5)
dst = socket.getaddrinfo("ff02::1:2%tap0", 547, socket.AF_INET6, socket.SOCK_DGRAM)[0][4]

def exchange(msg):
    sock.sendto(bytes(msg), dst)
    data, peer = sock.recvfrom(4096)
    return data, peer

out = {}
if kind == "info":
    data, peer = exchange(DHCP6_InfoRequest(trid=7) / client)
    reply = DHCP6_Reply(data)
else:
    ia = DHCP6OptIA_NA(iaid=9)
    data, peer = exchange(DHCP6_Solicit(trid=1) / client / ia)
    adv = DHCP6_Advertise(data)
    out["advertised"] = adv[DHCP6OptIAAddress].addr
    out["preferred"] = adv[DHCP6OptIAAddress].preflft
    out["valid"] = adv[DHCP6OptIAAddress].validlft
    out["iaid"] = adv[DHCP6OptIA_NA].iaid
    server = adv[DHCP6OptServerId]
    req_ia = DHCP6OptIA_NA(iaid=9, ianaopts=[DHCP6OptIAAddress(addr=ask_for)])
    data, peer = exchange(DHCP6_Request(trid=2) / client / server / req_ia)
    reply = DHCP6_Reply(data)
out["peer"] = peer[0]
out["reply_msgtype"] = reply.msgtype
if reply.haslayer(DHCP6OptIAAddress):
    out["address"] = reply[DHCP6OptIAAddress].addr
if reply.haslayer(DHCP6OptStatusCode):
    out["status"] = reply[DHCP6OptStatusCode].statuscode
if reply.haslayer(DHCP6OptDNSServers):
    out["dns"] = reply[DHCP6OptDNSServers].dnsservers
if reply.haslayer(DHCP6OptDNSDomains):
    out["search"] = reply[DHCP6OptDNSDomains].dnsdomains
out["has_ia"] = reply.haslayer(DHCP6OptIA_NA)
print(json.dumps(out))
"""


def dhcpv6(guest: lab.TapGuest, kind: str, ask_for: str = "::") -> dict:
    res = guest.run([sys.executable, "-c", DHCPV6_CLIENT, kind, ask_for], capture_output=True,
                    text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def dual(lab_host: lab.HostNamespace, program_argv, start_program):
    prog = start_program(lab_host, "v6", program_argv("v6", [*BASE_ARGS, "-D", DNS6]))
    guest = lab.TapGuest(lab_host, prog.socket, name="v6", wire="whole").up()
    yield prog, guest
    guest.down()
    assert prog.stop() == 0, prog.log_text()


def test_slaac_address_route_and_mtu_from_the_ra(dual) -> None:
    _, guest = dual
    assert guest.ip6 and guest.ip6.startswith("2001:db8::") and guest.prefix6 == 64
    assert guest.gw6 == "fe80::1"
    res = guest.run(["cat", "/proc/sys/net/ipv6/conf/tap0/mtu"], capture_output=True, text=True)
    assert res.stdout.strip() == "65520"


def test_dhcpv6_gives_the_hosts_address(dual, lab_host: lab.HostNamespace) -> None:
    _, guest = dual
    out = dhcpv6(guest, "address", lab_host.ip6)
    assert out["advertised"] == lab_host.ip6 == out["address"]
    assert out["preferred"] == out["valid"] == 0xFFFFFFFF
    assert out["iaid"] == 9
    assert out["reply_msgtype"] == 7  # REPLY
    assert out["peer"].split("%")[0] == "fe80::1"  # from our link-local address
    assert out["dns"] == [DNS6]
    assert out["search"] == ["example.test."]


def test_dhcpv6_foreign_address_is_not_on_link(dual) -> None:
    _, guest = dual
    out = dhcpv6(guest, "address", "2001:db8:ffff::9")
    assert out.get("status") == 4  # NotOnLink


def test_dhcpv6_information_request(dual) -> None:
    _, guest = dual
    out = dhcpv6(guest, "info")
    assert out["dns"] == [DNS6] and out["search"] == ["example.test."]
    assert not out["has_ia"]


def test_link_local_peer_other_than_the_gateway(dual, lab_host: lab.HostNamespace) -> None:
    """fe80::X%tap0 in the guest reaches fe80::X on the host's interface."""
    _, guest = dual
    (link,) = lab_host.ip_json("-6", "addr", "show", "dev", "eth0", "scope", "link")
    host_ll = next(a["local"] for a in link["addr_info"] if "local" in a)
    server = lab_host.spawn([sys.executable, NETPROG, "tcp-server", "--bind", "::",
                             "--port", "18090"], log=lab_host.workdir / "ll.log")
    try:
        lab_host.wait_listening(18090)
        res = guest.run([sys.executable, NETPROG, "tcp-client", "--host", f"{host_ll}%tap0",
                         "--port", "18090", "--send", "100000", "--reply", "100000"],
                        capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        lab.terminate(server)


def test_ipv4_only_instance(lab_host: lab.HostNamespace, program_argv, start_program) -> None:
    prog = start_program(lab_host, "only4", program_argv("only4", [*BASE_ARGS, "-4"]))
    guest = lab.TapGuest(lab_host, prog.socket, name="only4", wire="whole", v6wait=3).up()
    try:
        assert guest.ip4 and guest.gw4
        assert guest.ip6 is None and guest.gw6 is None  # no RA, no SLAAC
        res = guest.run(["busybox", "ping", "-c", "1", "-W", "2", "fe80::1%tap0"],
                        capture_output=True, timeout=10)
        assert res.returncode != 0
    finally:
        guest.down()
        prog.stop()


def test_ipv6_only_instance(lab_host: lab.HostNamespace, program_argv, start_program) -> None:
    prog = start_program(lab_host, "only6", program_argv("only6", [*BASE_ARGS, "-6"]))
    guest = lab.TapGuest(lab_host, prog.socket, name="only6", wire="whole", dhcp=False).up()
    server = lab_host.spawn([sys.executable, NETPROG, "tcp-server", "--bind", "::1",
                             "--port", "18091"], log=lab_host.workdir / "v6only.log")
    try:
        lab_host.wait_listening(18091)
        assert guest.ip6 and guest.gw6 == "fe80::1"
        res = guest.run([sys.executable, NETPROG, "tcp-client", "--host", "fe80::1%tap0",
                         "--port", "18091", "--send", "1000", "--reply", "1000"],
                        capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        # DHCPv4 gets no answer from an IPv6-only instance
        res = guest.run(["busybox", "udhcpc", "-i", "tap0", "-n", "-q", "-t", "2", "-T", "1",
                         "-s", "/bin/true"], capture_output=True, timeout=20)
        assert res.returncode != 0
    finally:
        lab.terminate(server)
        guest.down()
        prog.stop()
