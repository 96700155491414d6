#!/usr/bin/env python3
"""Run a fuzz target for as long as you like, or reproduce a crash (see README.md).

    python tests/fuzz/run.py list
    python tests/fuzz/run.py TARGET [--time S | --runs N] [--seed N]
                                    [--driver atheris|python] [--dir DIR] [-- LIBFUZZER_ARGS...]
    python tests/fuzz/run.py TARGET --repro FILE... [--verbose]
    python tests/fuzz/run.py TARGET --minimize FILE
    python tests/fuzz/run.py TARGET --seeds DIR

The engine target opens host sockets towards whatever the frames name, so it only runs
inside a lab namespace with a dead-end uplink: run as root, this command builds one
(passtd.tools.lab.HostNamespace, prefix "pdfuzz" unless --prefix says otherwise) and runs
itself inside it; it refuses to run in the machine's own network namespace.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

DEFAULT_DIR = Path("/var/tmp/passtd-fuzz")
PURE = ("framing", "frame", "arp", "dhcp", "dhcpv6", "ndp", "tcp_run", "tcp_buf", "tcp")
ALL = (*PURE, "engine")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=(*ALL, "list"))
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--time", type=float, default=None,
                        help="seconds to fuzz (default 60 unless --runs is given)")
    budget.add_argument("--runs", type=int, default=None,
                        help="fuzz for this many executions (seeds included) instead of a "
                             "time; with the python driver and --seed, the same inputs on "
                             "any machine, as the test suite runs them")
    p.add_argument("--driver", choices=("atheris", "python"), default=None,
                   help="atheris (libFuzzer) when installed, else the pure-Python driver")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                   help="where corpus/ and crashes/ of each target go (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="python driver: RNG seed")
    p.add_argument("--repro", type=Path, nargs="+", metavar="FILE",
                   help="run the target once on each FILE and show what it raises")
    p.add_argument("--verbose", action="store_true", help="with --repro: trace the tcp ops")
    p.add_argument("--minimize", type=Path, metavar="FILE",
                   help="atheris: shrink a crashing input (written to FILE.min)")
    p.add_argument("--seeds", type=Path, metavar="DIR", help="write the seed corpus to DIR")
    p.add_argument("--prefix", default="pdfuzz", help="engine: lab namespace prefix")
    p.add_argument("--inside-lab", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("libfuzzer", nargs="*", help="arguments for libFuzzer (after --)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.target == "list":
        from fuzz.targets import TARGETS

        for target in TARGETS.values():
            print(f"{target.name:8} {target.doc}")
        print("engine   the whole Engine on an event loop, inside a lab namespace (root)")
        return 0
    if args.target == "engine" and not args.inside_lab:
        return _run_in_lab(args, argv if argv is not None else sys.argv[1:])
    if args.target == "engine":
        from fuzz.isolation import require_lab

        require_lab()  # before anything: never fuzz the engine in the machine's namespace
    driver = args.driver or ("atheris" if _has_atheris() else "python")
    if args.minimize:
        return _minimize(args)  # never returns
    if driver == "atheris" and not (args.repro or args.seeds):
        return _atheris(args)  # never returns: libFuzzer ends the process
    target = _load(args.target)
    if args.seeds:
        args.seeds.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(target.seeds()):
            (args.seeds / f"seed-{i:03d}").write_bytes(seed)
        return 0
    if args.repro:
        return _repro(target, args.repro, args.verbose)
    return _python(target, args)


def _has_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def _load(name: str):  # -> driver.Target
    if name == "engine":
        from fuzz.engine_target import ENGINE_TARGET

        return ENGINE_TARGET
    from fuzz.targets import TARGETS

    return TARGETS[name]


def _repro(target, files: list[Path], verbose: bool) -> int:
    import traceback

    run = target.run
    if verbose and target.name == "tcp":
        from fuzz.tcp_target import run_tcp

        def run(data: bytes) -> None:
            run_tcp(data, trace=print)

    status = 0
    for path in files:
        try:
            run(path.read_bytes())
        except Exception:
            print(f"{path}: FAILS\n{traceback.format_exc()}")
            status = 1
        else:
            print(f"{path}: passes")
    return status


def _python(target, args: argparse.Namespace) -> int:
    import passtd.engine
    from fuzz.driver import CoverageFuzzer, module_files

    workdir = args.dir / target.name
    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    extra = [p.read_bytes() for p in sorted(corpus.iterdir()) if p.is_file()]
    engine_modules = [m for name, m in sys.modules.items()
                      if name.startswith("passtd.engine.") and m is not None]
    seed = args.seed if args.seed is not None else int(time.time())
    print(f"fuzz {target.name}: python driver, seed {seed}, {len(extra)} corpus entries "
          f"from {corpus}", flush=True)
    fuzzer = CoverageFuzzer(target, module_files([passtd.engine, *engine_modules]), seed=seed,
                            crash_dir=workdir / "crashes",
                            log=lambda line: print(line, flush=True))
    budget = {"executions": args.runs} if args.runs is not None \
        else {"seconds": args.time if args.time is not None else 60.0}
    stats = fuzzer.run(**budget, extra_corpus=extra, report_every=30.0,
                       stop_on_failure=False)
    known = {p.name for p in corpus.iterdir()}
    for data in fuzzer.corpus:
        name = f"py-{_digest(data)}"
        if name not in known:
            (corpus / name).write_bytes(data)
    print(stats.line(target.name), flush=True)
    return 1 if stats.failures else 0


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(data).hexdigest()[:16]


def _atheris(args: argparse.Namespace) -> int:
    import atheris

    with atheris.instrument_imports(include=["passtd"]):
        target = _load(args.target)
    workdir = args.dir / target.name
    corpus, seeds, crashes = workdir / "corpus", workdir / "seeds", workdir / "crashes"
    for d in (corpus, seeds, crashes):
        d.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(target.seeds()):
        (seeds / f"seed-{i:03d}").write_bytes(seed)
    libfuzzer = [
        f"-max_len={target.max_len}",
        f"-runs={args.runs}" if args.runs is not None
        else f"-max_total_time={int(args.time if args.time is not None else 60)}",
        f"-artifact_prefix={crashes}/",
        "-timeout=20",
        "-rss_limit_mb=4096",
        "-print_final_stats=1",
        "-len_control=20",  # programs (tcp, engine) need some length to get anywhere
        *(f"-dict={p}" for p in _dictionary(target, workdir)),
        *args.libfuzzer,
        str(corpus),
        str(seeds),
    ]
    print(f"fuzz {target.name}: atheris, corpus {corpus}, crashes in {crashes}", flush=True)
    atheris.Setup([sys.argv[0], *libfuzzer], target.run)
    atheris.Fuzz()
    return 0


def _minimize(args: argparse.Namespace) -> int:
    import atheris

    with atheris.instrument_imports(include=["passtd"]):
        target = _load(args.target)
    out = args.minimize.with_name(args.minimize.name + ".min")
    atheris.Setup([sys.argv[0], "-minimize_crash=1", "-runs=20000", f"-max_len={target.max_len}",
                   f"-exact_artifact_path={out}", *args.libfuzzer, str(args.minimize)],
                  target.run)
    atheris.Fuzz()
    return 0


def _dictionary(target, workdir: Path) -> list[Path]:
    if not target.dictionary:
        return []
    path = workdir / "tokens.dict"
    path.write_text("".join('"' + "".join(f"\\x{b:02x}" for b in token) + '"\n'
                            for token in target.dictionary))
    return [path]


def _run_in_lab(args: argparse.Namespace, argv: list[str]) -> int:
    """Build the lab namespace and run this command inside it (the engine target)."""
    from fuzz.isolation import OUTER_NETNS_ENV, netns_id
    from passtd.tools import lab

    missing = lab.missing_requirements()
    if missing:
        print("the engine target needs the lab: " + "; ".join(missing), file=sys.stderr)
        return 2
    with lab.HostNamespace(args.prefix) as host:
        inner = [sys.executable, str(Path(__file__).resolve()), *argv, "--inside-lab"]
        if "--" in argv:  # keep libFuzzer's arguments last
            cut = argv.index("--")
            inner = [sys.executable, str(Path(__file__).resolve()), *argv[:cut], "--inside-lab",
                     *argv[cut:]]
        env = {**lab.passtd_env(), OUTER_NETNS_ENV: netns_id()}
        res = host.run(inner, stdout=None, stderr=None, capture_output=False, timeout=None,
                       env=env)
        return res.returncode


if __name__ == "__main__":
    sys.exit(main())
