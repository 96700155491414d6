"""Which engine runs: the compiled modules (setup.py, mypyc) or their sources.

passtd/engine/__init__.py decides before any engine module is imported; each case runs a
fresh interpreter over a copy of the package, so the decision is made as a starting
instance makes it.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "passtd" / "engine"
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
REPORT = """
import json, passtd.engine as e, passtd.engine.tcp as t, passtd.engine.fwd as f
import passtd.engine.checksum as c
print(json.dumps({"compiled": e.COMPILED, "why": e.INTERPRETED_WHY, "tcp": t.__file__,
                  "fwd": f.__file__, "checksum": c.ENGINE}))
"""


def compiled_here() -> bool:
    return (ENGINE / f"_compiled{SUFFIX}").exists()


needs_build = pytest.mark.skipif(not compiled_here(),
                                 reason="no compiled engine in this checkout (./setup.sh)")


def report(root: Path, *options: str, **env: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, *options, "-c", REPORT], cwd=root, check=True,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(root), "PASSTD_NATIVE": "1",
                              **env})
    result: dict[str, object] = json.loads(out.stdout)
    return result


def copy_of_the_build(tmp_path: Path) -> Path:
    """The package and the compiled build's shared library, as a build leaves them."""
    shutil.copytree(ROOT / "passtd", tmp_path / "passtd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for shared in ROOT.glob(f"*__mypyc{SUFFIX}"):
        shutil.copy2(shared, tmp_path)
    return tmp_path


def test_the_pure_python_path_runs_the_sources() -> None:
    got = report(ROOT, PASSTD_NATIVE="0")
    assert got["compiled"] is False and got["why"] == "PASSTD_NATIVE=0"
    assert str(got["tcp"]).endswith("tcp.py") and got["checksum"] == "python"


@needs_build
def test_a_fresh_build_runs_compiled() -> None:
    got = report(ROOT)
    assert got["compiled"] is True and got["why"] == "", \
        f"this checkout's build does not run: {got['why']}"
    assert str(got["tcp"]).endswith(SUFFIX) and got["checksum"] == "native"
    assert str(got["fwd"]).endswith("fwd.py")  # never compiled (build_record.NOT_COMPILED)


@needs_build
def test_sources_changed_after_the_build_run_as_sources(tmp_path: Path) -> None:
    """A checkout edited since its build must not run the old code."""
    root = copy_of_the_build(tmp_path)
    with (root / "passtd" / "engine" / "nat.py").open("a") as f:
        f.write("# an edit after the build\n")
    got = report(root)
    assert got["compiled"] is False and "older than the sources" in str(got["why"])
    assert str(got["tcp"]).endswith("tcp.py")
    assert got["checksum"] == "native"  # the C parts have no sources to go stale


@needs_build
def test_a_build_without_its_shared_library_runs_as_sources(tmp_path: Path) -> None:
    root = copy_of_the_build(tmp_path)
    for shared in root.glob(f"*__mypyc{SUFFIX}"):
        shared.unlink()
    got = report(root, "-S")  # (not the installed copy's library of the same build)
    assert got["compiled"] is False and "does not import" in str(got["why"])
    assert str(got["tcp"]).endswith("tcp.py")


@needs_build
def test_a_compiled_module_the_build_did_not_list_is_never_run(tmp_path: Path) -> None:
    """A leftover of an earlier build (a module since kept out of compiling)."""
    root = copy_of_the_build(tmp_path)
    (root / "passtd" / "engine" / f"fwd{SUFFIX}").write_bytes(b"not a library")
    got = report(root)
    assert got["compiled"] is True and str(got["fwd"]).endswith("fwd.py")


def test_never_compiled_runs_as_sources(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "passtd", tmp_path / "passtd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "_compiled.py"))
    got = report(tmp_path)
    assert got["compiled"] is False and str(got["why"]).startswith("not compiled")
    assert str(got["tcp"]).endswith("tcp.py") and got["checksum"] == "python"


def test_an_exception_name_has_one_type_per_function() -> None:
    """Compiled, a name bound by several `except ... as name` clauses of one function takes
    the first clause's type, and the later clause's exception fails to fit it: a capture
    file that could not be opened (OSError) raised TypeError out of PcapWriter.open, where
    an earlier clause had bound CaptureRefused to the same name. mypy accepts it, so this
    test keeps it out of the modules that are compiled."""
    from passtd.engine.build_record import engine_modules

    clashes = []
    for name in engine_modules():
        tree = ast.parse((ENGINE / f"{name}.py").read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            bound: dict[str, set[str]] = {}
            for node in ast.walk(function):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type:
                    bound.setdefault(node.name, set()).add(ast.unparse(node.type))
            clashes += [f"{name}.py:{function.lineno} {function.name}: {var} as {sorted(types)}"
                        for var, types in bound.items() if len(types) > 1]
    assert clashes == []
