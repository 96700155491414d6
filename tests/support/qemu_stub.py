"""A stand-in for qemu's stream netdev in tests: a UNIX stream client speaking the framing
(4-byte big-endian length + Ethernet frame) that can ask for a DHCP lease.

It is what qemu is to passtd, minus the guest: tests hold one connection open across
service restarts (qemu 7.2 never reconnects) and check that DHCP still works on it. Frames
are built and parsed with scapy, an independent oracle.
"""

from __future__ import annotations

import os
import random
import socket
import time

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from passtd.tools.lab_wire import FrameReader, encode

DEFAULT_MAC = "52:54:00:12:34:56"
OUR_MAC = "9a:55:9a:55:9a:55"  # passtd's side of the link (config `mac`)
DHCP_OFFER = 2


class QemuStub:
    """One qemu-like connection to a passtd socket."""

    def __init__(self, path: str | os.PathLike[str], mac: str = DEFAULT_MAC,
                 timeout: float = 10.0) -> None:
        self.path = str(path)
        self.mac = mac
        self.reader = FrameReader()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QemuStub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, frame: bytes) -> None:
        self.sock.sendall(encode([frame]))

    def receive(self, deadline: float) -> list[bytes]:
        """Frames that arrive before `deadline` (monotonic), at least one read's worth;
        EOFError if the other side closed the connection."""
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return []
        if not data:
            raise EOFError(f"{self.path}: the service closed the connection")
        return self.reader.feed(data)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """Whether the service closes the connection within `timeout` (frames that
        arrive meanwhile are dropped)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.receive(deadline)
        except (EOFError, ConnectionResetError):
            return True
        return False

    def discover(self) -> int:
        """Send a DHCPDISCOVER (broadcast flag set); returns its transaction id."""
        xid = random.getrandbits(32)
        chaddr = bytes.fromhex(self.mac.replace(":", "")) + bytes(10)
        frame = (Ether(src=self.mac, dst="ff:ff:ff:ff:ff:ff")
                 / IP(src="0.0.0.0", dst="255.255.255.255")
                 / UDP(sport=68, dport=67)
                 / BOOTP(chaddr=chaddr, xid=xid, flags=0x8000)
                 / DHCP(options=[("message-type", "discover"), "end"]))
        self.send(bytes(frame))
        return xid

    def dhcp_offer(self, timeout: float = 15.0) -> Packet:
        """DISCOVER, then the OFFER answering it (other frames, e.g. router
        advertisements, are skipped). AssertionError if none comes within `timeout`."""
        xid = self.discover()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for raw in self.receive(deadline):
                pkt = Ether(raw)
                if pkt.haslayer(DHCP) and pkt[BOOTP].xid == xid and \
                        dhcp_option(pkt, "message-type") == DHCP_OFFER:
                    return pkt
        raise AssertionError(f"no DHCPOFFER on {self.path} within {timeout:g} s")


    def ping(self, src: str, dst: str, timeout: float = 5.0) -> Packet | None:
        """An ICMP echo request from `src` (the guest's address) to `dst`; the matching
        echo reply, or None if none comes within `timeout`."""
        ident, seq = random.getrandbits(16), random.getrandbits(16)
        frame = (Ether(src=self.mac, dst=OUR_MAC) / IP(src=src, dst=dst)
                 / ICMP(type="echo-request", id=ident, seq=seq) / b"passtd-test")
        self.send(bytes(frame))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for raw in self.receive(deadline):
                pkt = Ether(raw)
                if pkt.haslayer(ICMP) and pkt[ICMP].type == 0 and \
                        (pkt[ICMP].id, pkt[ICMP].seq) == (ident, seq):
                    return pkt
        return None


def dhcp_option(pkt: Packet, name: str) -> object:
    """The value of DHCP option `name` in `pkt` (None if absent)."""
    for option in pkt[DHCP].options:
        if isinstance(option, tuple) and option[0] == name:
            return option[1]
    return None
