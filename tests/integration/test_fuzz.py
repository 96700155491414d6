"""The engine-level fuzz target for a fixed number of executions, in a lab namespace (root).

tests/fuzz/run.py builds the lab (passtd.tools.lab.HostNamespace: a dead-end uplink, nothing
leaves the machine) and runs the whole Engine on an event loop there, fed by the
pure-Python coverage-guided driver; every input ends with an ARP request and a DHCP
DISCOVER that must still be answered. The run is bounded by a count of executions from a
fixed seed (PASSTD_FUZZ_ENGINE_RUNS, PASSTD_FUZZ_SEED), never by time: a slow machine
runs the same inputs as a fast one, only longer. Long runs by hand: tests/fuzz/README.md.

Twice: the driver's guidance traces the engine's Python, which the compiled engine
(setup.py, mypyc) does not run, so the first run is on the sources (PASSTD_NATIVE=0) and
the second, on the compiled engine and the C parts, starts from every input the first
found new coverage with.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from passtd.tools import lab

RUN = Path(__file__).resolve().parents[1] / "fuzz" / "run.py"
RUNS = int(os.environ.get("PASSTD_FUZZ_ENGINE_RUNS", "800"))
SEED = int(os.environ.get("PASSTD_FUZZ_SEED", "0"))

pytestmark = pytest.mark.netns


def test_fuzz_engine(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture,
                     tmp_path: Path) -> None:
    missing = lab.missing_requirements()
    if missing:
        pytest.skip("engine fuzzing needs the lab: " + "; ".join(missing))
    for engine, native in (("sources", "0"), ("compiled", "1")):
        res = subprocess.run(
            [sys.executable, str(RUN), "engine", "--driver", "python", "--runs", str(RUNS),
             "--seed", str(SEED), "--dir", str(tmp_path), "--prefix", f"pdfuzz-t{os.getpid()}"],
            capture_output=True, text=True, timeout=None,
            env={**lab.passtd_env(), "PASSTD_NATIVE": native},
        )
        output = res.stdout + res.stderr
        summary = re.findall(r"^fuzz engine: \d+ executions.*$", output, re.MULTILINE)
        line = f"{engine}: " + (summary[-1] if summary else "fuzz engine: no summary")
        request.node.add_report_section("call", f"fuzz ({engine})", line)
        with capsys.disabled():
            print(f"\n{line}", end="")
        crashes = sorted((tmp_path / "engine" / "crashes").glob("crash-*"))
        assert res.returncode == 0 and not crashes, (
            f"engine fuzzing ({engine}) failed (exit {res.returncode}); reproduce with "
            f"PASSTD_NATIVE={native} python tests/fuzz/run.py engine --repro "
            f"{' '.join(map(str, crashes))}\n{output[-8000:]}"
        )
        assert summary and int(summary[-1].split()[2]) > 0, output[-4000:]


REGRESSIONS = Path(__file__).resolve().parents[1] / "fuzz" / "regressions" / "engine"


def test_engine_fuzz_findings_stay_fixed() -> None:
    """Every input the engine target ever failed on (tests/fuzz/regressions/engine, one
    file per finding, named after the bug) passes again."""
    missing = lab.missing_requirements()
    if missing:
        pytest.skip("engine fuzzing needs the lab: " + "; ".join(missing))
    files = sorted(p for p in REGRESSIONS.iterdir() if p.is_file())
    assert files, f"no regression inputs in {REGRESSIONS}"
    for native in ("0", "1"):  # the sources, then the compiled engine and the C parts
        res = subprocess.run(
            [sys.executable, str(RUN), "engine", "--repro", *map(str, files),
             "--prefix", f"pdfuzz-r{os.getpid()}"],
            capture_output=True, text=True, env={**lab.passtd_env(), "PASSTD_NATIVE": native},
        )
        assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-2000:]
        assert res.stdout.count(": passes") == len(files), res.stdout
