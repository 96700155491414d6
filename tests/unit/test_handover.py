"""Flows across a restart (engine/handover.py, fd_handover.py), with real engines and sockets.

One engine (tests/support/engine_harness.py) serves a guest connection to a server on this
machine's loopback, then hands over: its state document and its sockets go to a second
engine, as they would to the next process, and the connection carries on there. Also: a
document this version cannot read, a socket that did not arrive, the format-1 document
kept as a fixture (an older version's state must keep reading), and the descriptor
bundles themselves. Frames are built and read with scapy.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from passtd import fd_handover
from passtd.engine.addrs import Ip4Config, NetConfig
from passtd.engine.fwd import ForwardRule
from passtd.engine.settings import EngineSettings
from tests.support.engine_harness import EngineHarness, engine_harness

GUEST_MAC, OUR_MAC = "52:54:00:12:34:56", "9a:55:9a:55:9a:55"
GUEST, GATEWAY = "198.51.100.2", "198.51.100.1"
NET = NetConfig(ip4=Ip4Config(socket.inet_aton(GUEST), 24, socket.inet_aton(GATEWAY),
                              map_host_loopback=socket.inet_aton(GATEWAY)))
SETTINGS = EngineSettings(net=NET)
FIXTURE = Path(__file__).parent / "data" / "handover-format1.json"
SPORT = 40000


def segment(dport: int, flags: str, seq: int, ack: int = 0, data: bytes = b"",
            window: int = 502) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IP(src=GUEST, dst=GATEWAY)
                 / TCP(sport=SPORT, dport=dport, flags=flags, seq=seq, ack=ack, window=window,
                       options=[("MSS", 1460), ("WScale", 7)] if flags == "S" else [])
                 / data)


def tcp_of(frames: list[bytes]) -> list[TCP]:
    return [Ether(f)[TCP] for f in frames if Ether(f).haslayer(TCP)]


def payload(seg: TCP) -> bytes:
    return bytes(seg[Raw].load) if seg.haslayer(Raw) else b""


def established(h: EngineHarness, server: socket.socket) -> tuple[socket.socket, int]:
    """A guest connection to `server` through the engine: (host peer, our next seq)."""
    port = server.getsockname()[1]
    (syn_ack,) = tcp_of(h.roundtrip(segment(port, "S", 1000), seconds=0.05))
    peer, _ = server.accept()
    ours = syn_ack.seq + 1
    h.roundtrip(segment(port, "A", 1001, ours), seconds=0.02)
    return peer, ours


def hand_over(old: EngineHarness) -> tuple[bytes, list[socket.socket | None]]:
    """What the next process gets: the document and (copies of) the sockets, as the FD
    store would keep them; then the old engine closes, as the old process does."""
    carried: list[socket.socket | None] = []

    def carry(socks: list[socket.socket]) -> int:
        carried.extend(sock.dup() for sock in socks)
        return len(socks)

    state = old.engine.hand_over(carry)
    old.engine.close()
    return state, carried


def take_over(new: EngineHarness, state: bytes, socks: list[socket.socket | None]) -> bool:
    ok = new.engine.inherit(state, socks)
    new.engine.start(None)
    new.engine.resume_inherited()
    return ok


def test_a_connection_carries_on_in_the_next_engine_without_loss(
        server: socket.socket) -> None:
    port = server.getsockname()[1]
    with engine_harness(SETTINGS) as old, engine_harness(SETTINGS) as new:
        peer, ours = established(old, server)
        peer.sendall(b"sent before the restart")
        (data,) = [t for t in tcp_of(old.roundtrip(seconds=0.05)) if payload(t)]
        assert data.seq == ours  # the guest got it, but does not acknowledge it (yet)
        flow_id = old.engine.flow_page(0, 10)[0]["id"]
        old.engine.ctx.started_at -= 3600  # the instance has served for an hour
        started_at = old.engine.started_at
        state, socks = hand_over(old)

        assert take_over(new, state, socks)
        assert new.engine.started_at == started_at  # "since when" survives the restart
        (flow,) = new.engine.flow_page(0, 10)
        assert flow["id"] == flow_id and flow["state"] == "ESTABLISHED"
        frames = tcp_of(new.roundtrip(seconds=0.05))
        # a window update, and the unacknowledged data again from the same sequence number
        assert any(not payload(t) and t.ack == 1001 for t in frames), frames
        (again,) = [t for t in frames if payload(t)]
        assert (again.seq, payload(again)) == (ours, b"sent before the restart")
        end = ours + len(b"sent before the restart")
        new.roundtrip(segment(port, "PA", 1001, end, b"and after it"), seconds=0.05)
        peer.settimeout(2)
        assert peer.recv(100) == b"and after it"
        peer.sendall(b"more")
        (more,) = [t for t in tcp_of(new.roundtrip(seconds=0.05)) if payload(t)]
        assert (more.seq, payload(more)) == (end, b"more")  # nothing sent twice
        assert new.engine.problems() == []
        peer.close()


def test_a_socket_left_with_an_so_rcvlowat_still_wakes_the_next_engine(
        server: socket.socket) -> None:
    """passtd before edge-triggered reads set SO_RCVLOWAT on flow sockets (bytes in flight
    + 1); the socket keeps it across the restart, and the kernel would hold back wakeups
    for less data than that: the engine that takes the flow resets it."""
    port = server.getsockname()[1]
    with engine_harness(SETTINGS) as old, engine_harness(SETTINGS) as new:
        peer, ours = established(old, server)
        state, socks = hand_over(old)
        for sock in socks:
            assert sock is not None
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 4096)
        assert take_over(new, state, socks)
        new.roundtrip(segment(port, "A", 1001, ours), seconds=0.02)
        with peer:
            peer.sendall(b"small")
            (data,) = [t for t in tcp_of(new.roundtrip(seconds=0.05)) if payload(t)]
            assert (data.seq, payload(data)) == (ours, b"small")


def test_listeners_are_kept_and_new_ids_follow_the_old_ones(server: socket.socket) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    rule = ForwardRule("tcp", "127.0.0.1", None, free, free, 22)
    settings = EngineSettings(net=NET, tcp_forwards=(rule,))
    with engine_harness(settings) as old, engine_harness(settings) as new:
        old.engine.start(None)
        established(old, server)[0].close()
        state, socks = hand_over(old)
        # a connection while no process listens: the kept listener queues it
        waiting = socket.create_connection(("127.0.0.1", free), timeout=2)
        assert take_over(new, state, socks)
        (fwd,) = new.engine.list_forwards()
        assert fwd["id"] == 1 and fwd["listeners"] == 1
        new.run(0.05)
        assert any(f["origin"] == "host" for f in new.engine.flow_page(0, 10))
        waiting.close()
        doc = json.loads(state)
        assert new.engine.flows.next_id >= doc["next_flow_id"]


@pytest.mark.parametrize("state", [b"not json", b'{"format": 99}', b"[]",
                                   b'{"format": 1, "flows": 3}'])
def test_a_state_that_does_not_read_resets_the_flows_only(server: socket.socket,
                                                         state: bytes) -> None:
    port = server.getsockname()[1]
    with engine_harness(SETTINGS) as old, engine_harness(SETTINGS) as new:
        peer, ours = established(old, server)
        _, socks = hand_over(old)
        assert not take_over(new, state, socks)
        assert new.engine.flow_count == 0
        peer.settimeout(2)
        with pytest.raises(ConnectionResetError):  # not an end of stream: a reset
            peer.recv(100)
        # the guest's next segment of it meets a reset; the instance goes on
        (rst,) = tcp_of(new.roundtrip(segment(port, "PA", 1001, ours, b"x"), seconds=0.05))
        assert "R" in str(rst.flags)
        peer2, _ = established(new, server)
        peer2.close()
        peer.close()


def test_a_flow_whose_socket_did_not_arrive_is_reset_towards_the_guest(
        server: socket.socket) -> None:
    with engine_harness(SETTINGS) as old, engine_harness(SETTINGS) as new:
        peer, _ours = established(old, server)
        state, socks = hand_over(old)
        for sock in socks:
            assert sock is not None
            sock.close()
        assert take_over(new, state, [None] * len(socks))
        assert new.engine.flow_count == 0
        (rst,) = tcp_of(new.receive())
        assert "R" in str(rst.flags) and rst.sport == server.getsockname()[1]
        peer.close()


@contextmanager
def fixture_sockets() -> Iterator[list[socket.socket | None]]:
    """The sockets the format-1 fixture numbers: its UDP forward's listener, a connected
    TCP socket (to a loopback server), a guest UDP flow's, a ping flow's (a UDP one will
    do: nothing is sent)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        tcp = socket.create_connection(srv.getsockname())
        udp_listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp_listener.bind(("127.0.0.1", 0))
        yield [udp_listener, tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
               socket.socket(socket.AF_INET, socket.SOCK_DGRAM)]


def test_the_format_1_document_still_reads() -> None:
    """tests/unit/data/handover-format1.json, as this version's first format writes it:
    a forward and its listener, a TCP flow, a guest UDP flow and an inbound one through
    the forward's... (UDP forwards answer through their listener), and a ping flow."""
    doc = json.loads(FIXTURE.read_text())
    assert doc["format"] == 1
    with fixture_sockets() as socks:
        rule = ForwardRule(**doc["forwards"][0]["rule"])
        settings = EngineSettings(net=NET, udp_forwards=(rule,))
        with engine_harness(settings) as new:
            assert take_over(new, json.dumps(doc).encode(), socks)
            flows = {f["id"]: f for f in new.engine.flow_page(0, 10)}
            assert sorted(flows) == [3, 4, 5, 6]
            assert flows[3]["protocol"] == "tcp" and flows[3]["state"] == "ESTABLISHED"
            assert flows[3]["bytes_from_guest"] == 1200 and flows[3]["bytes_to_guest"] == 3400
            assert flows[4]["protocol"] == "udp" and flows[4]["origin"] == "guest"
            assert flows[5]["origin"] == "host"  # answering through the forward's listener
            assert flows[6]["protocol"] == "icmp"
            (fwd,) = new.engine.list_forwards()
            assert (fwd["id"], fwd["connections"]) == (2, 7)
            assert new.engine.flows.next_id == 7
            assert new.engine.guest_mac == GUEST_MAC
            assert new.engine.problems() == []


def test_bundles_carry_many_sockets_in_order() -> None:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(600)]
    try:
        for i, sock in enumerate(socks[:50]):
            sock.bind(("127.0.0.1", 0))
            sock.connect(("127.0.0.1", 9 + i))
        bundles, sent = fd_handover.pack(socks, max_bundles=9)
        assert sent == 600 and len(bundles) == 1
        names = [s.getpeername() for s in socks[:50]]
        for sock in socks:
            sock.close()
        got = fd_handover.unpack([b.detach() for b in bundles])
        assert len(got) == 600
        assert [s.getpeername() for s in got[:50]] == names
        for sock in got:
            sock.close()
    finally:
        for sock in socks:
            sock.close()


def test_bundles_stop_where_the_limit_is() -> None:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(300)]
    try:
        bundles, sent = fd_handover.pack(socks, max_bundles=0)
        assert (bundles, sent) == ([], 0)
    finally:
        for sock in socks:
            sock.close()


def test_a_state_memfd_round_trips() -> None:
    fd = fd_handover.write_memfd("test", b"x" * 300_000)
    assert fd_handover.read_memfd(fd) == b"x" * 300_000


def test_flows_whose_sockets_find_no_room_are_reset_both_ways(server: socket.socket,
                                                              caplog) -> None:
    """The FD store (or the kernel's limit on descriptors in flight) took none of the
    sockets: the old process resets those flows itself, and leaves them out."""
    with engine_harness(SETTINGS) as old:
        peer, _ = established(old, server)
        state = old.engine.hand_over(lambda socks: 0)
        assert json.loads(state)["flows"] == []
        (rst,) = tcp_of(old.receive())
        assert "R" in str(rst.flags)
        peer.settimeout(2)
        with pytest.raises(ConnectionResetError):
            peer.recv(100)
        assert "cannot carry 1 of 1 flows" in caplog.text
        peer.close()


# -- a state document that is corrupt in any way costs flows, never the instance ------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                     st.floats(allow_nan=True), st.text(max_size=8))
_json = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=20)


def _mutations(doc: Any) -> st.SearchStrategy[Any]:
    """The fixture document with one value somewhere replaced by anything."""
    paths: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, (*path, key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, (*path, i))

    walk(doc, ())

    def replaced(path: tuple[Any, ...], value: Any) -> Any:
        if not path:
            return value
        copy = json.loads(json.dumps(doc))
        node = copy
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return copy

    return st.builds(replaced, st.sampled_from(paths), _json)


@settings(max_examples=300)
@given(data=st.data())
def test_any_corruption_of_the_document_costs_flows_only(data: st.DataObject) -> None:
    doc = json.loads(FIXTURE.read_text())
    mutated = data.draw(_mutations(doc))
    state = json.dumps(mutated, allow_nan=True).encode()
    with fixture_sockets() as socks:
        rule = ForwardRule(**doc["forwards"][0]["rule"])
        with engine_harness(EngineSettings(net=NET, udp_forwards=(rule,))) as new:
            take_over(new, state, socks)  # True or False: never an exception
            new.run(0.01)
            assert new.engine.problems() == []
            assert new.engine.flow_count <= 4


_FLOW_FIELDS = [(i, name) for i, flow in enumerate(json.loads(FIXTURE.read_text())["flows"])
                for name in sorted(flow["fields"])]


@settings(max_examples=300)
@given(where=st.sampled_from(_FLOW_FIELDS),
       value=st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=True)))
def test_any_number_in_a_flow_costs_that_flow_at_most(where: tuple[int, str],
                                                       value: float) -> None:
    """What resumes runs its timers (the fixture's deadlines are long past) and takes the
    guest's next segments without an error escaping: the fixture's TCP flow (guest port
    40000 to the gateway's 8080) gets data in order, then a window update."""
    doc = json.loads(FIXTURE.read_text())
    tcp = dict(doc["flows"][0]["fields"])
    doc["flows"][where[0]]["fields"][where[1]] = value
    with fixture_sockets() as socks:
        rule = ForwardRule(**doc["forwards"][0]["rule"])
        with engine_harness(EngineSettings(net=NET, udp_forwards=(rule,))) as new:
            errors: list[dict[str, Any]] = []
            new.loop.set_exception_handler(lambda _loop, context: errors.append(context))
            take_over(new, json.dumps(doc, allow_nan=True).encode(), socks)
            new.send(segment(8080, "PA", tcp["rcv_nxt"], tcp["snd_una"], b"x"),
                     segment(8080, "A", tcp["rcv_nxt"], tcp["snd_una"], window=1000))
            new.run(0.005)
            assert errors == [] and new.engine.problems() == []


@pytest.mark.parametrize("path, value", [
    (("next_forward_id",), None),  # found by the test above: a TypeError after reading
    (("guest", "mac"), "zz" * 6),  # not hex: learnt again from the guest's frames
    (("flows", 2, "origin"), "None"),  # a "guest" flow closing its forward's listener
])
def test_corruptions_found_so_far(path: tuple[Any, ...], value: Any) -> None:
    doc = json.loads(FIXTURE.read_text())
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    socks: list[socket.socket | None] = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                                         for _ in range(4)]
    rule = ForwardRule(**doc["forwards"][0]["rule"])
    with engine_harness(EngineSettings(net=NET, udp_forwards=(rule,))) as new:
        take_over(new, json.dumps(doc).encode(), socks)
        assert new.engine.problems() == []


def test_several_bundles_come_back_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past BUNDLE_FDS sockets go in more bundles (flows-0, flows-1...; systemd may hand
    them back in any order, their names number them)."""
    monkeypatch.setattr(fd_handover, "BUNDLE_MESSAGES", 1)  # 253 sockets a bundle
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(600)]
    try:
        for i, sock in enumerate(socks):
            sock.bind(("127.0.0.1", 0))
            sock.connect(("127.0.0.1", 1000 + i))
        bundles, sent = fd_handover.pack(socks, max_bundles=9)
        assert (len(bundles), sent) == (3, 600)
        names = fd_handover.bundle_names(len(bundles))
        pairs = list(zip(names, bundles, strict=True))
        handed = {name: [bundle.detach()] for name, bundle in reversed(pairs)}
        state, got = fd_handover.take({"state": [fd_handover.write_memfd("s", b"{}")],
                                       **handed})
        assert state == b"{}" and len(got) == 600
        assert [s.getpeername()[1] for s in got if s is not None] == \
            [1000 + i for i in range(600)]
        for sock in got:
            if sock is not None:
                sock.close()
    finally:
        for sock in socks:
            sock.close()


def test_the_bundles_stop_at_their_limit_and_say_how_many_went(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fd_handover, "BUNDLE_MESSAGES", 1)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(600)]
    try:
        bundles, sent = fd_handover.pack(socks, max_bundles=1)
        assert (len(bundles), sent) == (1, fd_handover.SCM_MAX_FD)  # the engine resets the rest
        for bundle in bundles:
            bundle.close()
    finally:
        for sock in socks:
            sock.close()


def test_a_forward_gone_from_the_configuration_closes_its_listener_not_its_flows(
        server: socket.socket) -> None:
    """The admin removed a forward from the configuration, then restarted: its listener
    closes, what is connected through it carries on (as `RemoveForward` does)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    rule = ForwardRule("tcp", "127.0.0.1", None, free, free, 22)
    with engine_harness(EngineSettings(net=NET, tcp_forwards=(rule,))) as old, \
            engine_harness(SETTINGS) as new:
        old.engine.start(None)
        peer, _ = established(old, server)  # a guest flow, which lives on
        inbound = socket.create_connection(("127.0.0.1", free), timeout=2)
        old.run(0.05)  # accepted: a flow through the forward, SYN sent to the guest
        assert old.engine.flow_count == 2
        state, socks = hand_over(old)
        assert take_over(new, state, socks)
        assert new.engine.list_forwards() == []
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", free), timeout=2).close()
        assert new.engine.flow_count == 2 and new.engine.problems() == []
        inbound.close()
        peer.close()


def test_flows_taken_over_while_qemu_is_away_resume_when_it_is_back(
        server: socket.socket) -> None:
    with engine_harness(SETTINGS) as old, engine_harness(SETTINGS) as new:
        peer, ours = established(old, server)
        state, socks = hand_over(old)
        new.engine.link.drop_client("qemu restarted")  # no guest while the flows come
        assert take_over(new, state, socks)
        peer.sendall(b"while qemu was away")
        new.run(0.05)
        new.reconnect()
        frames = tcp_of(new.roundtrip(seconds=0.1))
        (data,) = [t for t in frames if payload(t)]
        assert (data.seq, payload(data)) == (ours, b"while qemu was away")
        assert new.engine.problems() == []
        peer.close()


# numbers of the right type that no live flow holds: each would raise or mislead in the
# flow's next segment, read or timer (a negative shift, a division by zero, a header field
# that cannot take it, a deadline that never orders in the timer heap)
@pytest.mark.parametrize("field, value", [
    ("guest_wscale", -1), ("our_wscale", 15), ("guest_mss", 0), ("our_mss", 0),
    ("rcv_nxt", 1 << 32), ("snd_una", -1), ("guest_wnd", -1), ("discard", -1),
    ("timer_kind", 9), ("rto", 0.0), ("deadline", float("nan")),
    ("last_activity", float("inf")), ("bytes_to_guest", -1), ("id", 1 << 32),
])
def test_a_flow_whose_numbers_no_flow_holds_is_reset_not_resumed(
        server: socket.socket, field: str, value: float) -> None:
    port = server.getsockname()[1]
    with engine_harness(SETTINGS) as old, engine_harness(SETTINGS) as new:
        peer, ours = established(old, server)
        state, socks = hand_over(old)
        doc = json.loads(state)
        doc["flows"][0]["fields"][field] = value
        errors: list[dict[str, Any]] = []
        new.loop.set_exception_handler(lambda _loop, context: errors.append(context))
        assert take_over(new, json.dumps(doc, allow_nan=True).encode(), socks)
        assert new.engine.flow_count == 0
        peer.settimeout(2)
        with pytest.raises(ConnectionResetError):
            peer.recv(100)
        (rst,) = tcp_of(new.roundtrip(segment(port, "PA", 1001, ours, b"x"), seconds=0.05))
        assert "R" in str(rst.flags)
        assert errors == [] and new.engine.problems() == []
        peer.close()


def test_reexec_takes_the_wake_up_descriptor_away_before_moving_descriptors() -> None:
    """A signal's byte goes to the loop's wake-up descriptor: once reexec's dup2s put
    another socket (qemu's) on that number, the byte would land in it. Each dup2 is seen
    here with no wake-up descriptor set."""
    script = """
import os, signal, socket, sys
from passtd import fd_handover
from passtd.engine.mainloop import MainLoop
loop = MainLoop()
loop.add_signal_handler(signal.SIGTERM, loop.stop)
real_dup2 = os.dup2
def dup2(fd, to, inheritable=True):
    current = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(current)
    sys.stdout.write(f"{current} ")
    sys.stdout.flush()
    return real_dup2(fd, to, inheritable)
fd_handover.os.dup2 = dup2
a, _b = socket.socketpair()
fd_handover.reexec([("qemu", a.fileno())], [sys.executable, "-c", "print('exec')"])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["-1", "exec"]
