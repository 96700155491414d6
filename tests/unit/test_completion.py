"""bash completion for passtctl (completion/passtctl.bash), run by a real bash: the words
offered at each position."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "completion" / "passtctl.bash"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def complete(line: str, tmp_path: Path, forwards_json: str = "[]") -> list[str]:
    """What bash offers for the last word of `line` (an empty last word after a space).
    /run/passtd is replaced by a directory of the test's; `passtctl` by a stub."""
    run_dir = tmp_path / "run-passtd"
    run_dir.mkdir(exist_ok=True)
    for name in ("vm1", "build-box"):
        (run_dir / f"{name}.sock").touch()
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "passtctl").write_text(f"#!/bin/sh\necho '{forwards_json}'\n")
    (stub / "passtctl").chmod(0o755)
    script = SCRIPT.read_text().replace("/run/passtd/", f"{run_dir}/")
    words = line.split(" ")
    program = f"""{script}
COMP_WORDS=({" ".join(repr(w) if w else "''" for w in words)})
COMP_CWORD={len(words) - 1}
_passtctl
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    res = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30,
                         check=True, env={**os.environ, "PATH": f"{stub}:{os.environ['PATH']}"})
    return sorted(w for w in res.stdout.split("\n") if w)


def test_first_word_is_list_libvirt_or_an_instance(tmp_path: Path) -> None:
    assert complete("passtctl ", tmp_path) == ["build-box", "libvirt", "list", "metrics", "vm1"]
    assert complete("passtctl --json v", tmp_path) == ["vm1"]


def test_commands_of_an_instance(tmp_path: Path) -> None:
    assert complete("passtctl vm1 ", tmp_path) == ["flows", "forward", "forwards", "monitor",
                                                   "stats", "status"]
    assert complete("passtctl vm1 forward ", tmp_path) == ["add", "remove"]
    assert complete("passtctl vm1 forward add ", tmp_path) == ["tcp", "udp"]


def test_forward_ids_come_from_the_instance(tmp_path: Path) -> None:
    assert complete("passtctl vm1 forward remove ", tmp_path,
                    '[{"id": 3}, {"id": 12}]') == ["12", "3"]


def test_libvirt_commands_and_options(tmp_path: Path) -> None:
    assert complete("passtctl libvirt ", tmp_path) == ["attach", "detach"]
    assert "--json" in complete("passtctl --j", tmp_path)
    assert complete("passtctl --bus-address ", tmp_path) == []
