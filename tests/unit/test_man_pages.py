"""The manual pages in man/ render without warnings and document what they must: every
passtctl command, every passtd command, every setting of /etc/passtd.yaml."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAN = REPO / "man"
PAGES = sorted(MAN.glob("*.[1-8]"))


def text_of(page: Path) -> str:
    """The page as a reader sees it (groff's plain-text output, hyphens and all)."""
    res = subprocess.run(["groff", "-man", "-Tutf8", "-P-c", "-P-b", "-P-u", str(page)],
                         capture_output=True, text=True, check=True, timeout=30,
                         env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    return re.sub(r"\s+", " ", res.stdout.replace("\u2010", "-").replace("\u2212", "-"))


pytestmark = pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff")


def test_the_four_pages_exist() -> None:
    assert [p.name for p in PAGES] == ["passtctl.1", "passtd-libvirt.7", "passtd.8",
                                       "passtd.yaml.5"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_a_page_renders_without_warnings(page: Path) -> None:
    res = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True,
                         text=True, timeout=30, env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_passtctl_1_documents_every_command_and_exit_status() -> None:
    text = text_of(MAN / "passtctl.1")
    for command in ("list", "status", "forwards", "flows", "forward add", "forward remove",
                    "libvirt attach", "libvirt detach", "--json", "--persist"):
        assert command in text, command
    for status in range(5):
        assert re.search(rf"EXIT STATUS.* {status} ", text), status


def test_passtd_8_documents_every_command() -> None:
    text = text_of(MAN / "passtd.8")
    help_text = subprocess.run([sys.executable, "-m", "passtd", "--help"], capture_output=True,
                               text=True, cwd=REPO, timeout=30, check=True).stdout
    commands = re.findall(r"^    ([a-z-]+) ", help_text, re.MULTILINE)
    assert commands
    for command in commands:
        assert f"passtd {command}" in text or f" {command} " in text, command


def test_passtd_yaml_5_documents_every_setting() -> None:
    text = text_of(MAN / "passtd.yaml.5")
    shipped = (REPO / "etc" / "passtd.yaml").read_text()
    settings = set(re.findall(r"^  # ([a-z_0-9]+):", shipped, re.MULTILINE))
    settings |= set(re.findall(r"^  #   ([a-z_0-9]+):", shipped, re.MULTILINE))
    assert len(settings) > 30
    missing = sorted(s for s in settings if not re.search(rf"\b{s}\b", text))
    assert not missing, missing


def test_passtd_8_lists_every_journal_message_id() -> None:
    from passtd.engine import events

    text = (REPO / "man" / "passtd.8").read_text()
    for name, message_id in events.MESSAGE_IDS.items():
        assert f".B {name}\n{message_id}\n" in text, name
