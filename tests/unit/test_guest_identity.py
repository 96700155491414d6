"""GuestIdentity: what the guest's frames say about it, and a guest that arrives with a lease
from another host (a live migration of a domain whose addresses are not pinned)."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from passtd.engine import events
from passtd.engine.addrs import GuestSeen, Ip4Config, Ip6Config, NetConfig
from passtd.engine.context import RateLimitedLog
from passtd.engine.guest import GuestIdentity


def packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


NET = NetConfig(
    ip4=Ip4Config(address=packed("192.0.2.10"), prefix_len=24, gateway=packed("192.0.2.1")),
    ip6=Ip6Config(address=packed("2001:db8:a::10"), prefix_len=64, gateway=packed("fe80::1")))


def identity() -> tuple[GuestIdentity, list[str]]:
    changed: list[str] = []
    return GuestIdentity(NET, GuestSeen(), RateLimitedLog(), changed.append), changed


def foreign_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if getattr(r, events.JOURNAL, {}).get("MESSAGE_ID") == events.FOREIGN_ADDRESS]


def test_addresses_of_our_network_are_learnt_quietly(caplog: pytest.LogCaptureFixture) -> None:
    guest, changed = identity()
    with caplog.at_level(logging.INFO, "passtd.engine"):
        for family, text in ((4, "192.0.2.10"), (4, "192.0.2.77"), (6, "2001:db8:a::5"),
                             (6, "fe80::5054:ff:fe00:1")):
            guest.learn_addr(family, packed(text))
    assert guest.addresses() == ["192.0.2.77", "2001:db8:a::5", "fe80::5054:ff:fe00:1"]
    assert changed == ["GuestAddresses"] * 4
    assert not foreign_records(caplog)


def test_a_lease_from_another_host_is_learnt_and_said_once_per_change(
        caplog: pytest.LogCaptureFixture) -> None:
    guest, _ = identity()
    with caplog.at_level(logging.INFO, "passtd.engine"):
        guest.learn_addr(4, packed("198.51.100.2"))
        guest.learn_addr(4, packed("198.51.100.2"))  # the same again: nothing new to say
        guest.learn_addr(6, packed("2001:db8:b::2"))
    assert guest.addresses() == ["198.51.100.2", "2001:db8:b::2"]  # forwards go there
    said = foreign_records(caplog)
    assert [r.levelno for r in said] == [logging.WARNING] * 2
    assert [getattr(r, events.JOURNAL)["GUEST_ADDRESS"] for r in said] == \
        ["198.51.100.2", "2001:db8:b::2"]
    assert "passtctl libvirt attach --pin" in said[0].getMessage()


def test_a_guest_hopping_between_foreign_addresses_gets_few_lines(
        caplog: pytest.LogCaptureFixture) -> None:
    """A hostile guest changing its source address with every packet costs a few lines."""
    guest, _ = identity()
    with caplog.at_level(logging.INFO, "passtd.engine"):
        for n in range(1000):
            guest.learn_addr(4, packed(f"203.0.{n // 250}.{n % 250 + 1}"))
    assert len(foreign_records(caplog)) <= 10


def test_an_ipv6_prefix_from_another_host_is_kept_for_deprecation() -> None:
    """Its /64 is remembered (the last few only) and an RA is asked for at once."""
    guest, _ = identity()
    asked: list[int] = []
    guest.on_foreign_prefix = lambda: asked.append(1)
    guest.learn_addr(6, packed("2001:db8:b::2"))
    guest.learn_addr(6, packed("2001:db8:b::3"))  # the same /64: nothing new
    guest.learn_addr(6, packed("2001:db8:a::7"))  # ours: nothing
    guest.learn_addr(4, packed("198.51.100.2"))  # IPv4 has no prefixes to deprecate
    assert list(guest.foreign_prefixes) == [packed("2001:db8:b::")] and asked == [1]
    for n in range(10):
        guest.learn_addr(6, packed(f"2001:db8:{n + 0x100:x}::1"))
    assert len(guest.foreign_prefixes) == 4  # a spoofing guest cannot grow it
    assert guest.foreign_prefixes[-1] == packed("2001:db8:109::")
