"""A small coverage-guided mutation fuzzer in pure Python, for the in-suite runs.

Why our own: atheris (libFuzzer) is what the long runs by hand use (see README.md), but it
is not a project dependency and its `Fuzz()` never returns (it ends the process), so it
cannot run inside pytest. This driver needs nothing beyond the standard library:

- coverage: `sys.settrace` on Python 3.11 (no `sys.monitoring` before 3.12), recording
  line-to-line arcs (code object, previous line, line) of the engine's own files only;
  calls into anything else return no local tracer, so the cost stays on the code under
  test. Arcs, not lines, so that an `if` without an `else` counts both ways.
- corpus: the seeds, then every input that reached an arc never seen before.
- mutations, AFL "havoc" style: 1 to 8 stacked edits among bit flips, random and
  "interesting" bytes and 16/32-bit words, small additions, chunk deletion, duplication
  and insertion, splicing with another corpus entry, and dictionary tokens.

Targets are plain functions `(data: bytes) -> None`: anything they raise is a bug (the
expected `Malformed`/None outcomes are handled inside the target). The same functions run
under atheris unchanged.

Not done: corpus minimisation, hit-count buckets, value profiles (atheris has those).
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType, ModuleType
from typing import Any

INTERESTING8 = (0, 1, 2, 4, 6, 8, 14, 16, 20, 32, 40, 60, 64, 100, 127, 128, 255)
INTERESTING16 = (0, 1, 8, 20, 40, 54, 255, 256, 512, 576, 1000, 1024, 1280, 1460, 1500,
                 4096, 32767, 32768, 65507, 65535)
INTERESTING32 = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 0x10000)


@dataclass(frozen=True)
class Target:
    """One fuzz surface: `run(data)` raises only on a bug."""

    name: str
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    max_len: int = 4096
    dictionary: tuple[bytes, ...] = ()
    doc: str = ""


@dataclass
class Stats:
    executions: int = 0
    seconds: float = 0.0
    corpus: int = 0
    arcs: int = 0
    failures: list[tuple[bytes, str]] = field(default_factory=list)

    def line(self, name: str) -> str:
        rate = self.executions / self.seconds if self.seconds else 0.0
        return (f"fuzz {name}: {self.executions} executions in {self.seconds:.1f} s "
                f"({rate:.0f}/s), corpus {self.corpus}, {self.arcs} arcs covered, "
                f"{len(self.failures)} failures")


def module_files(modules: Iterable[ModuleType]) -> frozenset[str]:
    """The source paths (as code objects name them) of `modules`."""
    return frozenset(m.__file__ for m in modules if getattr(m, "__file__", None))


class ArcTracer:
    """Collects (code, previous line, line) arcs of code in `files` while active."""

    def __init__(self, files: frozenset[str]) -> None:
        self.files = files
        self.arcs: set[tuple[CodeType, int, int]] = set()

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        if code.co_filename not in self.files:
            return None
        arcs = self.arcs
        last = -1

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            nonlocal last
            line = frame.f_lineno
            arcs.add((code, last, line))
            last = line
            return local

        return local

    def __enter__(self) -> ArcTracer:
        self.arcs = set()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


class Mutator:
    def __init__(self, rng: random.Random, max_len: int, dictionary: Sequence[bytes]) -> None:
        self.rng = rng
        self.max_len = max_len
        self.dictionary = list(dictionary)

    def mutate(self, data: bytes, others: Sequence[bytes]) -> bytes:
        rng = self.rng
        buf = bytearray(data)
        for _ in range(1 << rng.randrange(4)):
            self._one(buf, rng, others)
        del buf[self.max_len :]
        return bytes(buf)

    def _one(self, buf: bytearray, rng: random.Random, others: Sequence[bytes]) -> None:
        choice = rng.randrange(12)
        n = len(buf)
        if n == 0 or choice == 0:  # insert random bytes
            pos = rng.randint(0, n)
            buf[pos:pos] = rng.randbytes(rng.choice((1, 1, 2, 4, rng.randint(1, 32))))
        elif choice == 1:
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif choice == 2:
            buf[rng.randrange(n)] = rng.randrange(256)
        elif choice == 3:
            buf[rng.randrange(n)] = rng.choice(INTERESTING8)
        elif choice == 4 and n >= 2:
            pos = rng.randrange(n - 1)
            buf[pos : pos + 2] = rng.choice(INTERESTING16).to_bytes(2, "big")
        elif choice == 5 and n >= 4:
            pos = rng.randrange(n - 3)
            buf[pos : pos + 4] = rng.choice(INTERESTING32).to_bytes(4, "big")
        elif choice == 6 and n >= 2:  # small arithmetic on a big-endian word
            pos = rng.randrange(n - 1)
            value = (int.from_bytes(buf[pos : pos + 2], "big") + rng.randint(-35, 35)) & 0xFFFF
            buf[pos : pos + 2] = value.to_bytes(2, "big")
        elif choice == 7:  # delete a chunk
            pos = rng.randrange(n)
            del buf[pos : pos + rng.randint(1, max(1, min(64, n - pos)))]
        elif choice == 8:  # duplicate a chunk somewhere
            pos = rng.randrange(n)
            chunk = buf[pos : pos + rng.randint(1, 64)]
            at = rng.randint(0, n)
            buf[at:at] = chunk
        elif choice == 9 and others:  # splice: our head, another input's tail
            other = rng.choice(others)
            if other:
                cut = rng.randint(0, n)
                buf[cut:] = other[rng.randrange(len(other)) :]
        elif choice == 10 and self.dictionary:
            token = rng.choice(self.dictionary)
            pos = rng.randint(0, n)
            if rng.randrange(2):
                buf[pos:pos] = token
            else:
                buf[pos : pos + len(token)] = token
        else:  # overwrite a chunk with a copy of another part of itself
            src, dst = rng.randrange(n), rng.randrange(n)
            length = rng.randint(1, min(32, n - src))
            buf[dst : dst + length] = buf[src : src + length]


def _fingerprint(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]


class CoverageFuzzer:
    """Runs a target under arc coverage, growing a corpus from the inputs that find arcs."""

    def __init__(self, target: Target, files: frozenset[str], *, seed: int = 0,
                 crash_dir: Path | None = None, log: Callable[[str], None] | None = None) -> None:
        self.target = target
        self.tracer = ArcTracer(files)
        self.rng = random.Random(seed)
        self.mutator = Mutator(self.rng, target.max_len, target.dictionary)
        self.crash_dir = crash_dir
        self.log = log
        self.seen: set[tuple[CodeType, int, int]] = set()
        self.corpus: list[bytes] = []
        self.stats = Stats()

    def execute(self, data: bytes) -> bool:
        """Run one input; True if it covered something new. Failures are recorded."""
        self.stats.executions += 1
        try:
            with self.tracer:
                self.target.run(data)
        except Exception:
            self._failed(data, traceback.format_exc())
            return False
        new = self.tracer.arcs - self.seen
        if new:
            self.seen |= new
            return True
        return False

    def _failed(self, data: bytes, trace: str) -> None:
        self.stats.failures.append((data, trace))
        where = ""
        if self.crash_dir is not None:
            self.crash_dir.mkdir(parents=True, exist_ok=True)
            path = self.crash_dir / f"crash-{self.target.name}-{_fingerprint(data)}"
            path.write_bytes(data)
            where = f" (saved as {path})"
        if self.log:
            self.log(f"FAILURE in {self.target.name}{where}: input {data.hex()}\n{trace}")

    def run(self, *, executions: int | None = None, seconds: float | None = None,
            stop_on_failure: bool = True, extra_corpus: Iterable[bytes] = (),
            report_every: float = 0.0) -> Stats:
        """Fuzz for a number of `executions` (the test suite: the same inputs on a fast and
        a slow machine) or for `seconds` (long runs by hand); the seeds always run first
        and count among the executions."""
        if (executions is None) == (seconds is None):
            raise ValueError("give executions or seconds, not both")
        start = time.monotonic()
        deadline = start + seconds if seconds is not None else float("inf")
        next_report = start + report_every if report_every else float("inf")
        for data in [*self.target.seeds(), *extra_corpus]:
            if self.execute(data[: self.target.max_len]) or not self.corpus:
                self.corpus.append(data[: self.target.max_len])
        rng = self.rng
        while not (stop_on_failure and self.stats.failures):
            now = time.monotonic()
            if now >= deadline:
                break
            if executions is not None and self.stats.executions >= executions:
                break
            if now >= next_report and self.log:
                self._update(now - start)
                self.log(self.stats.line(self.target.name))
                next_report = now + report_every
            # favour recent finds: they sit at the edge of what is covered
            corpus = self.corpus
            parent = corpus[-1 - min(int(rng.expovariate(0.05)), len(corpus) - 1)] \
                if rng.randrange(2) else rng.choice(corpus)
            child = self.mutator.mutate(parent, corpus)
            if self.execute(child):
                corpus.append(child)
        self._update(time.monotonic() - start)
        return self.stats

    def _update(self, elapsed: float) -> None:
        self.stats.seconds = elapsed
        self.stats.corpus = len(self.corpus)
        self.stats.arcs = len(self.seen)
