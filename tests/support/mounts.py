"""A program under test in a mount namespace of its own: a tiny tmpfs (a full filesystem),
a file bind-mounted over /etc/resolv.conf. The mounts exist for that program only, never
for the machine; /proc/PID/root/PATH shows them from outside."""

from __future__ import annotations

from collections.abc import Sequence


def with_private_mounts(setup: str, argv: Sequence[str]) -> list[str]:
    """`argv`, exec'd (same pid) in a new mount namespace after the shell commands
    `setup` ran there."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
            f'{setup}\nexec "$@"', "sh", *argv]
