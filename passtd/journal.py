"""Log records into the systemd journal with structured fields (its native protocol).

Why: under systemd, what a service writes to stderr reaches the journal as MESSAGE and
PRIORITY only, and admins filter by field (`journalctl -u passtd@vm1 FORWARD_ID=3`,
`journalctl MESSAGE_ID=...`). So when stderr is the journal (JOURNAL_STREAM names it, as
systemd sets it for the unit), `JournalHandler` sends each record to journald's socket as
one datagram of FIELD=value lines: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, CODE_FILE,
CODE_LINE, CODE_FUNC, PASSTD_INSTANCE, and the fields the record carries
(engine/events.py: MESSAGE_ID, FLOW_ID, FORWARD_ID, GUEST_ADDRESS). journald adds the unit
from our cgroup, so `-u` works as for stderr.

The protocol (systemd's JOURNAL_NATIVE_PROTOCOL): a value without a newline is
`NAME=value\\n`; one with a newline is `NAME\\n`, its length as a 64-bit little-endian
integer, the value, `\\n`. A record beyond MAX_DATAGRAM is cut (journald's memfd path
for big entries is not used: no log line of ours needs it).

If the socket cannot be reached, records go to stderr as before, with a one-time note.

Not done here: libsystemd (none is needed for this), reading the journal.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys

from .engine.events import JOURNAL

JOURNAL_SOCKET = "/run/systemd/journal/socket"
MAX_DATAGRAM = 64 << 10
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def stderr_is_journal() -> bool:
    """Whether systemd connected our stderr to the journal (JOURNAL_STREAM=dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def encode(fields: dict[str, str]) -> bytes:
    out = bytearray()
    for name, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Records to journald, with fields (see the module docstring)."""

    def __init__(self, instance: str, fallback: logging.Handler,
                 path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.instance = instance
        self.fallback = fallback
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if self._broken:
            self.fallback.emit(record)
            return
        try:
            message = self.format(record)
            fields = {
                "MESSAGE": message,
                "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
                "SYSLOG_IDENTIFIER": "passtd",
                "CODE_FILE": record.pathname,
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName,
                "PASSTD_INSTANCE": self.instance,
                **getattr(record, JOURNAL, {}),
            }
            data = encode(fields)
            if len(data) > MAX_DATAGRAM:
                fields["MESSAGE"] = message[: MAX_DATAGRAM // 2] + " [cut]"
                data = encode(fields)
            self.sock.sendto(data, self.path)
        except OSError as e:
            self._broken = True
            self.fallback.emit(record)
            self.fallback.emit(logging.makeLogRecord({
                "msg": f"the journal's socket {self.path} refused a record ({e}): logging to "
                       "stderr from now on", "levelno": logging.WARNING,
                "levelname": "WARNING"}))
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()
