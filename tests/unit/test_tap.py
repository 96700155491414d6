"""Stream framing: any split of the byte stream gives the same frames; bad lengths fail."""

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.engine.tap import IOV_MAX, FrameReader, FramingError, TapOutput, with_prefix


def framed(frames: list[bytes]) -> bytes:
    return b"".join(struct.pack("!I", len(f)) + f for f in frames)


def feed(reader: FrameReader, data: bytes, cuts: list[int]) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        piece = data[pos:cut]
        pos = cut
        space = reader.space()
        space[: len(piece)] = piece
        reader.commit(len(piece))
        while (off := reader.next_frame()) >= 0:
            out.append(bytes(reader.buf[off : off + reader.frame_len]))
    return out


frame_st = st.binary(min_size=14, max_size=3000)


@given(st.lists(frame_st, min_size=1, max_size=20), st.lists(st.integers(0, 60000), max_size=30))
def test_frames_survive_any_split(frames: list[bytes], cuts: list[int]) -> None:
    data = framed(frames)
    cuts = [c % (len(data) + 1) for c in cuts]
    assert feed(FrameReader(1 << 17), data, cuts) == frames


def test_byte_by_byte_and_max_size_frames() -> None:
    frames = [os.urandom(65535), os.urandom(14), os.urandom(60)]
    data = framed(frames)
    reader = FrameReader(1 << 17)
    assert feed(reader, data, list(range(0, len(data), 7919))) == frames
    assert feed(FrameReader(1 << 17), data[:300], list(range(300))) == []


@pytest.mark.parametrize("length", [0, 13, 65536, 0xFFFFFFFF])
def test_bad_length_is_a_framing_error(length: int) -> None:
    reader = FrameReader(1 << 17)
    data = framed([os.urandom(20)]) + struct.pack("!I", length) + bytes(20)
    space = reader.space()
    space[: len(data)] = data
    reader.commit(len(data))
    assert reader.next_frame() == 4 and reader.frame_len == 20
    with pytest.raises(FramingError):
        reader.next_frame()


def test_output_keeps_the_unsent_rest_in_order() -> None:
    out = TapOutput()
    out.prefixed(with_prefix(b"a" * 20))
    out.framed(memoryview(struct.pack("!I", 30) + b"b" * 30), 1)
    out.prefixed(with_prefix(b"c" * 40))
    batch = out.take()
    expected = b"".join(bytes(b) for b in batch)
    assert not out.sent(batch, 10)  # a short send: congested
    assert out.congested
    out.prefixed(with_prefix(b"d" * 14))
    batch = out.take()
    rest = b"".join(bytes(b) for b in batch)
    assert rest == expected[10:] + struct.pack("!I", 14) + b"d" * 14
    assert out.sent(batch, len(rest))
    assert not out.pending()


def test_output_sent_in_full_starts_a_new_queue() -> None:
    """Without a backlog `take` hands out the queue itself (no copy per flush): once sent,
    what is queued next goes to a new one, and the batch sent is left as it was."""
    out = TapOutput()
    out.prefixed(with_prefix(b"a" * 20))
    out.prefixed(with_prefix(b"b" * 30))
    batch = out.take()
    assert out.sent(batch, 24 + 34)
    assert not out.pending() and not out.congested
    out.prefixed(with_prefix(b"c" * 14))
    assert [bytes(b)[4:5] for b in batch] == [b"a", b"b"]
    assert [bytes(b) for b in out.take()] == [struct.pack("!I", 14) + b"c" * 14]


def test_output_takes_at_most_iov_max_buffers() -> None:
    out = TapOutput()
    for _ in range(IOV_MAX + 3):
        out.prefixed(with_prefix(b"x" * 14))
    batch = out.take()
    assert len(batch) == IOV_MAX
    assert out.sent(batch, IOV_MAX * 18)
    assert len(out.take()) == 3
