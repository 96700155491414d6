"""Address translation (nat.py), case by case: what a guest address becomes on the host and
what a host peer looks like to the guest."""

from __future__ import annotations

import socket

import pytest

from passtd.engine import nat
from passtd.engine.addrs import GuestSeen, Ip4Config, Ip6Config, NetConfig
from passtd.engine.fwd import ForwardRule
from passtd.engine.settings import EngineSettings


def a(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


GUEST4, GW4, MAP4, LOOP4 = a("192.0.2.10"), a("192.0.2.1"), a("192.0.2.2"), a("192.0.2.3")
GUEST6, GW6, MAP6, LOOP6 = a("2001:db8::10"), a("fe80::1"), a("2001:db8::2"), a("2001:db8::3")
HOST4, HOST6 = a("198.51.100.7"), a("2001:db8:1::7")

NET = NetConfig(
    ip4=Ip4Config(GUEST4, 24, GW4, map_host_loopback=LOOP4, map_guest_addr=MAP4),
    ip6=Ip6Config(GUEST6, 64, GW6, map_host_loopback=LOOP6, map_guest_addr=MAP6),
    host_ifname="eth0",
)
SETTINGS = EngineSettings(net=NET, host_addr4=HOST4, host_addr6=HOST6,
                          dns_redirect={GW4: "127.0.0.53", GW6: "fe80::53"})


def scope(ifname: str) -> int | None:
    return {"eth0": 2}.get(ifname)


@pytest.mark.parametrize("family, dst, port, expected", [
    (4, "203.0.113.9", 80, ("203.0.113.9", 80)),  # anywhere: as it is
    (4, "192.0.2.3", 22, ("127.0.0.1", 22)),  # map_host_loopback
    (4, "192.0.2.2", 22, ("198.51.100.7", 22)),  # map_guest_addr: the host's address
    (4, "192.0.2.1", 53, ("127.0.0.53", 53)),  # DNS to the gateway: the resolver
    (4, "192.0.2.1", 853, ("127.0.0.53", 853)),  # DNS over TLS too
    (4, "192.0.2.1", 80, ("192.0.2.1", 80)),  # the gateway's other ports: as it is
    (4, "192.0.2.10", 80, ("192.0.2.10", 80)),  # the guest's own (the host's) address
    (4, "0.1.2.3", 80, None),  # 0.0.0.0/8 would be this host
    (4, "224.0.0.1", 80, None),
    (4, "255.255.255.255", 80, None),
    (6, "2001:db8:5::1", 443, ("2001:db8:5::1", 443, 0, 0)),
    (6, "2001:db8::3", 22, ("::1", 22, 0, 0)),
    (6, "2001:db8::2", 22, ("2001:db8:1::7", 22, 0, 0)),
    (6, "fe80::1", 53, ("fe80::53", 53, 0, 2)),  # link-local resolver: scoped
    (6, "fe80::99", 80, ("fe80::99", 80, 0, 2)),
    (6, "2001:db8::10", 80, ("2001:db8::10", 80, 0, 0)),
    (6, "::", 80, None),
    (6, "ff02::1", 80, None),
])
def test_nat_from_tap(family: int, dst: str, port: int, expected: tuple | None) -> None:
    assert nat.nat_from_tap(SETTINGS, family, a(dst), port, scope) == expected


def test_link_local_without_the_template_interface_goes_nowhere() -> None:
    assert nat.nat_from_tap(SETTINGS, 6, a("fe80::99"), 80, lambda name: None) is None


@pytest.mark.parametrize("family, peer, seen_as", [
    (4, "127.0.0.1", "192.0.2.3"),  # loopback appears as map_host_loopback
    (4, "0.0.0.0", "192.0.2.3"),
    (4, "198.51.100.7", "192.0.2.2"),  # the host's address as map_guest_addr
    (4, "192.0.2.10", "192.0.2.2"),  # the guest's (= the host's) address
    (4, "203.0.113.9", "203.0.113.9"),  # everyone else as themselves
    (6, "::1", "2001:db8::3"),
    (6, "2001:db8:1::7", "2001:db8::2"),
    (6, "2001:db8:5::1", "2001:db8:5::1"),
])
def test_nat_from_host(family: int, peer: str, seen_as: str) -> None:
    assert nat.nat_from_host(SETTINGS, family, a(peer)) == a(seen_as)


def test_nat_from_host_without_mapped_addresses_shows_the_gateway() -> None:
    plain = EngineSettings(net=NetConfig(ip4=Ip4Config(GUEST4, 24, GW4)))
    assert nat.nat_from_host(plain, 4, a("127.0.0.1")) == GW4
    assert nat.nat_from_host(plain, 4, GUEST4) == GW4


@pytest.mark.parametrize("src, dst, martian", [
    ("192.0.2.10", "203.0.113.9", False),
    ("127.0.0.1", "203.0.113.9", True),
    ("192.0.2.10", "127.0.0.1", True),
    ("224.0.0.5", "203.0.113.9", True),
    ("255.255.255.255", "203.0.113.9", True),
    ("2001:db8::10", "2001:db8:5::1", False),
    ("::1", "2001:db8:5::1", True),
    ("2001:db8::10", "::1", True),
    ("ff02::1", "2001:db8:5::1", True),
    ("::ffff:127.0.0.1", "2001:db8:5::1", True),
    ("2001:db8::10", "::ffff:127.0.0.1", True),
])
def test_martians(src: str, dst: str, martian: bool) -> None:
    assert nat.is_martian(6 if ":" in src else 4, a(src), a(dst)) is martian


def test_tap_side_addresses_are_ours_and_the_unspecified_ones() -> None:
    assert nat.tap_side_addresses(NET) == {a("0.0.0.0"), a("::"), GW4, MAP4, LOOP4,
                                           GW6, MAP6, LOOP6}


def test_guest_target_follows_the_rule_then_what_the_guest_uses() -> None:
    rule = ForwardRule("tcp", None, None, 8080, 8080, 80)
    seen = GuestSeen()
    assert nat.guest_target(NET, seen, 4, GW4, rule) == GUEST4  # given, not seen yet
    seen.addr4, seen.addr6, seen.addr6_ll = a("192.0.2.99"), None, a("fe80::5")
    assert nat.guest_target(NET, seen, 4, GW4, rule) == a("192.0.2.99")
    assert nat.guest_target(NET, seen, 6, a("fe80::1"), rule) == a("fe80::5")  # link-local
    assert nat.guest_target(NET, seen, 6, MAP6, rule) == GUEST6
    to = ForwardRule("tcp", "192.0.2.1", None, 8080, 8080, 80, to_address="192.0.2.77")
    assert nat.guest_target(NET, seen, 4, GW4, to) == a("192.0.2.77")
    assert nat.guest_target(NET, seen, 6, MAP6, to) is None  # another family


def test_sockaddr_bytes_takes_ipv4_mapped_as_ipv4() -> None:
    assert nat.sockaddr_bytes("::ffff:203.0.113.9") == (4, a("203.0.113.9"))
    assert nat.sockaddr_bytes("fe80::1%eth0") == (6, a("fe80::1"))
    assert nat.sockaddr_bytes("203.0.113.9") == (4, a("203.0.113.9"))
