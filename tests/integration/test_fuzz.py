"""The engine-level fuzz target for a few seconds, inside a lab namespace (root only).

tests/fuzz/run.py builds the lab (passtd.lab.HostNamespace: a dead-end uplink, nothing
leaves the machine) and runs the whole Engine on an event loop there, fed by the
pure-Python coverage-guided driver; every input ends with an ARP request and a DHCP
DISCOVER that must still be answered. The execution count is printed. Long runs by
hand: tests/fuzz/README.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from passtd import lab

RUN = Path(__file__).resolve().parents[1] / "fuzz" / "run.py"
SECONDS = float(os.environ.get("PASSTD_FUZZ_ENGINE_SECONDS", "10"))
SEED = int(os.environ.get("PASSTD_FUZZ_SEED", "0"))

pytestmark = pytest.mark.netns


def test_fuzz_engine(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture,
                     tmp_path: Path) -> None:
    missing = lab.missing_requirements()
    if missing:
        pytest.skip("engine fuzzing needs the lab: " + "; ".join(missing))
    res = subprocess.run(
        [sys.executable, str(RUN), "engine", "--driver", "python", "--time", str(SECONDS),
         "--seed", str(SEED), "--dir", str(tmp_path), "--prefix", f"pdfuzz-t{os.getpid()}"],
        capture_output=True, text=True, timeout=SECONDS + 120, env=lab.passtd_env(),
    )
    output = res.stdout + res.stderr
    summary = re.findall(r"^fuzz engine: \d+ executions.*$", output, re.MULTILINE)
    line = summary[-1] if summary else "fuzz engine: no summary"
    request.node.add_report_section("call", "fuzz", line)
    with capsys.disabled():
        print(f"\n{line}", end="")
    crashes = sorted((tmp_path / "engine" / "crashes").glob("crash-*"))
    assert res.returncode == 0 and not crashes, (
        f"engine fuzzing failed (exit {res.returncode}); reproduce with "
        f"python tests/fuzz/run.py engine --repro {' '.join(map(str, crashes))}\n{output[-8000:]}"
    )
    assert summary and int(line.split()[2]) > 0, output[-4000:]
