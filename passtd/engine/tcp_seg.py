"""TCP numbers that need no connection state: segments, options, sequence arithmetic, ISNs.

Design: tcp.py's `TcpConn` decides every segment a flow sends; this module holds what those
decisions are made of and what the engine needs before a flow exists:

- `Segment`: a whole control segment for the guest (flags, seq, ack, window field,
  options), as `TcpConn.control` returns it and `tcp_buf.ControlFrames` frames it. The socket
  half (tcp_sock.py) only addresses and sends it.
- `initial_sequence`: RFC 6528, a keyed hash of the connection plus a 4-microsecond clock.
- `our_mss`: the largest segment our frames carry for the link's MTU.
- `reset_for_unknown` (RFC 9293 3.10.7.1) and `refusal`: the answers for segments that have
  no flow, or whose flow could not be opened.
- the SYN options we parse (MSS, window scale, SACK permitted) and those we send.

Not done here: timestamps and the other options (tcp.py's docstring says why), checksums
and headers (packet.py, tcp_buf.py).
"""

from __future__ import annotations

import struct
from typing import Final

from .packet import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

SEQ_MASK: Final = 0xFFFFFFFF
MAX_WSCALE: Final = 14
MAX_FRAME: Final = 65535 - 14  # the largest IP packet an Ethernet frame of ours carries
_OPT_MSS: Final = struct.Struct("!BBH")


class Segment:
    """A TCP segment without payload, for the guest: every number the header needs. A
    class of its own, not a NamedTuple: compiled, making one costs a tenth (three per
    connection), and nothing unpacks it."""

    def __init__(self, flags: int, seq: int, ack: int, window: int,
                 options: bytes = b"") -> None:
        self.flags = flags
        self.seq = seq
        self.ack = ack
        self.window = window  # the 16-bit field, already scaled
        self.options = options

    def fields(self) -> tuple[int, int, int, int, bytes]:
        return self.flags, self.seq, self.ack, self.window, self.options

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Segment) and self.fields() == other.fields()

    def __repr__(self) -> str:
        return "Segment(flags={:#x}, seq={}, ack={}, window={}, options={!r})".format(
            *self.fields())


class SynOptions:
    """What a SYN's options said. A compiled class, as Segment is: a NamedTuple made
    per connection ran interpreted code."""

    def __init__(self, mss: int | None, wscale: int | None, sack: bool) -> None:
        self.mss = mss
        self.wscale = wscale
        self.sack = sack  # SACK permitted (RFC 2018)

    def fields(self) -> tuple[int | None, int | None, bool]:
        return self.mss, self.wscale, self.sack

    def __repr__(self) -> str:
        return "SynOptions(mss={}, wscale={}, sack={})".format(*self.fields())


NO_SYN_OPTIONS: Final = SynOptions(None, None, False)


def seq_diff(a: int, b: int) -> int:
    """a - b in sequence space, as a signed 32-bit value."""
    d = (a - b) & SEQ_MASK
    return d - (1 << 32) if d & 0x80000000 else d


def parse_options(opts: bytes | memoryview) -> SynOptions:
    """MSS, window scale and SACK-permitted from a SYN; malformed options end the walk."""
    mss = wscale = None
    sack = False
    opts = bytes(opts)  # (a memoryview's items cost a generic call each; bytes' do not)
    i, n = 0, len(opts)
    while i < n:
        kind = opts[i]
        if kind == 0:  # end of options
            break
        if kind == 1:  # NOP
            i += 1
            continue
        if i + 1 >= n:
            break
        length = opts[i + 1]
        if length < 2 or i + length > n:
            break
        if kind == 2 and length == 4:
            mss = (opts[i + 2] << 8) | opts[i + 3]
        elif kind == 3 and length == 3:
            wscale = min(opts[i + 2], MAX_WSCALE)
        elif kind == 4 and length == 2:
            sack = True
        i += length
    return SynOptions(mss, wscale, sack)


def syn_options(mss: int, wscale: int | None, sack: bool) -> bytes:
    """MSS, NOP + window scale when the other side offered scaling (RFC 7323), and NOPs +
    SACK-permitted when it offered SACK (or when we open: then we offer).

    Every argument is ours (the MSS our MTU allows, our window scale, whether we use
    SACK), so an instance sends a handful of distinct option blocks: each is built once,
    not on every SYN (crr: building them was ~3% of a connection's interpreted work)."""
    key = (mss, wscale, sack)
    opts = _syn_options_built.get(key)
    if opts is None:
        if len(_syn_options_built) >= SYN_OPTIONS_KEPT:  # MTU changes: never grows unbounded
            _syn_options_built.clear()
        opts = _syn_options_built[key] = _build_syn_options(mss, wscale, sack)
    return opts


SYN_OPTIONS_KEPT: Final = 64
_syn_options_built: dict[tuple[int, int | None, bool], bytes] = {}


def _build_syn_options(mss: int, wscale: int | None, sack: bool) -> bytes:
    opts = _OPT_MSS.pack(2, 4, mss)
    if wscale is not None:
        opts += bytes((1, 3, 3, wscale))
    if sack:
        opts += bytes((1, 1, 4, 2))
    return opts


def initial_sequence(secret: bytes, key: tuple[object, ...], now: float) -> int:
    """RFC 6528: a keyed hash of the connection plus a 4-microsecond clock, so that a new
    connection with the same addresses starts above the old one's numbers."""
    return (hash((secret, key)) + int(now * 250_000)) & SEQ_MASK


def our_mss(family: int, mtu: int) -> int:
    """The MSS we announce: what one frame of ours carries on a link of `mtu` (0: the
    largest, 65520, as passt)."""
    return min(mtu or 65520, MAX_FRAME) - (40 if family == 4 else 60)


def reset_for_unknown(flags: int, seq: int, ack: int, plen: int) -> Segment | None:
    """RFC 9293 3.10.7.1: the RST for a segment that belongs to no connection; none for
    a RST."""
    if flags & TCP_RST:
        return None
    if flags & TCP_ACK:
        return Segment(TCP_RST, ack, 0, 0)
    seg_len = plen + (1 if flags & TCP_SYN else 0) + (1 if flags & TCP_FIN else 0)
    return Segment(TCP_RST | TCP_ACK, 0, (seq + seg_len) & SEQ_MASK, 0)


def refusal(syn_seq: int) -> Segment:
    """The answer to a guest SYN we cannot serve (connect refused, no route, limits): a
    RST as from a closed port."""
    return Segment(TCP_RST | TCP_ACK, 0, (syn_seq + 1) & SEQ_MASK, 0)
