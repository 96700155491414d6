"""Internet checksum (RFC 1071) for frames we build for the guest.

Design: the one's-complement sum is byte-order independent, so a buffer is summed as
native words into a wide accumulator, folded to 16 bits and byte-swapped. Two engines:

  - native (`_csum`, a C extension setup.sh builds, the default where it is built): every
    sum, small or large, one C call; `sum_rows` a whole batch of segments in one call;
  - pure Python (no `_csum`, or PASSTD_NATIVE=0): large buffers with numpy (one C loop,
    ~3 GB/s), small ones (headers, control packets; below ~1 KiB numpy's per-call
    overhead dominates) with a bigint fold; `sum_rows` in one numpy call.

Both give the same sums (tests/unit/test_checksum.py compares them on random buffers, and
CI runs the unit tests with each). Why a native part at all: numpy costs an instance ~15
MiB of resident memory once it carried bulk data, and Python's integers alone sum a 64 KiB
frame at ~1.3 GB/s, a second of CPU per second at 10 Gbit/s (docs/BENCHMARK.md,
"Checksums"; the C loop: ~40 GB/s).

Partial sums are plain Python ints in big-endian 16-bit word order, not yet folded, so
callers can add the pseudo-header, header and payload sums in any order and `finish()` once.

numpy is imported on first use, by the pure-Python path only: an instance that never
carries bulk data (most of them, most of the time) does not pay for it either way.

Not done here: verifying checksums of guest frames. Like passt we trust virtio/qemu and
never verify on receive (it would cost 2.6x at MTU 1500).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from types import ModuleType
from typing import Final, Protocol

from . import NATIVE_WANTED

_NUMPY_MIN: Final = 1024  # below this many bytes the bigint fold is faster than a numpy call
_FOLD_MASKS: dict[int, int] = {}
_ADDR6_WORDS: Final = struct.Struct("!8I")  # two IPv6 addresses
_numpy: ModuleType | None = None


class _Native(Protocol):
    def partial(self, buf: bytes | bytearray | memoryview | mmap.mmap, offset: int,
                length: int, /) -> int: ...

    def sum_rows(self, buf: bytes | bytearray | memoryview | mmap.mmap, offset: int,
                 stride: int, rows: int, length: int, /) -> list[int]: ...


_native: _Native | None = None
if NATIVE_WANTED:
    with contextlib.suppress(ImportError):  # not built here: the pure-Python path
        from . import _csum

        _native = _csum
ENGINE: Final = "native" if _native is not None else "python"  # which one this process runs


def _np() -> ModuleType:
    global _numpy
    if _numpy is None:
        # numpy's BLAS would start a thread per core at import: we never multiply matrices
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        import numpy

        _numpy = numpy
    return _numpy


def _fold_bigint(n: int) -> int:
    """Fold an arbitrarily long big-endian word sum down to at most 17 bits."""
    bits = n.bit_length()
    while bits > 32:
        half = ((bits + 31) // 32) * 16
        mask = _FOLD_MASKS.get(half)
        if mask is None:
            mask = _FOLD_MASKS[half] = (1 << half) - 1
        n = (n & mask) + (n >> half)
        bits = n.bit_length()
    return (n & 0xFFFF) + (n >> 16)


def _sum_small(buf: bytes | bytearray | memoryview) -> int:
    n = len(buf)
    value = int.from_bytes(buf, "big")
    if n & 1:
        value <<= 8
    return _fold_bigint(value)


def _swap16(v: int) -> int:
    v = (v & 0xFFFF) + (v >> 16)
    v = (v & 0xFFFF) + (v >> 16)
    return ((v & 0xFF) << 8) | (v >> 8)


def partial(buf: bytes | bytearray | memoryview, offset: int = 0,
            length: int | None = None) -> int:
    """One's-complement sum of buf[offset:offset+length] in big-endian words, not yet
    complemented (and, from the pure-Python path, not yet folded)."""
    if _native is not None:
        return _native.partial(buf, offset, -1 if length is None else length)
    return partial_python(buf, offset, length)


def partial_python(buf: bytes | bytearray | memoryview, offset: int = 0,
                   length: int | None = None) -> int:
    """`partial` by the pure-Python path."""
    if length is None:
        length = len(buf) - offset
    if length < _NUMPY_MIN:
        return _sum_small(memoryview(buf)[offset : offset + length])
    words = length >> 2
    np = _numpy or _np()
    le = int(np.frombuffer(buf, dtype="<u4", count=words, offset=offset).sum(dtype=np.uint64))
    le = (le & 0xFFFFFFFF) + (le >> 32)
    le = (le & 0xFFFFFFFF) + (le >> 32)
    total = _swap16((le & 0xFFFF) + (le >> 16))
    tail = length & 3
    if tail:
        start = offset + (words << 2)
        total += _sum_small(memoryview(buf)[start : start + tail])
    return total


def sum_rows(buf: bytearray | memoryview | mmap.mmap, offset: int, stride: int, rows: int,
             length: int) -> list[int]:
    """Partial sums of `rows` payloads of `length` bytes each, `stride` bytes apart.

    One call for the whole batch. `length` must be a multiple of 4; callers sum a short
    last row separately with `partial`.
    """
    if _native is not None:
        return _native.sum_rows(buf, offset, stride, rows, length)
    return sum_rows_python(buf, offset, stride, rows, length)


def sum_rows_python(buf: bytearray | memoryview | mmap.mmap, offset: int, stride: int,
                    rows: int, length: int) -> list[int]:
    """`sum_rows` by the pure-Python path (numpy)."""
    np = _numpy or _np()
    view = np.lib.stride_tricks.as_strided(
        np.frombuffer(buf, dtype=np.uint8, count=(rows - 1) * stride + length, offset=offset),
        shape=(rows, length),
        strides=(stride, 1),
    )
    le = view.view("<u4").sum(axis=1, dtype=np.uint64)
    le = (le & 0xFFFFFFFF) + (le >> 32)
    le = (le & 0xFFFFFFFF) + (le >> 32)
    le = (le & 0xFFFF) + (le >> 16)
    le = (le & 0xFFFF) + (le >> 16)
    swapped = ((le & 0xFF) << 8) | (le >> 8)
    sums: list[int] = swapped.tolist()
    return sums


def finish(total: int) -> int:
    """Fold a partial sum and complement it: the value to store in a checksum field."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def checksum(buf: bytes | bytearray | memoryview) -> int:
    """Complete checksum of one buffer (e.g. an IPv4 header or an ICMP message)."""
    return finish(partial(buf))


def pseudo4(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Partial sum of the IPv4 pseudo-header."""
    s = int.from_bytes(src, "big")
    d = int.from_bytes(dst, "big")
    return (s >> 16) + (s & 0xFFFF) + (d >> 16) + (d & 0xFFFF) + proto + length


def pseudo6(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Partial sum of the IPv6 pseudo-header (RFC 8200 section 8.1). The addresses are
    summed as 32-bit words: as 128-bit integers, folding them cost ~8000 instructions in
    the compiled engine (big-integer arithmetic), a tenth of an IPv6 request/response."""
    words: tuple[int, ...] = _ADDR6_WORDS.unpack(src + dst)
    total = sum(words)
    return (total >> 16) + (total & 0xFFFF) + (length >> 16) + (length & 0xFFFF) + proto


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Pseudo-header sum for either family (by address length)."""
    if len(src) == 4:
        return pseudo4(src, dst, proto, length)
    return pseudo6(src, dst, proto, length)
