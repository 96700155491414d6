"""`passtd`: run an instance, show its configuration, run the demo or the benchmark.

Argument parsing only; the work lives in service.py, config.py, demo.py and bench.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Any

import yaml

from . import __version__
from . import config as config_mod
from .names import RULE, InvalidName, check_name

DESCRIPTION = """\
Unprivileged networking for one VM per instance, after passt: qemu's stream netdev
(-netdev stream,server=off,addr.type=unix,addr.path=SOCKET) is turned into ordinary
host TCP, UDP and ICMP sockets. The guest gets the host's addresses by DHCP, NDP and
DHCPv6; its gateway address reaches the host's loopback; -t/-u forward host ports to it.
""" + textwrap.fill(f"An instance name (NAME) is {RULE}.", 86) + "\n"

EPILOG = """\
examples:
  passtd run vm1                      serve qemu on /run/passtd/vm1.sock
  passtd run vm1 -t 2222:22 -u 5353   forward host TCP 2222 to guest 22, UDP 5353 to 5353
  passtd config show vm1              print vm1's effective configuration
  passtd demo                         a guest in a throwaway namespace, end to end
  systemctl start passtd@vm1.socket   the same as a system service (see README.md)
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's, told the terminal's width: left to find it, it imports shutil, and with
    it zlib, bz2 and lzma, when a parser is built, which `passtd run` does too (~0.15 MiB
    of every instance's memory for one number)."""

    def __init__(self, prog: str) -> None:
        try:
            columns = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size(1).columns
        except (ValueError, OSError):
            columns = 80
        super().__init__(prog, width=max(columns, 40) - 2)  # argparse's own margin


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="passtd", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"passtd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run", help="run one instance in the foreground (SIGTERM ends it, SIGHUP reloads, "
             "SIGUSR2 re-executes it keeping its connections)",
        description="Run instance NAME in the foreground. Options override the "
                    "configuration files (see `passtd config show NAME`).")
    config_mod.add_run_arguments(run)

    show = sub.add_parser("config", help="show an instance's effective configuration")
    show_sub = show.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show_cmd = show_sub.add_parser("show", help="print the merged settings as YAML")
    config_mod.add_run_arguments(show_cmd)

    check = sub.add_parser(
        "check-name", help="check an instance name (exit status 2 and why, if it is not one)",
        description=f"Exit with status 0 if NAME can name an instance ({RULE}), else print "
                    "why and exit with status 2. passtd@.socket runs it before it listens.")
    check.add_argument("name", metavar="NAME")

    demo = sub.add_parser(
        "demo", help="start an instance for a demo guest in throwaway namespaces (root)",
        description="Create an isolated host namespace (its only uplink is a dead end) and "
                    "a guest namespace behind qemu's network hub, serve the guest with an "
                    "instance, and show DHCP, ping, outbound and inbound TCP working.")
    demo.add_argument("--keep-going", action="store_true",
                      help="keep the demo up until Ctrl-C to poke around")
    demo.add_argument("--prog", help=argparse.SUPPRESS)

    bench = sub.add_parser(
        "bench", help="benchmark passtd against the reference passt (root)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # argparse's REMAINDER drops leading options: bench parses its own
        from .tools import bench

        return bench.main(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "config":
        return _config_show(args)
    if args.command == "check-name":
        return _check_name(args.name)
    if args.command == "demo":
        from .tools import demo

        demo_argv = ["--keep-going"] if args.keep_going else []
        if args.prog:
            demo_argv += ["--prog", args.prog]
        return demo.main(demo_argv)
    parser.error(f"unknown command {args.command}")
    return 2


def _load(args: argparse.Namespace) -> config_mod.InstanceConfig | None:
    try:
        return config_mod.load(args.name, args)
    except config_mod.ConfigError as e:
        print(f"passtd: configuration error: {e}", file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return 2
    # asyncio (imported by an instance with the D-Bus API) imports ssl when it can, which
    # loads libssl and libcrypto and costs 1.2 MiB of the instance's own memory (relocated
    # pages) for TLS it never speaks (the bus is a UNIX socket): with the module marked
    # absent, asyncio goes without it
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    from . import service

    return service.run(cfg, lambda: config_mod.load(args.name, args))


def _check_name(name: str) -> int:
    try:
        check_name(name)
    except InvalidName as e:
        print(f"passtd: {e}", file=sys.stderr)
        return 2
    return 0


def _config_show(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return 2
    print(f"# instance {cfg.name}; from: {', '.join(cfg.sources) or 'built-in defaults only'}")
    print(yaml.safe_dump(config_mod.to_yaml_dict(cfg), sort_keys=False), end="")
    return 0
