"""Short coverage-guided fuzz runs of every pure target in tests/fuzz (a fixed count each).

Each target (framing, single frames, ARP, DHCP, DHCPv6, NDP, TCP segment sequences) runs
under the pure-Python driver of tests/fuzz/driver.py from its scapy-built seeds, with a
fixed RNG seed and a fixed number of executions, never a time budget: the same inputs run
on a fast and a slow machine, so the verdict does not depend on the machine's speed. The
execution count of every run is printed (and kept as a report section). PASSTD_FUZZ_RUNS
changes the count per target and PASSTD_FUZZ_SEED the seed; long runs by hand:
tests/fuzz/README.md.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

import pytest

import passtd.engine
from tests.fuzz.driver import CoverageFuzzer, module_files
from tests.fuzz.targets import TARGETS

RUNS = int(os.environ.get("PASSTD_FUZZ_RUNS", "10000"))
SEED = int(os.environ.get("PASSTD_FUZZ_SEED", "0"))
ENGINE_FILES = module_files(
    [passtd.engine] + [importlib.import_module(f"passtd.engine.{m.name}")
                       for m in pkgutil.iter_modules(passtd.engine.__path__)]
)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target(name: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture,
                     tmp_path: Path) -> None:
    fuzzer = CoverageFuzzer(TARGETS[name], ENGINE_FILES, seed=SEED, crash_dir=tmp_path)
    stats = fuzzer.run(executions=RUNS)
    line = stats.line(name)
    request.node.add_report_section("call", "fuzz", line)
    with capsys.disabled():
        print(f"\n{line}", end="")
    assert stats.executions > len(fuzzer.corpus), "the target hardly ran"
    if stats.failures:
        data, trace = stats.failures[0]
        crash = next(tmp_path.glob("crash-*"))
        pytest.fail(f"{name}: {trace}\ninput: {data.hex()}\nsaved as {crash}; reproduce with "
                    f"python tests/fuzz/run.py {name} --repro {crash}", pytrace=False)
