"""Host address discovery helpers: the resolv.conf reader, and which nameservers the guest
is told (and where its queries to them go)."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import pytest

from passtd.engine import addrs


def test_resolv_conf_garbage_is_skipped_with_a_warning(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# a comment\n"
        "nameserver not-an-address\n"
        "nameserver 192.0.2.300\n"
        "nameserver\n"
        "nameserver 0.0.0.0\n"
        "nameserver ff02::fb\n"
        "nameserver 192.0.2.53\n"
        "nameserver fe80::53%eth0\n"
        "nameserver \xff\xfe\n"
        "nameserver 2001:db8::53\n"
        "nameserver 192.0.2.54\n"  # a fourth valid one: beyond MAXNS
        "search example.com example.net\n"
    )
    with caplog.at_level(logging.WARNING):
        servers, search = addrs.read_resolv_conf(str(conf))
    assert servers == [ipaddress.ip_address(a) for a in ("192.0.2.53", "fe80::53", "2001:db8::53")]
    assert search == ["example.com", "example.net"]
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 6, skipped
    assert all(str(conf) in line for line in skipped)
    assert any("not-an-address" in line for line in skipped)


def test_resolv_conf_missing_is_empty(tmp_path: Path) -> None:
    assert addrs.read_resolv_conf(str(tmp_path / "absent")) == ([], [])


GW4 = ipaddress.ip_address("198.51.100.1")
GW6 = ipaddress.ip_address("fe80::1")


@pytest.mark.parametrize(
    ("nameservers", "version", "mapped", "told", "redirect", "unreachable"),
    [
        # a resolver on host loopback: through the mapped gateway, or not at all
        (["127.0.0.53"], 4, True, ["198.51.100.1"], {"198.51.100.1": "127.0.0.53"}, []),
        (["127.0.0.53"], 4, False, [], {}, ["127.0.0.53"]),
        (["::1"], 6, True, ["fe80::1"], {"fe80::1": "::1"}, []),
        (["::1"], 6, False, [], {}, ["::1"]),
        # the gateway is the resolver: the loopback mapping shadows it, so its DNS goes to
        # the real gateway; without the mapping nothing is shadowed
        (["198.51.100.1"], 4, True, ["198.51.100.1"], {"198.51.100.1": "198.51.100.1"}, []),
        (["198.51.100.1"], 4, False, ["198.51.100.1"], {}, []),
        (["fe80::1"], 6, True, ["fe80::1"], {"fe80::1": "fe80::1"}, []),
        # others as they are; the other family's are not this family's business
        (["192.0.2.53", "2001:db8::53"], 4, True, ["192.0.2.53"], {}, []),
        (["192.0.2.53", "2001:db8::53"], 6, False, ["2001:db8::53"], {}, []),
        # the first resolver that needs the gateway is the one its queries reach
        (["127.0.0.53", "198.51.100.1", "192.0.2.53"], 4, True,
         ["198.51.100.1", "192.0.2.53"], {"198.51.100.1": "127.0.0.53"}, []),
        (["127.0.0.53", "192.0.2.53", "127.0.0.1"], 4, False, ["192.0.2.53"], {},
         ["127.0.0.53", "127.0.0.1"]),
        # never more than a resolver uses
        (["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"], 4, True,
         ["192.0.2.1", "192.0.2.2", "192.0.2.3"], {}, []),
    ],
)
def test_guest_dns(nameservers: list[str], version: int, mapped: bool, told: list[str],
                   redirect: dict[str, str], unreachable: list[str]) -> None:
    gateway = GW4 if version == 4 else GW6
    found = addrs.guest_dns([ipaddress.ip_address(a) for a in nameservers], version, gateway,
                            mapped)
    assert found.servers == tuple(ipaddress.ip_address(a).packed for a in told)
    assert found.redirect == {ipaddress.ip_address(k).packed: v for k, v in redirect.items()}
    assert found.unreachable == tuple(ipaddress.ip_address(a) for a in unreachable)
