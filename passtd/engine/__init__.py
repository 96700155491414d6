"""The L2 <-> L4 translator: qemu's frames in, host sockets out (see docs/ARCHITECTURE.md).

Compiled or not: setup.py compiles the engine's modules with mypyc where it can (the
same sources, typed, turned into C: docs/BENCHMARK.md, "The engine compiled", says what
that gains). The compiled modules sit beside their sources and Python imports them
first, so this package decides which run before any of them is imported:

- the compiled ones, when the build record (`_compiled`, build_record.py) imports and
  its digest matches the sources here, and only those the record lists;
- otherwise the sources, through a finder placed ahead of the compiled modules (for a
  module the record does not list, always: a leftover of an earlier build): with
  PASSTD_NATIVE=0 (the pure-Python path, tested as such), where nothing was compiled,
  where the checkout changed after its build (running the old code would be worse
  than running slowly), or where the compiled build does not import.

`COMPILED` says which; `INTERPRETED_WHY` why not (the service logs it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

from . import build_record


class _Sources:
    """Finds this package's modules but `compiled` as their sources, ahead of compiled
    ones beside them (modules with no source, the C parts _csum, _tcp_run and _tcp_buf,
    are left to the other finders). A meta path finder needs only `find_spec`; importlib.abc's
    base class is left out because importing it imports importlib.resources, which a
    running instance needs for nothing (measured: 0.07 MiB of its memory)."""

    def __init__(self, compiled: frozenset[str]) -> None:
        self.compiled = compiled

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        source = os.path.join(build_record.ENGINE_DIR, f"{name}.py")
        if package != __name__ or name in self.compiled or not os.path.isfile(source):
            return None
        return importlib.util.spec_from_file_location(fullname, source)


# PASSTD_NATIVE=0: none of the native parts, the C ones (checksum.py, tcp_run.py) included
NATIVE_WANTED = os.environ.get("PASSTD_NATIVE", "1") != "0"


def _compiled_build() -> tuple[str, tuple[str, ...]]:
    """("", the modules) when the compiled modules may run, else (why not, ())."""
    if not NATIVE_WANTED:
        return "PASSTD_NATIVE=0", ()
    not_compiled = "not compiled (setup.py compiles it with mypyc where it can)"
    record_name = f"{__name__}.{build_record.RECORD}"
    try:
        record = importlib.import_module(record_name)
    except ImportError as e:
        return (not_compiled if e.name == record_name else
                f"the compiled build does not import: {e}"), ()
    modules = tuple(getattr(record, "MODULES", ()))
    if record.__file__ is None or record.__file__.endswith(".py"):
        return not_compiled, ()
    if getattr(record, "DIGEST", None) != build_record.sources_digest(modules):
        return "the compiled build is older than the sources beside it (run ./setup.sh)", ()
    return "", modules


INTERPRETED_WHY, _modules = _compiled_build()
COMPILED = not INTERPRETED_WHY
sys.meta_path.insert(0, _Sources(frozenset(_modules)))
