"""Instance configuration: YAML files plus the command line -> one validated InstanceConfig.

One instance is `passtd run NAME`. Its settings come from these layers, each overriding
the ones before it key by key (nested mappings such as `ipv4:` merge key by key; lists
such as `tcp_forwards` are replaced whole; an explicit `null` is a value like any other):

  1. built-in defaults (the field defaults of the records below);
  2. /etc/passtd.yaml: `defaults:` then `instances: {NAME: ...}`;
  3. /etc/passtd.d/*.yaml in lexical order (dotfiles skipped), each again `defaults:`
     then `instances.NAME` -- so a drop-in's `defaults:` overrides the main file's
     `instances.NAME`: every file is one layer, and a later file wins;
  4. /run/passtd/NAME.yaml, the runtime file the libvirt hook writes: this instance's
     settings at top level (no `defaults:`/`instances:` there);
  5. the command line.

`--config FILE` replaces /etc/passtd.yaml (a missing FILE is then an error, a missing
/etc/passtd.yaml is not), and the drop-ins come from FILE's directory + `passtd.d/`.
The environment variable PASSTD_RUNTIME_DIR replaces /run/passtd (the runtime file and
the default socket `{runtime_dir}/{name}.sock` live there).

Every error is a ConfigError reading "FILE: KEY.PATH: reason" (list items as `KEY[i]`),
or "command line: --option: reason"; YAML syntax errors give file, line and column.
Files are read with YAML 1.1 minus its traps: `22:23` and `12:34:56:78:9a:bc` stay
strings (not base-60 integers), `010` is not octal, and duplicate keys are errors.

Some settings have derived defaults, resolved here: an IPv4 address given without a
prefix length gets its class-based one (as passt), an IPv6 address /64; a `/LEN` on
`ipv4.address` also sets `ipv4.netmask` (the two must agree within one layer, and a
netmask from an earlier layer stays when a later layer gives an address without /LEN).

Not done here: anything that needs the host (its addresses, /etc/resolv.conf, whether an
interface exists): `None`/"host" values say "the host's" and the service resolves them
at start. Only the defaults and this instance's section of each file are validated:
one VM's broken section does not stop the others (but every key of `instances:` must be
an instance name, passtd.names: a key no instance can have is a mistake, not a section).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import yaml

from passtd.engine.addrs import is_unicast_mac, parse_mac
from passtd.engine.fwd import ForwardRule, SpecError, check_ifname, parse_spec
from passtd.names import (
    DEFAULT_RUNTIME_DIR,
    RULE,
    RUNTIME_DIR_ENV,
    InvalidName,
    check_name,
    hook_runtime_file,
    runtime_dir,
)

DEFAULT_CONFIG_FILE = "/etc/passtd.yaml"
DROPIN_DIR_NAME = "passtd.d"
# where the service keeps state across its restarts (runtime forwards); default: the
# runtime directory. The systemd unit points it at a directory only the instance may write.
STATE_DIR_ENV = "PASSTD_STATE_DIR"
COMMAND_LINE = "command line"

LOG_LEVELS = ("debug", "info", "warning", "error")
BUSES = ("system", "session", "none")
MTU_MIN, MTU_MAX = 68, 65520  # IPv4's minimum; passt's 65520 (65535 minus 802.3, aligned)
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) minus the terminating NUL
_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DnsSetting = Literal["host"] | tuple[IPAddress, ...]  # () = none
SearchSetting = Literal["host"] | tuple[str, ...]  # () = none


class ConfigError(Exception):
    """A setting is unknown, of the wrong type or out of range; the message says where."""


# --- the typed result ---------------------------------------------------------------


class Ip4Settings(NamedTuple):
    enabled: bool = True
    address: ipaddress.IPv4Address | None = None  # None: the host's
    prefix_len: int | None = None  # None: the host's (only while address is None)
    gateway: ipaddress.IPv4Address | None = None  # None: the host's default gateway


class Ip6Settings(NamedTuple):
    enabled: bool = True
    address: ipaddress.IPv6Address | None = None  # None: the host's
    prefix_len: int | None = None  # None: the host's (only while address is None)
    gateway: ipaddress.IPv6Address | None = None  # None: the host's (link-local) gateway


class Timeouts(NamedTuple):
    """Idle times in seconds before a flow is dropped."""

    udp: float = 30  # one-shot UDP flow
    udp_stream: float = 120  # UDP flow that saw traffic both ways
    icmp: float = 60  # ping sequence
    tcp_idle: float = 7200  # TCP connection with no activity at all


# SO_SNDBUF of host TCP sockets: the kernel stores twice the value in an int (so at most
# 2^30 - 1) after capping it at net.core.wmem_max, and gives nothing below ~4 KiB
TCP_SNDBUF_MIN, TCP_SNDBUF_MAX = 4096, (1 << 30) - 1


class Limits(NamedTuple):
    max_flows: int = 65536
    max_listeners: int = 65536  # listening sockets for port forwards: -t all and -u all fit
    tcp_sndbuf: int = 4194304  # SO_SNDBUF of host TCP sockets (passt's SNDBUF_BIG)
    pcap_size: int = 256 << 20  # bytes of a capture (`pcap`): it stops there
    # guest UDP flows at a time whose host socket keeps the guest's source port (where
    # that is harmless: engine/udp.py); beyond, a flow gets a port the kernel chooses
    udp_preserved_ports: int = 64


class InstanceConfig(NamedTuple):
    name: str
    socket: str  # {name} already substituted
    tcp_forwards: tuple[ForwardRule, ...] = ()
    udp_forwards: tuple[ForwardRule, ...] = ()
    tcp_forward_specs: tuple[str, ...] = ()  # as written, for display and `config show`
    udp_forward_specs: tuple[str, ...] = ()
    pcap: str | None = None
    log_level: str = "info"
    mtu: int = 65520  # 0: don't advertise one
    mac: bytes = bytes.fromhex("9a559a559a55")  # ours, on the tap side
    interface: str | None = None  # template host interface; None: the default route's
    ipv4: Ip4Settings = Ip4Settings()
    ipv6: Ip6Settings = Ip6Settings()
    dns: DnsSetting = "host"  # "host": /etc/resolv.conf's nameservers
    search: SearchSetting = "host"
    map_host_loopback: bool = True  # guest traffic to the gateway reaches host loopback
    map_guest_addr: IPAddress | None = None  # guest traffic to it reaches the host's address
    hostname: str | None = None
    dhcp: bool = True
    ndp: bool = True
    dhcpv6: bool = True
    ra: bool = True
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    bus: str = "system"
    qemu_cgroup: str | None = None  # accept qemu only from this cgroup (or below); None: anyone
    sources: tuple[str, ...] = ()  # the files that contributed settings, in order


# --- value checks: each takes a YAML value and returns the typed one, or raises _Invalid


class _Invalid(Exception):
    """A bad value; `path` is relative to where the checker was called (for the message)."""

    def __init__(self, reason: str, path: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path

    def within(self, key: str) -> _Invalid:
        return _Invalid(self.reason, (key, *self.path))


_Check = Callable[[Any], Any]


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value) if isinstance(value, str) else str(value)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_show(value)}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_show(value)}")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"must be an integer, got {_show(value)}")
    return value


def _positive_int(value: object) -> int:
    number = _int(value)
    if number <= 0:
        raise _Invalid(f"must be a positive integer, got {value}")
    return number


def _int_between(low: int, high: int) -> _Check:
    def check(value: object) -> int:
        number = _int(value)
        if not low <= number <= high:
            raise _Invalid(f"must be between {low} and {high}, got {value}")
        return number

    return check


def _positive_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"must be a number of seconds, got {_show(value)}")
    if not math.isfinite(value) or value <= 0:
        raise _Invalid(f"must be a positive number of seconds, got {value}")
    return value


def _choice(choices: tuple[str, ...]) -> _Check:
    def check(value: object) -> str:
        if value not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}; got {_show(value)}")
        return str(value)

    return check


def _optional(check: _Check) -> _Check:
    return lambda value: None if value is None else check(value)


def _path(value: object) -> str:
    text = _str(value)
    if not text or "\0" in text:
        raise _Invalid(f"bad path {text!r}")
    if not os.path.isabs(text):
        raise _Invalid(f"must be an absolute path, got {text!r}")
    return text


def _cgroup(value: object) -> str:
    """A cgroup as /proc/PID/cgroup shows it: /, then names (no "." or "..")."""
    text = _str(value)
    printable = re.fullmatch(r"/[^\x00-\x1f]*", text) is not None
    names = text[1:].split("/")
    if not printable or (text != "/" and any(n in ("", ".", "..") for n in names)):
        raise _Invalid(f"must be a cgroup path like /machine.slice/NAME.scope, got {text!r}")
    return text


def _mtu(value: object) -> int:
    mtu = _int(value)
    if mtu != 0 and not MTU_MIN <= mtu <= MTU_MAX:
        raise _Invalid(f"must be 0 or between {MTU_MIN} and {MTU_MAX}, got {mtu}")
    return mtu


def _mac(value: object) -> bytes:
    text = _str(value)
    mac = parse_mac(text)
    if mac is None:
        raise _Invalid(f"must be a MAC address like 9a:55:9a:55:9a:55, got {text!r}")
    if not is_unicast_mac(mac):
        raise _Invalid(f"must be a unicast MAC address, got {text!r}")
    return mac


def _ifname(value: object) -> str:
    try:
        check_ifname(_str(value))
    except SpecError as e:
        raise _Invalid(str(e)) from None
    return value  # type: ignore[return-value]


def _domain(value: object) -> str:
    text = _str(value)
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    if len(text) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise _Invalid(f"bad domain name {text!r}")
    return text


def _ip(value: object, version: int | None = None) -> IPAddress:
    text = _str(value)
    try:
        if "%" in text:  # ipaddress would accept a scope: not an address we can hand out
            raise ValueError
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise _Invalid(f"bad address {text!r}") from None
    if version is not None and addr.version != version:
        raise _Invalid(f"must be an IPv{version} address, got {text!r}")
    return addr


def _unicast(addr: IPAddress, text: str) -> IPAddress:
    """Refuse what cannot be anyone's address (passt refuses the same)."""
    if (
        addr.is_unspecified
        or addr.is_loopback
        or addr.is_multicast
        or addr == ipaddress.IPv4Address("255.255.255.255")
    ):
        raise _Invalid(f"{text!r} is not a unicast address")
    return addr


def _gateway(version: int) -> _Check:
    return lambda value: _unicast(_ip(value, version), value)


def _address_with_prefix(version: int) -> _Check:
    """"ADDR[/LEN]" -> (address, LEN or None)."""
    bits = 32 if version == 4 else 128

    def check(value: object) -> tuple[IPAddress, int | None]:
        text = _str(value)
        addr_text, slash, len_text = text.partition("/")
        addr = _unicast(_ip(addr_text, version), text)
        if not slash:
            return addr, None
        if not len_text.isascii() or not len_text.isdigit() or not 1 <= int(len_text) <= bits:
            raise _Invalid(f"bad prefix length in {text!r} (1 to {bits})")
        return addr, int(len_text)

    return check


def _netmask(value: object) -> int:
    """A prefix length (24 or "24") or a dotted netmask ("255.255.255.0")."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 32:
            raise _Invalid(f"prefix length must be between 1 and 32, got {value}")
        return value
    mask = int(_ip(value, 4))
    inverted = ~mask & 0xFFFFFFFF
    if mask == 0 or inverted & (inverted + 1):  # the host part must be contiguous ones
        raise _Invalid(f"bad netmask {value!r}")
    return 32 - inverted.bit_length()


def _host_none_or_list(check_item: _Check, items: str) -> _Check:
    """"host", "none" (-> ()) or a list of items, each checked (dns:, search:)."""

    def check(value: object) -> Literal["host"] | tuple[Any, ...]:
        if value in ("host", "none"):
            return "host" if value == "host" else ()
        if not isinstance(value, list):
            raise _Invalid(f"must be 'host', 'none' or a list of {items}, got {_show(value)}")
        checked = []
        for i, item in enumerate(value):
            try:
                if item in ("host", "none"):
                    raise _Invalid(f"{item!r} stands alone, not in a list")
                checked.append(check_item(item))
            except _Invalid as e:
                raise e.within(f"[{i}]") from None
        return tuple(checked)

    return check


def _nameserver(value: object) -> IPAddress:
    addr = _ip(value)
    if addr.is_unspecified or addr.is_multicast:
        raise _Invalid(f"{value!r} cannot be a nameserver")
    return addr


def _forwards(proto: str) -> _Check:
    """A list of -t/-u specs -> ((spec, rules), ...), checked against each other."""

    def check(value: object) -> tuple[tuple[str, tuple[ForwardRule, ...]], ...]:
        if not isinstance(value, list):
            raise _Invalid(f"must be a list of port specs, got {_show(value)}")
        parsed: list[tuple[str, tuple[ForwardRule, ...]]] = []
        for i, item in enumerate(value):
            # `- 8080` is an integer in YAML: take it as the spec it obviously is
            spec = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
            try:
                if not isinstance(spec, str):
                    raise _Invalid(f"must be a port spec string, got {_show(spec)}")
                if spec == "none" and len(value) > 1:
                    raise _Invalid("'none' cannot be combined with other specs")
                try:
                    rules = tuple(parse_spec(spec, proto))
                except SpecError as e:
                    raise _Invalid(str(e)) from None
                for earlier_spec, earlier_rules in parsed:
                    for rule in rules:
                        clash = next((r for r in earlier_rules if r.overlaps(rule)), None)
                        if clash:
                            port = max(rule.first, clash.first)
                            raise _Invalid(
                                f"{spec!r} and {earlier_spec!r} both forward port {port}"
                            )
            except _Invalid as e:
                raise e.within(f"[{i}]") from None
            parsed.append((spec, rules))
        return tuple(parsed)

    return check


def _section(schema: dict[str, _Check]) -> _Check:
    """A mapping with the keys of `schema`, each checked; unknown keys are errors."""

    def check(value: object) -> dict[str, Any]:
        if value is None:  # `ipv4:` with everything below it commented out
            return {}
        if not isinstance(value, dict):
            raise _Invalid(f"must be a mapping, got {_show(value)}")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or key not in schema:
                import difflib  # on this error path only: a running instance never needs it

                close = difflib.get_close_matches(str(key), schema, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise _Invalid(f"unknown key '{key}'{hint}", (str(key),))
            try:
                out[key] = schema[key](item)
            except _Invalid as e:
                raise e.within(key) from None
        return out

    return check


def _ip_section(version: int) -> _Check:
    """ipv4:/ipv6:, with `address: A/LEN` split into address and prefix_len."""
    keys: dict[str, _Check] = {
        "enabled": _bool,
        "address": _optional(_address_with_prefix(version)),
        "gateway": _optional(_gateway(version)),
    }
    if version == 4:
        keys["netmask"] = _optional(_netmask)
    check_keys = _section(keys)

    def check(value: object) -> dict[str, Any]:
        out: dict[str, Any] = check_keys(value)
        if "netmask" in out:
            out["prefix_len"] = out.pop("netmask")
        if "address" in out:
            addr, prefix_len = out["address"] or (None, None)
            out["address"] = addr
            if prefix_len is not None:
                if out.get("prefix_len") not in (None, prefix_len):
                    raise _Invalid(
                        f"/{out['prefix_len']} contradicts the /{prefix_len} of the address",
                        ("netmask",),
                    )
                out["prefix_len"] = prefix_len
            elif version == 6:  # IPv6 has no netmask key: the address says it all
                out["prefix_len"] = None
        return out

    return check


_INSTANCE_SCHEMA: dict[str, _Check] = {
    "socket": _path,
    "tcp_forwards": _forwards("tcp"),
    "udp_forwards": _forwards("udp"),
    "pcap": _optional(_path),
    "log_level": _choice(LOG_LEVELS),
    "mtu": _mtu,
    "mac": _mac,
    "interface": _optional(_ifname),
    "ipv4": _ip_section(4),
    "ipv6": _ip_section(6),
    "dns": _host_none_or_list(_nameserver, "addresses"),
    "search": _host_none_or_list(_domain, "domains"),
    "map_host_loopback": _bool,
    "map_guest_addr": _optional(lambda v: _unicast(_ip(v), v)),
    "hostname": _optional(_domain),
    "dhcp": _bool,
    "ndp": _bool,
    "dhcpv6": _bool,
    "ra": _bool,
    "timeouts": _section({name: _positive_number for name in Timeouts._fields}),
    "limits": _section({name: _positive_int for name in Limits._fields}
                       | {"tcp_sndbuf": _int_between(TCP_SNDBUF_MIN, TCP_SNDBUF_MAX),
                          "udp_preserved_ports": _int_between(0, 65535)}),
    "bus": _choice(BUSES),
    "qemu_cgroup": _optional(_cgroup),
}
_check_instance = _section(_INSTANCE_SCHEMA)


# --- YAML files ---------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader without base-60 numbers and leading-zero octals, refusing duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _value in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?
            |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)

_MISSING = object()


def _read_yaml(path: str, *, required: bool) -> object:
    """The document in `path` ({} if empty), or _MISSING if absent and not required."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: no such file") from None
        return _MISSING
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        doc = yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = e.problem or e.context or "syntax error"
        raise ConfigError(f"{path}: {where}{problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {e}") from None
    return {} if doc is None else doc


def _dropins(main_file: str) -> list[str]:
    directory = os.path.join(os.path.dirname(os.path.abspath(main_file)), DROPIN_DIR_NAME)
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise ConfigError(f"{directory}: cannot read: {e.strerror}") from None
    return [
        os.path.join(directory, n) for n in names if n.endswith(".yaml") and not n.startswith(".")
    ]


def _etc_sections(doc: object, path: str, name: str) -> list[tuple[str, object]]:
    """(key path, section) for `defaults` and `instances.NAME` of an /etc file."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: must be a mapping with 'defaults:' and/or 'instances:'")
    for key in doc:
        if key not in ("defaults", "instances"):
            raise ConfigError(
                f"{path}: {key}: unknown key (this file has 'defaults:' and 'instances:';"
                " settings go below one of them)"
            )
    sections = [("defaults", doc.get("defaults"))]
    instances = doc.get("instances")
    if instances is not None and not isinstance(instances, dict):
        raise ConfigError(f"{path}: instances: must be a mapping of instance names")
    for key, section in (instances or {}).items():
        try:  # a key that can name no instance is a mistake, not a section to skip
            check_name(str(key))
        except InvalidName as e:
            raise ConfigError(f"{path}: instances: {e}") from None
        if str(key) == name:
            sections.append((f"instances.{key}", section))
    return sections


# --- layers -------------------------------------------------------------------------


def _render(prefix: str, path: tuple[str, ...]) -> str:
    text = prefix
    for part in path:
        text += part if part.startswith("[") or not text else f".{part}"
    return text


class _Layers:
    """The merge of every layer so far, remembering where each value came from."""

    def __init__(self) -> None:
        self.merged: dict[str, Any] = {}
        self.origin: dict[tuple[str, ...], tuple[int, str]] = {}  # key -> (layer no, "FILE: KEY")
        self.count = 0

    def add(self, layer: dict[str, Any], describe: Callable[[tuple[str, ...]], str]) -> None:
        self.count += 1
        self._merge(self.merged, layer, (), describe)

    def _merge(self, into: dict[str, Any], layer: dict[str, Any], path: tuple[str, ...],
               describe: Callable[..., str]) -> None:
        for key, value in layer.items():
            if isinstance(value, dict):
                self._merge(into.setdefault(key, {}), value, (*path, key), describe)
            else:
                into[key] = value
                self.origin[(*path, key)] = (self.count, describe((*path, key)))

    def where(self, *paths: tuple[str, ...]) -> str:
        """Where the latest of these keys was set (the first named, within one layer)."""
        found = [self.origin[p] for p in paths if p in self.origin]
        return max(found, key=lambda layer_and_where: layer_and_where[0])[1]


def _add_file_section(layers: _Layers, section: object, path: str, key_prefix: str) -> bool:
    try:
        layer = _check_instance(section)
    except _Invalid as e:
        where = _render(key_prefix, e.path) or "(top level)"
        raise ConfigError(f"{path}: {where}: {e.reason}") from None
    layers.add(layer, lambda p: f"{path}: {_render(key_prefix, p)}")
    return bool(layer)


# --- the command line ---------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """NAME and every setting's option; every one defaults to None (= "not given")."""
    inst = parser.add_argument_group("Instance")
    inst.add_argument("name", metavar="NAME",
                      help=f"instance name, normally the VM's name: {RULE}")
    inst.add_argument(
        "--config",
        metavar="FILE",
        help=f"main config file instead of {DEFAULT_CONFIG_FILE} (drop-ins: its dir/passtd.d/)",
    )
    inst.add_argument(
        "-s", "--socket", metavar="PATH",
        help=f"UNIX socket qemu connects to (default: {DEFAULT_RUNTIME_DIR}/NAME.sock)",
    )
    inst.add_argument("--bus", choices=BUSES, help="D-Bus bus for the control API")
    inst.add_argument(
        "--qemu-cgroup", metavar="CGROUP|none",
        help="adopt qemu's connection only from a process in this cgroup or below it",
    )

    addr = parser.add_argument_group("Addresses")
    addr.add_argument(
        "-a", "--address", action="append", metavar="ADDR[/LEN]",
        help="guest address, once per family (default: the host's)",
    )
    addr.add_argument(
        "-n", "--netmask", metavar="MASK", help="IPv4 prefix length or dotted netmask"
    )
    addr.add_argument(
        "-g", "--gateway", action="append", metavar="ADDR",
        help="gateway offered to the guest, once per family (default: the host's)",
    )
    addr.add_argument(
        "-4", "--ipv4-only", action="store_const", const=True, help="IPv4 only: disable IPv6"
    )
    addr.add_argument(
        "-6", "--ipv6-only", action="store_const", const=True, help="IPv6 only: disable IPv4"
    )
    addr.add_argument("-M", "--mac-addr", metavar="MAC", help="our own MAC address")
    addr.add_argument("-m", "--mtu", metavar="MTU", help="MTU told to the guest (0: none)")
    addr.add_argument(
        "-i", "--interface", metavar="IFNAME", help="host interface to copy addresses from"
    )
    addr.add_argument(
        "--no-map-gw", dest="map_host_loopback", action="store_const", const=False,
        help="don't map the gateway address to host loopback (nor offer a resolver there)",
    )
    addr.add_argument(
        "--map-guest-addr", metavar="ADDR|none",
        help="address through which the guest reaches the host's own address",
    )

    fwd = parser.add_argument_group("Port forwarding")
    fwd.add_argument(
        "-t", "--tcp-ports", action="append", metavar="SPEC",
        help="forward host TCP ports, e.g. 2222:22, 127.0.0.1/8080:80, all,~22 (repeatable)",
    )
    fwd.add_argument(
        "-u", "--udp-ports", action="append", metavar="SPEC",
        help="forward host UDP ports, same SPEC grammar as -t (repeatable)",
    )

    svc = parser.add_argument_group("Services")
    svc.add_argument(
        "-D", "--dns", action="append", metavar="ADDR|host|none",
        help="nameserver told to the guest (repeatable; host: /etc/resolv.conf's)",
    )
    svc.add_argument(
        "-S", "--search", action="append", metavar="DOMAINS|host|none",
        help="DNS search domains, space-separated (repeatable)",
    )
    svc.add_argument("-H", "--hostname", metavar="NAME", help="hostname told to the guest")
    for proto, what in (("dhcp", "DHCP"), ("ndp", "NDP"), ("dhcpv6", "DHCPv6"), ("ra", "RA")):
        svc.add_argument(
            f"--no-{proto}", dest=proto, action="store_const", const=False,
            help=f"don't answer {what}" + (" (router advertisements)" if proto == "ra" else ""),
        )

    tune = parser.add_argument_group("Limits and timeouts")
    tune.add_argument(
        "--timeout", action="append", metavar="KIND=SECONDS",
        help=f"flow idle timeout; KIND: {', '.join(Timeouts._fields)}",
    )
    tune.add_argument(
        "--limit", action="append", metavar="KIND=N",
        help=f"resource limit (each one explained in /etc/passtd.yaml); KIND: "
             f"{', '.join(Limits._fields)}",
    )

    log = parser.add_argument_group("Logging")
    log.add_argument("--log-level", choices=LOG_LEVELS, help="least severe message logged")
    log.add_argument(
        "-p", "--pcap", metavar="FILE|none",
        help="capture the guest's frames to a pcap file, up to --limit pcap_size=BYTES",
    )


# config key -> the option that sets it, for error messages
_OPTION_FOR: dict[tuple[str, ...], str] = {
    ("socket",): "--socket",
    ("tcp_forwards",): "-t",
    ("udp_forwards",): "-u",
    ("pcap",): "--pcap",
    ("log_level",): "--log-level",
    ("mtu",): "--mtu",
    ("mac",): "--mac-addr",
    ("interface",): "--interface",
    ("ipv4", "address"): "--address",
    ("ipv6", "address"): "--address",
    ("ipv4", "netmask"): "--netmask",
    ("ipv4", "gateway"): "--gateway",
    ("ipv6", "gateway"): "--gateway",
    ("ipv4", "enabled"): "-6/--ipv6-only",
    ("ipv6", "enabled"): "-4/--ipv4-only",
    ("dns",): "--dns",
    ("search",): "--search",
    ("map_host_loopback",): "--no-map-gw",
    ("map_guest_addr",): "--map-guest-addr",
    ("hostname",): "--hostname",
    ("dhcp",): "--no-dhcp",
    ("ndp",): "--no-ndp",
    ("dhcpv6",): "--no-dhcpv6",
    ("ra",): "--no-ra",
    ("timeouts",): "--timeout",
    ("limits",): "--limit",
    ("bus",): "--bus",
    ("qemu_cgroup",): "--qemu-cgroup",
}


def _option_for(path: tuple[str, ...]) -> str:
    for length in range(len(path), 0, -1):
        if path[:length] in _OPTION_FOR:
            return _OPTION_FOR[path[:length]]
    return "/".join(path)


def _cli_number(text: str) -> object:
    """An option's text as the int or float YAML would give (else the text, to be refused)."""
    if re.fullmatch(r"[-+]?[0-9]+", text):
        return int(text)
    if re.fullmatch(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?", text):
        return float(text)
    return text


def _cli_error(option: str, reason: str) -> ConfigError:
    return ConfigError(f"{COMMAND_LINE}: {option}: {reason}")


def _cli_pairs(items: list[str], option: str, unit: str) -> dict[str, object]:
    pairs: dict[str, object] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise _cli_error(option, f"expected KIND={unit}, got {item!r}")
        pairs[key] = _cli_number(value)
    return pairs


def _cli_per_family(items: list[str], option: str, key: str, raw: dict[str, Any]) -> None:
    """-a/-g: one value per address family, sorted into ipv4:/ipv6: by its form."""
    for item in items:
        try:
            version = ipaddress.ip_address(item.partition("/")[0]).version
        except ValueError:
            raise _cli_error(option, f"bad address {item!r}") from None
        section = raw.setdefault(f"ipv{version}", {})
        if key in section:
            raise _cli_error(option, f"given twice for IPv{version}")
        section[key] = item


def _cli_raw(args: argparse.Namespace) -> dict[str, Any]:
    """The options given, as the instance section of a YAML file would hold them."""
    raw: dict[str, Any] = {}
    given = {k: v for k, v in vars(args).items() if v is not None}
    for key in ("log_level", "interface", "hostname", "bus", "map_host_loopback"):
        if key in given:
            raw[key] = given[key]
    raw.update({k: given[k] for k in ("dhcp", "ndp", "dhcpv6", "ra") if k in given})
    if "mac_addr" in given:
        raw["mac"] = given["mac_addr"]
    for key in ("socket", "pcap"):
        if key in given:
            none = key == "pcap" and given[key] == "none"
            raw[key] = None if none else os.path.abspath(given[key])
    if "mtu" in given:
        raw["mtu"] = _cli_number(given["mtu"])
    for key in ("map_guest_addr", "qemu_cgroup"):
        if key in given:
            raw[key] = None if given[key] == "none" else given[key]
    if "tcp_ports" in given:
        raw["tcp_forwards"] = given["tcp_ports"]
    if "udp_ports" in given:
        raw["udp_forwards"] = given["udp_ports"]
    for key, option in (("dns", "--dns"), ("search", "--search")):
        if key in given:
            words = given[key] if key == "dns" else [w for arg in given[key] for w in arg.split()]
            if any(w in ("host", "none") for w in words) and len(words) > 1:
                raise _cli_error(option, "'host' and 'none' cannot be combined with other values")
            raw[key] = words[0] if words in (["host"], ["none"]) else words
    _cli_per_family(given.get("address", []), "--address", "address", raw)
    _cli_per_family(given.get("gateway", []), "--gateway", "gateway", raw)
    if "netmask" in given:
        raw.setdefault("ipv4", {})["netmask"] = given["netmask"]
    if given.get("ipv4_only") and given.get("ipv6_only"):
        raise _cli_error("-4/--ipv4-only", "conflicts with -6/--ipv6-only")
    if given.get("ipv4_only") or given.get("ipv6_only"):
        v4 = bool(given.get("ipv4_only"))
        raw.setdefault("ipv4", {})["enabled"] = v4
        raw.setdefault("ipv6", {})["enabled"] = not v4
    if "timeout" in given:
        raw["timeouts"] = _cli_pairs(given["timeout"], "--timeout", "SECONDS")
    if "limit" in given:
        raw["limits"] = _cli_pairs(given["limit"], "--limit", "N")
    return raw


# --- loading ------------------------------------------------------------------------


def load(
    name: str, args: argparse.Namespace | None = None, *, config_file: str | None = None
) -> InstanceConfig:
    """The effective configuration of instance `name` (see the module docstring).

    `config_file` (else `args.config`) replaces /etc/passtd.yaml; `args` is what
    add_run_arguments() parsed, its options the last layer.
    """
    try:
        check_name(name)
    except InvalidName as e:
        raise ConfigError(str(e)) from None
    if config_file is None and args is not None:
        config_file = getattr(args, "config", None)
    runtime = runtime_dir()
    layers = _Layers()
    sources: list[str] = []

    main_file = config_file or DEFAULT_CONFIG_FILE
    for path in [main_file, *_dropins(main_file)]:
        doc = _read_yaml(path, required=path == config_file)
        if doc is _MISSING:
            continue
        contributed = False
        for key_prefix, section in _etc_sections(doc, path, name):
            contributed |= _add_file_section(layers, section, path, key_prefix)
        if contributed:
            sources.append(path)

    runtime_file = hook_runtime_file(name)
    doc = _read_yaml(runtime_file, required=False)
    if doc is not _MISSING and _add_file_section(layers, doc, runtime_file, ""):
        sources.append(runtime_file)

    if args is not None:
        try:
            cli_layer = _check_instance(_cli_raw(args))
        except _Invalid as e:
            raise _cli_error(_option_for(e.path), e.reason) from None
        layers.add(cli_layer, lambda p: f"{COMMAND_LINE}: {_option_for(p)}")

    return _build(name, layers, runtime, tuple(sources))


def _classful_prefix(addr: ipaddress.IPv4Address) -> int:
    """passt's prefix for an address given without one: its class's (A /8, B /16, C /24)."""
    first = int(addr) >> 24
    return 8 if first < 128 else 16 if first < 192 else 24 if first < 224 else 32


def _expand(template: str, name: str, where: str) -> str:
    path = template.replace("{name}", name)
    if len(path.encode()) > SUN_PATH_MAX:
        raise ConfigError(f"{where}: {path!r} is longer than {SUN_PATH_MAX} bytes")
    return path


def _build(
    name: str, layers: _Layers, runtime_dir: str, sources: tuple[str, ...]
) -> InstanceConfig:
    """InstanceConfig from the merged layers, with derived defaults and cross-checks."""
    merged = dict(layers.merged)
    ip4 = Ip4Settings(**merged.pop("ipv4", {}))
    if ip4.address is not None and ip4.prefix_len is None:
        ip4 = Ip4Settings(ip4.enabled, ip4.address, _classful_prefix(ip4.address), ip4.gateway)
    ip6 = Ip6Settings(**merged.pop("ipv6", {}))
    if ip6.address is None or ip6.prefix_len is None:
        prefix_len = None if ip6.address is None else 64
        ip6 = Ip6Settings(ip6.enabled, ip6.address, prefix_len, ip6.gateway)
    if not ip4.enabled and not ip6.enabled:
        where = layers.where(("ipv4", "enabled"), ("ipv6", "enabled"))
        raise ConfigError(f"{where}: IPv4 and IPv6 cannot both be disabled")

    forwards: dict[str, Any] = {}
    for proto in ("tcp", "udp"):
        key = f"{proto}_forwards"
        parsed = merged.pop(key, ())
        for spec, rules in parsed:
            for rule in rules:
                if rule.address is None:
                    continue
                version = ipaddress.ip_address(rule.address).version
                if not (ip4 if version == 4 else ip6).enabled:
                    where = layers.where((key,), (f"ipv{version}", "enabled"))
                    raise ConfigError(f"{where}: {spec!r} listens on IPv{version}, disabled")
        forwards[key] = tuple(rule for _spec, rules in parsed for rule in rules)
        forwards[f"{proto}_forward_specs"] = tuple(spec for spec, _rules in parsed)

    socket_where = layers.origin.get(("socket",), (0, f"{RUNTIME_DIR_ENV}={runtime_dir}"))[1]
    socket = _expand(merged.pop("socket", f"{runtime_dir}/{{name}}.sock"), name, socket_where)
    if merged.get("pcap") is not None:
        merged["pcap"] = _expand(merged["pcap"], name, layers.where(("pcap",)))
    return InstanceConfig(
        name=name,
        socket=socket,
        ipv4=ip4,
        ipv6=ip6,
        timeouts=Timeouts(**merged.pop("timeouts", {})),
        limits=Limits(**merged.pop("limits", {})),
        sources=sources,
        **forwards,
        **merged,
    )


def _with_prefix(addr: IPAddress | None, prefix_len: int | None) -> str | None:
    if addr is None:
        return None
    return str(addr) if prefix_len is None else f"{addr}/{prefix_len}"


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def to_yaml_dict(cfg: InstanceConfig) -> dict[str, Any]:
    """The effective settings as an instance section (loadable back as a runtime file).

    Name and sources are not settings: `passtd config show` prints them around this.
    """
    return {
        "socket": cfg.socket,
        "tcp_forwards": list(cfg.tcp_forward_specs),
        "udp_forwards": list(cfg.udp_forward_specs),
        "pcap": cfg.pcap,
        "log_level": cfg.log_level,
        "mtu": cfg.mtu,
        "mac": cfg.mac.hex(":"),
        "interface": cfg.interface,
        "ipv4": {
            "enabled": cfg.ipv4.enabled,
            "address": _with_prefix(cfg.ipv4.address, cfg.ipv4.prefix_len),
            "netmask": cfg.ipv4.prefix_len if cfg.ipv4.address is None else None,
            "gateway": _text_or_none(cfg.ipv4.gateway),
        },
        "ipv6": {
            "enabled": cfg.ipv6.enabled,
            "address": _with_prefix(cfg.ipv6.address, cfg.ipv6.prefix_len),
            "gateway": _text_or_none(cfg.ipv6.gateway),
        },
        "dns": cfg.dns if cfg.dns == "host" else [str(a) for a in cfg.dns] or "none",
        "search": cfg.search if cfg.search == "host" else list(cfg.search) or "none",
        "map_host_loopback": cfg.map_host_loopback,
        "map_guest_addr": _text_or_none(cfg.map_guest_addr),
        "hostname": cfg.hostname,
        "dhcp": cfg.dhcp,
        "ndp": cfg.ndp,
        "dhcpv6": cfg.dhcpv6,
        "ra": cfg.ra,
        "timeouts": cfg.timeouts._asdict(),
        "limits": cfg.limits._asdict(),
        "bus": cfg.bus,
        "qemu_cgroup": cfg.qemu_cgroup,
    }

