#!/bin/bash
# run-tests.sh: install what the tests need (./setup.sh --no-demo), then run them all.
#
#   ./run-tests.sh                 lint, types + unit + integration tests (root: namespaces, VMs,
#                                  a private dbus-daemon, systemd and libvirtd in containers),
#                                  then the unit tests again on the pure-Python path
#                                  (PASSTD_NATIVE=0: without the native parts)
#   ./run-tests.sh tests/unit -k tcp    any pytest arguments instead of the whole suite
#
# Exit status is pytest's (or ruff's): non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --no-demo
PY=${PASSTD_PREFIX:-/opt/passtd}/venv/bin/python
echo "run-tests: ruff check (style, and the import contract: the daemon never imports passtd.tools)"
"$PY" -m ruff check .
echo "run-tests: mypy (strict, the whole package)"
"$PY" -m mypy
echo "run-tests: pytest"
if [ $# -gt 0 ]; then
	exec "$PY" -m pytest -p no:cacheprovider -ra "$@"
fi
"$PY" -m pytest -p no:cacheprovider -ra tests
echo "run-tests: pytest tests/unit on the pure-Python path (PASSTD_NATIVE=0)"
PASSTD_NATIVE=0 exec "$PY" -m pytest -p no:cacheprovider -q tests/unit
