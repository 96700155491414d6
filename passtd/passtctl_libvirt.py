"""`passtctl libvirt attach|detach`, and the record of `passtctl NAME forward add|remove` in
the libvirt domain NAME: the parts of passtctl that need libvirt.

Design: imported only by those commands, and by forward changes only for an instance of a
libvirt domain (its hook's runtime file exists) or with --persist, so every other passtctl
command starts without libvirt-python and the domain XML code (a third of passtctl's
start-up time).

Not done here: the edits themselves (passtd/libvirt.py), the instance's D-Bus calls
(passtctl.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

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


def forward_from_listing(entry: dict[str, Any]) -> libvirt_mod.Forward:
    """The metadata's spelling of a forward as ListForwards describes it."""
    def ports(first: int, last: int) -> str:
        return str(first) if last == first else f"{first}-{last}"

    first, last = entry["host_port"], entry.get("host_port_last") or entry["host_port"]
    to_first = entry["guest_port"] or first
    return libvirt_mod.Forward(
        entry["protocol"], ports(first, last),
        None if to_first == first else ports(to_first, to_first + last - first),
        entry["address"] or None)


def recorder_for(args: argparse.Namespace, forward: libvirt_mod.Forward, *,
                 remove: bool) -> libvirt_mod.ForwardRecorder | None:
    """The record of a forward change in the libvirt domain NAME (ForwardRecorder), made
    before the instance is asked. --persist: the domain must take it, or nothing is done
    (Failure). Otherwise (the live definition only, so that the forward migrates with the
    domain) a domain that cannot be asked is said on stderr and the change goes on without
    it: None."""
    try:
        forward.check()
        return libvirt_mod.ForwardRecorder(args.name, forward, remove=remove,
                                           persist=args.persist,
                                           uri=args.connect or libvirt_mod.DEFAULT_URI)
    except libvirt_mod.MetadataError as e:
        raise Failure(EXIT_USAGE, f"forward {'remove' if remove else 'add'}: {e}") from None
    except libvirt_mod.DomainError as e:
        if args.persist:
            raise _domain_failure(e) from None
        print(f"passtctl: warning: {e}; the change is not recorded in the domain's live "
              "definition, so it stays with this host if the domain migrates", file=sys.stderr)
        return None


def recorded_text(name: str, recorder: libvirt_mod.ForwardRecorder, *, remove: bool) -> str:
    """What was recorded where, for people."""
    changed = recorder.changed
    if not changed:
        return (f"the definition of libvirt domain {name} already "
                f"{'lacks' if remove else 'has'} it")
    parts = []
    if "live" in changed:
        parts.append("its live definition (it goes with the domain when it migrates)")
    if "persistent" in changed:
        parts.append("its persistent definition (from its next start on)")
    return f"recorded in libvirt domain {name}: " + " and ".join(parts)


def _domain_failure(error: libvirt_mod.DomainError) -> Failure:
    status = EXIT_NOT_RUNNING if error.kind == libvirt_mod.DomainError.NOT_FOUND \
        else EXIT_INSTANCE_ERROR
    return Failure(status, str(error))


def addresses_here(name: str) -> dict[str, str]:
    """What an instance NAME started on this host now gives its guest (address with prefix
    and gateway, per family, as attach's options spell them): --pin's values."""
    from . import config, service

    try:
        net = service.engine_settings(config.load(name)).net
    except (config.ConfigError, service.StartError) as e:
        raise Failure(EXIT_INSTANCE_ERROR, f"--pin: cannot tell what this host gives the "
                      f"guest: {e}") from None
    out = {}
    if net.ip4 is not None:
        out["ipv4"] = f"{ipaddress.ip_address(net.ip4.address)}/{net.ip4.prefix_len}"
        out["gateway4"] = str(ipaddress.ip_address(net.ip4.gateway))
    if net.ip6 is not None:
        if net.ip6.address is not None:
            out["ipv6"] = f"{ipaddress.ip_address(net.ip6.address)}/{net.ip6.prefix_len}"
        out["gateway6"] = str(ipaddress.ip_address(net.ip6.gateway))
    return out


def _libvirt_attach(args: argparse.Namespace) -> int:
    pinned = {}
    if args.pin:  # what is given explicitly wins
        pinned = {key: value for key, value in addresses_here(args.domain).items()
                  if getattr(args, key) is None}
        for key, value in pinned.items():
            setattr(args, key, value)
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
                     "settings": libvirt_mod.runtime_config(settings), "pinned": pinned,
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
    if pinned:
        lines.append(("pinned", ", ".join(f"{key} {value}" for key, value in pinned.items())
                      + " (what this host gives now; the same on every host it migrates to)"))
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
    attach.add_argument("--pin", action="store_true",
                        help="pin the guest's addresses and gateways to what this host gives "
                             "now (those not given by --ipv4 ... --gateway6), so that they "
                             "mean the same on every host the domain migrates to")
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
