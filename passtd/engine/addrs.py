"""Address configuration: what the guest is given, and what it is seen to use.

Design, as passt does it by default: the guest gets the host's own address, prefix and
default gateway, taken from the interface that carries the host's default route (read
from the kernel over rtnetlink by netlink.py, into `HostAddresses`). The gateway address
is also ours on the tap side: the guest reaches host loopback through it
(`map_host_loopback`). Every value can be overridden by the configuration.

The guest is told the host's nameservers (resolv.conf, read once at start), except that
one on host loopback can only be reached through the gateway mapped to loopback: it is
told as the gateway, and DNS to the gateway is redirected to it (`guest_dns`, after
passt's --dns-forward defaults); without the mapping it is not told at all.

`NetConfig` is immutable and built once per instance (rebuilt on reload). `GuestSeen`
holds what the engine learns from guest frames (its MAC and the source addresses it
actually uses): inbound connections and replies go to those.

Not done here: following host address changes at run time (passt does not either), and
passt's local mode (169.254.2.1/16) for hosts without any default route: without a
route the family is disabled and the log says so.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Sequence
from typing import Final, NamedTuple

OUR_MAC: Final = bytes.fromhex("9a559a559a55")  # passt's default since 2024: not the host's MAC
DEFAULT_MTU: Final = 65520  # 802.3 maximum (65535) minus the Ethernet header, 32-bit aligned
IP6_GATEWAY_LL_DEFAULT: Final = ipaddress.IPv6Address("fe80::1")

MAXNS: Final = 3  # nameservers a resolver uses (resolv.h), and so the most we tell the guest
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
log = logging.getLogger("passtd.engine")


class AddressError(Exception):
    """The host offers nothing usable for a family that was asked for explicitly."""


class Ip4Config(NamedTuple):
    address: bytes  # the guest's address (default: the host's)
    prefix_len: int
    gateway: bytes  # our address on the tap side, and the guest's router
    dns: tuple[bytes, ...] = ()
    map_host_loopback: bytes | None = None  # guest traffic to it reaches 127.0.0.1
    map_guest_addr: bytes | None = None  # guest traffic to it reaches the host's address

    @property
    def netmask(self) -> bytes:
        return ((0xFFFFFFFF << (32 - self.prefix_len)) & 0xFFFFFFFF).to_bytes(4, "big")

    def on_link(self, addr: bytes) -> bool:
        shift = 32 - self.prefix_len
        a = int.from_bytes(addr, "big") >> shift if shift < 32 else 0
        b = int.from_bytes(self.address, "big") >> shift if shift < 32 else 0
        return a == b


class Ip6Config(NamedTuple):
    address: bytes | None  # the guest's global address (default: the host's); None: SLAAC only
    prefix_len: int
    gateway: bytes  # our link-local address on the tap side (the host gateway's, or fe80::1)
    dns: tuple[bytes, ...] = ()
    map_host_loopback: bytes | None = None  # guest traffic to it reaches ::1
    map_guest_addr: bytes | None = None

    @property
    def prefix(self) -> bytes:
        """The /64 (or configured prefix) advertised for SLAAC."""
        if self.address is None:
            return bytes(16)
        n = int.from_bytes(self.address, "big")
        mask = ((1 << 128) - 1) ^ ((1 << (128 - self.prefix_len)) - 1)
        return (n & mask).to_bytes(16, "big")

    def on_link(self, addr: bytes) -> bool:
        """Whether `addr` is in the guest's prefix (never without a global address)."""
        if self.address is None:
            return False
        shift = 128 - self.prefix_len
        return int.from_bytes(addr, "big") >> shift == int.from_bytes(self.address, "big") >> shift


class NetConfig(NamedTuple):
    """What the guest is told about its network: DHCP, NDP/RA and DHCPv6 read this."""

    mac: bytes = OUR_MAC
    mtu: int = DEFAULT_MTU  # 0: don't advertise an MTU
    ip4: Ip4Config | None = None
    ip6: Ip6Config | None = None
    search: tuple[str, ...] = ()
    hostname: str | None = None
    host_ifname: str | None = None  # template interface (scope for link-local peers)


class GuestSeen:
    """What the guest's own frames tell us; updated by the engine, read by flows."""

    __slots__ = ("addr4", "addr6", "addr6_ll", "mac")

    def __init__(self) -> None:
        self.mac: bytes | None = None
        self.addr4: bytes | None = None
        self.addr6: bytes | None = None  # global
        self.addr6_ll: bytes | None = None  # link-local


class HostAddresses(NamedTuple):
    """The host's addressing as read from the kernel (the template interface)."""

    ifname: str | None = None
    addr4: ipaddress.IPv4Interface | None = None
    gateway4: ipaddress.IPv4Address | None = None
    addr6: ipaddress.IPv6Interface | None = None
    gateway6: ipaddress.IPv6Address | None = None


_MAC_TEXT: Final = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")


def parse_mac(text: str) -> bytes | None:
    """The MAC written `text` ("52:54:00:12:34:56", either case), or None."""
    return bytes.fromhex(text.replace(":", "")) if _MAC_TEXT.fullmatch(text) else None


def is_unicast_mac(mac: bytes) -> bool:
    """Whether a guest or we may use `mac`: unicast, and not all zeros."""
    return not mac[0] & 1 and mac != bytes(6)


class GuestDns(NamedTuple):
    """The nameservers of one family told to the guest, and where its queries go."""

    servers: tuple[bytes, ...]  # told to the guest (DHCP, RA, DHCPv6), at most MAXNS
    redirect: dict[bytes, str]  # guest DNS to this address (port 53) goes to that resolver
    unreachable: tuple[IPAddress, ...]  # nameservers the guest could not reach: not told


def guest_dns(nameservers: Sequence[IPAddress], version: int, gateway: IPAddress,
              map_host_loopback: bool) -> GuestDns:
    """Which of the host's (or the configured) nameservers the guest is told, as passt
    does it (its --dns-forward address being the gateway):

    - a resolver on host loopback (127.0.0.53, ::1) is reachable only through the
      gateway mapped to loopback: the guest is told the gateway, and its DNS to the
      gateway goes to that resolver. With the gateway not mapped (`--no-map-gw`) the
      guest has no way to it: it is not told (passt: "address unreachable");
    - a resolver on the gateway's own address is shadowed by that same mapping (the
      guest's DNS to the gateway would reach host loopback): its DNS goes to the real
      gateway. Without the mapping nothing is shadowed;
    - any other resolver is told as it is.

    The first resolver that needs the gateway is the one its queries go to.
    """
    servers: list[bytes] = []
    redirect: dict[bytes, str] = {}
    unreachable: list[IPAddress] = []
    for server in nameservers:
        if server.version != version:
            continue
        if server.is_loopback and not map_host_loopback:
            unreachable.append(server)
            continue
        if map_host_loopback and (server.is_loopback or server == gateway):
            redirect.setdefault(gateway.packed, str(server))
            server = gateway
        if server.packed not in servers:
            servers.append(server.packed)
    return GuestDns(tuple(servers[:MAXNS]), redirect, tuple(unreachable))


def read_resolv_conf(path: str = "/etc/resolv.conf") -> tuple[list[IPAddress], list[str]]:
    """(nameservers, search domains) from a resolv.conf; at most 3 nameservers (MAXNS).

    A `nameserver` line that holds no usable address is skipped with a warning, as the C
    library's resolver skips it: one bad line must not keep the guest from starting.
    A scope (`%eth0`) is dropped: the guest reaches such a server on its own link.
    """
    servers: list[IPAddress] = []
    search: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                words = line.split()
                if not words or words[0].startswith(("#", ";")):
                    continue
                if words[0] == "nameserver" and len(servers) < MAXNS:
                    server = _nameserver(words[1] if len(words) > 1 else "")
                    if server is None:
                        log.warning("%s line %d: %r is not a nameserver address: skipped",
                                    path, number, line.strip())
                    else:
                        servers.append(server)
                elif words[0] in ("search", "domain"):
                    search = words[1:]
    except OSError:
        pass
    return servers, search


def _nameserver(text: str) -> IPAddress | None:
    try:
        addr = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    return None if addr.is_unspecified or addr.is_multicast else addr
