"""The repository stands on its own: nothing it ships (code, comments, docs, tests) points
at files outside it, such as the notes of a development machine. A user has only the clone."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUTSIDE = re.compile(r"\.\./shared|shared/rig|\b(?:PLATFORM|REFERENCE|RESULTS|PYPERF)\.md\b")


def test_no_file_points_outside_the_repository() -> None:
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"],
                                capture_output=True, check=False)
    except FileNotFoundError:  # no git on this machine (a clone copied in): as below
        listed = subprocess.CompletedProcess([], 127)
    if listed.returncode != 0:  # not a git checkout (an unpacked release): scan the tree
        files = [p.relative_to(REPO) for p in REPO.rglob("*") if p.is_file()
                 and ".git" not in p.parts and "__pycache__" not in p.parts]
    else:
        files = [Path(name) for name in listed.stdout.decode().split("\0") if name]
    found = []
    for name in files:
        if name == Path(__file__).relative_to(REPO):
            continue
        try:
            text = (REPO / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        found += [f"{name}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
                  if OUTSIDE.search(line)]
    assert not found, "references to files outside the repository:\n" + "\n".join(found)


def test_the_package_metadata_builds_without_deprecation_warnings() -> None:
    """setup.sh's output shows what matters: a `project.license` table makes setuptools
    print dozens of lines of deprecation warnings on every install (PEP 639 wants an SPDX
    expression, which setuptools reads from version 77 on)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)
    assert "setuptools>=77" in project["build-system"]["requires"]
