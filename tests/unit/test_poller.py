"""The Poller (passtd/engine/poller.py) under asyncio's loop (aioloop.py's EngineLoop, as
with the D-Bus API): the rules at the top of poller.py, on a real epoll with socketpairs,
and asyncio's own machinery (wake-ups from other threads, signals, sock_* calls, timers)
still working on top of it. The MainLoop alone: test_mainloop.py."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from passtd.engine.aioloop import EngineLoop
from passtd.engine.mainloop import MainLoop


@pytest.fixture
def loop() -> Iterator[EngineLoop]:
    loop = EngineLoop()
    yield loop
    loop.close()


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def spin(loop: EngineLoop, seconds: float = 0.02) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


def test_a_reader_runs_with_its_arguments_from_the_wait(loop: EngineLoop) -> None:
    a, b = pair()
    got: list[tuple[str, bytes]] = []
    loop.add_reader(a.fileno(), lambda tag: got.append((tag, a.recv(10))), "a")
    b.send(b"hello")
    spin(loop)
    assert got == [("a", b"hello")]
    assert loop.remove_reader(a.fileno()) is True
    assert loop.remove_reader(a.fileno()) is False  # as asyncio's: nothing was registered
    b.send(b"again")
    spin(loop)
    assert got == [("a", b"hello")]


def test_a_callback_removed_in_the_same_wakeup_does_not_run(loop: EngineLoop) -> None:
    """Both sockets are ready in one wait; whichever reader runs first removes the other's:
    its event is stale and must not run it (its socket may be closed already)."""
    a, b = pair()
    c, d = pair()
    ran: list[str] = []

    def reader(name: str, own: socket.socket, other: socket.socket) -> None:
        own.recv(10)
        ran.append(name)
        loop.remove_reader(other.fileno())
        loop.remove_reader(own.fileno())

    loop.add_reader(a.fileno(), reader, "a", a, c)
    loop.add_reader(c.fileno(), reader, "c", c, a)
    b.send(b"x")
    d.send(b"y")
    spin(loop)
    assert len(ran) == 1


def test_the_reader_comes_first_when_both_are_ready(loop: EngineLoop) -> None:
    a, b = pair()
    order: list[str] = []

    def read() -> None:
        a.recv(10)
        order.append("read")
        loop.remove_reader(a.fileno())

    def write() -> None:
        order.append("write")
        loop.remove_writer(a.fileno())

    loop.add_writer(a.fileno(), write)
    loop.add_reader(a.fileno(), read)
    b.send(b"x")
    spin(loop)
    assert order == ["read", "write"]


def test_an_exception_costs_that_callback_only(loop: EngineLoop,
                                               caplog: pytest.LogCaptureFixture) -> None:
    a, b = pair()
    c, d = pair()
    got: list[bytes] = []

    def broken() -> None:
        a.recv(10)
        raise RuntimeError("broken callback")

    loop.add_reader(a.fileno(), broken)
    loop.add_reader(c.fileno(), lambda: got.append(c.recv(10)))
    b.send(b"x")
    d.send(b"y")
    with caplog.at_level(logging.ERROR, logger="passtd.loop"):
        spin(loop)
    assert got == [b"y"]
    assert "broken callback" in caplog.text  # the MainLoop's handler logged it, traceback too


def test_asyncio_keeps_its_own_registrations(loop: EngineLoop) -> None:
    """The wake-up pipe (call_soon_threadsafe), signals and sock_* go through the selector
    methods and still work; a descriptor of asyncio's cannot also be the loop's."""
    a, b = pair()

    async def scenario() -> bytes:
        done = asyncio.Event()
        threading.Thread(target=lambda: loop.call_soon_threadsafe(done.set)).start()
        await asyncio.wait_for(done.wait(), 5)
        got = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, got.set)
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.wait_for(got.wait(), 5)
        loop.remove_signal_handler(signal.SIGUSR1)
        await loop.sock_sendall(b, b"ping")
        return await asyncio.wait_for(loop.sock_recv(a, 10), 5)

    assert loop.run_until_complete(scenario()) == b"ping"
    c, _ = pair()
    loop.add_reader(c.fileno(), lambda: None)
    with pytest.raises(KeyError, match="already registered"):
        loop.poller.register(c.fileno(), 1)
    assert loop.poller.problems() == []


def test_timers_fire_and_the_loop_sleeps_until_then(loop: EngineLoop) -> None:
    fired: list[float] = []
    start = loop.time()
    loop.call_later(0.05, lambda: fired.append(loop.time()))
    spin(loop, 0.2)
    assert len(fired) == 1 and fired[0] - start >= 0.05


def test_a_closed_loop_refuses_readers() -> None:
    loop = EngineLoop()
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        loop.add_reader(0, lambda: None)
    assert loop.remove_reader(0) is False


# -- what a callback run inside select gives asyncio is seen at once ------------------------


def test_a_future_a_reader_completes_is_seen_at_once(loop: EngineLoop) -> None:
    """The reader's set_result gives asyncio a callback (call_soon): it runs now, not when
    the watchdog's timer comes."""
    a, b = pair()
    done: asyncio.Future[str] = loop.create_future()
    loop.add_reader(a.fileno(), lambda: (a.recv(10), done.set_result("done")))
    loop.call_later(5, lambda: done.done() or done.set_result("the watchdog"))
    b.send(b"x")
    start = time.monotonic()
    assert loop.run_until_complete(done) == "done"
    assert time.monotonic() - start < 1


def test_a_timer_a_reader_arms_fires_on_time(loop: EngineLoop) -> None:
    a, b = pair()
    fired: list[float] = []
    loop.add_reader(a.fileno(), lambda: (a.recv(10), loop.call_later(
        0.01, lambda: fired.append(loop.time()))))
    loop.call_later(0.05, b.send, b"x")  # once select waits on asyncio's timer below
    start = loop.time()
    spin(loop, 0.5)  # asyncio's own timer: select is told to wait up to 0.5 s
    assert len(fired) == 1 and fired[0] - start < 0.25


def test_stop_from_a_reader_stops_the_loop_at_once(loop: EngineLoop) -> None:
    a, b = pair()
    loop.add_reader(a.fileno(), lambda: (a.recv(10), loop.stop()))
    loop.call_later(5, loop.stop)  # the watchdog
    b.send(b"x")
    start = time.monotonic()
    loop.run_forever()
    assert time.monotonic() - start < 1


def test_readers_keep_running_while_asyncio_has_nothing_to_do(loop: EngineLoop) -> None:
    """A ping-pong between two readers, and asyncio's timer ends it on time: a stream of
    the loop's callbacks does not hold back asyncio's timers."""
    a, b = pair()
    count = [0]

    def bounce(own: socket.socket) -> None:
        own.recv(10)
        count[0] += 1
        own.send(b"x")

    loop.add_reader(a.fileno(), bounce, a)
    loop.add_reader(b.fileno(), bounce, b)
    a.send(b"x")
    start = loop.time()
    spin(loop, 0.1)
    assert count[0] > 100 and loop.time() - start < 0.5


def test_a_socket_asyncio_used_first_can_be_watched_after(loop: EngineLoop,
                                                          tmp_path: Path) -> None:
    """What dbus-fast does: sock_connect and sock_recv (asyncio registers the descriptor and
    ends with remove_writer/remove_reader, which must reach asyncio's registration), then
    add_reader on the same socket."""
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(path)
        server.listen(1)
        client.setblocking(False)
        got: list[bytes] = []

        async def scenario() -> None:
            await loop.sock_connect(client, path)
            peer, _ = server.accept()
            with peer:
                peer.send(b"auth")
                assert await loop.sock_recv(client, 10) == b"auth"
                loop.add_reader(client, lambda: got.append(client.recv(10)))
                peer.send(b"message")
                await asyncio.sleep(0.05)
                assert loop.remove_reader(client) is True

        loop.run_until_complete(scenario())
    assert got == [b"message"]
    assert loop.poller.problems() == []


def test_a_descriptor_closed_before_its_reader_is_removed(loop: EngineLoop) -> None:
    """As with asyncio's selector: the kernel dropped it with the close, removing it is
    not an error."""
    a, _ = pair()
    loop.add_reader(a.fileno(), lambda: None)
    fd = a.fileno()
    a.close()
    assert loop.remove_reader(fd) is True
    assert loop.poller.problems() == []


# -- deadlines: the engine's timers re-armed per packet ---------------------------------------


def test_a_deadline_runs_once_at_its_time_not_before(loop: EngineLoop) -> None:
    fired: list[float] = []
    deadline = loop.poller.deadline(lambda: (fired.append(loop.time()), loop.stop()))
    assert not deadline.armed
    start = loop.time()
    deadline.arm(start + 0.05)
    loop.call_later(5, loop.stop)  # the watchdog: select must not wait for it
    loop.run_forever()
    assert len(fired) == 1 and 0.05 <= fired[0] - start < 1
    assert not deadline.armed
    spin(loop, 0.1)
    assert len(fired) == 1


def test_a_cancelled_deadline_does_not_run(loop: EngineLoop) -> None:
    fired: list[str] = []
    deadline = loop.poller.deadline(lambda: fired.append("ran"))
    deadline.arm(loop.time() + 0.01)
    deadline.cancel()
    spin(loop, 0.1)
    assert fired == [] and not deadline.armed


def test_a_deadline_may_arm_itself_again(loop: EngineLoop) -> None:
    fired: list[float] = []

    def again() -> None:
        fired.append(loop.time())
        if len(fired) < 3:
            deadline.arm(loop.time() + 0.01)

    deadline = loop.poller.deadline(again)
    deadline.arm(loop.time())
    spin(loop, 0.3)
    assert len(fired) == 3 and fired[2] - fired[0] >= 0.02


def test_a_deadline_a_reader_arms_bounds_the_wait(loop: EngineLoop) -> None:
    """Armed inside select, while asyncio waits on a timer of its own 0.5 s away: the
    next wait ends at the deadline."""
    a, b = pair()
    fired: list[float] = []
    deadline = loop.poller.deadline(lambda: fired.append(loop.time()))
    loop.add_reader(a.fileno(), lambda: (a.recv(10), deadline.arm(loop.time() + 0.01)))
    loop.call_later(0.05, b.send, b"x")
    start = loop.time()
    spin(loop, 0.5)
    assert len(fired) == 1 and fired[0] - start < 0.25


def test_an_exception_costs_that_deadline_only(loop: EngineLoop,
                                                caplog: pytest.LogCaptureFixture) -> None:
    fired: list[str] = []

    def broken() -> None:
        raise RuntimeError("broken deadline")

    now = loop.time()
    loop.poller.deadline(broken).arm(now)
    loop.poller.deadline(lambda: fired.append("ran")).arm(now)
    with caplog.at_level(logging.ERROR, logger="passtd.loop"):
        spin(loop)
    assert fired == ["ran"]
    assert "broken deadline" in caplog.text


def test_a_removed_deadline_is_forgotten(loop: EngineLoop) -> None:
    """An engine closed on a loop that goes on (the fuzz target's) leaves nothing behind."""
    fired: list[str] = []
    deadline = loop.poller.deadline(lambda: fired.append("ran"))
    deadline.arm(loop.time())
    loop.poller.remove_deadline(deadline)
    loop.poller.remove_deadline(deadline)  # twice is harmless
    spin(loop)
    assert fired == [] and not deadline.armed


def test_a_deadline_follows_the_loops_clock() -> None:
    """The engine arms deadlines in loop.time(), asyncio's clock for its timers too; a loop
    whose clock runs apart from time.monotonic (the engine fuzz target moves it on) must
    see them due by that clock, not 100 s later."""
    loop = EngineLoop(MainLoop(clock=lambda: time.monotonic() + 100.0))
    try:
        assert loop.time() - time.monotonic() > 99
        fired: list[float] = []
        loop.poller.deadline(lambda: fired.append(loop.time())).arm(loop.time() + 0.01)
        spin(loop, 0.2)
        assert len(fired) == 1
    finally:
        loop.close()
