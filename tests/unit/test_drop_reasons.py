"""Every category the engine's drop log uses is counted under a kind of drop (statistics,
`passtctl stats`, passtd_drops_total), or is a note on purpose."""

from __future__ import annotations

import re
from pathlib import Path

from passtd.engine.context import DROP_KINDS, DROP_REASONS, RateLimitedLog

ENGINE = Path(__file__).resolve().parents[2] / "passtd" / "engine"
NOTES = {"udp-ports"}  # "new flows get ephemeral ports": nothing is dropped


def test_every_category_is_a_kind_of_drop_or_a_note() -> None:
    used = set()
    for path in ENGINE.glob("*.py"):
        used |= set(re.findall(r'drop_log\(\s*logging\.[A-Z]+,\s*"([^"]+)"', path.read_text()))
    assert used, "no categories found: did the call change shape?"
    assert used - NOTES <= set(DROP_REASONS), used - NOTES - set(DROP_REASONS)
    assert set(DROP_REASONS.values()) <= set(DROP_KINDS)


def test_drops_are_counted_by_kind_logged_or_not() -> None:
    drops = RateLimitedLog(burst=1)
    for _ in range(3):
        drops(0, "bad-tcp4", "x")  # below any log level: counted all the same
    drops(0, "udp-ports", "a note")
    assert drops.drops() == {"malformed": 3, "policy": 0, "backlog": 0, "limits": 0,
                             "host_errors": 0}
