"""The instance's loop: the poller, timers and signals, and no asyncio.

Design: an instance waits on one epoll set (poller.py) and otherwise on time. `MainLoop`
is what the engine and the service ask of a loop, and no more: readiness callbacks (its
poller's add_reader/add_writer), timers (`call_at`, `call_later`, `call_soon`, on a heap of
its own, waited for through one poller deadline), signals (`add_signal_handler`, through
signal.set_wakeup_fd, as asyncio does it) and `run_forever` until `stop`. All of it runs
from inside the poller's `select`, so whatever calls `select` runs the instance:
- without the D-Bus API, `run_forever` does, and asyncio is never imported: it and what it
  imports are ~1.8 MiB of a bus-less instance's ~12 (`passtd bench --density`), and its
  loop's iteration a few µs of interpreted code per wakeup;
- with it, asyncio's loop does (aioloop.py's `EngineLoop`, built on this poller), as
  dbus-fast needs asyncio: the engine's callbacks and timers run from inside its `select`
  all the same.

Rules, kept true by every method:
- a timer runs once and not before its time (the poller waits whole milliseconds, rounded
  up), in the order of its time, then of its arming; `call_soon`'s run after the readiness
  callbacks of the turn they were queued in or of the next, in the order they were
  called, before the timers then due; a cancelled one does not run;
- cancelled timers do not pile up: when they are more than half of a heap of over
  `_CLEANUP_AT`, the heap is rebuilt without them (a guest that keeps re-arming one far
  timer would otherwise grow it without bound, as asyncio's would but for the same rule);
- a callback's exception goes to the exception handler (logged, or the one set) and costs
  that callback only;
- one clock (`clock`, time.monotonic unless given): `time()`, the timers and the poller's
  deadlines all read it;
- `stop` ends `run_forever` after the current turn; asked before it, `run_forever`
  returns without waiting.

Not done here: futures, tasks and coroutines (the bus's asyncio has them), threads.
"""

from __future__ import annotations

import heapq
import logging
import math
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, Final

from .poller import Poller

log = logging.getLogger("passtd.loop")

_CLEANUP_AT: Final = 64  # heap size from which cancelled timers are weeded out


class Timer:
    """One call at a time of the loop's clock; `cancel` before it runs and it does not."""

    def __init__(self, loop: MainLoop | None, callback: Callable[..., object],
                 args: tuple[Any, ...]) -> None:
        self.heap_owner = loop  # the loop whose heap holds it (None: call_soon's queue)
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        # until its time comes or it is weeded out the heap keeps it: not what it would
        # have called (a bound method keeps its object, and an engine, alive)
        self.callback, self.args = _cancelled, ()
        if self.heap_owner is not None:
            self.heap_owner.timer_cancelled()


def _cancelled() -> None:
    """What a cancelled timer holds instead of its callback."""


def _ignore_signal(_signum: int, _frame: object) -> None:
    """Python-level handler of a watched signal: the wake-up descriptor carries it."""


class MainLoop:
    """Readiness callbacks, timers and signals of one instance, run by its poller's select."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.poller = Poller()
        self.poller.clock = clock
        self.poller.on_error = self.call_exception_handler
        self._heap: list[tuple[float, int, Timer]] = []
        self._armed = 0  # timers armed so far: the order among equal times
        self._cancelled = 0  # cancelled timers still in the heap
        self._soon: list[Timer] = []
        self._due = self.poller.deadline(self._run_timers)
        self._stopping = False
        self._running = False
        self._closed = False
        self._exception_handler: Callable[[MainLoop, dict[str, Any]], object] | None = None
        self._signals: dict[int, tuple[Callable[..., object], tuple[Any, ...]]] = {}
        self._signals_before: dict[int, Any] = {}  # their handlers before ours: put back
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._wakeup_before = -1

    def time(self) -> float:
        return self.clock()

    # -- readiness: the poller's, as asyncio's loop names them ----------------------------------

    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        self._open()
        self.poller.add_reader(fd, callback, args)

    def remove_reader(self, fd: int) -> bool:
        return False if self._closed else self.poller.remove_reader(fd)

    def add_writer(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        self._open()
        self.poller.add_writer(fd, callback, args)

    def remove_writer(self, fd: int) -> bool:
        return False if self._closed else self.poller.remove_writer(fd)

    # -- timers ------------------------------------------------------------------------------

    def call_soon(self, callback: Callable[..., object], *args: Any) -> Timer:
        self._open()
        timer = Timer(None, callback, args)
        self._soon.append(timer)
        self._due.arm(-math.inf)
        return timer

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        return self.call_at(self.clock() + delay, callback, *args)

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Timer:
        self._open()
        timer = Timer(self, callback, args)
        self._armed += 1
        heapq.heappush(self._heap, (when, self._armed, timer))
        if when < self._due.when:
            self._due.arm(when)
        return timer

    @property
    def timers_held(self) -> int:
        """Timers the heap holds, cancelled ones not yet weeded out included."""
        return len(self._heap)

    def timer_cancelled(self) -> None:
        """A timer of the heap was cancelled (Timer.cancel): weed them out when they are
        most of it."""
        self._cancelled += 1
        if len(self._heap) > _CLEANUP_AT and 2 * self._cancelled > len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0
            self._arm_due()

    def _run_timers(self) -> None:
        soon, self._soon = self._soon, []  # what these queue runs on the next turn
        for timer in soon:
            if not timer.cancelled:
                self.poller.run_callback(timer.callback, timer.args)
        heap = self._heap
        now = self.clock()
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            if timer.cancelled:
                self._cancelled -= 1
            else:
                timer.cancelled = True  # run: a cancel from now on changes nothing
                timer.heap_owner = None
                self.poller.run_callback(timer.callback, timer.args)
            heap = self._heap  # a callback's cancel may have rebuilt it
        self._arm_due()

    def _arm_due(self) -> None:
        if self._soon:
            self._due.arm(-math.inf)
            return
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
            self._cancelled -= 1
        if heap:
            self._due.arm(heap[0][0])
        else:
            self._due.cancel()

    # -- errors ------------------------------------------------------------------------------

    def set_exception_handler(self,
                              handler: Callable[[MainLoop, dict[str, Any]], object] | None
                              ) -> None:
        self._exception_handler = handler

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        if self._exception_handler is not None:
            self._exception_handler(self, context)
            return
        exception = context.get("exception")
        log.error("%s", context.get("message", "error in the loop"),
                  exc_info=(type(exception), exception, exception.__traceback__)
                  if isinstance(exception, BaseException) else None)

    # -- signals -----------------------------------------------------------------------------

    def add_signal_handler(self, sig: int, callback: Callable[..., object], *args: Any) -> None:
        """`callback(*args)` on the loop's next turn after `sig` arrives (main thread only,
        as signal.signal)."""
        self._open()
        if self._wakeup is None:
            reader, writer = socket.socketpair()
            reader.setblocking(False)
            writer.setblocking(False)
            try:
                self._wakeup_before = signal.set_wakeup_fd(writer.fileno(),
                                                           warn_on_full_buffer=False)
            except ValueError:
                reader.close()
                writer.close()
                raise
            self._wakeup = (reader, writer)
            self.poller.add_reader(reader.fileno(), self._read_signals, ())
        before = signal.signal(sig, _ignore_signal)
        self._signals_before.setdefault(sig, before)
        self._signals[sig] = (callback, args)
        signal.siginterrupt(sig, False)

    def remove_signal_handler(self, sig: int) -> bool:
        """The signal's handler before ours back; False if we had none."""
        if self._signals.pop(sig, None) is None:
            return False
        before = self._signals_before.pop(sig)
        signal.signal(sig, before if before is not None else signal.SIG_DFL)
        return True

    def _read_signals(self) -> None:
        assert self._wakeup is not None
        while True:
            try:
                data = self._wakeup[0].recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            for signum in data:
                handler = self._signals.get(signum)
                if handler is not None:
                    self.call_soon(handler[0], *handler[1])

    # -- running -----------------------------------------------------------------------------

    def run_forever(self) -> None:
        """Wait and run callbacks until `stop`."""
        self._open()
        if self._running:
            raise RuntimeError("the loop is already running")
        self._running = True
        select = self.poller.select
        try:
            while not self._stopping:
                select(None)
        finally:
            self._running = False
            self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Forget timers, put back the signals' handlers and wake-up descriptor from before
        (SIGINT's is KeyboardInterrupt's), close the poller."""
        if self._closed:
            return
        self._closed = True
        for sig in list(self._signals):
            self.remove_signal_handler(sig)
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._wakeup_before)
            for sock in self._wakeup:
                sock.close()
            self._wakeup = None
        self._heap.clear()
        self._soon.clear()
        self.poller.close()

    def _open(self) -> None:
        if self._closed:
            raise RuntimeError("Event loop is closed")
