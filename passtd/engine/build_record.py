"""Which engine modules a build compiles, and a digest of their sources.

Design: setup.py compiles the engine's modules with mypyc and writes `_compiled.py`
(compiled with them) holding the list and the digest computed here; at import the
package (`__init__.py`) computes the digest again over the sources beside it. A compiled
module sits beside its source and Python imports it first, so a checkout edited after
its last build would otherwise run the old code: where the digests differ, or the
compiled set does not import, the engine runs from its sources.

Never compiled itself: the check must work when the compiled build does not.
"""

from __future__ import annotations

import binascii
import os

ENGINE_DIR = os.path.dirname(os.path.abspath(__file__))
RECORD = "_compiled"  # the module setup.py writes
# fwd.py builds forward rules from what users give (config, D-Bus, the command line):
# compiled, a value of the wrong type fails as a TypeError before its own checks can say
# what is wrong with it
NOT_COMPILED = ("__init__", "build_record", RECORD, "fwd")


def engine_modules(directory: str = ENGINE_DIR) -> tuple[str, ...]:
    """The modules a build compiles: every engine module but this check and the package."""
    names = (name[:-3] for name in os.listdir(directory) if name.endswith(".py"))
    return tuple(sorted(name for name in names if name not in NOT_COMPILED))


def sources_digest(modules: tuple[str, ...], directory: str = ENGINE_DIR) -> str:
    """CRC-32 over the modules' names and sources, with their lengths; "" when one of them
    is missing. It tells an edited source from the one compiled, nothing more: no
    hashlib, whose OpenSSL costs every instance ~0.4 MiB and ~5 ms to start."""
    crc, total = 0, 0
    for name in modules:
        try:
            with open(os.path.join(directory, f"{name}.py"), "rb") as f:
                source = f.read()
        except OSError:
            return ""
        crc = binascii.crc32(source, binascii.crc32(b"%s %d\n" % (name.encode(), len(source)), crc))
        total += len(source)
    return f"{crc:08x}-{total}"
