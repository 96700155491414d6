"""setup.sh's ping_group_range step (scripts/ping-group-range.sh): it opens the kernel's
closed default for the instances' group, and never overrides an admin's setting."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ping-group-range.sh"
GID = 65534


def run(tmp_path: Path, current: str, *, conf_exists: bool = False) -> tuple[str, str, str]:
    """(what the conf file holds afterwards or "", stdout, stderr)"""
    (tmp_path / "range").write_text(current + "\n")
    conf = tmp_path / "60-passtd-ping.conf"
    if conf_exists:
        conf.write_text("# the admin's\n")
    applied = tmp_path / "applied"
    fake_sysctl = tmp_path / "sysctl"
    fake_sysctl.write_text(f"#!/bin/sh\necho \"$@\" >{applied}\n")
    fake_sysctl.chmod(0o755)
    res = subprocess.run([str(SCRIPT), str(GID)], capture_output=True, text=True, timeout=10,
                         env={"PATH": "/usr/bin:/bin", "PING_RANGE_FILE": str(tmp_path / "range"),
                              "PING_CONF": str(conf), "SYSCTL": str(fake_sysctl)})
    assert res.returncode == 0, res.stderr
    return (conf.read_text() if conf.exists() else ""), res.stdout, res.stderr


def test_the_closed_kernel_default_is_opened_for_the_group_only(tmp_path: Path) -> None:
    conf, out, _ = run(tmp_path, "1\t0")
    assert conf == f"net.ipv4.ping_group_range = {GID} {GID}\n"
    conf_path = str(tmp_path / "60-passtd-ping.conf")
    assert (tmp_path / "applied").read_text().split() == ["-q", "-p", conf_path]
    assert "opened" in out


@pytest.mark.parametrize("current", ["0\t2147483647", "65534\t65534", "100\t70000"])
def test_a_range_that_covers_the_group_is_left_alone_quietly(tmp_path: Path,
                                                             current: str) -> None:
    assert run(tmp_path, current) == ("", "", "")


def test_an_admin_s_range_without_the_group_is_kept_and_explained(tmp_path: Path) -> None:
    conf, _, err = run(tmp_path, "100\t200")
    assert conf == "" and not (tmp_path / "applied").exists()
    assert '"100 200", set by this machine\'s admin: left as it is' in err
    assert "widen the range to cover 65534" in err


def test_an_existing_file_is_applied_as_it_is_never_rewritten(tmp_path: Path) -> None:
    conf, _, err = run(tmp_path, "1\t0", conf_exists=True)
    assert conf == "# the admin's\n" and err == ""
    assert (tmp_path / "applied").exists()
