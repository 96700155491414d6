"""`passtd bench --quick`: the benchmark runs end to end and its output can be read.

Both programs, the quick matrix (one round of 1-second runs). No thresholds here: figures
depend on the machine and its load, and judging them against the targets is the bench's
own job (docs/BENCHMARK.md). This proves that the command works: it exits 0, every run
measured something, the three markdown tables have the expected rows and cells that parse,
and the --json report agrees with them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from passtd import bench, lab

pytestmark = pytest.mark.netns

RESULT_RE = re.compile(r"PASS|FAIL \(.+\)|n/a|-")
NUMBER_RE = r"\d+(?:\.\d+)?"
SPREAD_RE = re.compile(rf"({NUMBER_RE})(?: (?:µs|conn/s))?(?: \({NUMBER_RE}-{NUMBER_RE}\))?")


def parse_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Markdown tables of `text` by the title above them: rows as {column: cell}."""
    tables: dict[str, list[dict[str, str]]] = {}
    title = None
    header: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("### "):
            title, header = line[4:], None
            tables[title] = []
        elif line.startswith("|") and title is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not all(set(c) <= {"-"} for c in cells):
                assert len(cells) == len(header), f"row {cells} vs header {header}"
                tables[title].append(dict(zip(header, cells, strict=True)))
    return tables


def table(tables: dict[str, list[dict[str, str]]], prefix: str) -> list[dict[str, str]]:
    (rows,) = [rows for title, rows in tables.items() if title.startswith(prefix)]
    return rows


def number(cell: str) -> float:
    m = SPREAD_RE.fullmatch(cell)
    assert m, f"not a measurement: {cell!r}"
    return float(m[1])


def test_quick_bench_produces_parseable_tables(tmp_path: Path) -> None:
    missing = lab.missing_requirements(["iperf3", "passt"])
    if missing:
        pytest.skip("; ".join(missing))
    report = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "-m", "passtd", "bench", "--quick",
                          "--json", str(report)],
                         capture_output=True, text=True, timeout=600, env=lab.passtd_env())
    assert res.returncode == 0, f"status {res.returncode}\n{res.stdout}\n{res.stderr}"
    tables = parse_tables(res.stdout)
    programs = bench.PROGRAMS

    bulk = table(tables, "Bulk TCP")
    assert [r["test"] for r in bulk] == [t.name for t in bench.QUICK_MATRIX if t.bulk]
    for row in bulk:
        for p in programs:
            assert number(row[f"{p} Gbit/s"]) > 0, row
            assert re.fullmatch(r"\d+%", row[f"{p} CPU"]), row
            assert re.fullmatch(r"\d+", row[f"{p} guest retr"]), row
        float(row["ratio"])
        float(row["CPU/Gbit ratio"])
        assert RESULT_RE.fullmatch(row["result"]), row

    latency = table(tables, "Request/response")
    assert [r["test"] for r in latency] == [t.name for t in bench.QUICK_MATRIX if not t.bulk]
    for row in latency:
        for p in programs:
            assert number(row[p]) > 0, row
        float(row["ratio"])
        assert RESULT_RE.fullmatch(row["result"]), row

    idle = table(tables, "Idle instance")
    assert [r["state"] for r in idle] == list(bench.IDLE_STATES)
    for row in idle:
        for p in programs:
            assert float(row[f"{p} RSS MiB"]) > 0, row
            assert float(row[f"{p} wakeups/s"]) >= 0, row
        assert RESULT_RE.fullmatch(row["result"]), row

    assert "Machine load during the" in res.stdout
    data = json.loads(report.read_text())
    runs = data["runs"]
    assert {(r["test"], r["program"]) for r in runs} == {
        (t.name, p) for t in bench.QUICK_MATRIX for p in programs}
    assert all(r["error"] is None and r["value"] > 0 for r in runs), runs
    assert [r["test"] for r in data["rows"]] == [r["test"] for r in bulk + latency]
