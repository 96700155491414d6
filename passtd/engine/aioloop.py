"""asyncio's loop run on an instance's MainLoop, for the D-Bus API (dbus-fast needs asyncio).

Design: asyncio's selector loop asks its selector (an object with `selectors.BaseSelector`'s
methods, which `asyncio.SelectorEventLoop` takes as an argument) for ready descriptors once
per iteration. `EngineLoop` is asyncio's loop with a MainLoop's poller as that selector: its
`select` runs the MainLoop's callbacks, timers and signals from inside (mainloop.py), and
hands asyncio back only asyncio's own events. So with the bus, asyncio's `run_forever`
drives the instance; the engine runs exactly as under `MainLoop.run_forever`.

Its public `add_reader/add_writer/remove_reader/remove_writer` go to the poller too (what
registers through them, the D-Bus connection, runs straight from the epoll result, with no
Handle); what asyncio registers for itself (its wake-up pipe, transports, the end of a
sock_connect or sock_recv) goes through the selector methods and comes back from `select`
as asyncio expects (poller.py's rules). Its clock is the MainLoop's.

Not done here: signals (`add_signal_handler` is the MainLoop's, bus or no bus), anything
of the engine's: only the service imports this module, and only with a bus.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable
from typing import Protocol, TypeVarTuple, cast

from .mainloop import MainLoop
from .poller import fileno_of

_Ts = TypeVarTuple("_Ts")


class HasFileno(Protocol):
    def fileno(self) -> int: ...


class EngineLoop(asyncio.SelectorEventLoop):
    """asyncio's loop on a MainLoop's poller; closing it closes the MainLoop."""

    def __init__(self, main: MainLoop | None = None) -> None:
        self.main = main if main is not None else MainLoop()
        self.poller = self.main.poller
        super().__init__(cast(selectors.BaseSelector, self.poller))

    # asyncio calls these too, for descriptors of its own (sock_connect and sock_recv end
    # with remove_writer/remove_reader): those stay asyncio's, with its own implementation

    def add_reader(self, fd: int | HasFileno, callback: Callable[[*_Ts], object],
                   *args: *_Ts) -> None:
        fileno = fileno_of(fd)
        if self.poller.is_asyncios(fileno):
            return super().add_reader(fileno, callback, *args)
        self._open()
        self.poller.add_reader(fileno, callback, args)
        return None

    def remove_reader(self, fd: int | HasFileno) -> bool:
        fileno = fileno_of(fd)
        if self.poller.is_asyncios(fileno):
            return super().remove_reader(fileno)
        return False if self.is_closed() else self.poller.remove_reader(fileno)

    def add_writer(self, fd: int | HasFileno, callback: Callable[[*_Ts], object],
                   *args: *_Ts) -> None:
        fileno = fileno_of(fd)
        if self.poller.is_asyncios(fileno):
            return super().add_writer(fileno, callback, *args)
        self._open()
        self.poller.add_writer(fileno, callback, args)
        return None

    def remove_writer(self, fd: int | HasFileno) -> bool:
        fileno = fileno_of(fd)
        if self.poller.is_asyncios(fileno):
            return super().remove_writer(fileno)
        return False if self.is_closed() else self.poller.remove_writer(fileno)

    def time(self) -> float:
        return self.main.time()

    # the MainLoop watches signals (one wake-up descriptor per process: asyncio's own
    # handling would take it, and the instance's SIGTERM with it)

    def add_signal_handler(self, sig: int, callback: Callable[[*_Ts], object],
                           *args: *_Ts) -> None:
        self.main.add_signal_handler(sig, callback, *args)

    def remove_signal_handler(self, sig: int) -> bool:
        return self.main.remove_signal_handler(sig)

    def close(self) -> None:
        super().close()
        self.main.close()

    def _open(self) -> None:
        if self.is_closed():
            raise RuntimeError("Event loop is closed")
