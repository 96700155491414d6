"""Instance names: the one rule every name entering passtd is held to.

An instance name becomes many things at once: file names (/run/passtd/NAME.sock and
NAME.yaml, the state directory /run/passtd-state/NAME), a program argument (`passtd run
NAME`, written by systemd and the libvirt hook), a systemd unit instance
(passtd@NAME.socket, escaped), an element of a D-Bus bus name (org.passtd.Passtd1.<NAME>,
escaped) and a libvirt domain name. The rule keeps every one of them ordinary:

    1 to 60 characters of A-Z a-z 0-9 _ . -, the first a letter or a digit

Why each part:
  - the first character: "." and ".." are directory names (the unit passtd@..service, VM
    ".", had /run/passtd-state itself as its state directory, and stopping it deleted the
    runtime forwards of every other VM); a leading "-" is read as an option (`passtd run
    -x` starts no instance); systemd-escape spells a leading "." as \\x2e.
  - no "/" (a path), no ":" (systemd 254 and later read `RuntimeDirectory=A:B` as a
    directory and a symlink to it), no "@" (the separator of a unit template), no space,
    no non-ASCII character (each tool that sees the name quotes or escapes those its own
    way).
  - 60: passtd@NAME.service stays within systemd's 255 characters for a unit name even
    when every "-" is escaped (\\x2d, four characters); the socket path (77 bytes of the
    107 a UNIX socket address holds) and the D-Bus name (at most 199 of 255) fit as well.

`check_name` is called wherever a name comes in: config.load (so `passtd run` and
`passtd config show`), the `instances:` keys of the configuration files, `passtd
check-name` (the socket unit's ExecStartPre), the D-Bus name mapping (dbus_api), passtctl's
NAME and DOMAIN arguments, and the libvirt hook and `passtctl libvirt attach`. The error
reads the same everywhere.

Not done here: mapping other names onto valid ones. A libvirt domain whose name breaks the
rule is refused with the reason (rename it) rather than given an instance name its admin
would not recognise in `systemctl`, `passtctl list` or /run/passtd.
"""

from __future__ import annotations

import os
import re
from typing import TypeGuard

DEFAULT_RUNTIME_DIR = "/run/passtd"  # NAME.sock, and NAME.yaml of the libvirt hook
RUNTIME_DIR_ENV = "PASSTD_RUNTIME_DIR"  # replaces it (tests, `passtd run` by a user)
NAME_MAX = 60
RULE = f"1 to {NAME_MAX} characters of A-Z a-z 0-9 _ . -, starting with a letter or a digit"
_NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{NAME_MAX - 1}}}")


class InvalidName(ValueError):
    """Not an instance name; the message quotes the name and the rule."""


def is_valid_name(name: object) -> TypeGuard[str]:
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def runtime_dir() -> str:
    return os.environ.get(RUNTIME_DIR_ENV) or DEFAULT_RUNTIME_DIR


def hook_runtime_file(name: str) -> str:
    """The runtime file the libvirt hook writes for the instance of domain `name`: while it
    exists, the instance serves that libvirt domain (passtd.libvirt)."""
    return os.path.join(runtime_dir(), f"{name}.yaml")


def check_name(name: object) -> str:
    """`name` itself if it is a valid instance name, else InvalidName."""
    if is_valid_name(name):
        return name
    raise InvalidName(f"instance name {name!r}: must be {RULE}")
