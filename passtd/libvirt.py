"""libvirt integration: a domain's passtd settings in its XML, the qemu hook, attach/detach.

Design. A libvirt domain that uses passtd carries everything in its own definition:

  - its settings, as a metadata element in our namespace (NAMESPACE, prefix `passtd`):

        <metadata>
          <passtd:network xmlns:passtd="https://passtd.org/xmlns/libvirt/1" mtu="65520">
            <passtd:forward proto="tcp" host="2222" guest="22"/>
            <passtd:forward proto="udp" host="5353" address="127.0.0.1"/>
            <passtd:ipv4 address="198.51.100.10/24" gateway="198.51.100.1"/>
            <passtd:ipv6 enabled="no"/>
            <passtd:dns address="198.51.100.53"/>
          </passtd:network>
        </metadata>

    (libvirt-hook/README.md documents every element and attribute);
  - its NIC, as `<qemu:commandline>` arguments: `-netdev stream` (client) to the instance's
    socket /run/passtd/NAME.sock and a virtio-net-pci device with a stable MAC. libvirt 9.0
    rejects `<interface><backend type='passt'/>`, so this is the way in (the domain is
    then "tainted: custom-argv" in libvirt's log, which is harmless).

The instance name is the domain name, so a domain whose name is not an instance name
(passtd.names: "-x", "..", "a b") is refused by the hook and by attach, with the reason;
its systemd units are passtd@ESCAPED.socket/.service (`systemd_escape`).

Three users of this module:

  - the qemu hook (libvirt-hook/passtd calls `hook_main`): on "prepare begin" it turns the
    metadata into the runtime file /run/passtd/NAME.yaml (a config layer, see config.py),
    with `qemu_cgroup` naming the scope libvirt will run this domain's qemu in (`qemu_scope`:
    the instance then adopts no other process's connection, passtd/qemu_peer.py; every
    qemu of the host may open every instance's socket), checks the effective
    configuration, starts the socket unit so that it listens before
    qemu connects (qemu 7.2's stream netdev connects once, never again), checks that
    qemu's user may connect to it and starts the instance (its forwards listen before the
    domain runs: a port taken fails `virsh start`, or an incoming migration, while the
    guest still runs where it was); any failure exits non-zero with a message, which
    libvirt shows as the reason `virsh start` or `virsh migrate` failed. On "release
    end" it stops the instance and removes the runtime file. The hook never calls
    libvirt (that deadlocks: libvirtd waits for the hook) and does nothing at all for
    domains without our metadata.
  - `passtctl libvirt attach|detach` (`attach`, `detach`): edits of the persistent
    definition, done by pure functions on the XML text (`attach_xml`, `detach_xml`) and
    one defineXML. Idempotent; refused while the domain runs (the edit would apply only at
    its next start, which surprises) and when its command line already has a netdev we did
    not write.
  - `passtctl NAME forward add|remove` (`ForwardRecorder`): a forward added or removed at
    runtime is recorded in the running domain's live metadata (setMetadata AFFECT_LIVE),
    which `virsh migrate` carries to the destination's hook, and with --persist in the
    persistent metadata as well (AFFECT_CONFIG).

Metadata values are checked twice: structurally here (known elements and attributes only,
so a typo is an error, not a silently ignored setting), then by passtd.config itself, on
the settings alone (`check_settings`) and, in the hook, merged with /etc/passtd.yaml.

Migration needs nothing of its own: the destination host's hook gets the live definition
(metadata, runtime forwards recorded there included) and starts its own instance with it;
the guest keeps the addresses it has, which only pinned ones (<passtd:ipv4 address
gateway>, `passtctl libvirt attach --pin`) make mean the same on every host
(libvirt-hook/README.md, "Live migration").

Not done here: hot-plugging the NIC into a running domain (qemu 7.2 cannot reconnect a
stream netdev anyway, and i440fx hot-plug needs ACPI), and machines without PCI
(virtio-net-pci is x86's and arm's virt machine's device, not s390's).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import io
import ipaddress
import os
import pwd
import re
import stat
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from . import config
from .engine.addrs import is_unicast_mac, parse_mac
from .engine.fwd import SpecError, find_conflict, parse_range, parse_spec, unbracket
from .names import DEFAULT_RUNTIME_DIR, InvalidName, check_name, hook_runtime_file
from .qemu_peer import CGROUP_ROOTS

NAMESPACE = "https://passtd.org/xmlns/libvirt/1"
PREFIX = "passtd"
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
DEFAULT_URI = "qemu:///system"
NETDEV_ID = "passtd0"
NIC_ID = "passtd0-nic"
NIC_MODEL = "virtio-net-pci"
MAC_OUI = "52:54:00"  # the prefix qemu and libvirt use for generated MACs
QEMU_CONF = "/etc/libvirt/qemu.conf"
# libvirt's compiled-in qemu user when qemu.conf sets none: Debian's, then Fedora's
QEMU_DEFAULT_USERS = ("libvirt-qemu", "qemu")
SYSTEMCTL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEMCTL_TIMEOUT = 30.0
# where the system bus finds the services it can start (dbus-daemon's standard directories)
DBUS_SYSTEM_SERVICE_DIRS = ("/usr/local/share/dbus-1/system-services",
                            "/usr/share/dbus-1/system-services", "/lib/dbus-1/system-services")
MACHINED_BUS_SERVICE = "org.freedesktop.machine1.service"
MACHINE_NAME_MAX = 64  # libvirt stops adding a domain's name at this length
DEFAULT_PARTITION = "/machine"  # libvirt's resource partition when the domain sets none

_TAG = f"{{{NAMESPACE}}}"
_QEMU_TAG = f"{{{QEMU_NAMESPACE}}}"
_BOOLS = {"yes": True, "no": False}
_QEMU_USER_RE = re.compile(r'^\s*user\s*=\s*"([^"]*)"', re.MULTILINE)

# ElementTree names namespaces ns0, ns1... unless told the prefix: ours and qemu's here,
# a domain's others when it is parsed (`_parse_domain`)
ET.register_namespace(PREFIX, NAMESPACE)
ET.register_namespace("qemu", QEMU_NAMESPACE)


class MetadataError(ValueError):
    """The domain's passtd metadata (or a setting given for it) is invalid."""


class DomainError(Exception):
    """A domain cannot be edited as asked; `kind` tells the caller's exit status."""

    NOT_FOUND = "not-found"  # no such domain, or no libvirt to ask
    REFUSED = "refused"  # running, transient, conflicting netdev, not a passtd domain

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class HookError(Exception):
    """The hook cannot let the domain start; the message is what libvirt shows."""


# -- the settings ------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    """One port forward: host port(s) -> guest port(s), on one host address or all."""

    proto: str  # "tcp" | "udp"
    host: str  # "PORT" or "FIRST-LAST"
    guest: str | None = None  # same form; None: the same ports
    address: str | None = None  # listen address; None: every address of both families

    @property
    def spec(self) -> str:
        """The -t/-u spec passtd.config reads, e.g. "127.0.0.1/2222:22"."""
        listen = f"{self.address}/" if self.address is not None else ""
        target = f":{self.guest}" if self.guest is not None else ""
        return f"{listen}{self.host}{target}"

    def describe(self) -> str:
        return f"{self.proto} {self.spec}"

    def check(self) -> None:
        """MetadataError unless this is one well-formed forward (ports, ranges, address)."""
        if self.proto not in ("tcp", "udp"):
            raise MetadataError(f"proto must be tcp or udp, got {self.proto!r}")
        for what, ports in (("host", self.host), ("guest", self.guest)):
            try:
                if ports is not None:
                    parse_range(ports)
            except SpecError as e:
                raise MetadataError(f"{what} must be a port or a range FIRST-LAST, got "
                                    f"{ports!r} ({e})") from None
        if self.address is not None:
            try:  # an address only: not the spec grammar's "*", "%IFNAME" or a prefix
                ipaddress.ip_address(self.address)
            except ValueError:
                raise MetadataError(f"address must be an IP address, got {self.address!r}") \
                    from None
        try:
            parse_spec(self.spec, self.proto)
        except SpecError as e:
            raise MetadataError(str(e)) from None

    def overlaps(self, other: Forward) -> bool:
        """Whether both would listen on a common (protocol, address, port)."""
        if self.proto != other.proto:
            return False
        rules = parse_spec(self.spec, self.proto)
        return any(r.overlaps(o) for r in rules for o in parse_spec(other.spec, other.proto))


def parse_forward(text: str) -> Forward:
    """`PROTO:[ADDRESS/]HOST[:GUEST]` (passtctl's --forward), e.g. tcp:2222:22,
    udp:127.0.0.1/5353, tcp:::1/8080:80, tcp:8000-8010:9000-9010."""
    proto, colon, rest = text.partition(":")
    if not colon or proto not in ("tcp", "udp"):
        raise MetadataError(f"{text!r}: expected PROTO:[ADDRESS/]HOST[:GUEST], PROTO tcp or udp")
    address, slash, ports = rest.rpartition("/")
    host, colon, guest = ports.partition(":")
    forward = Forward(proto, host, guest if colon else None,
                      unbracket(address) if slash else None)
    try:
        forward.check()
    except MetadataError as e:
        raise MetadataError(f"{text!r}: {e}") from None
    return forward


@dataclass(frozen=True)
class IpSettings:
    """One address family's settings; None: not set here (the host's, or /etc's)."""

    enabled: bool | None = None
    address: str | None = None  # "ADDR[/LEN]"
    gateway: str | None = None

    def is_empty(self) -> bool:
        return self == IpSettings()


@dataclass(frozen=True)
class NetworkSettings:
    """What a domain's <passtd:network> says. Unset values leave the other layers' own."""

    mtu: int | None = None
    forwards: tuple[Forward, ...] = ()
    ipv4: IpSettings = field(default_factory=IpSettings)
    ipv6: IpSettings = field(default_factory=IpSettings)
    dns: tuple[str, ...] = ()  # nameservers told to the guest; (): not set

    def with_forward(self, forward: Forward) -> NetworkSettings:
        """These settings plus `forward` (unchanged if it is there already); MetadataError
        if another forward listens on one of its ports."""
        if forward in self.forwards:
            return self
        for existing in self.forwards:
            if existing.overlaps(forward):
                raise MetadataError(
                    f"forward {forward.describe()} overlaps {existing.describe()}, which "
                    f"the metadata already has")
        return replace(self, forwards=(*self.forwards, forward))

    def without_forward(self, forward: Forward) -> NetworkSettings:
        """These settings less the forwards that listen where `forward` does, on the same
        ports to the same guest ports, however spelt (unchanged if there is none)."""
        rules = parse_spec(forward.spec, forward.proto)
        kept = tuple(f for f in self.forwards
                     if f.proto != forward.proto or parse_spec(f.spec, f.proto) != rules)
        return self if kept == self.forwards else replace(self, forwards=kept)


def runtime_config(settings: NetworkSettings) -> dict[str, Any]:
    """The runtime file's settings (config.py's instance keys; only those that are set).

    A protocol's forwards replace that protocol's list from /etc/passtd.yaml (lists are
    replaced whole by a later layer); a protocol without forwards here keeps /etc's.
    """
    doc: dict[str, Any] = {}
    if settings.mtu is not None:
        doc["mtu"] = settings.mtu
    for proto in ("tcp", "udp"):
        specs = [f.spec for f in settings.forwards if f.proto == proto]
        if specs:
            doc[f"{proto}_forwards"] = specs
    for family, ip in (("ipv4", settings.ipv4), ("ipv6", settings.ipv6)):
        section = {key: value for key, value in
                   (("enabled", ip.enabled), ("address", ip.address), ("gateway", ip.gateway))
                   if value is not None}
        if section:
            doc[family] = section
    if settings.dns:
        doc["dns"] = list(settings.dns)
    return doc


def check_settings(name: str, settings: NetworkSettings) -> None:
    """MetadataError unless passtd.config accepts these settings for instance `name`.

    passtd.config is the one validator: the settings go through it as the only instance
    section of a scratch config file (no /etc files, no drop-ins), and its message loses
    the scratch file's name.
    """
    with tempfile.TemporaryDirectory(prefix="passtd-check-") as scratch:
        path = os.path.join(scratch, "passtd.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump({"instances": {name: runtime_config(settings)}}, f)
        try:
            config.load(name, config_file=path)
        except config.ConfigError as e:
            message = str(e)
            for prefix in (f"{path}: instances.{name}.", f"{path}: instances.{name}: ",
                           f"{path}: "):
                if message.startswith(prefix):
                    message = message[len(prefix):]
                    break
            raise MetadataError(message) from None


# -- metadata <-> XML ----------------------------------------------------------------------


def _attributes(element: ET.Element, allowed: Sequence[str], where: str) -> dict[str, str]:
    unknown = sorted(set(element.attrib) - set(allowed))
    if unknown:
        raise MetadataError(f"{where}: unknown attribute {_local(unknown[0])!r} "
                            f"(known: {', '.join(allowed) or 'none'})")
    return dict(element.attrib)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _bool_attr(value: str | None, where: str) -> bool | None:
    if value is None:
        return None
    if value not in _BOOLS:
        raise MetadataError(f"{where}: enabled must be yes or no, got {value!r}")
    return _BOOLS[value]


def parse_metadata(element: ET.Element) -> NetworkSettings:
    """The settings in a <passtd:network> element; MetadataError says what is wrong."""
    if element.tag != f"{_TAG}network":
        raise MetadataError(f"expected <{PREFIX}:network> in {NAMESPACE}, got {element.tag}")
    attrs = _attributes(element, ("mtu",), "network")
    mtu = None
    if "mtu" in attrs:
        if not attrs["mtu"].isascii() or not attrs["mtu"].isdigit():
            raise MetadataError(f"network: mtu must be a number, got {attrs['mtu']!r}")
        mtu = int(attrs["mtu"])
    forwards: list[Forward] = []
    ip: dict[str, IpSettings] = {}
    dns: list[str] = []
    for index, child in enumerate(element):
        if not isinstance(child.tag, str):
            continue  # a comment or processing instruction
        kind = _local(child.tag)
        where = f"{kind} #{index + 1}" if kind in ("forward", "dns") else kind
        if not child.tag.startswith(_TAG) or kind not in ("forward", "ipv4", "ipv6", "dns"):
            raise MetadataError(f"unknown element {child.tag} in <{PREFIX}:network> "
                                "(known: forward, ipv4, ipv6, dns)")
        if kind == "forward":
            a = _attributes(child, ("proto", "host", "guest", "address"), where)
            if "proto" not in a or "host" not in a:
                raise MetadataError(f"{where}: proto and host are required")
            forward = Forward(a["proto"], a["host"], a.get("guest"), a.get("address"))
            try:
                forward.check()
            except MetadataError as e:
                raise MetadataError(f"{where}: {e}") from None
            forwards.append(forward)
        elif kind in ("ipv4", "ipv6"):
            if kind in ip:
                raise MetadataError(f"{kind} given twice")
            a = _attributes(child, ("enabled", "address", "gateway"), kind)
            ip[kind] = IpSettings(_bool_attr(a.get("enabled"), kind), a.get("address"),
                                  a.get("gateway"))
        else:
            a = _attributes(child, ("address",), where)
            if "address" not in a:
                raise MetadataError(f"{where}: address is required")
            dns.append(a["address"])
    settings = NetworkSettings(mtu, tuple(forwards), ip.get("ipv4", IpSettings()),
                               ip.get("ipv6", IpSettings()), tuple(dns))
    _check_forward_conflicts(settings.forwards)
    return settings


def _check_forward_conflicts(forwards: Sequence[Forward]) -> None:
    rules = [(f, rule) for f in forwards for rule in parse_spec(f.spec, f.proto)]
    clash = find_conflict(rule for _f, rule in rules)
    if clash is not None:
        first, second = (next(f for f, r in rules if r is rule) for rule in clash)
        raise MetadataError(f"forwards {first.describe()} and {second.describe()} "
                            f"both listen on {first.proto} port "
                            f"{max(clash[0].first, clash[1].first)}")


def metadata_element(settings: NetworkSettings) -> ET.Element:
    """The <passtd:network> element that `parse_metadata` reads back as `settings`."""
    element = ET.Element(f"{_TAG}network")
    if settings.mtu is not None:
        element.set("mtu", str(settings.mtu))
    for forward in settings.forwards:
        attrs = {"proto": forward.proto, "host": forward.host}
        if forward.guest is not None:
            attrs["guest"] = forward.guest
        if forward.address is not None:
            attrs["address"] = forward.address
        ET.SubElement(element, f"{_TAG}forward", attrs)
    for family, ip in (("ipv4", settings.ipv4), ("ipv6", settings.ipv6)):
        if not ip.is_empty():
            attrs = {}
            if ip.enabled is not None:
                attrs["enabled"] = "yes" if ip.enabled else "no"
            if ip.address is not None:
                attrs["address"] = ip.address
            if ip.gateway is not None:
                attrs["gateway"] = ip.gateway
            ET.SubElement(element, f"{_TAG}{family}", attrs)
    for address in settings.dns:
        ET.SubElement(element, f"{_TAG}dns", {"address": address})
    return element


def metadata_xml(settings: NetworkSettings) -> str:
    """`metadata_element` as setMetadata takes it: without the namespace, which libvirt
    gives it (from the key and URI); it refuses an element that declares it already."""
    element = metadata_element(settings)
    for node in element.iter():
        node.tag = _local(node.tag)
    ET.indent(element)
    return ET.tostring(element, encoding="unicode")


def _parse_domain(domain_xml: str | bytes) -> ET.Element:
    """The domain's root element; its namespace prefixes are kept for writing it back."""
    source = domain_xml.encode() if isinstance(domain_xml, str) else domain_xml
    events = ET.iterparse(io.BytesIO(source), events=("start-ns",))
    try:
        for _event, (prefix, uri) in events:
            if prefix and not re.fullmatch(r"ns\d+", prefix):  # ET refuses to register those
                ET.register_namespace(prefix, uri)
    except ET.ParseError as e:
        raise MetadataError(f"the domain XML does not parse: {e}") from None
    root: ET.Element = events.root  # type: ignore[attr-defined]
    if root.tag != "domain":
        raise MetadataError(f"expected a <domain> document, got <{root.tag}>")
    return root


def _find_metadata(root: ET.Element) -> tuple[ET.Element | None, ET.Element | None]:
    """The domain's <metadata> and our <passtd:network> in it (None: absent)."""
    metadata = root.find("metadata")
    return metadata, None if metadata is None else metadata.find(f"{_TAG}network")


def settings_from_domain(domain_xml: str | bytes) -> NetworkSettings | None:
    """The domain's passtd settings, or None if it has no passtd metadata."""
    _metadata, element = _find_metadata(_parse_domain(domain_xml))
    return None if element is None else parse_metadata(element)


def domain_name(domain_xml: str | bytes) -> str:
    return _parse_domain(domain_xml).findtext("name") or ""


# -- systemd names ---------------------------------------------------------------------------


def systemd_escape(name: str) -> str:
    """What `systemd-escape NAME` prints: the unit instance for instance `name`."""
    out = []
    for index, byte in enumerate(name.encode()):
        char = chr(byte)
        if char == "/":
            out.append("-")
        elif ((char.isascii() and char.isalnum()) or char in ":_.") and \
                not (index == 0 and char == "."):
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def socket_unit(name: str) -> str:
    return f"passtd@{systemd_escape(name)}.socket"


def service_unit(name: str) -> str:
    return f"passtd@{systemd_escape(name)}.service"


def socket_path(name: str) -> str:
    """passtd@.socket's ListenStream: always under /run/passtd (the unit's %I)."""
    return f"{DEFAULT_RUNTIME_DIR}/{name}.sock"


# -- the cgroup libvirt runs qemu in ----------------------------------------------------------


def machined_available(service_dirs: Sequence[str] = DBUS_SYSTEM_SERVICE_DIRS) -> bool:
    """Whether libvirt will run qemu in a systemd-machined scope: as libvirt decides it,
    whether the system bus can start org.freedesktop.machine1 (Debian's libvirt depends
    on systemd-container, which ships it)."""
    return any(os.path.exists(os.path.join(d, MACHINED_BUS_SERVICE)) for d in service_dirs)


def machine_name(domain_id: int, name: str) -> str:
    """The name libvirt registers domain `name` under with systemd-machined: "qemu-ID-"
    and the name's letters, digits, and single "." or "-" between them, 64 characters
    at most (libvirt's virDomainDriverGenerateMachineName, unchanged from 9.0 to 11)."""
    out = f"qemu-{domain_id}-"
    after_separator = True  # no "." or "-" at the start, none twice in a row
    for char in name:
        if len(out) >= MACHINE_NAME_MAX:
            break
        if char in ".-":
            if not after_separator:
                out += char
                after_separator = True
        elif char.isascii() and char.isalnum():
            out += char
            after_separator = False
    return out.rstrip(".-")


def _slice_cgroup(partition: str) -> str:
    """The cgroup of the slice libvirt makes of a resource partition: "/machine" is
    machine.slice, "/machine/prod" machine-prod.slice inside machine.slice."""
    parts = systemd_escape(partition.strip("/")).split("-")
    return "".join(f"/{'-'.join(parts[:i + 1])}.slice" for i in range(len(parts)))


def qemu_scope(domain_xml: str | bytes) -> str | None:
    """The cgroup of the scope systemd-machined makes for the domain's qemu (libvirt asks
    for it when it starts qemu), e.g. /machine.slice/machine-qemu\\x2d1\\x2dvm1.scope.
    None without the domain's id: libvirt gives the domain its id before "prepare", so
    that is a domain XML from elsewhere."""
    root = _parse_domain(domain_xml)
    domain_id = root.get("id", "")
    if not (domain_id.isascii() and domain_id.isdigit()):
        return None
    partition = root.findtext("resource/partition") or DEFAULT_PARTITION
    machine = machine_name(int(domain_id), root.findtext("name") or "")
    return f"{_slice_cgroup(partition)}/machine-{systemd_escape(machine)}.scope"


# -- the qemu command line -----------------------------------------------------------------


def _qemu_options(value: str) -> dict[str, str]:
    """qemu's "type,key=value,..." (",," is a literal comma); the first bare word is
    stored under the key ""."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(value[i])
        i += 1
    parts.append("".join(current))
    options: dict[str, str] = {}
    for index, part in enumerate(parts):
        key, equals, item = part.partition("=")
        if not equals and index == 0:
            options[""] = part
        else:
            options[key] = item
    return options


def _format_qemu_options(options: dict[str, str]) -> str:
    """`_qemu_options` backwards."""
    parts = [f"{key}={value}" if key else value for key, value in options.items()]
    if "" in options:
        parts.insert(0, parts.pop(list(options).index("")))
    return ",".join(part.replace(",", ",,") for part in parts)


def netdev_value(name: str) -> str:
    # instance names (passtd.names) have no commas: nothing to escape for qemu
    return f"stream,id={NETDEV_ID},server=off,addr.type=unix,addr.path={socket_path(name)}"


def device_value(mac: str) -> str:
    return f"{NIC_MODEL},id={NIC_ID},netdev={NETDEV_ID},mac={mac}"


@dataclass
class _Option:
    """One "-netdev VALUE" or "-device VALUE" pair of <qemu:arg> elements."""

    flag: ET.Element
    arg: ET.Element

    @property
    def options(self) -> dict[str, str]:
        return _qemu_options(self.arg.get("value", ""))


def _qemu_pairs(commandline: ET.Element | None, option: str) -> list[_Option]:
    if commandline is None:
        return []
    args = commandline.findall(f"{_QEMU_TAG}arg")
    pairs = []
    i = 0
    while i < len(args) - 1:
        if args[i].get("value") in (f"-{option}", f"--{option}"):
            pairs.append(_Option(args[i], args[i + 1]))
            i += 2  # its value is not a flag, even if it looks like one
        else:
            i += 1
    return pairs


def _our_pairs(commandline: ET.Element, option: str, key: str) -> list[_Option]:
    """The -netdev (key "id") or -device (key "netdev") pairs of our netdev."""
    return [p for p in _qemu_pairs(commandline, option) if p.options.get(key) == NETDEV_ID]


def _is_passtd_netdev(options: dict[str, str]) -> bool:
    """A stream netdev to some instance's socket: ours (maybe of an earlier domain name)."""
    path = options.get("addr.path", "")
    return options.get("") == "stream" and \
        os.path.dirname(path) == DEFAULT_RUNTIME_DIR and path.endswith(".sock")


def stable_mac(uuid: str, taken: Iterable[str] = ()) -> str:
    """The NIC's MAC: from the domain's UUID, so a detach and attach give it back; the
    next candidate if another NIC of the domain has it."""
    used = {mac.lower() for mac in taken}
    for attempt in range(256):
        digest = hashlib.sha256(f"passtd:{uuid}:{attempt}".encode()).digest()
        mac = f"{MAC_OUI}:{digest[0]:02x}:{digest[1]:02x}:{digest[2]:02x}"
        if mac not in used:
            return mac
    raise DomainError(DomainError.REFUSED, "no free MAC address for the passtd NIC")


def _check_mac(mac: str) -> str:
    """The MAC in lower case; MetadataError unless it is a unicast one."""
    raw = parse_mac(mac)
    if raw is None or not is_unicast_mac(raw):
        raise MetadataError(f"{mac!r} is not a unicast MAC address like 52:54:00:12:34:56")
    return mac.lower()


def _domain_macs(root: ET.Element) -> list[str]:
    macs = [m.get("address", "") for m in root.findall("devices/interface/mac")]
    for device in _qemu_pairs(root.find(f"{_QEMU_TAG}commandline"), "device"):
        if "mac" in device.options:
            macs.append(device.options["mac"])
    return macs


# -- attach and detach: pure edits of the domain XML ------------------------------------------


@dataclass(frozen=True)
class Edit:
    """The result of an edit: the new XML, whether anything changed, and what it is."""

    xml: str
    changed: bool
    settings: NetworkSettings | None = None
    mac: str | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SettingsChange:
    """What `passtctl libvirt attach` was asked to set (None/empty: leave as it is)."""

    forwards: tuple[Forward, ...] = ()  # added to those there (already there: no change)
    mtu: int | None = None
    ipv4_address: str | None = None
    ipv4_gateway: str | None = None
    ipv6_address: str | None = None
    ipv6_gateway: str | None = None
    dns: tuple[str, ...] = ()  # replaces the list
    mac: str | None = None  # the NIC's MAC (default: kept, or `stable_mac`)

    def apply(self, settings: NetworkSettings) -> NetworkSettings:
        for forward in self.forwards:
            settings = settings.with_forward(forward)
        changes: dict[str, Any] = {}
        if self.mtu is not None:
            changes["mtu"] = self.mtu
        for family, address, gateway in (("ipv4", self.ipv4_address, self.ipv4_gateway),
                                         ("ipv6", self.ipv6_address, self.ipv6_gateway)):
            ip = getattr(settings, family)
            if address is not None:
                ip = replace(ip, address=address)
            if gateway is not None:
                ip = replace(ip, gateway=gateway)
            changes[family] = ip
        if self.dns:
            changes["dns"] = self.dns
        return replace(settings, **changes)


def _serialize(root: ET.Element) -> str:
    ET.indent(root)  # whitespace between elements only: libvirt reformats it anyway
    return ET.tostring(root, encoding="unicode") + "\n"


def attach_xml(domain_xml: str, change: SettingsChange = SettingsChange()) -> Edit:
    """The domain wired to passtd: metadata (with `change` applied) and the qemu netdev
    and NIC. Applying the same change again changes nothing. DomainError(REFUSED) if the
    command line has a netdev of ours that is not passtd's, or one to our socket that we
    did not write; MetadataError if the settings are invalid."""
    root = _parse_domain(domain_xml)
    name = root.findtext("name") or ""
    try:
        check_name(name)
    except InvalidName as e:
        raise DomainError(DomainError.REFUSED, f"domain {name!r}: {e}") from None
    settings, metadata_changed = _update_metadata(root, name, change)
    commandline = root.find(f"{_QEMU_TAG}commandline")
    if commandline is None:
        commandline = ET.SubElement(root, f"{_QEMU_TAG}commandline")
    netdev_changed, notes = _update_netdev(commandline, name)
    mac, nic_changed = _update_nic(root, commandline, change.mac)
    changed = metadata_changed or netdev_changed or nic_changed
    xml = _serialize(root) if changed else domain_xml
    return Edit(xml, changed, settings, mac, notes)


def _update_metadata(root: ET.Element, name: str,
                     change: SettingsChange) -> tuple[NetworkSettings, bool]:
    """The domain's <passtd:network> with `change` applied: (settings, changed)."""
    metadata, element = _find_metadata(root)
    old = parse_metadata(element) if element is not None else None
    settings = change.apply(old or NetworkSettings())
    check_settings(name, settings)
    if settings == old:
        return settings, False
    if metadata is None:
        metadata = ET.Element("metadata")
        # where libvirt puts it: after name, uuid, title and description
        after = [i for i, child in enumerate(root)
                 if child.tag in ("name", "uuid", "genid", "title", "description")]
        root.insert(after[-1] + 1 if after else 0, metadata)
    if element is None:
        metadata.append(metadata_element(settings))
    else:
        metadata[list(metadata).index(element)] = metadata_element(settings)
    return settings, True


def _update_netdev(commandline: ET.Element, name: str) -> tuple[bool, tuple[str, ...]]:
    """Our -netdev, added or pointed at this domain's socket: (changed, notes)."""
    netdevs = _qemu_pairs(commandline, "netdev")
    ours = [n for n in netdevs if n.options.get("id") == NETDEV_ID]
    for netdev in netdevs:
        value = netdev.arg.get("value")
        if netdev in ours and not _is_passtd_netdev(netdev.options):
            raise DomainError(DomainError.REFUSED, (
                f"domain {name}: its <qemu:commandline> already has a netdev with id "
                f"{NETDEV_ID} that is not passtd's ({value}); remove it first (virsh edit)"))
        if netdev not in ours and netdev.options.get("addr.path") == socket_path(name):
            raise DomainError(DomainError.REFUSED, (
                f"domain {name}: its <qemu:commandline> already connects a netdev to "
                f"{socket_path(name)} ({value}); remove it first (virsh edit)"))
    if not ours:
        for value in ("-netdev", netdev_value(name)):
            ET.SubElement(commandline, f"{_QEMU_TAG}arg", value=value)
        return True, ()
    if ours[0].arg.get("value") == netdev_value(name):
        return False, ()
    # a stream to another instance's socket: the domain was renamed since
    note = (f"netdev {NETDEV_ID} now connects to {socket_path(name)} "
            f"(was {ours[0].options.get('addr.path')})")
    ours[0].arg.set("value", netdev_value(name))
    return True, (note,)


def _update_nic(root: ET.Element, commandline: ET.Element,
                wanted: str | None) -> tuple[str, bool]:
    """Our -device on the netdev, added or given the `wanted` MAC: (its MAC, changed)."""
    wanted = None if wanted is None else _check_mac(wanted)
    devices = _our_pairs(commandline, "device", "netdev")
    if not devices:
        mac = wanted or stable_mac(root.findtext("uuid") or "", _domain_macs(root))
        for value in ("-device", device_value(mac)):
            ET.SubElement(commandline, f"{_QEMU_TAG}arg", value=value)
        return mac, True
    mac = devices[0].options.get("mac", "")
    if wanted is None or mac.lower() == wanted:
        return mac, False
    devices[0].arg.set("value", _format_qemu_options({**devices[0].options, "mac": wanted}))
    return wanted, True


def detach_xml(domain_xml: str) -> Edit:
    """The domain without our metadata, netdev and NIC (what attach added, and nothing
    else); unchanged if it has none of them."""
    root = _parse_domain(domain_xml)
    notes: list[str] = []
    changed = False
    metadata, element = _find_metadata(root)
    if metadata is not None and element is not None:
        metadata.remove(element)
        if len(metadata) == 0:
            root.remove(metadata)
        changed = True
    commandline = root.find(f"{_QEMU_TAG}commandline")
    if commandline is not None:
        netdevs = _our_pairs(commandline, "netdev", "id")
        foreign = [n for n in netdevs if not _is_passtd_netdev(n.options)]
        if foreign:  # then its NIC is not ours either
            notes.append(f"left netdev {NETDEV_ID} and its NIC alone: not passtd's "
                         f"({foreign[0].arg.get('value')})")
        else:
            devices = _our_pairs(commandline, "device", "netdev")
            for pair in [*netdevs, *devices]:
                commandline.remove(pair.flag)
                commandline.remove(pair.arg)
                changed = True
        if len(commandline) == 0:
            root.remove(commandline)
    return Edit(_serialize(root) if changed else domain_xml, changed, notes=tuple(notes))


# -- the qemu hook ----------------------------------------------------------------------------

Systemctl = Callable[..., subprocess.CompletedProcess[str]]


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    # libvirtd runs hooks with a minimal environment: give systemctl a PATH of its own
    return subprocess.run(["systemctl", *args], capture_output=True, text=True,
                          env={"PATH": SYSTEMCTL_PATH, "LC_ALL": "C"},
                          timeout=SYSTEMCTL_TIMEOUT, check=False)


def qemu_user(conf_path: str = QEMU_CONF) -> str | None:
    """The user libvirt runs qemu as: qemu.conf's `user =`, else the distribution's
    default that exists; None if unknown."""
    try:
        with open(conf_path, encoding="utf-8") as f:
            found = _QEMU_USER_RE.findall(f.read())
    except OSError:
        found = []
    if found:
        return str(found[-1])
    for user in QEMU_DEFAULT_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(user).pw_name
    return None


def may_connect(st: os.stat_result, uid: int, groups: Iterable[int]) -> bool:
    """Whether a process of `uid` with `groups` may connect to a socket with stat `st`
    (connect(2) needs write permission on a UNIX socket)."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IWUSR)
    if st.st_gid in set(groups):
        return bool(st.st_mode & stat.S_IWGRP)
    return bool(st.st_mode & stat.S_IWOTH)


def _user_ids(user: str) -> tuple[int, list[int]] | None:
    """(uid, groups) of a user name or libvirt's "+UID" form; None if unknown."""
    try:
        entry = pwd.getpwuid(int(user[1:])) if user.startswith("+") else pwd.getpwnam(user)
    except (KeyError, ValueError):
        return None
    return entry.pw_uid, os.getgrouplist(entry.pw_name, entry.pw_gid)


def check_qemu_access(path: str, user: str | None) -> None:
    """HookError if qemu's user could not connect to the socket at `path` (qemu would
    start anyway, with a NIC that never works: its stream netdev fails silently)."""
    if user is None:
        return
    ids = _user_ids(user)
    if ids is None:
        return  # libvirt refuses to start qemu as a user that does not exist
    uid, groups = ids
    st = os.stat(path)
    if not may_connect(st, uid, groups):
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        raise HookError(
            f"qemu runs as {user}, which may not connect to {path} (mode "
            f"{stat.S_IMODE(st.st_mode):o}, group {group}): add it to that group "
            f"(usermod -a -G {group} {user}; setup.sh does) and start the domain again")


def _write_runtime_file(path: str, doc: dict[str, Any]) -> None:
    """Atomically, mode 0644: the service's user (passtd) reads it."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=".", suffix=".yaml.new", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# written by passtd's libvirt hook from the domain's passtd metadata;\n"
                    "# removed when the domain stops (edit the domain, not this file)\n")
            yaml.safe_dump(doc, f, default_flow_style=False, sort_keys=False)
        os.chmod(scratch, 0o644)
        os.replace(scratch, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)
        raise


def _failed(res: subprocess.CompletedProcess[str]) -> str:
    return (res.stderr or res.stdout).strip() or f"exit status {res.returncode}"


def _status_text(unit: str, systemctl: Systemctl) -> str:
    """What the unit's process last said of itself (sd_notify STATUS=; systemd keeps it
    after the process failed)."""
    res = systemctl("show", "--property=StatusText", "--value", unit)
    return res.stdout.strip() if res.returncode == 0 else ""


def prepare(name: str, domain_xml: str | bytes, *, systemctl: Systemctl = _systemctl,
            user: str | None = None, config_file: str | None = None,
            machined: bool = False) -> bool:
    """"prepare begin": the instance's runtime file, then its socket; False if the domain
    does not use passtd. HookError (with everything undone) if the domain must not start.
    `user`: qemu's user, whose access to the socket is checked (None: not checked);
    `config_file`: instead of /etc/passtd.yaml (as `passtd run --config`); `machined`:
    libvirt runs qemu in a systemd-machined scope (`machined_available`), then the
    instance adopts only that scope's qemu (`qemu_cgroup` of the runtime file)."""
    try:
        settings = settings_from_domain(domain_xml)
    except MetadataError as e:
        raise HookError(f"domain {name}: its passtd metadata is invalid: {e}") from None
    if settings is None:
        return False
    try:
        check_name(name)
    except InvalidName as e:
        raise HookError(f"domain {name!r} cannot have a passtd instance: {e}; rename the "
                        "domain (virsh domrename)") from None
    try:
        check_settings(name, settings)
    except MetadataError as e:
        raise HookError(f"domain {name}: its passtd metadata is refused: {e}") from None
    runtime_file = hook_runtime_file(name)
    socket, service = socket_unit(name), service_unit(name)
    runtime = runtime_config(settings)
    scope = qemu_scope(domain_xml) if machined else None
    if scope is not None:
        runtime["qemu_cgroup"] = scope
    _write_runtime_file(runtime_file, runtime)
    try:
        try:  # the effective configuration: /etc/passtd.yaml and its drop-ins as well
            config.load(name, config_file=config_file)
        except config.ConfigError as e:
            raise HookError(f"domain {name}: passtd's configuration is refused: {e}") from None
        # restart, not start: an instance left over from a start whose release never ran
        # (libvirtd killed) goes, with its old guest's connection
        res = systemctl("restart", socket)
        if res.returncode != 0:
            raise HookError(f"domain {name}: cannot start {socket}: {_failed(res)} "
                            f"(journalctl -u {socket})")
        try:
            check_qemu_access(socket_path(name), user)
        except HookError as e:
            systemctl("stop", service, socket)
            raise HookError(f"domain {name}: {e}") from None
        # the instance itself now, not at qemu's connection: what it cannot do (a forward's
        # port taken on this host) then fails this start, or an incoming migration while
        # the domain still runs on its source, instead of leaving the guest unconnected
        res = systemctl("start", service)
        if res.returncode != 0:
            reason = _status_text(service, systemctl).removeprefix("failed: ") or _failed(res)
            systemctl("stop", service, socket)
            raise HookError(f"domain {name}: its passtd instance cannot start: {reason} "
                            f"(journalctl -u {service})")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(runtime_file)
        raise
    return True


def started(name: str, *, systemctl: Systemctl = _systemctl,
            cgroup_roots: Sequence[str] = CGROUP_ROOTS) -> bool:
    """"started begin" (qemu runs): if the scope `prepare` named for qemu does not exist,
    libvirt runs qemu without one on this host (no machined scopes: libvirt 11 in a
    container, or `cgroup_controllers = [ ]`); the instance would refuse its qemu for
    ever. Drop `qemu_cgroup` from the runtime file and reload the instance, which then
    adopts the connection it holds. True if it did so."""
    runtime_file = hook_runtime_file(name)
    try:
        with open(runtime_file, encoding="utf-8") as f:
            runtime = yaml.safe_load(f)
    except FileNotFoundError:
        return False  # not a passtd domain
    scope = runtime.get("qemu_cgroup") if isinstance(runtime, dict) else None
    if not scope or any(os.path.isdir(root + scope) for root in cgroup_roots):
        return False
    del runtime["qemu_cgroup"]
    _write_runtime_file(runtime_file, runtime)
    res = systemctl("reload", service_unit(name))
    print(f"passtd: domain {name}: qemu runs in no scope {scope} (libvirt uses no machined "
          f"scopes here); its instance adopts qemu by the socket's permissions alone"
          + ("" if res.returncode == 0 else f"; reloading it failed: {_failed(res)}"),
          file=sys.stderr)
    return True


def release(name: str, domain_xml: str | bytes, *, systemctl: Systemctl = _systemctl) -> bool:
    """"release end": stop the instance and remove its runtime file; False if the domain
    does not use passtd. HookError if stopping failed (libvirt only logs it)."""
    try:
        root = _parse_domain(domain_xml)
        check_name(name)
    except (MetadataError, InvalidName):
        return False  # prepare refused it: nothing was started
    if _find_metadata(root)[1] is None:
        return False
    res = systemctl("stop", service_unit(name), socket_unit(name))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(hook_runtime_file(name))
    if res.returncode != 0:
        raise HookError(f"domain {name}: cannot stop its passtd instance: {_failed(res)}")
    return True


def hook_main(argv: Sequence[str], domain_xml: bytes) -> int:
    """The qemu hook's work (libvirt-hook/passtd): argv is libvirt's (NAME OP SUBOP
    EXTRA), the domain XML came on stdin. Returns the exit status; messages on stderr."""
    if len(argv) < 3:
        print("passtd hook: expected NAME OPERATION SUB-OPERATION (run by libvirtd)",
              file=sys.stderr)
        return 2
    name, operation, sub = argv[0], argv[1], argv[2]
    try:
        if (operation, sub) == ("prepare", "begin"):
            prepare(name, domain_xml, user=qemu_user(), machined=machined_available())
        elif (operation, sub) == ("started", "begin"):
            started(name)
        elif (operation, sub) == ("release", "end"):
            release(name, domain_xml)
    except HookError as e:
        print(f"passtd: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug of ours: still one line for libvirt's error message
        print(f"passtd hook failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


# -- libvirt (passtctl): only here is libvirt-python imported ----------------------------------


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise DomainError(DomainError.NOT_FOUND, (
            "libvirt-python is not installed (pip install 'passtd[libvirt]'; setup.sh "
            "does)")) from None
    # its default handler prints every error on stderr, besides raising it
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def _lookup(libvirt: Any, uri: str, name: str) -> tuple[Any, Any]:
    """(connection, domain); DomainError if there is no libvirt or no such domain."""
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise DomainError(DomainError.NOT_FOUND,
                          f"cannot connect to libvirt at {uri}: {e}") from None
    try:
        return conn, conn.lookupByName(name)
    except libvirt.libvirtError as e:
        conn.close()
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise DomainError(DomainError.NOT_FOUND,
                              f"no libvirt domain {name!r} at {uri}") from None
        raise DomainError(DomainError.NOT_FOUND, f"{uri}: {e}") from None


def _editable(dom: Any, name: str, what: str) -> None:
    if not dom.isPersistent():
        raise DomainError(DomainError.REFUSED, (
            f"domain {name} is transient (no persistent definition to {what})"))
    if dom.isActive():
        raise DomainError(DomainError.REFUSED, (
            f"domain {name} is running: {what} edits its definition, which takes effect "
            f"at its next start; shut it down first (virsh shutdown {name})"))


def _edit(name: str, uri: str, what: str, edit: Callable[[str], Edit]) -> Edit:
    libvirt = _libvirt()
    conn, dom = _lookup(libvirt, uri, name)
    try:
        _editable(dom, name, what)
        # SECURE: the definition goes back whole, passwords (VNC, SPICE) included
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        result = edit(dom.XMLDesc(flags))
        if result.changed:
            try:
                conn.defineXML(result.xml)
            except libvirt.libvirtError as e:
                raise DomainError(DomainError.REFUSED,
                                  f"libvirt refused the edited definition of {name}: {e}") \
                    from None
        return result
    finally:
        conn.close()


def attach(name: str, change: SettingsChange = SettingsChange(), *,
           uri: str = DEFAULT_URI) -> Edit:
    """`passtctl libvirt attach`: the domain's definition wired to passtd."""
    return _edit(name, uri, "attach", lambda xml: attach_xml(xml, change))


def detach(name: str, *, uri: str = DEFAULT_URI) -> Edit:
    """`passtctl libvirt detach`: passtd's metadata, netdev and NIC out of the definition."""
    return _edit(name, uri, "detach", detach_xml)


class ForwardRecorder:
    """A forward added (or removed) at runtime, recorded in the domain's definitions, so
    that the domain says which forwards it has wherever it runs:

      - the live definition, whenever the domain runs: `virsh migrate` carries it to the
        destination, whose hook starts passtd with its metadata, so the forward moves with
        the domain; it goes when the domain stops, as a runtime forward does;
      - with `persist`, the persistent definition as well (from the next start on).

    Checked before the instance is asked (`__init__`: the domain, its metadata, the
    result's validity), written after it did it (`write`), so that nothing is recorded
    that the instance refused."""

    def __init__(self, name: str, forward: Forward, *, remove: bool = False,
                 persist: bool = False, uri: str = DEFAULT_URI) -> None:
        self.libvirt = _libvirt()
        self.name = name
        self.conn, self.dom = _lookup(self.libvirt, uri, name)
        self.edits: list[tuple[str, int, NetworkSettings]] = []  # (which, AFFECT_*, settings)
        try:
            targets = []
            if self.dom.isActive():
                targets.append(("live", 0, self.libvirt.VIR_DOMAIN_AFFECT_LIVE))
            if persist:
                if not self.dom.isPersistent():
                    raise DomainError(DomainError.REFUSED, (
                        f"domain {name} is transient: there is no definition to persist into"))
                targets.append(("persistent", self.libvirt.VIR_DOMAIN_XML_INACTIVE,
                                self.libvirt.VIR_DOMAIN_AFFECT_CONFIG))
            for which, xml_flags, affect in targets:
                current = settings_from_domain(self.dom.XMLDesc(xml_flags))
                if current is None:
                    raise DomainError(DomainError.REFUSED, (
                        f"domain {name} is not a passtd domain (no passtd metadata in its "
                        f"{which} definition): see passtctl libvirt attach"))
                try:
                    settings = (current.without_forward(forward) if remove
                                else current.with_forward(forward))
                    check_settings(name, settings)
                except MetadataError as e:
                    raise DomainError(DomainError.REFUSED, f"domain {name}: cannot record the "
                                      f"forward in its {which} definition: {e}") from None
                if settings != current:
                    self.edits.append((which, affect, settings))
        except BaseException:
            self.close()
            raise

    @property
    def changed(self) -> tuple[str, ...]:
        """The definitions `write` changes ("live", "persistent"): the others have it (or,
        for a removal, have it not) already."""
        return tuple(which for which, _, _ in self.edits)

    def write(self) -> None:
        for which, affect, settings in self.edits:
            try:
                self.dom.setMetadata(self.libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                     metadata_xml(settings), PREFIX, NAMESPACE, affect)
            except self.libvirt.libvirtError as e:
                raise DomainError(DomainError.REFUSED, f"domain {self.name}: cannot write the "
                                  f"metadata of its {which} definition: {e}") from None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
