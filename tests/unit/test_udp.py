"""Which guest source ports a UDP flow may keep on the host (engine/udp.py)."""

from __future__ import annotations

import pytest

from passtd.engine.udp import SourcePortRule

RULE = SourcePortRule(ephemeral=(32768, 60999), reserved=((8080, 8080), (9000, 9100)))


@pytest.mark.parametrize(
    ("port", "kept"),
    [
        (53, False), (123, False), (500, False), (1023, False),  # the host's services
        (1024, True), (5060, True), (32767, True),
        (32768, False), (45000, False), (60999, False),  # the host's ephemeral ports
        (61000, True), (65535, True),
        (8080, False), (9000, False), (9100, False), (9101, True),  # reserved by the admin
    ],
)  # fmt: skip
def test_source_port_rule(port: int, kept: bool) -> None:
    assert RULE.allows(port) is kept


def test_the_default_is_linuxs_ephemeral_range() -> None:
    assert not SourcePortRule().allows(40000) and SourcePortRule().allows(20000)
