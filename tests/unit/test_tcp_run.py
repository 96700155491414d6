"""tcp_run.gather: a run of one flow's in-order guest segments, taken in one step.

Frames are built with scapy (an independent codec). Each test runs the pure-Python path,
which is the reference, and the C twin where it is built; the differential fuzz feeds both
mangled streams and wants the same results, exceptions included.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from passtd.engine import tcp_run

GUEST4, HOST4 = "198.51.100.2", "198.51.100.1"
GUEST6, HOST6 = "2001:db8::2", "2001:db8::1"
ACK, WINDOW = 7000, 502
Gather = Callable[..., tuple[int, int, int, int]]


def _native() -> ModuleType:
    try:
        from passtd.engine import _tcp_run
    except ImportError:
        pytest.skip("the native walk is not built here (./setup.sh builds it)")
    return _tcp_run


@pytest.fixture(params=["python", "native"])
def gather(request: pytest.FixtureRequest) -> Gather:
    return tcp_run.gather_python if request.param == "python" else _native().gather


def seg(seq: int, payload: bytes = b"x" * 100, *, flags: str = "A", ack: int = ACK,
        window: int = WINDOW, sport: int = 40000, v6: bool = False, ip: dict | None = None,
        options: list | None = None) -> bytes:
    net = IPv6(src=GUEST6, dst=HOST6) if v6 else IP(src=GUEST4, dst=HOST4, **(ip or {}))
    return bytes(Ether(src="52:54:00:12:34:56", dst="9a:55:9a:55:9a:55") / net
                 / TCP(sport=sport, dport=5201, flags=flags, seq=seq, ack=ack, window=window,
                       options=options or []) / payload)


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
