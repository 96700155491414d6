"""The whole engine in process (tests/support/engine_harness.py): guest frames in, frames
out, with real host sockets on this machine's loopback only (the guest's gateway address
maps to it). Frames are built and read with scapy, independently of the engine's codecs."""

from __future__ import annotations

import gc
import socket
import struct
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from passtd.engine.addrs import Ip4Config, NetConfig
from passtd.engine.loop import Engine
from passtd.engine.mainloop import MainLoop
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


def syn(dport: int, seq: int = 1000, options: list | None = None, sport: int = 40000
        ) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IP(src=GUEST, dst=GATEWAY)
                 / TCP(sport=sport, dport=dport, flags="S", seq=seq, window=64240,
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
        harness: EngineHarness, server: socket.socket) -> None:
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
        harness: EngineHarness, server: socket.socket) -> None:
    """To the host's loopback the kernel completes the handshake inside connect(): the
    SYN-ACK goes out with the batch that carried the SYN, no wait for writability."""
    writers_before = harness.loop.poller.writers_added  # waits for writability asked for
    port = server.getsockname()[1]
    harness.send(syn(port))
    harness.run(0.0)  # the read and its batch, no time for a wait on writability
    (syn_ack,) = tcp_replies(harness.receive())
    assert str(syn_ack.flags) == "SA" and harness.loop.poller.writers_added == writers_before


class WatchedStreams:
    """HostSockets for tests that watch TCP sockets (`stream`, in each subclass): plain
    UDP sockets, and no ICMP."""

    def datagram(self, af: socket.AddressFamily) -> socket.socket:
        return socket.socket(af, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)

    def ping(self, af: socket.AddressFamily) -> socket.socket:
        raise OSError("not in this test")


class PeerClosesInConnect(WatchedStreams):
    """HostSockets whose TCP connect() returns only after the server accepted and closed:
    what a fast server on the other CPU does (crr) before we look at the socket's state."""

    def __init__(self, server: socket.socket) -> None:
        self.server = server

    def stream(self, af: socket.AddressFamily) -> socket.socket:
        server = self.server

        class ClosedByPeer(socket.socket):
            def connect_ex(self, address: object) -> int:
                rc = super().connect_ex(address)  # type: ignore[arg-type]
                peer, _ = server.accept()
                peer.close()
                return rc

        return ClosedByPeer(af, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)


def test_a_local_connect_whose_peer_closed_already_is_answered_in_the_same_batch(
        server: socket.socket) -> None:
    """The socket is in CLOSE_WAIT, not ESTABLISHED, by the time we look: connected all
    the same, so the SYN-ACK goes out in the SYN's batch, and the FIN with the guest's ACK."""
    with engine_harness(SETTINGS, PeerClosesInConnect(server)) as harness:
        writers_before = harness.loop.poller.writers_added
        port = server.getsockname()[1]
        harness.send(syn(port))
        harness.run(0.0)
        (syn_ack,) = tcp_replies(harness.receive())
        assert str(syn_ack.flags) == "SA" and harness.loop.poller.writers_added == writers_before
        harness.send(guest_segment(port, syn_ack.seq + 1, 64240))
        harness.run(0.0)
        (fin,) = tcp_replies(harness.receive())
        assert str(fin.flags) == "FA" and fin.seq == syn_ack.seq + 1 and fin.ack == 1001


def test_what_the_peer_did_before_the_handshake_ended_is_read_with_the_guests_ack(
        harness: EngineHarness, server: socket.socket) -> None:
    """crr's shape: the server accepts and closes while our SYN-ACK and the guest's ACK
    cross. The flow reads its socket in the batch of that ACK: the FIN goes out with it,
    not one registration and one wakeup later (tcp_sock.py, execute)."""
    port = server.getsockname()[1]
    (syn_ack,) = tcp_replies(harness.roundtrip(syn(port), seconds=0.05))
    peer, _ = server.accept()
    peer.close()
    harness.send(guest_segment(port, syn_ack.seq + 1, 64240))
    harness.run(0.0)  # the read and its batch, no time for a wakeup of the flow's socket
    (fin,) = tcp_replies(harness.receive())
    assert str(fin.flags) == "FA" and fin.seq == syn_ack.seq + 1 and fin.ack == 1001


class CloseWatch(WatchedStreams):
    """HostSockets whose TCP sockets note, as they close, what qemu could read by then."""

    def __init__(self) -> None:
        self.qemu: socket.socket | None = None
        self.readable_at_close: list[bytes] = []

    def stream(self, af: socket.AddressFamily) -> socket.socket:
        watch = self

        class Watched(socket.socket):
            def close(self) -> None:
                assert watch.qemu is not None
                try:
                    watch.readable_at_close.append(watch.qemu.recv(1 << 16, socket.MSG_PEEK))
                except BlockingIOError:
                    watch.readable_at_close.append(b"")
                super().close()

        return Watched(af, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)


def test_a_flow_ending_in_a_batch_closes_its_socket_after_the_batchs_frames_went_out(
        server: socket.socket) -> None:
    """crr's shape: the guest's FIN for one connection and its SYN for the next in one
    read. The old socket's close() (its FIN to the peer, work in the kernel) waits until
    the batch's frames, the next SYN-ACK among them, are with qemu (loop.py, settle)."""
    watch = CloseWatch()
    with engine_harness(SETTINGS, watch) as harness:
        watch.qemu = harness.qemu
        port = server.getsockname()[1]
        (syn_ack,) = tcp_replies(harness.roundtrip(syn(port), seconds=0.05))
        peer, _ = server.accept()
        peer.close()
        (fin,) = tcp_replies(harness.roundtrip(guest_segment(port, syn_ack.seq + 1, 64240),
                                               seconds=0.05))
        guest_fin = bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IP(src=GUEST, dst=GATEWAY)
                          / TCP(sport=40000, dport=port, flags="FA", seq=1001,
                                ack=fin.seq + 1, window=64240))
        harness.send(guest_fin, syn(port, sport=40001))
        harness.run(0.0)
        (at_close,) = watch.readable_at_close
        frames, rest = [], at_close
        while len(rest) >= 4:
            (length,) = struct.unpack_from("!I", rest)
            frames.append(rest[4 : 4 + length])
            rest = rest[4 + length :]
        assert [(t.dport, str(t.flags)) for t in tcp_replies(frames)] == \
            [(40000, "A"), (40001, "SA")]
        assert harness.engine.flow_count == 1


def test_flows_opened_and_closed_are_told_once_per_batch(
        harness: EngineHarness, server: socket.socket) -> None:
    """The flow events and FlowCount reach the service (D-Bus) once per batch, not once
    per flow (news.py): a batch that closes one flow and opens the next
    makes one on_events call with both, and FlowCount, back where it was, is not told."""
    told: list[list[tuple[str, dict]]] = []
    changed: list[set[str]] = []
    harness.engine.news.on_events = lambda events: told.append(
        [(kind, describe()) for kind, describe in events])
    harness.engine.news.on_change = changed.append
    port = server.getsockname()[1]
    (syn_ack,) = tcp_replies(harness.roundtrip(syn(port), seconds=0.05))
    assert [[kind for kind, _ in events] for events in told] == [["flow-opened"]]
    assert [names for names in changed if "FlowCount" in names] == [{"FlowCount"}]
    peer, _ = server.accept()
    peer.close()
    (fin,) = tcp_replies(harness.roundtrip(guest_segment(port, syn_ack.seq + 1, 64240),
                                           seconds=0.05))
    told.clear()
    changed.clear()
    harness.send(bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IP(src=GUEST, dst=GATEWAY)
                       / TCP(sport=40000, dport=port, flags="FA", seq=1001,
                             ack=fin.seq + 1, window=64240)),
                 syn(port, sport=40001))
    harness.run(0.0)
    (events,) = told
    assert [(kind, d["guest_port"]) for kind, d in events] == \
        [("flow-closed", 40000), ("flow-opened", 40001)]
    assert not [names for names in changed if "FlowCount" in names]  # 1 before, 1 after
    harness.engine.news.on_events = None
    harness.engine.news.on_change = None


def connected(harness: EngineHarness, server: socket.socket, window: int
              ) -> tuple[socket.socket, int]:
    """A flow to `server` through the engine (no window scaling: the guest's window is
    `window` bytes): the host's end of it, and our first sequence number after the SYN."""
    port = server.getsockname()[1]
    (syn_ack,) = tcp_replies(harness.roundtrip(syn(port, options=[("MSS", 1460)]),
                                               seconds=0.05))
    peer, _ = server.accept()
    ours = syn_ack.seq + 1
    harness.roundtrip(guest_segment(port, ours, window), seconds=0.05)
    return peer, ours


def guest_segment(port: int, ack: int, window: int, payload: bytes = b"") -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IP(src=GUEST, dst=GATEWAY)
                 / TCP(sport=40000, dport=port, flags="PA" if payload else "A", seq=1001,
                       ack=ack, window=window) / payload)


def payloads(harness: EngineHarness, seconds: float = 0.05) -> list[TCP]:
    harness.run(seconds)
    return [t for t in tcp_replies(harness.receive()) if bytes(t.payload)]


def test_host_data_after_everything_was_acknowledged_wakes_the_engine(
        harness: EngineHarness, server: socket.socket) -> None:
    """Request/response: the flow's socket is edge-triggered (tcp_peek.py: Wakeups), so
    each reply must be an edge of its own once the guest acknowledged the one before."""
    peer, ours = connected(harness, server, window=60000)
    port = server.getsockname()[1]
    with peer:
        for n in range(3):
            reply = f"reply {n}".encode()
            peer.sendall(reply)
            (got,) = payloads(harness)
            assert (bytes(got.payload), got.seq) == (reply, ours)
            ours += len(reply)
            harness.roundtrip(guest_segment(port, ours, 60000), seconds=0.02)  # ACK


def test_a_read_stopped_by_the_guest_window_goes_on_after_its_ack(
        harness: EngineHarness, server: socket.socket) -> None:
    """The socket holds 30 bytes, the guest's window takes 10: the rest comes after each
    ACK, with no new host data (no new edge) to say it is there."""
    peer, ours = connected(harness, server, window=10)
    port = server.getsockname()[1]
    with peer:
        peer.sendall(bytes(range(30)))
        got = b""
        for _ in range(3):
            (segment,) = payloads(harness)
            assert segment.seq == ours + len(got) and len(segment.payload) == 10
            got += bytes(segment.payload)
            harness.send(guest_segment(port, ours + len(got), 10))  # the ACK
        assert got == bytes(range(30))


def test_the_last_data_and_the_peers_fin_in_one_wakeup_both_reach_the_guest(
        harness: EngineHarness, server: socket.socket) -> None:
    """The FIN is queued behind the data: the read that finds the data sees no end, and
    no other edge comes (tcp_peek.py: Wakeups); the guest must still get its FIN."""
    peer, ours = connected(harness, server, window=60000)
    with peer:
        peer.sendall(b"last words")
        peer.shutdown(socket.SHUT_WR)
        harness.run(0.05)
        segments = tcp_replies(harness.receive())
        data = [t for t in segments if t.haslayer(Raw)]
        assert b"".join(t[Raw].load for t in data) == b"last words"
        fin = [t for t in segments if "F" in str(t.flags)]
        assert fin and fin[-1].seq == ours + len(b"last words") - (
            len(fin[-1][Raw].load) if fin[-1].haslayer(Raw) else 0)


def test_a_banner_sent_before_the_handshake_completes_reaches_the_guest(
        harness: EngineHarness, server: socket.socket) -> None:
    """An SSH server speaks first: its banner is queued before the guest's ACK makes the
    flow established, and registering the socket then is the only edge there will be."""
    port = server.getsockname()[1]
    (syn_ack,) = tcp_replies(harness.roundtrip(syn(port, options=[("MSS", 1460)]),
                                               seconds=0.05))
    peer, _ = server.accept()
    with peer:
        peer.sendall(b"SSH-2.0-banner\r\n")
        harness.send(guest_segment(port, syn_ack.seq + 1, 60000))
        (got,) = payloads(harness)
        assert got[Raw].load == b"SSH-2.0-banner\r\n" and got.seq == syn_ack.seq + 1


def test_arp_for_the_gateway_is_answered(harness: EngineHarness) -> None:
    request = bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
                    / ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST, pdst=GATEWAY))
    (reply,) = [Ether(f) for f in harness.roundtrip(request)]
    assert (reply[ARP].op, reply[ARP].psrc, reply[ARP].hwsrc, reply[ARP].pdst) == \
        (2, GATEWAY, OUR_MAC, GUEST)


def test_a_bad_length_word_drops_qemu_and_nothing_else(
        harness: EngineHarness, caplog: pytest.LogCaptureFixture) -> None:
    """A frame length no Ethernet frame has: qemu's connection is dropped with a warning
    (its stream cannot be read past it), the loop sees no exception, and the next qemu is
    served."""
    escaped: list[dict[str, object]] = []
    harness.loop.set_exception_handler(lambda _loop, context: escaped.append(context))
    harness.qemu.sendall(struct.pack("!I", 5) + b"short")
    harness.run()
    assert harness.qemu.recv(1) == b""  # dropped
    assert escaped == []
    assert "dropping qemu client: frame length 5 out of range" in caplog.text
    harness.reconnect()
    test_arp_for_the_gateway_is_answered(harness)


def _established(harness: EngineHarness, server: socket.socket) -> tuple[socket.socket, int]:
    """A guest connection to `server` through the engine: (the host's end, our next seq)."""
    frames = harness.roundtrip(syn(server.getsockname()[1], seq=1000, options=[
        ("MSS", 1460), ("WScale", 7)]), seconds=0.05)
    (syn_ack,) = tcp_replies(frames)
    peer, _ = server.accept()
    harness.roundtrip(_data(server.getsockname()[1], 1001, syn_ack.seq + 1, b""))
    return peer, syn_ack.seq + 1


def _data(port: int, seq: int, ours: int, payload: bytes) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IP(src=GUEST, dst=GATEWAY)
                 / TCP(sport=40000, dport=port, flags="A", seq=seq, ack=ours, window=502)
                 / payload)


def _receive_all(peer: socket.socket, size: int) -> bytes:
    peer.settimeout(2)
    got = b""
    while len(got) < size:
        chunk = peer.recv(size - len(got))
        assert chunk, "the host's end saw EOF"
        got += chunk
    return got


@pytest.mark.parametrize("gap", [None, 10])
def test_a_read_of_in_order_segments_is_written_as_one_run(
        harness: EngineHarness, server: socket.socket, monkeypatch: pytest.MonkeyPatch,
        gap: int | None) -> None:
    """tcp_run takes the segments after the first of a run in one step; a gap ends the
    run, the segments after it are held, and the missing one, sent last, completes it."""
    from passtd.engine import tcp_run

    taken: list[int] = []

    def counting(*args: object) -> tuple[int, int, int, int]:
        result = real(*args)
        taken.append(result[1])
        return result

    real = tcp_run.gather
    monkeypatch.setattr(tcp_run, "gather", counting)
    port = server.getsockname()[1]
    peer, ours = _established(harness, server)
    with peer:
        chunks = [bytes([48 + i % 40]) * 1000 for i in range(30)]
        frames = [_data(port, 1001 + 1000 * i, ours, c) for i, c in enumerate(chunks)]
        read_before = harness.engine.statistics()["frames_from_guest"]
        harness.send(*[f for i, f in enumerate(frames) if i != gap])
        harness.run(0.05)
        if gap is not None:
            harness.send(frames[gap])
            harness.run(0.05)
        assert _receive_all(peer, 30_000) == b"".join(chunks)
        acks = tcp_replies(harness.receive())
        assert acks[-1].ack == 1001 + 30_000
        assert harness.engine.statistics()["frames_from_guest"] - read_before == 30
        # without a gap one call takes the 29 after the first; with one, the segments
        # before it are one run and those after it wait in the hold
        assert taken == ([29] if gap is None else [gap - 1])


def test_an_engine_closed_on_a_loop_that_goes_on_leaves_nothing_on_it() -> None:
    """The fuzz target builds engine after engine on one loop: a closed engine's
    registrations and deadlines must not keep it (and its buffers) alive."""
    def engines() -> int:  # (a compiled Engine takes no weak reference)
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is Engine)

    loop = MainLoop()
    try:
        before = engines()
        harness = EngineHarness(SETTINGS, loop=loop)
        harness.run(0.02)
        assert engines() == before + 1
        harness.close()
        del harness
        assert engines() == before
    finally:
        loop.close()
