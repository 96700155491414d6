"""passtctl starts without what only some commands need: libvirt (passtctl libvirt and
forward add --persist) and the engine's event loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_passtctl_imports_neither_libvirt_nor_the_engine_loop() -> None:
    res = subprocess.run([sys.executable, "-c", "import sys, passtd.passtctl; "
                          "print(' '.join(sorted(sys.modules)))"], capture_output=True,
                         text=True, cwd=REPO, timeout=60, check=True)
    loaded = set(res.stdout.split())
    assert not loaded & {"libvirt", "passtd.libvirt", "passtd.passtctl_libvirt",
                         "passtd.engine.loop", "passtd.config"}, sorted(loaded)
