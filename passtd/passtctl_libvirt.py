"""`passtctl libvirt attach|detach` and `passtctl NAME forward add --persist`: the parts of
passtctl that need libvirt.

Design: imported only by those commands, so every other passtctl command starts without
libvirt-python and the domain XML code (a third of passtctl's start-up time).

Not done here: the edits themselves (passtd/libvirt.py), the instance's D-Bus calls
(passtctl.py).
"""

from __future__ import annotations

import argparse

from . import libvirt as libvirt_mod
from .names import RULE
from .passtctl import (
    EXIT_INSTANCE_ERROR,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    Failure,
    name_arg,
    print_error,
    print_json,
)


def persister_for(args: argparse.Namespace, host_port: int,
               guest_port: int) -> libvirt_mod.ForwardPersister:
    forward = libvirt_mod.Forward(
        args.protocol, str(host_port),
        str(guest_port) if guest_port not in (0, host_port) else None, args.address or None)
    try:
        forward.check()
        return libvirt_mod.ForwardPersister(args.name, forward,
                                            uri=args.connect or libvirt_mod.DEFAULT_URI)
    except libvirt_mod.MetadataError as e:
        raise Failure(EXIT_USAGE, f"forward add --persist: {e}") from None
    except libvirt_mod.DomainError as e:
        raise _domain_failure(e) from None


def _domain_failure(error: libvirt_mod.DomainError) -> Failure:
    status = EXIT_NOT_RUNNING if error.kind == libvirt_mod.DomainError.NOT_FOUND \
        else EXIT_INSTANCE_ERROR
    return Failure(status, str(error))


def _libvirt_attach(args: argparse.Namespace) -> int:
    change = libvirt_mod.SettingsChange(
        forwards=tuple(args.forward or ()), mtu=args.mtu, ipv4_address=args.ipv4,
        ipv4_gateway=args.gateway4, ipv6_address=args.ipv6, ipv6_gateway=args.gateway6,
        dns=tuple(args.dns or ()), mac=args.mac)
    edit = libvirt_mod.attach(args.domain, change, uri=args.connect)
    settings = edit.settings or libvirt_mod.NetworkSettings()
    if args.json:
        print_json({"domain": args.domain, "changed": edit.changed,
                     "socket": libvirt_mod.socket_path(args.domain),
                     "unit": libvirt_mod.socket_unit(args.domain), "mac": edit.mac,
                     "settings": libvirt_mod.runtime_config(settings),
                     "notes": list(edit.notes)})
        return EXIT_OK
    if edit.changed:
        print(f"domain {args.domain}: attached to passtd (takes effect at its next start)")
    else:
        print(f"domain {args.domain}: already attached to passtd as asked; nothing changed")
    forwards = ", ".join(f.describe() for f in settings.forwards) or "none"
    lines = [("socket", f"{libvirt_mod.socket_path(args.domain)} "
                        f"({libvirt_mod.socket_unit(args.domain)}, started by the hook)"),
             ("NIC", f"{libvirt_mod.NIC_MODEL}, MAC {edit.mac}"),
             ("forwards", forwards)]
    for key, value in lines:
        print(f"  {key:<9} {value}")
    for note in edit.notes:
        print(f"  note: {note}")
    return EXIT_OK


def _libvirt_detach(args: argparse.Namespace) -> int:
    edit = libvirt_mod.detach(args.domain, uri=args.connect)
    if args.json:
        print_json({"domain": args.domain, "changed": edit.changed, "notes": list(edit.notes)})
        return EXIT_OK
    if edit.changed:
        print(f"domain {args.domain}: detached from passtd (takes effect at its next start)")
    else:
        print(f"domain {args.domain}: not attached to passtd; nothing changed")
    for note in edit.notes:
        print(f"  note: {note}")
    return EXIT_OK


def _forward_arg(text: str) -> libvirt_mod.Forward:
    try:
        return libvirt_mod.parse_forward(text)
    except libvirt_mod.MetadataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _mtu_arg(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number")
    return int(text)


def _build_libvirt_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--connect", metavar="URI", default=libvirt_mod.DEFAULT_URI,
                        help=f"libvirt URI (default: {libvirt_mod.DEFAULT_URI})")
    common.add_argument("--json", action="store_true", help="print JSON")
    parser = argparse.ArgumentParser(
        prog="passtctl libvirt",
        description="Wire libvirt domains to passtd: their persistent definition gets passtd "
                    "metadata (the settings the libvirt hook gives the instance) and a qemu "
                    "stream netdev with a virtio-net NIC. Edits only domains that are shut "
                    "off; takes effect at the next start.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    attach = sub.add_parser(
        "attach", parents=[common], help="wire a domain to passtd (idempotent)",
        description="Add passtd metadata, netdev and NIC to DOMAIN's definition, or update "
                    "them: forwards are added to those there, other options replace what "
                    "they set, what is not given stays.")
    attach.add_argument("domain", metavar="DOMAIN", type=name_arg,
                        help="the domain; its name is the instance's, so it must be one "
                             f"({RULE})")
    attach.add_argument("--forward", action="append", type=_forward_arg,
                        metavar="PROTO:[ADDR/]HOST[:GUEST]",
                        help="forward host port(s) to the guest, e.g. tcp:2222:22, "
                             "udp:127.0.0.1/5353 (repeatable)")
    attach.add_argument("--mtu", type=_mtu_arg, help="MTU told to the guest (0: none)")
    attach.add_argument("--ipv4", metavar="ADDR[/LEN]", help="guest IPv4 address")
    attach.add_argument("--gateway4", metavar="ADDR", help="guest IPv4 gateway")
    attach.add_argument("--ipv6", metavar="ADDR[/LEN]", help="guest IPv6 address")
    attach.add_argument("--gateway6", metavar="ADDR", help="guest IPv6 gateway")
    attach.add_argument("--dns", action="append", metavar="ADDR",
                        help="nameserver told to the guest (repeatable; replaces the list)")
    attach.add_argument("--mac", help="the guest NIC's MAC (default: kept, or one derived "
                                      "from the domain's UUID)")
    detach = sub.add_parser("detach", parents=[common], help="unwire a domain from passtd",
                            description="Remove passtd's metadata, netdev and NIC from "
                                        "DOMAIN's definition (nothing else).")
    # any name: a domain wired before the name rule tightened can still be unwired
    detach.add_argument("domain", metavar="DOMAIN")
    return parser


def libvirt_main(argv: list[str]) -> int:
    args = _build_libvirt_parser().parse_args(argv)
    handler = _libvirt_attach if args.command == "attach" else _libvirt_detach
    try:
        return handler(args)
    except libvirt_mod.DomainError as e:
        print_error(str(e))
        return _domain_failure(e).status
    except libvirt_mod.MetadataError as e:
        print_error(f"domain {args.domain}: {e}")
        return EXIT_USAGE
