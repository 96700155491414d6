"""The native parts, each the C twin of a pure-Python path that stays the reference:

- passtd.engine._csum: the checksum's inner loop (checksum.py);
- passtd.engine._tcp_run: the walk over a run of in-order guest segments (tcp_run.py).

Optional: where they cannot be built, passtd runs the pure-Python paths.
Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("passtd.engine._csum", ["passtd/engine/_csum.c"], extra_compile_args=["-O3"],
              optional=True),
    Extension("passtd.engine._tcp_run", ["passtd/engine/_tcp_run.c"],
              extra_compile_args=["-O3"], optional=True),
])
