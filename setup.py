"""The native parts, each the twin of a pure-Python path that stays the reference:

- passtd.engine._csum: the checksum's inner loop (checksum.py);
- passtd.engine._tcp_run: the walk over a run of in-order guest segments (tcp_run.py);
- passtd.engine._tcp_buf: the headers of host->guest TCP frames (tcp_buf.py);
- the engine's own modules (passtd/engine/*.py) compiled by mypyc, where mypy (with
  mypyc) is importable here: setup.sh builds with its venv's (`--no-build-isolation`).
  The sources are the code: mypyc turns the same typed modules into C, and they stay
  beside the compiled ones. `_compiled.py` (written here, compiled with them) records
  which modules were compiled and a digest of their sources, so that a compiled build
  older than its sources is never run (passtd/engine/__init__.py checks it).

Optional: where they cannot be built, passtd runs the pure-Python paths. PASSTD_COMPILE=0
builds without the compiled engine. Everything else about the package is in pyproject.toml.
"""

import os
import sys

from setuptools import Extension, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from passtd.engine.build_record import ENGINE_DIR, RECORD, engine_modules, sources_digest


def compiled_engine() -> list[Extension]:
    if os.environ.get("PASSTD_COMPILE", "1") == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:  # no mypyc here: the engine runs as Python
        return []
    modules = engine_modules()
    with open(os.path.join(ENGINE_DIR, RECORD + ".py"), "w", encoding="ascii") as f:
        f.write('"""Written by setup.py: the engine modules this build compiled (mypyc), and a\n'
                'digest of their sources (passtd/engine/__init__.py compares it)."""\n\n'
                "MODULES: tuple[str, ...] = (\n")
        f.writelines(f'    "{name}",\n' for name in modules)
        f.write(f')\nDIGEST = "{sources_digest(modules)}"\n')
    paths = [os.path.join("passtd", "engine", f"{name}.py") for name in (*modules, RECORD)]
    extensions = mypycify(paths, opt_level="3")
    for extension in extensions:  # a part that fails to build leaves the sources to run
        extension.optional = True
    return extensions


setup(ext_modules=[
    Extension("passtd.engine._csum", ["passtd/engine/_csum.c"],
              depends=["passtd/engine/_sum.h"], extra_compile_args=["-O3"], optional=True),
    Extension("passtd.engine._tcp_run", ["passtd/engine/_tcp_run.c"],
              extra_compile_args=["-O3"], optional=True),
    Extension("passtd.engine._tcp_buf", ["passtd/engine/_tcp_buf.c"],
              depends=["passtd/engine/_sum.h"], extra_compile_args=["-O3"], optional=True),
    *compiled_engine(),
])
