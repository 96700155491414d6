"""What an admin filters the journal on: message ids of events, and the fields of records.

Design: a log call that concerns a flow, a forward or one of the events below passes
`extra=fields(...)`; the journal handler of the service (passtd/journal.py) sends them as
journal fields, so that `journalctl -u passtd@vm1 FORWARD_ID=3` or `journalctl
MESSAGE_ID=<id>` find them. Elsewhere (stderr, tests) they are ignored. The ids are fixed
128-bit values, as systemd's catalog wants them; they never change meaning, and a new
event gets a new id. man/passtd.8 lists them.

Not done here: writing to the journal (passtd/journal.py), what is logged (each part).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Final

# MESSAGE_ID values (`journalctl MESSAGE_ID=...`)
GUEST_CONNECTED: Final = "744fa28770b9449b9eb14c85ef117029"
GUEST_DISCONNECTED: Final = "d43181e010534251879c91c459fc710f"
FORWARD_ADDED: Final = "fa0500b3b1694f38b7e5b54c2d1d8333"
FORWARD_REMOVED: Final = "7730f976aa524c789ea8dad9bb5f6ea5"
LIMIT_REACHED: Final = "f4dec564054b431380188cbe6f1caa2c"
FLOWS_HANDED_OVER: Final = "ab0ada1029f4401e85d46ee4aed1cc3e"
FLOWS_TAKEN_OVER: Final = "c12beabf54e243d0b9f2230e5f56f94c"
QEMU_REFUSED: Final = "a104e9c3cb4944ce9f27de7330f3884c"
FOREIGN_ADDRESS: Final = "4955805edfcb4b1aace54b3526db7df5"

MESSAGE_IDS: Final = {
    "GUEST_CONNECTED": GUEST_CONNECTED, "GUEST_DISCONNECTED": GUEST_DISCONNECTED,
    "FORWARD_ADDED": FORWARD_ADDED, "FORWARD_REMOVED": FORWARD_REMOVED,
    "LIMIT_REACHED": LIMIT_REACHED, "FLOWS_HANDED_OVER": FLOWS_HANDED_OVER,
    "FLOWS_TAKEN_OVER": FLOWS_TAKEN_OVER, "QEMU_REFUSED": QEMU_REFUSED,
    "FOREIGN_ADDRESS": FOREIGN_ADDRESS,
}

JOURNAL: Final = "journal"  # the LogRecord attribute the fields travel in


def fields(message_id: str | None = None, *, flow_id: int | None = None,
           forward_id: int | None = None, guest: bytes | str | None = None) -> dict[str, Any]:
    """`extra=` for a log call: the journal fields that apply (None: the field is left out)."""
    out: dict[str, str] = {}
    if message_id is not None:
        out["MESSAGE_ID"] = message_id
    if flow_id is not None:
        out["FLOW_ID"] = str(flow_id)
    if forward_id is not None:
        out["FORWARD_ID"] = str(forward_id)
    if guest is not None:
        out["GUEST_ADDRESS"] = guest if isinstance(guest, str) \
            else str(ipaddress.ip_address(guest))
    return {JOURNAL: out}
