"""tcp_run: a guest frame's segment numbers and flow (segment), and a run of one flow's
in-order guest segments taken in one step (gather).

Frames are built with scapy (an independent codec). Each test runs the pure-Python path,
which is the reference, and the C twin where it is built; the differential fuzz feeds both
mangled streams and wants the same results, exceptions included.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Ether

from passtd.engine import tcp_run
from passtd.engine.flow import Flow

GUEST4, HOST4 = "198.51.100.2", "198.51.100.1"
GUEST6, HOST6 = "2001:db8::2", "2001:db8::1"
ACK, WINDOW = 7000, 502
Gather = Callable[..., tuple[int, int, int, int]]
SegmentOf = Callable[..., tuple[int, Any, int, int, int, int, int, int]]


def _native() -> ModuleType:
    try:
        from passtd.engine import _tcp_run
    except ImportError:
        pytest.skip("the native walk is not built here (./setup.sh builds it)")
    return _tcp_run


@pytest.fixture(params=["python", "native"])
def gather(request: pytest.FixtureRequest) -> Gather:
    return tcp_run.gather_python if request.param == "python" else _native().gather


@pytest.fixture(params=["python", "native"])
def segment(request: pytest.FixtureRequest) -> SegmentOf:
    return tcp_run.segment_python if request.param == "python" else _native().segment


def seg(seq: int, payload: bytes = b"x" * 100, *, flags: str = "A", ack: int = ACK,
        window: int = WINDOW, sport: int = 40000, v6: bool = False, ip: dict | None = None,
        options: list | None = None) -> bytes:
    net = IPv6(src=GUEST6, dst=HOST6) if v6 else IP(src=GUEST4, dst=HOST4, **(ip or {}))
    return bytes(Ether(src="52:54:00:12:34:56", dst="9a:55:9a:55:9a:55") / net
                 / TCP(sport=sport, dport=5201, flags=flags, seq=seq, ack=ack, window=window,
                       options=options or []) / payload)


def mangled(frame: bytes, at: int, value: int) -> bytes:
    out = bytearray(frame)
    out[at] = value
    return bytes(out)


def stream(*frames: bytes) -> tuple[memoryview, list[int]]:
    """The frames with their length words as in the read buffer, and each frame's offset."""
    buf, offsets = bytearray(), []
    for frame in frames:
        buf += struct.pack("!I", len(frame))
        offsets.append(len(buf))
        buf += frame
    return memoryview(buf), offsets


def payloads(views: list[memoryview]) -> list[bytes]:
    return [bytes(v) for v in views]


@pytest.mark.parametrize("v6", [False, True])
def test_the_segments_that_continue_the_run_are_taken_to_the_end(gather: Gather,
                                                                   v6: bool) -> None:
    chunks = [bytes([65 + i]) * (100 + i) for i in range(6)]
    frames, seq = [], 1000
    for chunk in chunks:
        frames.append(seg(seq, chunk, v6=v6, flags="PA" if len(frames) % 2 else "A"))
        seq += len(chunk)
    mem, offsets = stream(*frames)
    views: list[memoryview] = []
    pos = offsets[1] - 4  # the first segment went through on_segment
    assert gather(mem, offsets[0], pos, len(mem), 1100, ACK, WINDOW, views) == \
        (len(mem), 5, sum(map(len, chunks[1:])), offsets[5])
    assert payloads(views) == chunks[1:]


def test_sequence_numbers_wrap(gather: Gather) -> None:
    mem, offsets = stream(seg(0xFFFFFF00, b"a" * 256), seg(0, b"b" * 10))
    views: list[memoryview] = []
    assert gather(mem, offsets[0], offsets[1] - 4, len(mem), 0, ACK, WINDOW, views)[1] == 1


STOPS: dict[str, Callable[[int], bytes]] = {
    "a gap": lambda seq: seg(seq + 1),
    "a retransmission": lambda seq: seg(seq - 100),
    "a new ACK": lambda seq: seg(seq, ack=ACK + 100),
    "a window update": lambda seq: seg(seq, window=WINDOW + 1),
    "a FIN": lambda seq: seg(seq, flags="FA"),
    "a RST": lambda seq: seg(seq, flags="RA"),
    "a SYN": lambda seq: seg(seq, flags="SA"),
    "no ACK flag": lambda seq: seg(seq, flags="P"),
    "no payload": lambda seq: seg(seq, b""),
    "another flow": lambda seq: seg(seq, sport=40001),
    "another family": lambda seq: seg(seq, v6=True),
    "a fragment": lambda seq: seg(seq, ip={"flags": "MF"}),
    "IP options": lambda seq: seg(seq, ip={"options": b"\x01\x01\x01\x00"}),
    "not TCP": lambda seq: bytes(Ether() / IP(src=GUEST4, dst=HOST4, proto=17) / (b"u" * 30)),
}


@pytest.mark.parametrize("stop", sorted(STOPS))
def test_the_run_ends_at_the_first_segment_on_segment_must_see(gather: Gather,
                                                               stop: str) -> None:
    """The loop handles that one as ever: nothing after it is taken either."""
    mem, offsets = stream(seg(1000), seg(1100), STOPS[stop](1200), seg(1200))
    views: list[memoryview] = []
    assert gather(mem, offsets[0], offsets[1] - 4, len(mem), 1100, ACK, WINDOW, views) == \
        (offsets[2] - 4, 1, 100, offsets[1])


def test_timestamps_and_other_options_do_not_end_the_run(gather: Gather) -> None:
    ts = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]
    mem, offsets = stream(seg(1000, options=ts), seg(1100, options=ts))
    views: list[memoryview] = []
    assert gather(mem, offsets[0], offsets[1] - 4, len(mem), 1100, ACK, WINDOW, views)[:3] == \
        (len(mem), 1, 100)
    assert payloads(views) == [b"x" * 100]


@pytest.mark.parametrize("cut", [1, 3, 4, 60])
def test_a_frame_cut_by_the_read_is_left_for_the_next_one(gather: Gather, cut: int) -> None:
    mem, offsets = stream(seg(1000), seg(1100), seg(1200))
    end = len(mem) - cut
    assert gather(mem, offsets[0], offsets[1] - 4, end, 1100, ACK, WINDOW, [])[:2] == \
        (offsets[2] - 4, 1)


@pytest.mark.parametrize("length", [0, 13, 65536, 0xFFFFFFFF])
def test_a_bad_length_word_is_left_to_the_reader(gather: Gather, length: int) -> None:
    """(tap.FrameReader raises FramingError for it: gather must not step over it.)"""
    mem, offsets = stream(seg(1000), seg(1100))
    buf = bytearray(mem)
    struct.pack_into("!I", buf, offsets[1] - 4, length)
    assert gather(memoryview(buf), offsets[0], offsets[1] - 4, len(buf), 1100, ACK, WINDOW,
                  []) == (offsets[1] - 4, 0, 0, -1)


@pytest.mark.parametrize("first, pos, end", [(-1, 0, 0), (10**6, 0, 0), (None, -1, 0),
                                             (None, 8, 4), (None, 0, 10**6), (None, 0, -1),
                                             (2**70, 0, 0), (-2**70, 0, 0), (None, 2**70, 0),
                                             (None, 0, 2**70), (None, -2**70, 0)])
def test_offsets_outside_the_buffer_are_refused(gather: Gather, first: int | None, pos: int,
                                               end: int) -> None:
    mem, offsets = stream(seg(1000))
    with pytest.raises(ValueError):
        gather(mem, offsets[0] if first is None else first, pos, end, 1100, ACK, WINDOW, [])


@pytest.mark.parametrize("numbers", [(-1, ACK, WINDOW), (2**32, ACK, WINDOW), (1100, -1, WINDOW),
                                     (1100, 2**64, WINDOW), (1100, ACK, 0x10000),
                                     (1100, ACK, -2**70)])
def test_numbers_no_header_field_can_hold_are_refused(gather: Gather,
                                                      numbers: tuple[int, int, int]) -> None:
    mem, offsets = stream(seg(1000), seg(1100))
    with pytest.raises(ValueError, match="unsigned"):
        gather(mem, offsets[0], offsets[1] - 4, len(mem), *numbers, [])


def test_a_first_frame_the_fast_path_would_not_take_is_refused(gather: Gather) -> None:
    mem, offsets = stream(bytes(Ether() / IP(proto=17) / (b"u" * 60)), seg(1100))
    with pytest.raises(ValueError):
        gather(mem, offsets[0], offsets[1] - 4, len(mem), 1100, ACK, WINDOW, [])


# -- segment: one frame -------------------------------------------------------------------


def key_of(v6: bool, sport: int = 40000) -> tuple[int, bytes, int, bytes, int]:
    family = socket.AF_INET6 if v6 else socket.AF_INET
    guest, host = (GUEST6, HOST6) if v6 else (GUEST4, HOST4)
    return (6, socket.inet_pton(family, guest), sport, socket.inet_pton(family, host), 5201)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("options", [[], [("MSS", 1460), ("NOP", None), ("WScale", 7)]])
def test_a_segment_gives_its_numbers_and_flow(segment: SegmentOf, v6: bool,
                                              options: list) -> None:
    frame = seg(0xFFFFFFF0, b"p" * 33, flags="PA", ack=0x89ABCDEF, window=0xFEDC, v6=v6,
                options=options)
    mem, offsets = stream(seg(1, v6=not v6), frame)
    flow = Flow(key_of(v6), "guest", 0.0)
    off = offsets[1]
    thl = 20 + (8 if options else 0)
    data = off + (54 if v6 else 34) + thl
    assert segment(mem, off, len(frame), {key_of(v6): flow}) == \
        (tcp_run.SEG_TCP, flow, 0x18, 0xFFFFFFF0, 0x89ABCDEF, 0xFEDC, data, data + 33)
    assert segment(mem, off, len(frame), {key_of(v6, sport=40001): flow})[:2] == \
        (tcp_run.SEG_TCP, None)


def test_each_frame_finds_the_flow_as_it_is_now(segment: SegmentOf) -> None:
    """Frames of one flow in a row (the C parse keeps the key of the frame before): a flow
    gone, or replaced, since the frame before is seen as it is now."""
    frames = [seg(1000), seg(1100), seg(1200), seg(1300), seg(1400, sport=40001), seg(1500)]
    mem, offsets = stream(*frames)
    first, second = Flow(key_of(False), "guest", 0.0), Flow(key_of(False), "guest", 0.0)
    flows = {key_of(False): first}

    def flow_of(i: int) -> object:
        return segment(mem, offsets[i], len(frames[i]), flows)[1]

    assert flow_of(0) is first and flow_of(1) is first
    del flows[key_of(False)]
    assert flow_of(2) is None
    flows[key_of(False)] = second
    assert flow_of(3) is second and flow_of(4) is None and flow_of(5) is second


def test_ethernet_padding_is_not_payload(segment: SegmentOf) -> None:
    """A short IPv4 segment comes padded to Ethernet's minimum: the IP length decides."""
    frame = seg(1000, b"") + bytes(6)
    mem, offsets = stream(frame)
    data = offsets[0] + 54
    assert segment(mem, offsets[0], len(frame), {})[6:] == (data, data)


KINDS: dict[str, tuple[bytes, int]] = {
    "UDP": (bytes(Ether() / IP(src=GUEST4, dst=HOST4) / UDP() / (b"u" * 30)), tcp_run.SEG_OTHER),
    "ARP": (bytes(Ether() / ARP()), tcp_run.SEG_OTHER),
    "IPv4 options": (seg(1, ip={"options": b"\x01\x01\x01\x00"}), tcp_run.SEG_OTHER),
    "IPv6 extension header": (bytes(Ether() / IPv6(src=GUEST6, dst=HOST6) / IPv6ExtHdrHopByHop()
                                    / TCP()), tcp_run.SEG_OTHER),
    "Ethernet only": (bytes(Ether(type=0x0800)), tcp_run.SEG_OTHER),
    "IPv4 shorter than TCP's": (seg(1)[:53], tcp_run.SEG_OTHER),
    "IPv4 fragment": (seg(1, ip={"flags": "MF"}), tcp_run.SEG_BAD4),
    "IPv4 fragment offset": (seg(1, ip={"frag": 3}), tcp_run.SEG_BAD4),
    "IPv4 length past the frame": (seg(1, ip={"len": 200}), tcp_run.SEG_BAD4),
    "IPv4 TCP header too short": (seg(1, b"", ip={"len": 39}), tcp_run.SEG_BAD4),
    "TCP data offset below 5": (mangled(seg(1), 46, 0x40), tcp_run.SEG_BAD4),
    "TCP data offset past IP": (mangled(seg(1, b""), 46, 0xF0), tcp_run.SEG_BAD4),
    "IPv6 version 4": (mangled(seg(1, v6=True), 14, 0x40), tcp_run.SEG_BAD6),
    "IPv6 length past the frame": (seg(1, v6=True)[:-1], tcp_run.SEG_BAD6),
    "IPv6 TCP data offset past IP": (mangled(seg(1, b"", v6=True), 66, 0xF0), tcp_run.SEG_BAD6),
}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_what_is_no_segment_says_what_it_is(segment: SegmentOf, name: str) -> None:
    frame, kind = KINDS[name]
    mem, offsets = stream(frame)
    flows = {key_of(False): Flow(key_of(False), "guest", 0.0)}
    assert segment(mem, offsets[0], len(frame), flows) == (kind, None, 0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize("off, length", [(-1, 60), (4, 13), (4, 10**6), (2**70, 60),
                                         (-2**70, 60), (4, 2**70)])
def test_a_frame_outside_the_buffer_is_refused(segment: SegmentOf, off: int,
                                               length: int) -> None:
    mem, _offsets = stream(seg(1))
    with pytest.raises(ValueError, match="must lie in the buffer"):
        segment(mem, off, length, {})


def test_the_native_segment_refuses_what_is_no_buffer_or_dict() -> None:
    native = _native()
    mem, offsets = stream(seg(1))
    for args in ((bytes(mem), offsets[0], 60, {}), (mem, offsets[0], 60, []),
                 (mem, offsets[0], 60)):
        with pytest.raises(TypeError):
            native.segment(*args)


_FRAMES = [seg(7, b"q" * 40), seg(9, b"", flags="S", options=[("MSS", 1460)], v6=True),
           seg(11, b"r" * 3, flags="FA"), bytes(Ether() / IP(src=GUEST4, dst=HOST4) / UDP())]
_FRAMES_MEM, _FRAME_OFFSETS = stream(*_FRAMES)
_FLOWS = {key: Flow(key, "guest", 0.0) for key in (key_of(False), key_of(True))}


@given(st.integers(0, len(_FRAMES) - 1),
       st.lists(st.tuples(st.integers(0, 90), st.integers(0, 255)), max_size=5),
       st.integers(-2, 2))
def test_native_and_python_segments_agree_on_mangled_frames(
        which: int, flips: list[tuple[int, int]], trim: int) -> None:
    """Differential fuzz of the C parse: any header byte changed, the frame's length a
    little off, both engines the same (results, flow found, exceptions)."""
    native = _native()
    buf = bytearray(_FRAMES_MEM)
    off = _FRAME_OFFSETS[which]
    for at, value in flips:
        if off + at < len(buf):
            buf[off + at] = value
    length = len(_FRAMES[which]) + trim
    results = []
    for parse in (tcp_run.segment_python, native.segment):
        try:
            results.append(parse(memoryview(buf), off, length, _FLOWS))
        except ValueError as e:
            results.append(("ValueError", str(e)))
    assert results[0] == results[1]


# -- gather: a run ------------------------------------------------------------------------

_RUN = [seg(1000 + 100 * i, v6=bool(i % 5 == 4)) for i in range(8)]  # two families mixed
_BASE, _OFFSETS = stream(*_RUN)


@given(st.lists(st.tuples(st.integers(0, len(_BASE) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(_BASE)), st.integers(0, 4))
def test_native_and_python_walks_agree_on_mangled_streams(
        flips: list[tuple[int, int]], cut: int, start: int) -> None:
    """Differential fuzz of the C walk: any bytes changed anywhere (length words, headers,
    the run's own first frame), the read cut anywhere, both engines the same."""
    native = _native()
    buf = bytearray(_BASE)
    for at, value in flips:
        buf[at] = value
    first, pos = _OFFSETS[start], _OFFSETS[start + 1] - 4
    args = (first, min(pos, cut), cut, 1000 + 100 * (start + 1), ACK, WINDOW)
    results = []
    for walk in (tcp_run.gather_python, native.gather):
        views: list[memoryview] = []
        try:
            results.append((walk(memoryview(buf), *args, views), payloads(views)))
        except ValueError as e:
            results.append(("ValueError", str(e)))
    assert results[0] == results[1]


def test_the_engine_in_use_is_said() -> None:
    import os

    assert tcp_run.ENGINE in ("native", "python")
    if os.environ.get("PASSTD_NATIVE") == "0":
        assert tcp_run.gather is tcp_run.gather_python
        assert tcp_run.segment is tcp_run.segment_python
