"""Stream framing: any split of the byte stream gives the same frames; bad lengths fail."""

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.engine.tap import FrameReader, FramingError, TapOutput


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
        out += [bytes(reader.buf[off : off + n]) for off, n in reader.frames()]
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
    frames = reader.frames()
    assert next(frames)[1] == 20
    with pytest.raises(FramingError):
        next(frames)


def test_output_keeps_the_unsent_rest_in_order() -> None:
    out = TapOutput()
    out.frame(b"a" * 20)
    out.framed(memoryview(struct.pack("!I", 30) + b"b" * 30), 1)
    out.frame(b"c" * 40)
    batch = out.take()
    expected = b"".join(bytes(b) for b in batch)
    assert not out.sent(batch, 10)  # a short send: congested
    assert out.congested
    out.frame(b"d" * 14)
    batch = out.take()
    rest = b"".join(bytes(b) for b in batch)
    assert rest == expected[10:] + struct.pack("!I", 14) + b"d" * 14
    assert out.sent(batch, len(rest))
    assert not out.pending()
