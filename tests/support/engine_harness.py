"""One real Engine in process: frames in, frames out (after aioquic's `roundtrip`).

The engine runs on an event loop of its own, with a socketpair standing in for qemu:
`send` writes guest frames as qemu would (each after its 4-byte length), `run` lets the
loop work for a while, `receive` returns the frames the engine sent the guest. Host
sockets come from `sockets` (engine/sockets.py), the kernel's by default: a test that lets
the engine open real ones aims them at loopback only. Unit tests use it to drive the
engine's dispatch, the socket halves and the TCP core together, without a namespace; the
engine fuzz target (tests/fuzz/engine_target.py) builds its engines with it too, on a loop
it shares across inputs (`loop`), writing and reading `qemu` itself.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from passtd.engine.loop import Engine
from passtd.engine.mainloop import MainLoop
from passtd.engine.settings import EngineSettings
from passtd.engine.sockets import HostSockets


def run_for(loop: MainLoop, seconds: float) -> None:
    """Let `loop` run its callbacks and timers for `seconds`."""
    loop.call_later(seconds, loop.stop)
    loop.run_forever()


class EngineHarness:
    def __init__(self, settings: EngineSettings, sockets: HostSockets | None = None, *,
                 loop: MainLoop | None = None) -> None:
        self._own_loop = loop is None
        self.loop = loop or MainLoop()
        self.engine = Engine(settings, loop=self.loop, sockets=sockets)
        self._engine_ends: list[socket.socket] = []  # the service's to close, not the engine's
        self.qemu = self.reconnect()
        self._rx = bytearray()

    def reconnect(self) -> socket.socket:
        """A new qemu connection (after the old one hung up or was dropped): our end."""
        self.qemu, engine_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.qemu.setblocking(False)
        self.engine.adopt_client(engine_end)
        self._engine_ends.append(engine_end)
        return self.qemu

    def send(self, *frames: bytes) -> None:
        self.qemu.sendall(b"".join(struct.pack("!I", len(f)) + f for f in frames))

    def run(self, seconds: float = 0.02) -> None:
        run_for(self.loop, seconds)

    def receive(self) -> list[bytes]:
        while True:
            try:
                chunk = self.qemu.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._rx += chunk
        frames = []
        while len(self._rx) >= 4:
            (length,) = struct.unpack_from("!I", self._rx)
            if len(self._rx) < 4 + length:
                break
            frames.append(bytes(self._rx[4 : 4 + length]))
            del self._rx[: 4 + length]
        return frames

    def roundtrip(self, *frames: bytes, seconds: float = 0.02) -> list[bytes]:
        """Send frames, let the engine work, return what it sent the guest."""
        self.send(*frames)
        self.run(seconds)
        return self.receive()

    def close(self) -> None:
        self.engine.close()
        for sock in (self.qemu, *self._engine_ends):
            sock.close()
        if self._own_loop:
            self.loop.close()


@contextmanager
def engine_harness(settings: EngineSettings,
                   sockets: HostSockets | None = None) -> Iterator[EngineHarness]:
    harness = EngineHarness(settings, sockets)
    try:
        yield harness
    finally:
        harness.close()
