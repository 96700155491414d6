"""Flow timers: one lazy heap of deadlines for every flow of an instance, without a clock.

Design: flows keep a `deadline` (flow.py's timer contract). `FlowTimers` holds heap
entries [deadline, seq, flow]; the engine asks it for the flows that are due at `now` and
for the next deadline, and owns the one poller deadline (poller.py) that waits for it. Entries
are lazy: a flow whose deadline moved later keeps its old entry and is re-queued when that
entry comes up, so the hot path never touches the heap because an ACK pushed a
retransmission timeout out. With no flows the heap is empty and the engine sleeps: no
periodic wakeups.

Rules, kept true by every method:
- a flow with a deadline has exactly one live entry (`flow.timer_entry`), at or before
  its deadline, in the heap;
- an entry whose flow is gone or was superseded is stale (its flow slot is None) and is
  dropped when it reaches the top, due or not: stale entries never wake anyone;
- stale entries are at most STALE_TIMERS_MAX or half the heap: past that it is rebuilt.

Not done here: reading a clock or arming a loop timer (the engine), what a flow does
when it is due (its `handle_timer`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any, Final

from .flow import Flow

STALE_TIMERS_MAX: Final = 4096  # stale heap entries tolerated before a rebuild


class FlowTimers:
    def __init__(self) -> None:
        self._heap: list[list[Any]] = []  # [deadline, seq, flow or None when stale]
        self._stale = 0
        self._seq = itertools.count()

    def __len__(self) -> int:
        """Live entries."""
        return len(self._heap) - self._stale

    def schedule(self, flow: Flow) -> bool:
        """Make sure the flow's deadline is in the heap; True when it took a new entry
        (the engine then arms its timer if that is earlier than the one it waits for)."""
        at = flow.deadline
        entry = flow.timer_entry
        if at is None or (entry is not None and entry[0] <= at):
            return False
        if entry is not None:
            self._drop(entry)  # superseded by this earlier one
        entry = flow.timer_entry = [at, next(self._seq), flow]
        heapq.heappush(self._heap, entry)
        return True

    def cancel(self, flow: Flow) -> None:
        """The flow is gone: its entry goes stale and lets go of it at once."""
        if flow.timer_entry is not None:
            self._drop(flow.timer_entry)
            flow.timer_entry = None

    def due(self, now: float) -> list[Flow]:
        """Take the flows whose deadline has passed; flows whose deadline moved later are
        re-queued. The caller runs their `handle_timer` and schedules them again."""
        heap = self._heap
        out = []
        while heap and (heap[0][2] is None or heap[0][0] <= now):
            _, _, flow = heapq.heappop(heap)
            if flow is None:
                self._stale = max(0, self._stale - 1)
                continue
            flow.timer_entry = None
            if flow.deadline is None:
                continue
            if flow.deadline > now:
                self.schedule(flow)
                continue
            out.append(flow)
        return out

    def next_deadline(self) -> float | None:
        """When the earliest entry comes up (a stale one included: popping it is cheap,
        and the flow it superseded has a later live entry)."""
        return self._heap[0][0] if self._heap else None

    def problems(self, flows: list[Flow], armed_at: float = -math.inf) -> list[str]:
        """Where the rules above do not hold for `flows`, or a live entry comes before
        `armed_at`, the time the engine's timer waits for (the fuzz targets check)."""
        live = {id(entry): entry[0] for entry in self._heap if entry[2] is not None}
        out = [f"{flow!r}: its deadline is not scheduled" for flow in flows
               if flow.deadline is not None and not (
                   flow.timer_entry is not None and flow.timer_entry[0] <= flow.deadline
                   and flow.timer_entry[2] is flow and id(flow.timer_entry) in live)]
        if live and min(live.values()) < armed_at:
            out.append(f"the timer waits for {armed_at}, a deadline is at {min(live.values())}")
        return out

    def _drop(self, entry: list[Any]) -> None:
        entry[2] = None
        self._stale += 1
        if self._stale > STALE_TIMERS_MAX and self._stale * 2 > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._stale = 0
