"""The MainLoop (passtd/engine/mainloop.py): the rules at the top of the module, on a real
epoll, real signals and a clock of the test's; and that a bus-less instance never imports
asyncio. The Poller's own rules under asyncio's loop: test_poller.py."""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from passtd.engine import mainloop
from passtd.engine.mainloop import MainLoop
from tests.support.engine_harness import run_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def loop() -> Iterator[MainLoop]:
    loop = MainLoop()
    yield loop
    loop.close()


def test_timers_run_in_the_order_of_their_time_then_of_their_arming(loop: MainLoop) -> None:
    ran: list[str] = []
    now = loop.time()
    loop.call_at(now + 0.03, ran.append, "c")
    loop.call_at(now + 0.01, ran.append, "a")
    loop.call_at(now + 0.01, ran.append, "b")  # same time: after the one armed first
    loop.call_soon(ran.append, "soon")
    run_for(loop, 0.1)
    assert ran == ["soon", "a", "b", "c"]


def test_a_timer_runs_not_before_its_time_and_once(loop: MainLoop) -> None:
    ran: list[float] = []
    start = loop.time()
    loop.call_later(0.05, lambda: ran.append(loop.time()))
    run_for(loop, 0.2)
    assert len(ran) == 1 and ran[0] - start >= 0.05


def test_a_cancelled_timer_does_not_run(loop: MainLoop) -> None:
    ran: list[str] = []
    loop.call_later(0.01, ran.append, "later").cancel()
    loop.call_soon(ran.append, "soon").cancel()
    timer = loop.call_later(0.01, ran.append, "ran")
    run_for(loop, 0.05)
    timer.cancel()  # after it ran: changes nothing
    assert ran == ["ran"]


def test_what_call_soon_queues_from_a_callback_runs_on_the_next_turn(loop: MainLoop) -> None:
    """A callback that keeps queueing itself (a read that stops early, tcp_peek.py) does
    not keep the loop from its descriptors: one queued call per turn."""
    a, b = socket.socketpair()
    a.setblocking(False)
    turns: list[str] = []

    def again() -> None:
        turns.append("soon")
        if len(turns) < 50:
            loop.call_soon(again)

    loop.add_reader(a.fileno(), lambda: (a.recv(10), turns.append("read"), loop.stop()))
    loop.call_soon(again)
    b.send(b"x")
    loop.run_forever()
    assert turns[:2] == ["read", "soon"] or turns[:3] == ["soon", "read", "soon"]
    assert turns.count("soon") < 50
    a.close()
    b.close()


def test_a_cancelled_timer_lets_go_of_its_callback(loop: MainLoop) -> None:
    """It stays in the heap until its time; what it would have called (a bound method of
    an engine's part, and the engine through it) must not stay alive with it."""
    class Owner:
        def tick(self) -> None:
            pass

    owner = Owner()
    gone = weakref.ref(owner)
    loop.call_later(600, owner.tick).cancel()
    del owner
    gc.collect()
    assert gone() is None


def test_cancelled_timers_do_not_pile_up(loop: MainLoop) -> None:
    """A guest that keeps having one far timer re-armed (router advertisements) leaves a
    heap no larger than about twice the live timers."""
    timer = loop.call_later(600, lambda: None)
    for _ in range(10_000):
        timer.cancel()
        timer = loop.call_later(600, lambda: None)
    heap = loop.timers_held
    assert heap <= 2 * mainloop._CLEANUP_AT + 2, heap
    ran: list[str] = []
    loop.call_later(0.01, ran.append, "due")
    run_for(loop, 0.05)
    assert ran == ["due"]


def test_an_exception_costs_that_callback_only_and_is_logged(
        loop: MainLoop, caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("broken timer")

    loop.call_soon(broken)
    loop.call_soon(ran.append, "next")
    a, b = socket.socketpair()
    loop.add_reader(a.fileno(), lambda: (_ for _ in ()).throw(RuntimeError("broken reader")))
    b.send(b"x")
    with caplog.at_level(logging.ERROR, logger="passtd.loop"):
        run_for(loop, 0.02)
    loop.remove_reader(a.fileno())
    a.close()
    b.close()
    assert ran == ["next"]
    assert "broken timer" in caplog.text and "broken reader" in caplog.text
    assert "Traceback" in caplog.text


def test_an_exception_handler_set_sees_the_exception(loop: MainLoop) -> None:
    seen: list[BaseException] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context["exception"]))
    loop.call_soon(lambda: 1 / 0)
    run_for(loop, 0.01)
    assert [type(e) for e in seen] == [ZeroDivisionError]


def test_the_clock_given_is_the_one_of_timers_and_deadlines() -> None:
    """The engine fuzz target moves its loop's clock on: timers are due by that clock."""
    skew = [100.0]
    loop = MainLoop(clock=lambda: time.monotonic() + skew[0])
    try:
        ran: list[str] = []
        assert loop.time() - time.monotonic() > 99
        loop.call_at(loop.time() + 0.01, ran.append, "timer")
        loop.poller.deadline(lambda: ran.append("deadline")).arm(loop.time() + 0.01)
        run_for(loop, 0.1)
        assert sorted(ran) == ["deadline", "timer"]
    finally:
        loop.close()


def test_stop_asked_before_run_forever_returns_at_once(loop: MainLoop) -> None:
    loop.call_later(5, loop.stop)  # the watchdog
    loop.stop()
    start = time.monotonic()
    loop.run_forever()
    assert time.monotonic() - start < 1


def test_an_idle_loop_waits_without_waking() -> None:
    """Nothing armed: select waits for a descriptor, it does not poll (0 idle wakeups)."""
    code = """
import signal, sys, time
from passtd.engine.mainloop import MainLoop
loop = MainLoop()
loop.add_signal_handler(signal.SIGTERM, loop.stop)
loop.call_later(0.05, lambda: None)  # one timer, then nothing
loop.run_forever()
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        time.sleep(1.0)
        switches = _context_switches(proc.pid)
        time.sleep(1.0)
        assert _context_switches(proc.pid) == switches
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def _context_switches(pid: int) -> int:
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
            total += int(line.split()[1])
    return total


def test_a_signal_runs_its_handler_on_the_next_turn_and_close_restores_it() -> None:
    loop = MainLoop()
    got: list[str] = []
    loop.add_signal_handler(signal.SIGUSR1, lambda what: (got.append(what), loop.stop()), "usr1")
    loop.call_later(5, loop.stop)  # the watchdog
    loop.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
    start = time.monotonic()
    loop.run_forever()
    assert got == ["usr1"] and time.monotonic() - start < 1
    loop.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert signal.set_wakeup_fd(-1) == -1  # given back


def test_close_puts_back_the_handlers_from_before() -> None:
    """SIGINT's is KeyboardInterrupt's, not SIG_DFL; a wake-up descriptor set before the
    loop's is set again."""
    a, b = socket.socketpair()
    a.setblocking(False)
    before = signal.set_wakeup_fd(a.fileno())
    try:
        loop = MainLoop()
        loop.add_signal_handler(signal.SIGINT, loop.stop)
        loop.add_signal_handler(signal.SIGUSR1, loop.stop)
        assert loop.remove_signal_handler(signal.SIGUSR1)
        assert not loop.remove_signal_handler(signal.SIGUSR1)
        loop.close()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.set_wakeup_fd(before) == a.fileno()
    finally:
        a.close()
        b.close()


def test_a_closed_loop_refuses_work() -> None:
    loop = MainLoop()
    loop.close()
    loop.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        loop.call_soon(lambda: None)
    with pytest.raises(RuntimeError, match="closed"):
        loop.add_reader(0, lambda: None)
    assert loop.remove_reader(0) is False and loop.is_closed()


def test_a_bus_less_instance_imports_neither_asyncio_nor_dataclasses(tmp_path: Path) -> None:
    """What `passtd run NAME --bus none` loads (mainloop.py and docs/ARCHITECTURE.md say
    why it matters): the service's and the engine's modules, an engine started on a
    MainLoop with a qemu connected and a frame answered, a signal to stop."""
    code = f"""
import signal, socket, struct, sys
for unwanted in ("asyncio", "dataclasses", "inspect", "subprocess"):
    sys.modules[unwanted] = None  # an import of it would fail
from passtd import cli, service
from passtd.engine.addrs import Ip4Config, NetConfig
from passtd.engine.loop import Engine
from passtd.engine.mainloop import MainLoop
from passtd.engine.settings import EngineSettings
loop = MainLoop()
net = NetConfig(ip4=Ip4Config(bytes([198, 51, 100, 2]), 24, bytes([198, 51, 100, 1])))
engine = Engine(EngineSettings(net=net), loop)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind({str(tmp_path / "vm.sock")!r})
listener.listen(1)
engine.start(listener)
qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
qemu.connect({str(tmp_path / "vm.sock")!r})
guest_mac = bytes.fromhex("525400123456")
arp = (b"\\xff" * 6 + guest_mac + b"\\x08\\x06" + bytes.fromhex("0001080006040001")
       + guest_mac + bytes([198, 51, 100, 2]) + bytes(6) + bytes([198, 51, 100, 1]))
qemu.send(struct.pack("!I", len(arp)) + arp)
loop.add_signal_handler(signal.SIGTERM, loop.stop)
loop.call_later(0.2, signal.raise_signal, signal.SIGTERM)
loop.run_forever()
qemu.settimeout(2)
answer = qemu.recv(4096)
engine.close()
loop.close()
print(len(answer) > 4 and answer[4 + 12:4 + 14] == b"\\x08\\x06")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
