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
