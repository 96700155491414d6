"""RFC 1071 sums against a plain reference loop, on the edge cases that trip folds."""

import os
import struct
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.engine import checksum
from tests.fuzz.oracle import rfc1071 as reference

EDGE_CASES = [
    b"",
    b"\x01",
    bytes.fromhex("1234edcb"),  # sums to exactly 0xffff
    bytes(1500),
    b"\xff" * 1500,
    b"\xff" * 65535,
    os.urandom(1499),
    os.urandom(1501),
    os.urandom(65480),
    os.urandom(65536),
    *[os.urandom(n) for n in range(0, 70)],
    *[os.urandom(n) for n in range(1020, 1030)],  # around the numpy threshold
]


@pytest.mark.parametrize("buf", EDGE_CASES, ids=lambda b: f"{len(b)}B")
def test_checksum_matches_reference(buf: bytes) -> None:
    assert checksum.checksum(buf) == reference(buf)
    assert checksum.checksum(bytearray(buf)) == reference(buf)
    assert checksum.checksum(memoryview(buf)) == reference(buf)


@given(st.binary(max_size=5000), st.integers(0, 64))
def test_partial_at_any_offset(data: bytes, offset: int) -> None:
    buf = os.urandom(offset) + data
    assert checksum.finish(checksum.partial(buf, offset, len(data))) == reference(data)


@given(st.binary(min_size=2, max_size=4000).filter(lambda b: len(b) % 2 == 0),
       st.binary(max_size=4000))
def test_partials_add_up(first: bytes, second: bytes) -> None:
    total = checksum.partial(first) + checksum.partial(second)
    assert checksum.finish(total) == reference(first + second)


@pytest.mark.parametrize(("rows", "length", "stride"), [(1, 1460, 1518), (45, 1460, 1518),
                                                        (3, 65480, 65538), (7, 4, 9)])
def test_sum_rows_equals_per_row_sums(rows: int, length: int, stride: int) -> None:
    offset = 58
    buf = bytearray(os.urandom(offset + rows * stride))
    sums = checksum.sum_rows(buf, offset, stride, rows, length)
    for i, s in enumerate(sums):
        row = bytes(buf[offset + i * stride : offset + i * stride + length])
        assert checksum.finish(s) == reference(row)


def test_pseudo_headers_match_scapy_view() -> None:
    src4, dst4 = bytes([198, 51, 100, 1]), bytes([198, 51, 100, 2])
    raw = src4 + dst4 + struct.pack("!BBH", 0, 17, 28)
    assert checksum.finish(checksum.pseudo4(src4, dst4, 17, 28)) == reference(raw)
    src6, dst6 = os.urandom(16), os.urandom(16)
    raw6 = src6 + dst6 + struct.pack("!I3xB", 70000, 6)
    assert checksum.finish(checksum.pseudo6(src6, dst6, 6, 70000)) == reference(raw6)


# -- both engines side by side, whichever this process runs (CI runs the suite with each) -----


def _native() -> ModuleType:
    try:
        from passtd.engine import _csum
    except ImportError:
        pytest.skip("the native checksum is not built here (./setup.sh builds it)")
    return _csum


@given(st.binary(max_size=3000), st.integers(0, 40), st.integers(0, 40))
def test_native_and_python_sums_agree(data: bytes, before: int, after: int) -> None:
    """Differential fuzz of the C sum: any bytes at any offset, any length, summed by
    both engines, fold to the reference's checksum."""
    native = _native()
    buf = bytearray(os.urandom(before) + data + os.urandom(after))
    want = reference(data)
    assert checksum.finish(native.partial(buf, before, len(data))) == want
    assert checksum.finish(checksum.partial_python(buf, before, len(data))) == want
    assert checksum.finish(native.partial(memoryview(buf)[before:before + len(data)])) == want


@given(st.integers(1, 12), st.sampled_from([4, 8, 12, 1460, 1464]), st.integers(0, 9),
       st.integers(0, 3))
def test_native_and_python_row_sums_agree(rows: int, length: int, gap: int,
                                          offset: int) -> None:
    native = _native()
    stride = length + gap
    buf = bytearray(os.urandom(offset + rows * stride))
    got = [checksum.finish(s) for s in native.sum_rows(buf, offset, stride, rows, length)]
    assert got == [checksum.finish(s)
                   for s in checksum.sum_rows_python(buf, offset, stride, rows, length)]


@pytest.mark.parametrize("args", [(-1, 4), (0, 99), (10, 1), (5, -2), (11, -1)])
def test_native_refuses_regions_outside_the_buffer(args: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        _native().partial(bytes(10), *args)


@pytest.mark.parametrize("args", [(0, 10, 2, 11), (0, -1, 1, 4), (0, 4, -1, 4),
                                  (8, 0, 1, 4), (0, 2**62, 3, 4)])
def test_native_refuses_rows_outside_the_buffer(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        _native().sum_rows(bytes(10), *args)
    assert _native().sum_rows(bytes(10), 0, 4, 0, 4) == []


@pytest.mark.parametrize("args", [(), ("abc",), (bytes(4), "1"), (bytes(4), 0, 1, 2),
                                  (bytes(4), 1.0)])
def test_native_refuses_wrong_arguments(args: tuple[object, ...]) -> None:
    with pytest.raises(TypeError):
        _native().partial(*args)
    with pytest.raises(TypeError):
        _native().sum_rows(*args)


def test_native_sums_a_long_region_as_a_short_one() -> None:
    """Past the length where the GIL is released, the same sum."""
    buf = os.urandom(70000)
    assert checksum.finish(_native().partial(buf, 1, 69999)) == reference(buf[1:])


def test_the_engine_in_use_is_said() -> None:
    assert checksum.ENGINE in ("native", "python")
    if os.environ.get("PASSTD_NATIVE") == "0":
        assert checksum.ENGINE == "python"
