"""The whole engine in process (tests/support/engine_harness.py): guest frames in, frames
out, with real host sockets on this machine's loopback only (the guest's gateway address
maps to it). Frames are built and read with scapy, independently of the engine's codecs."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether

from passtd.engine.addrs import Ip4Config, NetConfig
from passtd.engine.settings import EngineSettings
from tests.support.engine_harness import EngineHarness, engine_harness

GUEST_MAC, OUR_MAC = "52:54:00:12:34:56", "9a:55:9a:55:9a:55"
GUEST, GATEWAY = "198.51.100.2", "198.51.100.1"
SETTINGS = EngineSettings(net=NetConfig(ip4=Ip4Config(
    socket.inet_aton(GUEST), 24, socket.inet_aton(GATEWAY),
    map_host_loopback=socket.inet_aton(GATEWAY))))


@pytest.fixture
def harness() -> Iterator[EngineHarness]:
    with engine_harness(SETTINGS) as h:
        yield h


def syn(dport: int, seq: int = 1000, options: list | None = None) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IP(src=GUEST, dst=GATEWAY)
                 / TCP(sport=40000, dport=dport, flags="S", seq=seq, window=64240,
                       options=options or []))


def tcp_replies(frames: list[bytes]) -> list[TCP]:
    return [Ether(f)[TCP] for f in frames if Ether(f).haslayer(TCP)]


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_syn_to_a_closed_host_port_gets_exactly_a_reset(harness: EngineHarness) -> None:
    port = free_loopback_port()
    replies = tcp_replies(harness.roundtrip(syn(port, seq=1000), seconds=0.05))
    assert len(replies) == 1
    rst = replies[0]
    # a guest in SYN-SENT checks a RST's ACK, not its sequence number (RFC 9293 3.10.7.3)
    assert (rst.sport, rst.dport, str(rst.flags), rst.ack) == (port, 40000, "RA", 1001)
    assert harness.engine.flow_count == 0


def test_a_syn_to_a_listening_host_port_gets_exactly_this_syn_ack_then_data_flows(
        harness: EngineHarness) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        frames = harness.roundtrip(syn(port, seq=1000, options=[
            ("MSS", 1460), ("NOP", None), ("WScale", 7), ("SAckOK", b"")]), seconds=0.05)
        (syn_ack,) = tcp_replies(frames)
        assert (syn_ack.sport, syn_ack.dport, str(syn_ack.flags), syn_ack.ack) == \
            (port, 40000, "SA", 1001)
        assert syn_ack.window == 0xFFFF  # never scaled in a SYN; the socket has more room
        # MSS 65480 (our MTU 65520), NOP + window scale 8, NOPs + SACK permitted
        assert bytes(syn_ack)[20 : syn_ack.dataofs * 4] == bytes.fromhex("0204ffc8010303080101"
                                                                         "0402")
        peer, _ = server.accept()
        with peer:
            ours = syn_ack.seq + 1
            data = bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IP(src=GUEST, dst=GATEWAY)
                         / TCP(sport=40000, dport=port, flags="PA", seq=1001, ack=ours,
                               window=502) / b"hello")
            frames = harness.roundtrip(data, seconds=0.05)
            peer.settimeout(2)
            assert peer.recv(100) == b"hello"
            acks = tcp_replies(frames)
            assert acks and acks[-1].ack == 1006 and acks[-1].seq == ours
            peer.sendall(b"world")
            harness.run(0.05)
            (reply,) = [t for t in tcp_replies(harness.receive()) if bytes(t.payload)]
            assert (bytes(reply.payload), reply.seq, reply.ack) == (b"world", ours, 1006)


def test_a_local_connect_done_inside_connect_is_answered_in_the_same_batch(
        harness: EngineHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """To the host's loopback the kernel completes the handshake inside connect(): the
    SYN-ACK goes out with the batch that carried the SYN, no wait for writability."""
    waited: list[object] = []
    monkeypatch.setattr(harness.engine.tcp, "_connect_done", waited.append)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        harness.send(syn(port))
        harness.run(0.0)  # the read and its batch, no time for a wait on writability
        (syn_ack,) = tcp_replies(harness.receive())
        assert str(syn_ack.flags) == "SA" and waited == []


def test_arp_for_the_gateway_is_answered(harness: EngineHarness) -> None:
    request = bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
                    / ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST, pdst=GATEWAY))
    (reply,) = [Ether(f) for f in harness.roundtrip(request)]
    assert (reply[ARP].op, reply[ARP].psrc, reply[ARP].hwsrc, reply[ARP].pdst) == \
        (2, GATEWAY, OUR_MAC, GUEST)
