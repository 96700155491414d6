"""The instance's epoll set: readiness callbacks and deadlines run straight off epoll.

Design: `Poller` keeps the callbacks registered through a loop's `add_reader/add_writer`
(the engine's sockets, qemu's stream, the D-Bus connection) and runs them from inside
`select`, straight from the epoll result: no Handle, no queue, no second look-up; and the
deadlines (below), which `select` waits for and runs the same way. Whatever calls
`select` runs the instance: `MainLoop.run_forever` (mainloop.py, whose timers and signals
are a deadline and a reader here), or with the D-Bus API asyncio's loop (aioloop.py),
for which the Poller is also the selector (`selectors.BaseSelector`'s methods, which
`asyncio.SelectorEventLoop` takes as an argument): what asyncio registers for itself (its
wake-up pipe, transports) goes through those methods and comes back from `select` as it
expects. Through asyncio's own selector every ready callback was wrapped in a Handle,
queued and run from the queue: in interpreted code, about as much time per event as the
compiled engine spends on an ACK. (Waiting on inside `select` while only the loop's
callbacks were ready, to skip asyncio's iteration too, was measured and dropped:
request/response used more CPU, not less; docs/BENCHMARK.md, "The engine's own poller".)

Rules, kept true by every method:
- a descriptor is either the loop's (add_reader/add_writer) or asyncio's own (register):
  the loop's add/remove calls on one of asyncio's go to asyncio's own implementation
  (asyncio makes them itself, ending a sock_connect or sock_recv), and asyncio registering
  one of the loop's is an error, as the kernel has one epoll entry per descriptor;
- a callback runs only while its registration stands: one removed by an earlier callback
  of the same wakeup does not run (its event is stale), one replaced runs as replaced;
- the reader runs before the writer when both are ready, as asyncio orders them;
- an exception from a callback is reported to the loop's exception handler (`on_error`:
  MainLoop's, which logs it) and costs that callback only, as a Handle's would;
- `select` waits as selectors.EpollSelector does: None blocks, <= 0 polls, a timeout is
  rounded up to whole milliseconds (epoll's unit) so that a due timer is not missed by
  waking a little early.

Edge triggering (`Poller.add_reader(..., edge=True)`, which asyncio's API has no word for):
the reader runs when data arrives, not again while data it left stays, and is given the
epoll events (EPOLLRDHUP: the peer shut its side); the engine's TCP sockets use it
(tcp_peek.py says why and what it must then do itself).

Deadlines (`Poller.deadline(callback)`): the engine's timers, re-armed per packet (the
delayed ACK of request/response traffic is armed and disarmed once per round trip) or
whenever a flow's deadline comes before the one waited for (the flow timers), and the
MainLoop's earliest timer. A heap entry per arming would leave one to clean up per
disarming; a Deadline is one time on an object of ours, which `select` waits for (never
longer than its caller asked) and runs from inside, as it runs readiness callbacks. A
deadline runs at most once per arming, not before its time; it waits at least the whole
millisecond epoll counts in.

Not done here: timers on a heap (mainloop.py's, on one deadline of this), anything about
what the callbacks do.
"""

from __future__ import annotations

import contextlib
import math
import select
import selectors
import time
import types
from collections.abc import Callable, Mapping
from typing import Any, Final

_IN: Final = select.EPOLLIN
_OUT: Final = select.EPOLLOUT
_EDGE: Final = select.EPOLLET | select.EPOLLRDHUP
# what asyncio's selector reports as readable / writable (selectors.EpollSelector): an error
# or a hang-up wakes both sides, so that each finds out from its own call
_READABLE: Final = ~_OUT
_WRITABLE: Final = ~_IN


class Watch:
    """One descriptor's callbacks registered through the loop's add_reader/add_writer."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.edge = False  # the reader wants edge-triggered events (EPOLLET)
        self.reader: Callable[..., object] | None = None
        self.reader_args: tuple[Any, ...] = ()
        self.writer: Callable[..., object] | None = None
        self.writer_args: tuple[Any, ...] = ()

    def mask(self) -> int:
        mask = (_IN if self.reader is not None else 0) | (_OUT if self.writer is not None else 0)
        return mask | _EDGE if mask and self.edge else mask


class Deadline:
    """A callback at one time of the loop's clock (`loop.time()`, as its timers),
    armed as often as wanted; it runs once per arming, from the poller's select."""

    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback
        self.when = math.inf  # not armed

    @property
    def armed(self) -> bool:
        return self.when != math.inf

    def arm(self, when: float) -> None:
        self.when = when

    def cancel(self) -> None:
        self.when = math.inf


class Poller:
    """The registry of callbacks and deadlines `select` runs, and asyncio's selector."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._keys: dict[int, selectors.SelectorKey] = {}  # asyncio's own registrations
        self._key_map: Mapping[int, selectors.SelectorKey] = types.MappingProxyType(self._keys)
        self._watches: dict[int, Watch] = {}
        self.on_error: Callable[[dict[str, Any]], None] | None = None  # the loop's handler
        self.writers_added = 0  # writers registered so far (how often writability was awaited)
        self._deadlines: list[Deadline] = []
        # the clock deadlines are armed in: the loop's (MainLoop sets it), which a loop
        # may run apart from time.monotonic (the engine fuzz target moves it on)
        self.clock: Callable[[], float] = time.monotonic

    def deadline(self, callback: Callable[[], object]) -> Deadline:
        """A new deadline, not armed, kept until `remove_deadline`."""
        deadline = Deadline(callback)
        self._deadlines.append(deadline)
        return deadline

    def remove_deadline(self, deadline: Deadline) -> None:
        """Its owner is done with it (an engine closed on a loop that goes on)."""
        deadline.cancel()
        with contextlib.suppress(ValueError):
            self._deadlines.remove(deadline)

    # -- the loop's add_reader/add_writer ---------------------------------------------------

    def add_reader(self, fd: int, callback: Callable[..., object], args: tuple[Any, ...],
                   edge: bool = False) -> None:
        """`edge`: run it when new data arrives, not while unread data stays (EPOLLET, for
        the whole descriptor: its writer too), with the epoll events after `args`: they
        say whether the peer has shut its side (EPOLLRDHUP), which a read that finds data
        cannot tell and no later edge will."""
        watch = self._watch(fd)
        had = watch.mask()
        watch.reader, watch.reader_args, watch.edge = callback, args, edge
        self._update(watch, had)

    def add_writer(self, fd: int, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        watch = self._watch(fd)
        had = watch.mask()
        watch.writer, watch.writer_args = callback, args
        self.writers_added += 1
        self._update(watch, had)

    def remove_reader(self, fd: int) -> bool:
        watch = self._watches.get(fd)
        if watch is None or watch.reader is None:
            return False
        had = watch.mask()
        watch.reader, watch.reader_args, watch.edge = None, (), False
        self._update(watch, had)
        return True

    def remove_writer(self, fd: int) -> bool:
        watch = self._watches.get(fd)
        if watch is None or watch.writer is None:
            return False
        had = watch.mask()
        watch.writer, watch.writer_args = None, ()
        self._update(watch, had)
        return True

    def _watch(self, fd: int) -> Watch:
        watch = self._watches.get(fd)
        if watch is None:
            if fd in self._keys:
                raise ValueError(f"descriptor {fd} is registered with the selector already")
            watch = self._watches[fd] = Watch(fd)
        return watch

    def _update(self, watch: Watch, had: int) -> None:
        mask = watch.mask()
        if mask == had:
            return
        if not mask:
            del self._watches[watch.fd]
            with contextlib.suppress(OSError):  # closed first: the kernel dropped it already
                self._epoll.unregister(watch.fd)
        elif had:
            self._epoll.modify(watch.fd, mask)
        else:
            try:
                self._epoll.register(watch.fd, mask)
            except OSError:
                del self._watches[watch.fd]
                raise

    # -- selectors.BaseSelector, for asyncio ----------------------------------------------

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileno_of(fileobj)
        if fd in self._keys or fd in self._watches:
            raise KeyError(f"{fileobj!r} (descriptor {fd}) is already registered")
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._epoll.register(fd, _epoll_mask(events))
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        key = self._keys.pop(fileno_of(fileobj))
        with contextlib.suppress(OSError):  # closed first: the kernel dropped it already
            self._epoll.unregister(key.fd)
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileno_of(fileobj)
        old = self._keys[fd]
        key = selectors.SelectorKey(old.fileobj, fd, events, data)
        if events != old.events:
            self._epoll.modify(fd, _epoll_mask(events))
        self._keys[fd] = key
        return key

    def is_asyncios(self, fd: int) -> bool:
        """Whether asyncio registered `fd` itself (through the selector methods)."""
        return fd in self._keys

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys[fileno_of(fileobj)]

    def get_map(self) -> Mapping[int, selectors.SelectorKey]:
        return self._key_map

    def close(self) -> None:
        self._keys.clear()
        self._watches.clear()
        self._deadlines.clear()
        self._epoll.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Run the loop's callbacks of what is ready and the deadlines that are due;
        asyncio's events, for it to run."""
        earliest = math.inf
        for deadline in self._deadlines:
            if deadline.when < earliest:
                earliest = deadline.when
        if earliest != math.inf:
            until = max(earliest - self.clock(), 0.0)
            if timeout is None or until < timeout:
                timeout = until
        wait = -1.0 if timeout is None else _epoll_timeout(timeout)
        try:
            ready = self._epoll.poll(wait, max(len(self._keys) + len(self._watches), 1))
        except InterruptedError:
            ready = []
        out: list[tuple[selectors.SelectorKey, int]] = []
        watches = self._watches
        for fd, event in ready:
            watch = watches.get(fd)
            if watch is not None:
                if event & _READABLE and watch.reader is not None:
                    self.run_callback(watch.reader, watch.reader_args, event if watch.edge else -1)
                    watch = watches.get(fd)  # the reader may have removed or replaced it
                if watch is not None and event & _WRITABLE and watch.writer is not None:
                    self.run_callback(watch.writer, watch.writer_args)
                continue
            key = self._keys.get(fd)
            if key is not None:
                mask = (selectors.EVENT_READ if event & _READABLE else 0) \
                    | (selectors.EVENT_WRITE if event & _WRITABLE else 0)
                out.append((key, mask & key.events))
        if earliest != math.inf:
            self._run_due(self.clock())
        return out

    def _run_due(self, now: float) -> None:
        for deadline in self._deadlines:
            if deadline.when <= now:
                deadline.when = math.inf  # before the callback, which may arm it again
                self.run_callback(deadline.callback, ())

    def run_callback(self, callback: Callable[..., object], args: tuple[Any, ...],
                     event: int = -1) -> None:
        """Run a callback of the loop's (a reader, a deadline, a timer), its exception to
        `on_error` (costing that callback only), as a Handle's would go to asyncio's."""
        try:
            if event < 0:
                callback(*args)
            else:
                callback(*args, event)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as e:  # a Handle reports these to the loop too
            if self.on_error is None:
                raise
            self.on_error({"message": f"Exception in callback {callback!r}",
                           "exception": e})

    def problems(self) -> list[str]:
        """Registrations the kernel does not have as kept here (the fuzz targets check)."""
        both = set(self._watches) & set(self._keys)
        out = [f"descriptors {sorted(both)} registered on both sides"] if both else []
        return out + [f"descriptor {fd} watched with no callback"
                      for fd, watch in self._watches.items() if not watch.mask()]


def fileno_of(fileobj: Any) -> int:
    """The descriptor of a descriptor or of an object with fileno(), as selectors takes them."""
    fd = fileobj if isinstance(fileobj, int) else int(fileobj.fileno())
    if fd < 0:
        raise ValueError(f"invalid file descriptor: {fd}")
    return fd


def _epoll_timeout(seconds: float) -> float:
    """epoll counts milliseconds: round up, so that a timer is not missed by waking early."""
    return math.ceil(seconds * 1e3) * 1e-3 if seconds > 0 else 0.0


def _epoll_mask(events: int) -> int:
    return (_IN if events & selectors.EVENT_READ else 0) \
        | (_OUT if events & selectors.EVENT_WRITE else 0)
