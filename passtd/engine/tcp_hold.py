"""Guest data that arrived after a gap, held until the gap is filled.

Design: without it one lost frame costs the guest everything it sent after it: without
SACK it learns that only one retransmission at a time, and a large window of small
segments collapses into retransmission timeouts. `Reassembly` keeps such segments for one
flow, in sequence order, bounded by HOLD_MAX per flow and by one `HoldBudget` shared by all
the flows of an instance (a guest opening many flows gets no more than one cap); tcp.py
also refuses to hold beyond the window it offered. It tells the guest what it holds with
SACK blocks (RFC 2018), so that the guest resends only the holes.

Rules: the held bytes always equal the sum of the segments kept, and the budget's `used`
always equals the sum over its flows; `clear` gives everything back (a flow that ends, a
FIN that ends the stream).

Not done here: deciding what to hold (tcp.py's `on_segment`), SACK blocks the guest sends
about our data (ignored, as RFC 2018 allows: our retransmissions restart at the last
acknowledged byte).
"""

from __future__ import annotations

import bisect
import struct
from typing import Final

from .tcp_seg import SEQ_MASK, seq_diff

HOLD_MAX: Final = 1 << 20  # bytes of out-of-order guest data held per flow
HOLD_TOTAL_MAX: Final = 64 << 20  # ... and by all the flows of one instance (HoldBudget)
SACK_BLOCKS_MAX: Final = 4  # all that fits in our ACKs, which carry no other option


class HoldBudget:
    """Out-of-order bytes held by all the flows of one instance, against one cap."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int = HOLD_TOTAL_MAX) -> None:
        self.limit = limit
        self.used = 0


class Reassembly:
    """One flow's held segments: (seq, payload), in sequence order from `rcv_nxt`."""

    __slots__ = ("budget", "bytes", "last", "segments")

    def __init__(self, budget: HoldBudget) -> None:
        self.budget = budget
        self.segments: list[tuple[int, bytes]] = []
        self.bytes = 0
        self.last = 0  # sequence number of the segment held most recently

    def __bool__(self) -> bool:
        return bool(self.segments)

    def admits(self, plen: int) -> bool:
        """Whether `plen` more bytes fit under the flow's and the instance's caps."""
        budget = self.budget
        return self.bytes + plen <= HOLD_MAX and budget.used + plen <= budget.limit

    def add(self, seq: int, data: bytes, rcv_nxt: int) -> None:
        """Keep a segment; the same segment twice is kept once."""
        self.last = seq
        segments = self.segments
        at = bisect.bisect(segments, seq_diff(seq, rcv_nxt),
                           key=lambda e: seq_diff(e[0], rcv_nxt))
        if at and segments[at - 1][0] == seq:
            return
        segments.insert(at, (seq, data))
        self.bytes += len(data)
        self.budget.used += len(data)

    def clear(self) -> None:
        self.budget.used -= self.bytes
        self.segments.clear()
        self.bytes = 0

    def take_contiguous(self, rcv_nxt: int) -> list[bytes]:
        """The held bytes that continue the stream at `rcv_nxt`, without what it already
        has; they leave the hold."""
        nxt = rcv_nxt
        out: list[bytes] = []
        segments = self.segments
        while segments:
            seq, data = segments[0]
            offset = seq_diff(seq, nxt)
            if offset > 0:
                break
            del segments[0]
            self.bytes -= len(data)
            self.budget.used -= len(data)
            if -offset < len(data):
                piece = data[-offset:]
                out.append(piece)
                nxt = (nxt + len(piece)) & SEQ_MASK
        return out

    def sack_option(self) -> bytes:
        """SACK blocks for what is held (RFC 2018): the block holding the latest arrival
        first, as 4.3 asks; SACK_BLOCKS_MAX at most."""
        if not self.segments:
            return b""
        blocks: list[list[int]] = []
        for seq, data in self.segments:
            end = (seq + len(data)) & SEQ_MASK
            if blocks and seq_diff(seq, blocks[-1][1]) <= 0:
                if seq_diff(end, blocks[-1][1]) > 0:
                    blocks[-1][1] = end
            else:
                blocks.append([seq, end])
        last = self.last
        first = next((b for b in blocks if seq_diff(last, b[0]) >= 0
                      and seq_diff(last, b[1]) < 0), blocks[0])
        ordered = ([first] + [b for b in blocks if b is not first])[:SACK_BLOCKS_MAX]
        body = b"".join(struct.pack("!II", start, end) for start, end in ordered)
        return bytes((1, 1, 5, 2 + len(body))) + body
