"""Port forwarding: passt's -t/-u SPEC grammar, and the rules it produces.

Grammar (passt(1), `-t/--tcp-ports`, `-u/--udp-ports`):

    SPEC    := "none" | [LISTEN "/"] ENTRY ("," ENTRY)*
    LISTEN  := [ADDR | "*"] ["%" IFNAME]          ADDR: IPv4 or bare IPv6 (brackets allowed)
    ENTRY   := RANGE [":" TARGET]                 include: host ports -> guest ports
             | "~" RANGE                          exclude: wins over every include
             | "all" [":" ADDR]                   every non-ephemeral port
    RANGE   := PORT ["-" PORT]
    TARGET  := ADDR "/" RANGE | ADDR | RANGE      guest address and/or guest ports

A spec becomes a short, sorted list of `ForwardRule`s, each a contiguous host port range
with one offset to the guest ports: includes are cut around the excludes, adjacent
ranges with the same mapping are merged. A spec with no includes (only `all` and/or
excludes) forwards every port below the start of the kernel's ephemeral range
(ip_local_port_range) minus the excludes, and its rules are "weak": ports that cannot
be bound are skipped, and only a rule set of which nothing at all could be bound is an
error (the event loop implements that; the flag tells it to). An `all` with excludes
is therefore a handful of rules, never one per port. As in passt, a port given twice
(overlapping includes) is an error, and `none` only stands alone.

A listen address of None means every address of both families (passt's dual-stack
wildcard); an explicit `0.0.0.0` or `::` means that family only. A target address
(the newer `5000:192.0.2.5/6000`, `all:192.0.2.6` forms) replaces the address the
guest is seen to use; it needs an explicit listen address of the same family.

Deliberately not done:
- `auto` (pasta only: it scans the namespace's listening sockets; a VM has none to scan).
- upstream's "`all` combined with includes": passt silently drops the `all` there; we
  refuse the spec, since one of the two entries cannot mean what its author wanted.
- ports above the *end* of the ephemeral range: newest passt forwards them with `all`,
  the passt this project follows (Debian 12's, 2023) stops below the range's start,
  which keeps `all` one band that does not depend on a second sysctl value.
- deciding whether a port can actually be bound: that is the event loop's business.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from itertools import pairwise
from typing import Any, Final, NamedTuple

PORT_RANGE_SYSCTL: Final = "/proc/sys/net/ipv4/ip_local_port_range"
RESERVED_PORTS_SYSCTL: Final = "/proc/sys/net/ipv4/ip_local_reserved_ports"
EPHEMERAL_RANGE_FALLBACK: Final = (32768, 60999)  # Linux's default ip_local_port_range
MAX_PORT: Final = 65535
IFNAMSIZ: Final = 16  # interface names are at most IFNAMSIZ - 1 bytes
PROTOCOLS: Final = ("tcp", "udp")
_OPTION: Final = {"tcp": "-t", "udp": "-u"}

_DIGITS: Final = re.compile(r"[0-9]+")
_PORT_THEN_COLON: Final = re.compile(r"[0-9]+(?:-[0-9]+)?:")


class SpecError(ValueError):
    """A port spec (or a rule built by hand) is invalid; the message names the part."""


class _RuleFields(NamedTuple):
    proto: str  # "tcp" | "udp"
    address: str | None  # listen address; None = all addresses (dual-stack ::, as passt)
    ifname: str | None  # bind to this interface (SO_BINDTODEVICE)
    first: int  # host port range first..last
    last: int
    to_first: int  # guest port for `first`
    to_address: str | None  # guest-side target address, None = the guest's seen address
    weak: bool  # from `all`: ports that cannot be bound are skipped


class ForwardRule(_RuleFields):
    """Host ports first..last (on `address`/`ifname`) forwarded to the guest.

    Port p goes to guest port to_first + (p - first), on `to_address` when set,
    else on the address the guest is seen to use. Built by hand (the D-Bus API
    does), a rule is validated and its addresses canonicalised: SpecError if bad.
    An immutable record (a NamedTuple: no dataclasses in an instance, whose import
    costs each one ~1 MiB); `_replace` goes through the checks too (`_make`, which
    would not, is for no one to call).
    """

    __slots__ = ()

    def __new__(cls, proto: str, address: str | None, ifname: str | None, first: int,
                last: int, to_first: int, to_address: str | None = None,
                weak: bool = False) -> ForwardRule:
        if proto not in PROTOCOLS:
            raise SpecError(f"unknown protocol {proto!r}, expected 'tcp' or 'udp'")
        for port in (first, last, to_first):
            _check_port_number(port)
        if first > last:
            raise SpecError(f"bad port range {first}-{last}: first port above last")
        to_last = to_first + (last - first)
        if to_last > MAX_PORT:
            raise SpecError(f"target range {to_first}-{to_last} goes beyond port {MAX_PORT}")
        for text in (address, ifname, to_address):
            if text is not None and not isinstance(text, str):
                raise SpecError(f"expected a string or None, got {text!r}")
        if ifname is not None:
            check_ifname(ifname)
        listen = None if address is None else _parse_address(address, "listen")
        target = None if to_address is None else _parse_address(to_address, "target")
        if target is not None:
            _check_target(listen, target)
        return super().__new__(cls, proto, None if listen is None else str(listen), ifname,
                               first, last, to_first, None if target is None else str(target),
                               weak)

    def _replace(self, **changes: Any) -> ForwardRule:
        return ForwardRule(**{**self._asdict(), **changes})

    @property
    def to_last(self) -> int:
        return self.to_first + (self.last - self.first)

    def ports(self) -> range:
        """The host ports this rule listens on."""
        return range(self.first, self.last + 1)

    def guest_port(self, host_port: int) -> int:
        """The guest port a connection to `host_port` goes to."""
        if not self.first <= host_port <= self.last:
            raise ValueError(f"port {host_port} is not in {self.first}-{self.last}")
        return self.to_first + (host_port - self.first)

    def overlaps(self, other: ForwardRule) -> bool:
        """Whether both rules would listen on a common (protocol, address, port).

        As passt, the interface is not considered, and a wildcard covers every
        address of its family (None: of both families).
        """
        if self.proto != other.proto:
            return False
        if self.last < other.first or other.last < self.first:
            return False
        return _addresses_overlap(self.address, other.address)


def parse_spec(spec: str, proto: str, *, ephemeral_start: int | None = None) -> list[ForwardRule]:
    """Parse one -t (proto "tcp") or -u ("udp") SPEC into forwarding rules.

    `ephemeral_start`: the first ephemeral port, which bounds `all` and exclude-only
    specs; None reads it from /proc/sys/net/ipv4/ip_local_port_range.
    """
    if proto not in PROTOCOLS:
        raise SpecError(f"unknown protocol {proto!r}, expected 'tcp' or 'udp'")
    try:
        return _SpecParser(spec, proto).rules(ephemeral_start)
    except SpecError as e:
        raise SpecError(f"'{_OPTION[proto]} {spec}': {e}") from None


def format_rule(rule: ForwardRule) -> str:
    """The rule as spec text, e.g. "127.0.0.1/8080:80" (parse_spec gives the rule back).

    `weak` has no spelling of its own (only `all` produces it), so it is not shown.
    """
    listen = ""
    if rule.address is not None or rule.ifname is not None:
        ifname = f"%{rule.ifname}" if rule.ifname is not None else ""
        listen = f"{rule.address or ''}{ifname}/"
    ports = _format_range(rule.first, rule.last)
    if rule.to_address is not None:
        target = f":{rule.to_address}/{_format_range(rule.to_first, rule.to_last)}"
    elif rule.to_first != rule.first:
        target = f":{_format_range(rule.to_first, rule.to_last)}"
    else:
        target = ""
    return f"{listen}{ports}{target}"


def find_conflict(rules: Iterable[ForwardRule]) -> tuple[ForwardRule, ForwardRule] | None:
    """The first pair of rules that would listen on a common port, if any."""
    seen: list[ForwardRule] = []
    for rule in rules:
        for earlier in seen:
            if rule.overlaps(earlier):
                return earlier, rule
        seen.append(rule)
    return None


def read_ephemeral_range(path: str = PORT_RANGE_SYSCTL) -> tuple[int, int]:
    """The host's ephemeral port range (Linux's default, 32768-60999, if unreadable)."""
    try:
        with open(path, encoding="ascii") as f:
            first, last = (int(word) for word in f.read().split())
    except (OSError, ValueError):
        return EPHEMERAL_RANGE_FALLBACK
    return (first, last) if 1 <= first <= last <= MAX_PORT else EPHEMERAL_RANGE_FALLBACK


def read_ephemeral_start(path: str = PORT_RANGE_SYSCTL) -> int:
    """The first ephemeral port of this host (32768, Linux's default, if unreadable)."""
    return read_ephemeral_range(path)[0]


def read_reserved_ports(path: str = RESERVED_PORTS_SYSCTL) -> tuple[tuple[int, int], ...]:
    """The port ranges the admin keeps out of the ephemeral pool ("8080,9000-9100");
    none if unreadable."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
        return tuple(parse_range(item.strip()) for item in text.split(",") if item.strip())
    except (OSError, ValueError):  # SpecError is a ValueError
        return ()


# --- the parser ---------------------------------------------------------------------


class _Include(NamedTuple):
    first: int
    last: int
    to_first: int
    to_address: str | None


class _SpecParser:
    """One spec's listen part and entries; `rules()` turns them into ForwardRules."""

    def __init__(self, spec: str, proto: str) -> None:
        self.proto = proto
        self.address: str | None = None
        self.ifname: str | None = None
        self.includes: list[_Include] = []
        self.excludes: list[tuple[int, int]] = []
        self.all_seen = False
        self.all_target: str | None = None
        if spec == "none":
            self.none = True
            return
        self.none = False
        for entry in self._split_listen(spec).split(","):
            self._entry(entry)

    def _split_listen(self, spec: str) -> str:
        """Take the optional `ADDR%IFNAME/` prefix off; return the entries' text."""
        head, slash, entries = spec.partition("/")
        if not slash:
            return spec
        addr_text, percent, ifname = head.partition("%")
        if percent:
            check_ifname(ifname)
            self.ifname = ifname
        if addr_text in ("", "*"):
            return entries
        try:
            self.address = str(_parse_address(unbracket(addr_text), "listen"))
        except SpecError:
            # no listen address after all: "5000:192.0.2.5/6000" is an entry whose
            # target has an address (refused below for want of a listen address)
            if not percent and _PORT_THEN_COLON.match(head):
                return spec
            raise
        return entries

    def _entry(self, entry: str) -> None:
        if entry == "all" or entry.startswith("all:"):
            if self.all_seen:
                raise SpecError("'all' given twice")
            self.all_seen = True
            if entry != "all":
                self.all_target = self._target_address(entry[len("all:") :])
        elif entry == "auto":
            raise SpecError(
                "'auto' is pasta-only (it follows the namespace's listening sockets); "
                "give the ports, or 'all'"
            )
        elif entry == "none":
            raise SpecError("'none' must be the whole spec")
        elif entry.startswith("~"):
            if ":" in entry:
                raise SpecError(f"exclude '{entry}' cannot have a target")
            self.excludes.append(parse_range(entry[1:]))
        else:
            self._include(entry)

    def _include(self, entry: str) -> None:
        ports, colon, target = entry.partition(":")
        first, last = parse_range(ports)
        to_address = None
        to_first, to_last = first, last
        if colon:
            addr_text, slash, to_ports = target.partition("/")
            if not target:
                raise SpecError(f"missing target after '{ports}:'")
            if slash:
                to_address = self._target_address(addr_text)
                to_first, to_last = parse_range(to_ports)
            elif target[0].isdigit() and "." not in target and ":" not in target:
                to_first, to_last = parse_range(target)
            else:
                to_address = self._target_address(target)
        if to_last - to_first != last - first:
            raise SpecError(
                f"target range {_format_range(to_first, to_last)} has {to_last - to_first + 1}"
                f" ports, {_format_range(first, last)} has {last - first + 1}"
            )
        self.includes.append(_Include(first, last, to_first, to_address))

    def _target_address(self, text: str) -> str:
        target = _parse_address(unbracket(text), "target")
        listen = None if self.address is None else ipaddress.ip_address(self.address)
        _check_target(listen, target)
        return str(target)

    def rules(self, ephemeral_start: int | None) -> list[ForwardRule]:
        if self.none:
            return []
        excluded = _merge_ranges(self.excludes)
        if self.includes and self.all_seen:
            raise SpecError("'all' cannot be combined with explicit port ranges")
        if self.includes:
            pieces = [
                (piece_first, piece_last, inc.to_first + (piece_first - inc.first), inc.to_address)
                for inc in self.includes
                for piece_first, piece_last in _subtract(inc.first, inc.last, excluded)
            ]
            weak = False
        else:
            start = read_ephemeral_start() if ephemeral_start is None else ephemeral_start
            top = min(start, MAX_PORT + 1) - 1
            pieces = [(a, b, a, self.all_target) for a, b in _subtract(1, top, excluded)]
            weak = True
        if not pieces:
            raise SpecError("nothing left to forward after the excludes")
        rules = [
            ForwardRule(self.proto, self.address, self.ifname, first, last, to_first, to_addr, weak)
            for first, last, to_first, to_addr in _collapse(pieces)
        ]
        # sorted, all on one listen address: any overlap shows between neighbours
        for before, after in pairwise(rules):
            if after.first <= before.last:
                both = after.first, min(before.last, after.last)
                raise SpecError(f"port {_format_range(*both)} given twice")
        return rules


# --- helpers ------------------------------------------------------------------------


def _check_port_number(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= MAX_PORT:
        raise SpecError(f"port {port!r} out of range 1-{MAX_PORT}")


def parse_port(text: str) -> int:
    """One port number written in decimal, 1-65535; SpecError otherwise."""
    if not _DIGITS.fullmatch(text):
        raise SpecError(f"bad port '{text}'")
    significant = text.lstrip("0")
    # the length check first: int() of thousands of digits is slow, and refused past 4300
    if len(significant) > len(str(MAX_PORT)) or not 1 <= int(significant or "0") <= MAX_PORT:
        raise SpecError(f"port '{text}' out of range 1-{MAX_PORT}")
    return int(significant)


def parse_range(text: str) -> tuple[int, int]:
    """PORT or FIRST-LAST; SpecError otherwise."""
    first_text, dash, last_text = text.partition("-")
    if dash and not last_text:
        raise SpecError(f"bad port range '{text}'")
    first = parse_port(first_text)
    last = parse_port(last_text) if dash else first
    if first > last:
        raise SpecError(f"bad port range '{text}': first port above last")
    return first, last


def _format_range(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def unbracket(text: str) -> str:
    """passt accepts `[ADDR]` as well as the bare address."""
    if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
        return text[1:-1]
    return text


def _parse_address(text: str, role: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # ipaddress would take "fe80::1%eth0" as a scoped address: a scope is the ifname's job
    if "%" in text or not text.isascii():
        raise SpecError(f"bad {role} address '{text}'")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise SpecError(f"bad {role} address '{text}'") from None
    # passt's addresses are IPv4-mapped internally: ::ffff:a.b.c.d *is* IPv4
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _check_target(
    listen: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    target: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    if target.is_multicast or target.is_unspecified:
        raise SpecError(f"target address {target} is not a unicast address")
    if listen is None:
        wildcard = "0.0.0.0" if target.version == 4 else "::"
        raise SpecError(
            f"a target address ({target}) needs a listen address of its family,"
            f" e.g. '{wildcard}/...'"
        )
    if listen.version != target.version:
        raise SpecError(f"cannot forward from IPv{listen.version} to IPv{target.version}")


def check_ifname(name: str) -> None:
    """SpecError unless `name` can be a Linux interface name."""
    # the kernel's dev_valid_name(), restricted to printable ASCII so names log cleanly,
    # and without '%' (the kernel reads it as a template, "eth%d"; here it is a separator)
    if (
        not name
        or len(name) >= IFNAMSIZ
        or name in (".", "..")
        or not all("!" <= c <= "~" and c not in "/:%" for c in name)
    ):
        raise SpecError(f"bad interface name '{name}'")


def _addresses_overlap(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return True
    addr_a, addr_b = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if addr_a.version != addr_b.version:
        return False
    return addr_a == addr_b or addr_a.is_unspecified or addr_b.is_unspecified


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent ranges covering the same ports."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _subtract(first: int, last: int, excluded: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """first..last minus the (merged, sorted) excluded ranges."""
    pieces = []
    for ex_first, ex_last in excluded:
        if ex_last < first or ex_first > last:
            continue
        if ex_first > first:
            pieces.append((first, ex_first - 1))
        first = ex_last + 1
    if first <= last:
        pieces.append((first, last))
    return pieces


def _collapse(
    pieces: list[tuple[int, int, int, str | None]],
) -> list[tuple[int, int, int, str | None]]:
    """Sort, and merge ranges that continue each other with the same port offset."""
    out: list[tuple[int, int, int, str | None]] = []
    for first, last, to_first, to_addr in sorted(pieces, key=lambda p: (p[0], p[1])):
        if out:
            p_first, p_last, p_to, p_addr = out[-1]
            if first == p_last + 1 and to_first - first == p_to - p_first and to_addr == p_addr:
                out[-1] = (p_first, last, p_to, p_addr)
                continue
        out.append((first, last, to_first, to_addr))
    return out

