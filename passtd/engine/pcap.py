"""libpcap capture of every frame on the tap side, as passt's --pcap does.

Design: the classic format (magic a1b2c3d4, version 2.4, link type Ethernet, microsecond
timestamps) that Wireshark, tshark and tcpdump all read. Records are written through a
buffered file object and flushed when the loop goes idle, so capturing costs one memcpy
per frame on the data path; the capture is complete once the instance stops or flushes.

Not done here: rotation, snap lengths, pcapng, host-side sockets (only tap frames are
captured, as in passt).
"""

from __future__ import annotations

import struct
from typing import BinaryIO

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
LINKTYPE_ETHERNET = 1
SNAPLEN = 65535 + 14


class PcapWriter:
    def __init__(self, path: str) -> None:
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - lives as long as the instance
        self._file.write(_GLOBAL.pack(0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        self.path = path

    def write(self, frame: bytes | bytearray | memoryview, now: float) -> None:
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        length = len(frame)
        self._file.write(_RECORD.pack(sec, usec, length, length))
        self._file.write(frame)

    def write_framed(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Record each frame of a run of length-prefixed frames (a tap output batch)."""
        mem = memoryview(data)
        pos = 0
        while pos + 4 <= len(mem):
            length = int.from_bytes(mem[pos : pos + 4], "big")
            self.write(mem[pos + 4 : pos + 4 + length], now)
            pos += 4 + length

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
