"""The one native part: passtd.engine._csum, the checksum's inner loop (see its source).

Optional: where it cannot be built, passtd runs its pure-Python path (checksum.py).
Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("passtd.engine._csum", ["passtd/engine/_csum.c"],
                             extra_compile_args=["-O3"], optional=True)])
