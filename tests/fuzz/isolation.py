"""Where the engine target may run: only in the lab namespace run.py builds for it.

Kept apart from engine_target.py, which imports the engine: run.py checks this before
anything of passtd is imported (atheris instruments only modules imported after it starts).
"""

from __future__ import annotations

import os
import socket

OUTER_NETNS_ENV = "PASSTD_FUZZ_OUTER_NETNS"  # run.py: the namespace it built the lab from


class NotIsolated(RuntimeError):
    """The engine target was asked to run in the machine's own network namespace."""


def netns_id() -> str:
    return str(os.stat("/proc/self/ns/net").st_ino)


def require_lab() -> None:
    """Refuse to run unless run.py started us in a network namespace other than its own,
    whose only links are lo and the lab's eth0 (the dead-end uplink)."""
    outer = os.environ.get(OUTER_NETNS_ENV)
    if not outer or outer == netns_id():
        raise NotIsolated("the engine target runs only inside a lab namespace: use "
                          "tests/fuzz/run.py engine (as root), which builds one")
    links = {name for _, name in socket.if_nameindex()}
    if not links <= {"lo", "eth0"}:
        raise NotIsolated(f"this namespace has links {sorted(links)}: not the lab's")
