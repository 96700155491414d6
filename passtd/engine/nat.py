"""Address translation between the guest's view and the host's sockets, as passt's fwd.c.

Design: pure functions of the settings and the addresses, no sockets and no state, so a
table of cases tests them all (tests/unit/test_nat.py):

- `is_martian`: a guest packet that cannot be what it claims (loopback, multicast or
  broadcast source, loopback destination, IPv4-mapped IPv6) never enters.
- `tap_side_addresses`: the addresses that are ours on the tap side (gateway, mapped host
  addresses): a guest may not use them as its source, or its flows would collide with the
  host peers that appear at those addresses.
- `nat_from_tap` (passt's fwd_nat_from_tap): where a flow the guest opens towards an
  address goes on the host: the mapped host loopback and host addresses, DNS redirection
  (DNS_PORTS), link-local peers scoped to the template interface, or nowhere.
- `nat_from_host` (fwd_nat_from_host): how the guest sees a host peer of a forwarded
  connection: loopback and the host's own address appear as the gateway (or the mapped
  addresses), everyone else as themselves.
- `guest_target`: which guest address a forwarded connection goes to.

Not done here: port translation (fwd.py's ForwardRule), and pasta's splice paths.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Final

from . import packet
from .addrs import GuestSeen, Ip4Config, Ip6Config, NetConfig
from .flow import addr_text
from .fwd import ForwardRule
from .settings import EngineSettings

DNS_PORTS: Final = (53, 853)  # DNS and DNS over TLS: what a DNS redirection applies to, as in passt

SockAddr = tuple[str, int] | tuple[str, int, int, int]


def is_martian(family: int, src: bytes, dst: bytes) -> bool:
    """Whether a guest packet pretends to come from somewhere it cannot, or goes to the
    host's loopback directly (map_host_loopback is the only way there)."""
    if family == 4:
        return packet.is_ipv4_loopback(src) or packet.is_ipv4_loopback(dst) \
            or packet.is_ipv4_multicast_or_broadcast(src)
    return packet.is_ipv6_loopback(src) or packet.is_ipv6_loopback(dst) \
        or packet.is_ipv6_multicast(src) or packet.is_ipv6_v4_mapped(src) \
        or packet.is_ipv6_v4_mapped(dst)


def tap_side_addresses(net: NetConfig) -> frozenset[bytes]:
    """Sources a guest may not use: the unspecified addresses and ours on the tap side."""
    out = {packet.IP4_ANY, packet.IP6_ANY}
    for conf in (net.ip4, net.ip6):
        if conf is not None:
            out |= {a for a in (conf.gateway, conf.map_host_loopback, conf.map_guest_addr) if a}
    return frozenset(out)


def nat_from_tap(settings: EngineSettings, family: int, dst: bytes, dport: int,
                 scope_of: Callable[[str], int | None]) -> SockAddr | None:
    """The host socket address for a flow the guest opens towards `dst`, or None.

    The address the guest was given (the host's own, by default) is a destination like any
    other in both families, as in passt: a guest that uses it never sends there, and one
    that does not (IPv6 by SLAAC alone, a static IPv4 address) reaches the host at it, as a
    machine on the host's LAN would. `scope_of` names the interface index for a link-local
    peer (None: no such interface).
    """
    net = settings.net
    redirect = settings.dns_redirect.get(dst) if dport in DNS_PORTS else None
    if family == 4:
        net4 = net.ip4
        assert net4 is not None
        if redirect is not None:
            return (redirect, dport)
        if net4.map_host_loopback is not None and dst == net4.map_host_loopback:
            return ("127.0.0.1", dport)
        if net4.map_guest_addr is not None and dst == net4.map_guest_addr:
            return (addr_text(settings.host_addr4 or net4.address), dport)
        if dst[0] == 0 or packet.is_ipv4_multicast_or_broadcast(dst):
            return None  # 0.0.0.0/8 would be this host
        return (addr_text(dst), dport)
    net6 = net.ip6
    assert net6 is not None
    if redirect is not None:
        # the resolver may be the gateway's link-local address: scoped below
        dst = socket.inet_pton(socket.AF_INET6, redirect)
    elif net6.map_host_loopback is not None and dst == net6.map_host_loopback:
        return ("::1", dport, 0, 0)
    elif net6.map_guest_addr is not None and dst == net6.map_guest_addr:
        target = settings.host_addr6 or net6.address
        return (addr_text(target), dport, 0, 0) if target else None
    elif dst == packet.IP6_ANY or packet.is_ipv6_multicast(dst):
        return None
    if packet.is_ipv6_link_local(dst):
        scope = scope_of(net.host_ifname) if net.host_ifname else None
        return (addr_text(dst), dport, 0, scope) if scope is not None else None
    return (addr_text(dst), dport, 0, 0)


def interface_index(ifname: str) -> int | None:
    """`scope_of` for nat_from_tap: the kernel's index of an interface, if it exists."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


def nat_from_host(settings: EngineSettings, family: int, addr: bytes) -> bytes:
    """How the guest sees a host peer: loopback and the host's own address appear as the
    gateway (the guest would otherwise see its own address talking to it)."""
    net: Ip4Config | Ip6Config | None
    if family == 4:
        net, host_addr = settings.net.ip4, settings.host_addr4
        loopback = packet.is_ipv4_loopback(addr) or addr == packet.IP4_ANY
    else:
        net, host_addr = settings.net.ip6, settings.host_addr6
        loopback = packet.is_ipv6_loopback(addr) or addr == packet.IP6_ANY
    assert net is not None
    if loopback:
        return net.map_host_loopback or net.gateway
    if addr in (net.address, host_addr):
        return net.map_guest_addr or net.gateway
    return addr


def guest_target(net: NetConfig, seen: GuestSeen, family: int, peer: bytes,
                 rule: ForwardRule) -> bytes | None:
    """The guest address a host-initiated flow goes to: the rule's target address if it
    has one, else the address the guest was seen using (or was given)."""
    if rule.to_address is not None:
        to_family, to_addr = sockaddr_bytes(rule.to_address)
        return to_addr if to_family == family else None
    if family == 4:
        return seen.addr4 or net.ip4.address if net.ip4 is not None else None
    if net.ip6 is None:
        return None
    if packet.is_ipv6_link_local(peer):
        return seen.addr6_ll
    return seen.addr6 or net.ip6.address or seen.addr6_ll


def sockaddr_bytes(addr: str) -> tuple[int, bytes]:
    """(family, packed address) of a socket address string; IPv4-mapped IPv6 counts as 4."""
    if ":" in addr:
        packed = socket.inet_pton(socket.AF_INET6, addr.split("%")[0])
        if packed[:12] == b"\0" * 10 + b"\xff\xff":
            return 4, packed[12:]
        return 6, packed
    return 4, socket.inet_pton(socket.AF_INET, addr)


def gateway(net: NetConfig, family: int) -> bytes:
    """Our address on the tap side: the source of the ICMP errors we send the guest."""
    conf = net.ip4 if family == 4 else net.ip6
    assert conf is not None
    return conf.gateway
