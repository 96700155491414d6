"""`passtd bench --quick`: the benchmark runs end to end and its output can be read.

Both programs, the quick matrix (one round of 1-second runs). No thresholds here: figures
depend on the machine and its load, and judging them against the targets is the bench's
own job (docs/BENCHMARK.md). The netns test proves that the command works: it exits 0,
every run measured something, the three markdown tables have the expected rows and cells
that parse, and the --json report agrees with them. The other tests need no root: the
verdicts against the targets, the tables rendered from made-up runs, /proc/net/snmp
parsing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from passtd.tools import bench, lab

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


@pytest.mark.netns
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


# --- no root needed ----------------------------------------------------------------------


@pytest.mark.parametrize(("test", "value_ratio", "cpu_ratio", "verdict"), [
    (bench.Test("g2h", 4, 65520), 1.0, 2.0, "PASS"),
    (bench.Test("g2h", 4, 65520), 0.99, 1.0, "FAIL (rate)"),
    (bench.Test("h2g", 6, 1500), 1.0, 1.5, "PASS"),
    (bench.Test("h2g", 6, 1500), 1.0, 1.6, "FAIL (CPU)"),
    (bench.Test("h2g", 6, 1500), 0.9, 1.0, "FAIL (rate)"),
    (bench.Test("h2g", 6, 1500), None, None, "FAIL (rate, CPU)"),
    (bench.Test("rr", 4), 1.2, None, "PASS"),
    (bench.Test("rr", 6), 1.25, None, "FAIL (latency)"),
    (bench.Test("crr", 4), 0.9, None, "PASS"),
    (bench.Test("crr", 4), 0.85, None, "FAIL (rate)"),
])
def test_verdicts_follow_the_targets(test: bench.Test, value_ratio: float | None,
                                     cpu_ratio: float | None, verdict: str) -> None:
    assert bench.judge(test, value_ratio, cpu_ratio, True)[1] == verdict
    assert bench.judge(test, value_ratio, cpu_ratio, False)[1] == "n/a"


def test_idle_verdicts() -> None:
    ok = bench.IdleSample("guest", "passtd", rss_mib=29.9, wakeups_per_s=0.0)
    assert bench.judge_idle(ok) == "PASS"
    bad = bench.IdleSample("after", "passtd", rss_mib=30.0, wakeups_per_s=0.1)
    assert bench.judge_idle(bad) == "FAIL (RSS, wakeups)"
    assert bench.judge_idle(bench.IdleSample("guest", "passt", rss_mib=99.0)) == "-"


def made_up_runs() -> list[bench.Run]:
    runs = []
    for rnd, (ours, theirs) in enumerate([(5.0, 4.0), (6.0, 5.0), (4.0, 6.0)], 1):
        for program, gbps in (("passtd", ours), ("passt", theirs)):
            runs.append(bench.Run("g2h/4/65520", program, rnd, value=gbps, cpu=10 * gbps,
                                  other_cpu=5.0, machine_busy=99.0, steal=0.0,
                                  guest={"retr": rnd}))
        runs.append(bench.Run("rr/4", "passtd", rnd, value=115.0, cpu=40.0, other_cpu=30.0))
        runs.append(bench.Run("rr/4", "passt", rnd, value=100.0, cpu=20.0, other_cpu=1.0))
    runs[0].error, runs[0].value = "iperf3: boom", None
    return runs


def test_made_up_runs_render_as_parseable_tables() -> None:
    runs = made_up_runs()
    tests = [bench.Test("g2h", 4), bench.Test("rr", 4)]
    rows = bench.summarize(tests, runs, bench.PROGRAMS)
    g2h, rr = rows
    assert g2h.value["passtd"] == bench.Spread(5.0, 4.0, 6.0, 2)  # the failed run left out
    assert g2h.errors == {"passtd": 1, "passt": 0}
    assert g2h.ratio == pytest.approx(1.0) and g2h.cpu_ratio == pytest.approx(1.0)
    assert g2h.verdict == "FAIL (errors)"
    assert rr.ratio == pytest.approx(1.15) and rr.verdict == "PASS"
    idle = [bench.IdleSample(s, p, rss_mib=20.0, wakeups_per_s=0.0, guest_frames=0)
            for s in bench.IDLE_STATES for p in bench.PROGRAMS]
    meta = {"rounds": 3, "time": 5, "wire": "whole", "idle_time": 10.0, "cpus": 2,
            "kernel": "6.1", "loadavg": "0 0 0", "commands": {p: p for p in bench.PROGRAMS},
            "versions": {p: "1" for p in bench.PROGRAMS}}
    text = bench.render(meta, rows, idle, runs, bench.PROGRAMS)
    tables = parse_tables(text)
    (bulk,) = table(tables, "Bulk TCP")
    assert number(bulk["passtd Gbit/s"]) == 5.0 and bulk["passtd Gbit/s"] == "5.00 (4.00-6.00)"
    assert bulk["ratio"] == "1.00" and bulk["passtd guest retr"] == "2"
    (latency,) = table(tables, "Request/response")
    assert number(latency["passtd"]) == 115.0 and latency["ratio"] == "1.15"
    assert latency["other CPU max"] == "30%"
    assert [r["result"] for r in table(tables, "Idle instance")] == ["PASS"] * 3
    assert "3 of 12 runs were perturbed" in text


def test_one_program_has_no_ratio_columns() -> None:
    runs = [r for r in made_up_runs() if r.program == "passtd"]
    rows = bench.summarize([bench.Test("g2h", 4)], runs, ["passtd"])
    meta = {"rounds": 3, "time": 5, "wire": "whole", "idle_time": 10.0, "cpus": 2,
            "kernel": "6.1", "loadavg": "0 0 0", "commands": {"passtd": "x"},
            "versions": {"passtd": "1"}}
    (row,) = table(parse_tables(bench.render(meta, rows, [], runs, ["passtd"])), "Bulk TCP")
    assert "ratio" not in row and row["result"] == "n/a"


def test_snmp_counters() -> None:
    text = ("Ip: Forwarding DefaultTTL\nIp: 1 64\n"
            "Tcp: RtoAlgorithm RetransSegs InCsumErrors\nTcp: 1 17 2\n"
            "TcpExt: SyncookiesSent TCPOFOQueue\nTcpExt: 0 5\n")
    assert bench.parse_snmp(text, bench.GUEST_COUNTERS) == {
        "retr": 17, "ooo": 5, "csum_errors": 2}


@pytest.mark.netns
def test_density_mode_measures_many_instances(tmp_path: Path) -> None:
    """`passtd bench --density N` (a few here: the figures come from N=200 by hand)."""
    missing = lab.missing_requirements(["passt"])
    if missing:
        pytest.skip("; ".join(missing))
    report = tmp_path / "density.json"
    res = subprocess.run([sys.executable, "-m", "passtd", "bench", "--density", "4",
                          "--idle-time", "2", "--json", str(report)],
                         capture_output=True, text=True, timeout=300, env=lab.passtd_env())
    assert res.returncode == 0, f"status {res.returncode}\n{res.stdout}\n{res.stderr}"
    rows = table(parse_tables(res.stdout), "Density")
    assert [r["program"] for r in rows] == list(bench.PROGRAMS)
    for row in rows:
        assert row["answered"] == "4/4", row
        assert float(row["PSS total MiB"]) > 0, row
    summaries = {s["program"]: s for s in json.loads(report.read_text())}
    ours = summaries["passtd"]
    assert ours["answered"] == 4 and ours["first_answer_ms_max"] < 20_000
    assert ours["idle_wakeups_per_s"] == 0, ours  # idle instances do not wake the host
