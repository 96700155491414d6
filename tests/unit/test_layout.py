"""The engine's layout rules (passtd/engine/loop.py and context.py describe them), checked.

- no engine module over 500 lines; tcp.py, which holds every TCP decision in one place
  (the rule at its top, including how a flow carries on after a restart and the numbers
  a restart may hand it), may reach 690;
- the engine imports nothing of passtd outside passtd/engine;
- the parts never import each other sideways: a socket half does not import another
  socket half (tcp_sock may use its own reader, tcp_peek); the link, forwards, timers
  and guest modules import no socket half; only loop.py puts them together;
- the sans-IO cores (the protocol state machines, responders, codecs, nat) import no part
  that owns sockets or a loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "passtd" / "engine"
LIMIT, TCP_LIMIT = 500, 690
HALVES = {"tcp_sock", "tcp_peek", "udp_sock", "icmp_sock"}
PARTS = {"link", "forwards", "timers", "guest", "context", "sockets", "handover", "poller",
         "mainloop", "aioloop", "netlink", "news"}
CORES = {"tcp", "tcp_seg", "tcp_hold", "tcp_run", "udp", "icmp", "arp", "dhcp", "dhcpv6", "ndp",
         "packet", "checksum", "tap", "tcp_buf", "flow", "nat", "addrs", "fwd", "settings",
         "events"}
ALLOWED_SIDEWAYS = {("tcp_sock", "tcp_peek")}


def engine_imports(path: Path) -> set[str]:
    """The engine modules a module imports (relative or absolute), and 'OUTSIDE' for any
    other passtd module."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:
                names = [module] if module else [alias.name for alias in node.names]
                out |= {name.split(".")[0] for name in names}
            elif node.level > 1 or (module.startswith("passtd") and \
                    not module.startswith("passtd.engine")):
                out.add("OUTSIDE")
        elif isinstance(node, ast.Import):
            out |= {"OUTSIDE" for alias in node.names if alias.name.startswith("passtd")
                    and not alias.name.startswith("passtd.engine")}
    return out


# (_compiled.py is written by a build, build_record.py checks it: neither is a part)
MODULES = {p.stem: p for p in ENGINE.glob("*.py")
           if p.stem not in {"__init__", "_compiled", "build_record"}}


def test_every_module_is_placed() -> None:
    assert set(MODULES) == HALVES | PARTS | CORES | {"loop", "pcap"}, \
        "a new engine module: say in this test which kind of part it is"


def test_no_engine_module_is_too_long() -> None:
    for name, path in MODULES.items():
        lines = len(path.read_text().splitlines())
        assert lines <= (TCP_LIMIT if name == "tcp" else LIMIT), f"{name}.py has {lines} lines"


def test_the_engine_imports_nothing_outside_it() -> None:
    for name, path in MODULES.items():
        assert "OUTSIDE" not in engine_imports(path), f"{name}.py imports outside the engine"


def test_parts_do_not_import_each_other_sideways() -> None:
    for name in HALVES:
        sideways = {m for m in engine_imports(MODULES[name]) & HALVES
                    if (name, m) not in ALLOWED_SIDEWAYS}
        assert not sideways, f"{name}.py imports {sideways}"
    for name in PARTS:
        assert not engine_imports(MODULES[name]) & (HALVES | {"loop"}), \
            f"{name}.py imports a socket half or the loop"


def test_only_the_bus_loop_imports_asyncio() -> None:
    """A bus-less instance runs without asyncio (mainloop.py says why): no engine module
    imports it but aioloop.py, which no engine module imports (the service does, for the
    D-Bus API)."""
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert ("asyncio" in imported) == (name == "aioloop"), f"{name}.py and asyncio"
        assert "aioloop" not in engine_imports(path), f"{name}.py imports aioloop"


def test_cores_import_no_part_with_sockets_or_a_loop() -> None:
    for name in CORES:
        assert not engine_imports(MODULES[name]) & (HALVES | PARTS | {"loop", "pcap"}), \
            f"{name}.py (a sans-IO core) imports a part"
