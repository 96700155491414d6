"""Host address discovery over rtnetlink (passtd/engine/netlink.py): against the kernel, in
network namespaces of the test's own (`unshare -n`: never the machine's routes), with
iproute2's `ip -j` in the same namespace as an independent oracle; and the parser on bytes
that are cut short or lie about their lengths."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from passtd.engine import netlink
from passtd.engine.netlink import Malformed

ROOT = Path(__file__).resolve().parents[2]

# Runs in the namespace: the setup commands, then discover_host() for each name asked,
# every route of the unfiltered dump through the parser, and `ip -j`'s view.
SNIPPET = r"""
import json, socket, subprocess, sys
from passtd.engine import netlink

for command in json.loads(sys.argv[1]):
    subprocess.run(command, shell=True, check=True)

def text(value):
    return None if value is None else str(value)

def ip(*args):
    out = subprocess.run(["ip", "-j", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout or "[]")

def every_route(family):
    payloads = []
    def pick(kind, payload):
        payloads.append(payload)
        return None
    netlink.query(netlink.RTM_GETROUTE, netlink.RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0),
                  pick)
    routes = [netlink.parse_route(p, family) for p in payloads]
    return [[socket.if_indextoname(r.ifindex), text(r.gateway)] for r in routes if r]

found = {}
for name in json.loads(sys.argv[2]):
    found[str(name)] = {k: text(v) for k, v in netlink.discover_host(name)._asdict().items()}
print(json.dumps({
    "found": found,
    "raw4": every_route(socket.AF_INET), "raw6": every_route(socket.AF_INET6),
    "ip": {v: {"routes": ip(f"-{v}", "route", "show", "default"),
               "all": ip(f"-{v}", "route", "show", "table", "all"),
               "addrs": ip(f"-{v}", "addr", "show")} for v in "46"},
}))
"""

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip (iproute2) for a network namespace of its own")

LINKS = ["ip link set lo up",
         "ip link add d0 type veth peer name d1", "ip link add e0 type veth peer name e1",
         "for l in d0 d1 e0 e1; do ip link set $l up; done",
         "ip addr add 10.1.0.2/24 dev d0", "ip addr add 10.2.0.2/24 dev e0"]


def in_netns(commands: list[str], names: list[str | None]) -> dict[str, Any]:
    """Run the snippet in a new network namespace after `commands` (shell lines)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", SNIPPET, json.dumps(commands),
                          json.dumps(names)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def host(ifname: str | None, addr4: str | None = None, gateway4: str | None = None,
         addr6: str | None = None, gateway6: str | None = None) -> dict[str, str | None]:
    return {"ifname": ifname, "addr4": addr4, "gateway4": gateway4, "addr6": addr6,
            "gateway6": gateway6}


def ip_oracle(view: dict[str, Any], ifname: str | None = None) -> dict[str, str | None]:
    """What `ip -j` says, read with the old code's rules (single-path routes only)."""
    found: dict[str, str | None] = host(ifname)
    for v in "46":
        routes = [r for r in view[v]["routes"] if "dev" in r and "type" not in r
                  and (ifname is None or r["dev"] == ifname)]
        if not routes:
            continue
        dev = routes[0]["dev"]
        found["ifname"] = found["ifname"] or dev
        found[f"gateway{v}"] = routes[0].get("gateway")
        for link in view[v]["addrs"]:
            infos = [i for i in link["addr_info"] if link["ifname"] == dev
                     and i["scope"] == "global" and not i.get("tentative")
                     and not i.get("deprecated")]
            if infos:
                found[f"addr{v}"] = f"{infos[0]['local']}/{infos[0]['prefixlen']}"
                break
    return found


@needs_netns
def test_ipv4_and_ipv6_default_routes_with_their_gateways() -> None:
    out = in_netns([*LINKS, "ip addr add 10.1.0.3/24 dev d0",
                    "ip -6 addr add 2001:db8:1::2/64 dev d0 nodad",
                    "ip -6 addr add 2001:db8:2::2/64 dev e0 nodad",
                    "ip route add default via 10.1.0.1",
                    "ip -6 route add default via fe80::1 dev d0"], [None])
    expected = host("d0", "10.1.0.2/24", "10.1.0.1", "2001:db8:1::2/64", "fe80::1")
    assert out["found"]["None"] == expected
    assert ip_oracle(out["ip"]) == expected
    assert out["raw4"] == [["d0", "10.1.0.1"]] and out["raw6"] == [["d0", "fe80::1"]]


@needs_netns
def test_the_local_end_of_a_point_to_point_address_and_a_route_without_gateway() -> None:
    out = in_netns(["ip link set lo up", "ip link add d0 type veth peer name d1",
                    "ip link set d0 up", "ip link set d1 up",
                    "ip addr add 10.5.0.2 peer 10.5.0.1 dev d0",  # IFA_LOCAL != IFA_ADDRESS
                    "ip route add default dev d0"], [None])
    assert out["found"]["None"] == host("d0", "10.5.0.2/32")
    assert ip_oracle(out["ip"]) == out["found"]["None"]


@needs_netns
def test_an_interface_given_counts_only_routes_through_it() -> None:
    out = in_netns([*LINKS, "ip link add f0 type veth peer name f1", "ip link set f0 up",
                    "ip addr add 10.3.0.2/24 dev f0",
                    "ip route add default via 10.1.0.1 dev d0 metric 100",
                    "ip route add default via 10.2.0.1 dev e0 metric 200"],
                   [None, "e0", "f0", "nosuch0"])
    assert out["found"]["None"] == host("d0", "10.1.0.2/24", "10.1.0.1")
    assert out["found"]["e0"] == host("e0", "10.2.0.2/24", "10.2.0.1")
    assert ip_oracle(out["ip"], "e0") == out["found"]["e0"]
    assert out["found"]["f0"] == host("f0")  # an address, but no default route through it
    assert out["found"]["nosuch0"] == host("nosuch0")


@needs_netns
def test_no_default_route_no_addresses() -> None:
    out = in_netns([*LINKS, "ip -6 addr add 2001:db8:1::2/64 dev d0 nodad"], [None])
    assert out["found"]["None"] == host(None)
    assert ip_oracle(out["ip"]) == host(None)


@needs_netns
def test_a_multipath_default_route_takes_the_heaviest_nexthop() -> None:
    out = in_netns([*LINKS, "ip -6 addr add 2001:db8:1::2/64 dev d0 nodad",
                    "ip -6 addr add 2001:db8:2::2/64 dev e0 nodad",
                    "ip route add default nexthop via 10.1.0.1 dev d0 weight 1 "
                    "nexthop via 10.2.0.1 dev e0 weight 3",
                    "ip -6 route add default nexthop via fe80::1 dev d0 weight 2 "
                    "nexthop via fe80::2 dev e0 weight 1"], [None, "d0"])
    # each family its own heaviest nexthop (and the interface's address): e0, d0
    assert out["found"]["None"] == host("e0", "10.2.0.2/24", "10.2.0.1",
                                        "2001:db8:1::2/64", "fe80::1")
    # only the nexthops through the interface asked for
    assert out["found"]["d0"] == host("d0", "10.1.0.2/24", "10.1.0.1",
                                      "2001:db8:1::2/64", "fe80::1")
    hops = out["ip"]["4"]["routes"][0]["nexthops"]  # the oracle: ip's weights
    assert max(hops, key=lambda h: h["weight"])["dev"] == "e0"


@needs_netns
def test_tentative_and_deprecated_ipv6_addresses_are_skipped() -> None:
    # newest first in the dump: the usable address is added first, so it comes last;
    # DAD that waits a minute keeps the second one tentative for the test's duration
    out = in_netns([*LINKS, "echo 60000 > /proc/sys/net/ipv6/neigh/d0/retrans_time_ms",
                    "ip -6 addr add 2001:db8:1::2/64 dev d0 nodad",
                    "ip -6 addr add 2001:db8:1::3/64 dev d0",
                    "ip -6 addr add 2001:db8:1::4/64 dev d0 nodad preferred_lft 0",
                    "ip -6 route add default via fe80::1 dev d0"], [None])
    assert out["found"]["None"]["addr6"] == "2001:db8:1::2/64"
    assert ip_oracle(out["ip"]) == out["found"]["None"]
    d0 = next(link for link in out["ip"]["6"]["addrs"] if link["ifname"] == "d0")
    listed = [(i["local"], bool(i.get("tentative")), bool(i.get("deprecated")))
              for i in d0["addr_info"] if i["scope"] == "global"]
    assert listed == [("2001:db8:1::4", False, True), ("2001:db8:1::3", True, False),
                      ("2001:db8:1::2", False, False)]


@needs_netns
def test_routes_of_other_tables_do_not_count() -> None:
    out = in_netns([*LINKS, "ip route add default via 10.2.0.1 dev e0 table 100",
                    "ip -6 route add default via fe80::2 dev e0 table 1000",  # RTA_TABLE
                    "ip route add default via 10.1.0.1 dev d0 metric 300"], [None, "e0"])
    assert out["found"]["None"] == host("d0", "10.1.0.2/24", "10.1.0.1")
    assert out["found"]["e0"] == host("e0")
    assert out["raw4"] == [["d0", "10.1.0.1"]] and out["raw6"] == []  # the parser, unfiltered
    tables = {r.get("table") for v in "46" for r in out["ip"][v]["all"] if r["dst"] == "default"}
    assert {"100", "1000"} <= tables  # they are there


@needs_netns
def test_unreachable_default_routes_do_not_count() -> None:
    out = in_netns([*LINKS, "ip -6 addr add 2001:db8:1::2/64 dev d0 nodad",
                    "ip route add unreachable default metric 1",
                    "ip route add blackhole default metric 2",
                    "ip -6 route add unreachable default metric 1",
                    "ip route add default via 10.1.0.1 dev d0 metric 100",
                    "ip -6 route add default via fe80::1 dev d0 metric 100"], [None])
    assert out["found"]["None"] == host("d0", "10.1.0.2/24", "10.1.0.1",
                                        "2001:db8:1::2/64", "fe80::1")
    assert out["raw4"] == [["d0", "10.1.0.1"]] and out["raw6"] == [["d0", "fe80::1"]]
    assert out["ip"]["4"]["routes"][0]["type"] == "unreachable"  # first in dump order
    assert out["ip"]["6"]["routes"][0]["type"] == "unreachable"


def test_a_refused_request_raises_oserror_with_the_kernels_errno() -> None:
    # a route dump header with a destination length: the kernel's strict check refuses it
    bad = netlink.RTMSG.pack(socket.AF_INET, 8, 0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(OSError) as raised:
        netlink.query(netlink.RTM_GETROUTE, bad, lambda kind, payload: None)
    assert raised.value.errno == errno.EINVAL
    assert "netlink" in str(raised.value)


# -- the parser on bytes --------------------------------------------------------------------

SEQ, PORT = 1, 4242


def attr(kind: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), kind) + data
    return raw + bytes(-len(raw) % 4)


def message(kind: int, payload: bytes, seq: int = SEQ, port: int = PORT) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(payload), kind, 2, seq, port) + payload
    return raw + bytes(-len(raw) % 4)


def route(*attrs: bytes, table: int = 254, kind: int = 1, dst_len: int = 0,
          family: int = socket.AF_INET) -> bytes:
    return struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, table, 3, 0, kind, 0) + \
        b"".join(attrs)


def nexthop(ifindex: int, hops: int, gateway: bytes) -> bytes:
    tail = attr(netlink.RTA_GATEWAY, gateway)
    return struct.pack("=HBBi", 8 + len(tail), 0, hops, ifindex) + tail


def address(*attrs: bytes, flags: int = 0, prefix: int = 24, ifindex: int = 3) -> bytes:
    return struct.pack("=BBBBI", socket.AF_INET, prefix, flags, 0, ifindex) + b"".join(attrs)


GW = bytes([10, 0, 0, 1])
OIF = attr(netlink.RTA_OIF, struct.pack("=I", 3))


def test_a_route_the_parser_takes_and_those_it_does_not() -> None:
    assert netlink.parse_route(route(OIF, attr(netlink.RTA_GATEWAY, GW)), socket.AF_INET) == \
        netlink.DefaultRoute(3, ipaddress.IPv4Address("10.0.0.1"))
    assert netlink.parse_route(route(OIF), socket.AF_INET, ifindex=4) is None
    assert netlink.parse_route(route(OIF, dst_len=8), socket.AF_INET) is None
    assert netlink.parse_route(route(OIF, kind=2), socket.AF_INET) is None  # RTN_LOCAL
    assert netlink.parse_route(route(OIF), socket.AF_INET6) is None
    assert netlink.parse_route(route(), socket.AF_INET) is None  # no interface
    # RTA_TABLE is the table where given: main past rtm_table 252 (compat), not 1000
    main = attr(netlink.RTA_TABLE, struct.pack("=I", 254))
    other = attr(netlink.RTA_TABLE, struct.pack("=I", 1000))
    assert netlink.parse_route(route(OIF, main, table=252), socket.AF_INET) is not None
    assert netlink.parse_route(route(OIF, other), socket.AF_INET) is None


def test_multipath_takes_the_heaviest_nexthop_and_the_first_of_equals() -> None:
    hops = nexthop(3, 0, GW) + nexthop(4, 2, bytes([10, 0, 0, 2])) + \
        nexthop(5, 2, bytes([10, 0, 0, 3]))
    taken = netlink.parse_route(route(attr(netlink.RTA_MULTIPATH, hops)), socket.AF_INET)
    assert taken is not None and taken.ifindex == 4 and str(taken.gateway) == "10.0.0.2"
    taken = netlink.parse_route(route(attr(netlink.RTA_MULTIPATH, hops)), socket.AF_INET, 3)
    assert taken is not None and taken.ifindex == 3 and str(taken.gateway) == "10.0.0.1"


def test_addresses_the_parser_takes_and_those_it_does_not() -> None:
    local, peer = attr(netlink.IFA_LOCAL, bytes([10, 0, 0, 2])), attr(netlink.IFA_ADDRESS, GW)
    assert str(netlink.parse_address(address(peer, local), socket.AF_INET, 3)) == "10.0.0.2/24"
    assert str(netlink.parse_address(address(peer), socket.AF_INET, 3)) == "10.0.0.1/24"
    assert netlink.parse_address(address(peer), socket.AF_INET, 4) is None
    assert netlink.parse_address(address(peer, flags=0x40), socket.AF_INET, 3) is None
    tentative = attr(netlink.IFA_FLAGS, struct.pack("=I", 0x40))  # IFA_FLAGS over ifa_flags
    assert netlink.parse_address(address(peer, tentative), socket.AF_INET, 3) is None
    deprecated = attr(netlink.IFA_FLAGS, struct.pack("=I", 0x20))
    assert netlink.parse_address(address(peer, deprecated), socket.AF_INET, 3) is None


def test_answers_skip_other_requests_and_raise_the_kernels_error() -> None:
    data = message(24, b"theirs", seq=7) + message(24, b"other port", port=1) + \
        message(24, b"ours") + message(netlink.NLMSG_DONE, struct.pack("=i", 0))
    assert netlink.answers(data, SEQ, PORT) == ([(24, b"ours")], True)
    assert netlink.answers(message(24, b"ours"), SEQ, PORT) == ([(24, b"ours")], False)
    refused = message(netlink.NLMSG_ERROR, struct.pack("=i", -errno.EPERM) + bytes(16))
    with pytest.raises(OSError) as raised:
        netlink.answers(refused, SEQ, PORT)
    assert raised.value.errno == errno.EPERM
    with pytest.raises(OSError):  # a dump that failed on the way
        netlink.answers(message(netlink.NLMSG_DONE, struct.pack("=i", -errno.EINTR)), SEQ, PORT)
    # another request's error is not ours
    assert netlink.answers(message(netlink.NLMSG_ERROR, struct.pack("=i", -1), seq=9),
                           SEQ, PORT) == ([], False)


def test_malformed_bytes_raise_malformed_not_a_crash() -> None:
    with pytest.raises(Malformed, match="header cut short"):
        netlink.messages(b"\x14\x00\x00\x00\x18\x00")
    with pytest.raises(Malformed, match="length 100"):
        netlink.messages(struct.pack("=IHHII", 100, 24, 0, 1, 1) + bytes(4))
    with pytest.raises(Malformed, match="length 8"):
        netlink.messages(struct.pack("=IHHII", 8, 24, 0, 1, 1))
    with pytest.raises(Malformed, match="attribute 4 of length 40"):
        netlink.parse_route(route(struct.pack("=HH", 40, netlink.RTA_OIF) + bytes(4)),
                            socket.AF_INET)
    with pytest.raises(Malformed, match="nexthop"):
        netlink.parse_route(route(attr(netlink.RTA_MULTIPATH, struct.pack("=HBBi", 64, 0, 0, 3))),
                            socket.AF_INET)
    with pytest.raises(Malformed, match="RTA_GATEWAY"):
        netlink.parse_route(route(OIF, attr(netlink.RTA_GATEWAY, bytes(16))), socket.AF_INET)
    with pytest.raises(Malformed, match="RTA_OIF"):
        netlink.parse_route(route(attr(netlink.RTA_OIF, b"\x03")), socket.AF_INET)
    with pytest.raises(Malformed, match="route message cut short"):
        netlink.parse_route(bytes(5), socket.AF_INET)
    with pytest.raises(Malformed, match="address message cut short"):
        netlink.parse_address(bytes(7), socket.AF_INET, 3)
    with pytest.raises(Malformed, match="prefix length 40"):
        netlink.parse_address(address(attr(netlink.IFA_ADDRESS, GW), prefix=40),
                              socket.AF_INET, 3)
    with pytest.raises(Malformed, match="error message cut short"):
        netlink.answers(message(netlink.NLMSG_ERROR, b"\xff"), SEQ, PORT)
    assert issubclass(Malformed, ValueError)


def test_every_truncation_and_byte_of_a_datagram_parses_or_raises_malformed() -> None:
    hops = nexthop(3, 0, GW) + nexthop(4, 2, GW)
    data = message(netlink.RTM_NEWROUTE, route(OIF, attr(netlink.RTA_MULTIPATH, hops),
                                               attr(netlink.RTA_GATEWAY, GW))) + \
        message(netlink.RTM_NEWADDR, address(attr(netlink.IFA_ADDRESS, GW))) + \
        message(netlink.NLMSG_DONE, struct.pack("=i", 0))

    def parse(raw: bytes) -> None:
        try:
            found, _ = netlink.answers(raw, SEQ, PORT)
            for kind, payload in found:
                if kind == netlink.RTM_NEWROUTE:
                    netlink.parse_route(payload, socket.AF_INET)
                else:
                    netlink.parse_address(payload, socket.AF_INET, 3)
        except OSError:  # a byte that made the DONE an error
            pass
        except Malformed:
            pass

    for end in range(len(data)):
        parse(data[:end])
    for at in range(len(data)):
        for value in (0, 1, 0x7F, 0xFF):
            parse(data[:at] + bytes([value]) + data[at + 1:])
