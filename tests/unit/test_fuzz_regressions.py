"""Minimal reproducers of the bugs the fuzz targets (tests/fuzz) found, one test each.

A new one goes in marked `xfail(strict=True, reason="engine bug: ...")` until the engine is
fixed (strict: the fix makes it pass, and the mark must go); it stays as a regression test.

The engine-level tests run a real Engine on an event loop with a socketpair as qemu, and
give it host sockets (sockets.HostSockets) that refuse to send: no datagram leaves the
machine, whatever address the frames name.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from passtd.engine import packet, tcp
from passtd.engine.addrs import Ip4Config, NetConfig
from passtd.engine.packet import TCP_ACK
from passtd.engine.settings import EngineSettings
from passtd.engine.sockets import KernelSockets
from passtd.engine.tcp import TcpConn
from tests.support.engine_harness import engine_harness

KEY = (6, bytes([198, 51, 100, 2]), 40000, bytes([198, 51, 100, 1]), 80)
GUEST_ISN = 1000
OUR_ISN = 5000
OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST_MAC = bytes.fromhex("525400123456")
GUEST4, GATEWAY4 = bytes([198, 51, 100, 2]), bytes([198, 51, 100, 1])
FAR4 = bytes([198, 51, 100, 255])  # the subnet's broadcast address (the fuzzer's case)


def test_fin_acknowledged_after_its_retransmission_timeout() -> None:
    """Found by the tcp target: the guest's ACK of our FIN, arriving after a retransmission
    timeout rewound the FIN, was taken for an ACK of data (one byte too many discarded,
    the FIN never acknowledged, a second FIN one sequence number further). Fixed in
    323c919."""
    conn = TcpConn.from_guest_syn(KEY, 0.0, OUR_ISN, 65480, GUEST_ISN, 65535, 1460, None)
    conn.host_connected(0.0)
    assert conn.on_segment(TCP_ACK, GUEST_ISN + 1, OUR_ISN + 1, 65535, 0, 0.1) \
        & tcp.A_ESTABLISHED
    # the host peer closes: FIN to the guest, sequence number OUR_ISN + 1
    assert conn.on_host_eof(0.2) == tcp.A_FIN
    # its ACK is late: the retransmission timer rewinds (the FIN is to be sent again
    # once the read reaches EOF again, e.g. when the guest's window opens)
    deadline = conn.get_timer()
    assert deadline is not None
    assert conn.handle_timer(deadline) & tcp.A_REWIND
    # now the guest's ACK of the FIN arrives
    actions = conn.on_segment(TCP_ACK, GUEST_ISN + 1, OUR_ISN + 2, 65535, 0, deadline + 0.1)
    assert not actions & tcp.A_DISCARD, f"{conn.discard} bytes discarded: the socket holds none"
    assert conn.events & tcp.TAP_FIN_ACKED, "the guest acknowledged our FIN"


def test_fin_ends_the_stream_before_data_held_past_it() -> None:
    """Found by the engine target (a CI run, issue 14 item 2): the guest sent 1460 bytes
    after a gap, then the segment before the gap with a FIN that ends the stream inside
    the held bytes. The held data was released after the FIN's segment and the FIN
    counted after it: the engine acknowledged a byte the guest never sent."""
    conn = TcpConn.from_guest_syn(KEY, 0.0, OUR_ISN, 65480, GUEST_ISN, 65535, 1460, None)
    conn.host_connected(0.0)
    conn.on_segment(TCP_ACK, GUEST_ISN + 1, OUR_ISN + 1, 65535, 0, 0.1)
    conn.window_field(1 << 20)
    start = GUEST_ISN + 1
    assert conn.on_segment(TCP_ACK, start + 108, OUR_ISN + 1, 65535, 1460, 0.2) & tcp.A_HOLD
    conn.hold(start + 108, bytes(1460))
    conn.commit(0, 0.2)
    # in order, with a FIN after 1460 bytes: the stream ends at start + 1460
    conn.on_segment(TCP_ACK | packet.TCP_FIN, start, OUR_ISN + 1, 65535, 1460, 0.3)
    assert conn.data_take == 1460
    actions = conn.commit(1460, 0.3)
    assert not actions & tcp.A_RELEASE, "nothing past the FIN is the guest's data"
    assert actions & tcp.A_SHUT_WR
    assert conn.rcv_nxt == start + 1460 + 1  # the data and the FIN, nothing more
    assert conn.reassembly.bytes == 0 and conn.reassembly.budget.used == 0


def test_data_after_a_fin_in_the_same_batch_is_not_taken() -> None:
    """The same bug's other door: a FIN and, in the same batch of frames, data past it
    in sequence (a guest that contradicts itself) before `commit` settles the FIN."""
    conn = TcpConn.from_guest_syn(KEY, 0.0, OUR_ISN, 65480, GUEST_ISN, 65535, 1460, None)
    conn.host_connected(0.0)
    conn.on_segment(TCP_ACK, GUEST_ISN + 1, OUR_ISN + 1, 65535, 0, 0.1)
    start = GUEST_ISN + 1
    conn.on_segment(TCP_ACK | packet.TCP_FIN, start, OUR_ISN + 1, 65535, 100, 0.2)
    assert conn.data_take == 100
    assert conn.on_segment(TCP_ACK, start + 100, OUR_ISN + 1, 65535, 100, 0.2) & tcp.A_ACK
    assert conn.data_take == 0
    conn.commit(100, 0.2)
    assert conn.rcv_nxt == start + 100 + 1


# -- engine level: a real Engine on an event loop, its sockets replaced by ones that fail ---


class _SendRefused(socket.socket):
    """A datagram socket whose sends fail as the kernel refuses some (EACCES for a broadcast
    address without SO_BROADCAST, EPERM from a firewall): nothing is ever sent."""

    def sendto(self, *args: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    def send(self, *args: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    def connect(self, address: object) -> None:
        pass  # a connected UDP socket: nothing to do for a socket that never sends


class RefusingSockets:
    """The engine's host sockets (sockets.HostSockets), all of them refusing to send."""

    def stream(self, af: socket.AddressFamily) -> socket.socket:
        return KernelSockets().stream(af)

    def datagram(self, af: socket.AddressFamily) -> socket.socket:
        return _SendRefused(socket.AF_INET, socket.SOCK_DGRAM)

    def ping(self, af: socket.AddressFamily) -> socket.socket:
        return _SendRefused(socket.AF_INET, socket.SOCK_DGRAM)


def _guest_frame(l4: bytes, proto: int) -> bytes:
    return packet.ip_frame(OUR_MAC, GUEST_MAC, GUEST4, FAR4, proto, l4)


@pytest.mark.parametrize("what", ["ping", "udp"])
def test_flow_whose_first_send_fails_still_expires(what: str) -> None:
    """Found by the engine target (a ping to the subnet's broadcast address: EACCES): a new
    flow whose first datagram could not be sent was never scheduled, so it never expired
    and kept its socket and a slot of max_flows for the life of the instance. Fixed in
    323c919."""
    settings = EngineSettings(net=NetConfig(ip4=Ip4Config(GUEST4, 24, GATEWAY4)),
                              icmp_timeout=0.05, udp_timeout=0.05)
    with engine_harness(settings, RefusingSockets()) as harness:
        if what == "ping":
            message = packet.icmp4_message(8, 0, struct.pack("!HH", 0x4242, 1) + b"ping")
            harness.send(_guest_frame(message, packet.IPPROTO_ICMP))
        else:
            harness.send(_guest_frame(packet.udp_message(GUEST4, FAR4, 40000, 9, b"x"),
                                      packet.IPPROTO_UDP))
        harness.run(0.35)  # six timeouts
        assert harness.engine.flow_count == 0, "the flow outlived its timeout"
