"""passtd/journal.py: the native journal protocol, read back by a socket standing in for
journald (the systemd container's test_systemd.py checks the real journal)."""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path

from passtd.engine import events
from passtd.journal import JournalHandler, encode


def test_values_with_a_newline_take_the_binary_form() -> None:
    data = encode({"MESSAGE": "two\nlines", "PRIORITY": "6"})
    assert data == b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n" + b"PRIORITY=6\n"


def test_a_record_carries_its_fields(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journald:
        journald.bind(path)
        handler = JournalHandler("vm1", logging.StreamHandler(), path=path)
        logger = logging.getLogger("passtd.test-journal")
        logger.addHandler(handler)
        logger.propagate = False
        try:
            logger.warning("forward %d added", 3,
                           extra=events.fields(events.FORWARD_ADDED, forward_id=3,
                                               guest=bytes([198, 51, 100, 2])))
        finally:
            logger.removeHandler(handler)
            handler.close()
        lines = journald.recv(65536).decode().splitlines()
    fields = dict(line.split("=", 1) for line in lines)
    assert fields["MESSAGE"] == "forward 3 added"
    assert (fields["PRIORITY"], fields["PASSTD_INSTANCE"], fields["SYSLOG_IDENTIFIER"]) == \
        ("4", "vm1", "passtd")
    assert (fields["MESSAGE_ID"], fields["FORWARD_ID"], fields["GUEST_ADDRESS"]) == \
        (events.FORWARD_ADDED, "3", "198.51.100.2")


def test_no_journal_means_stderr(tmp_path: Path, capsys) -> None:
    fallback = logging.StreamHandler()
    handler = JournalHandler("vm1", fallback, path=str(tmp_path / "absent.sock"))
    logger = logging.getLogger("passtd.test-journal-absent")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("first")
        logger.warning("second")
    finally:
        logger.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert "first" in err and "second" in err and err.count("logging to stderr") == 1
