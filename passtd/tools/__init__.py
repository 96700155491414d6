"""Tools around the daemon, not the daemon: the lab (isolated namespaces, tap guests, wires
with fault injection, /proc readers), `passtd demo`, `passtd bench` and the system call
timeline of a running instance (timeline.py).

The daemon (everything else in passtd) never imports this package: the import contract in
pyproject.toml (ruff's banned-api, run by ./run-tests.sh) refuses it, except for the command
line, which starts the tools on request.
"""
