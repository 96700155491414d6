"""NDP responder: Neighbour Advertisements for every solicited address, and our Router
Advertisements.

Design, after passt's ndp.c: as with ARP, every IPv6 neighbour of the guest is us, so any
Neighbour Solicitation is answered with our MAC, from our link-local address, with the
Router, Solicited and Override flags. A solicitation from :: is another node's duplicate-
address detection and stays unanswered, so the guest's own DAD succeeds. Router
Solicitations get a Router Advertisement: the guest's /64 for SLAAC (on-link, autonomous,
infinite lifetimes), the M flag so that DHCPv6 hands out the exact address as a /128,
the MTU, RDNSS and DNSSL (RFC 8106), and our link-layer address. Unsolicited RAs are the
event loop's business: it asks `next_unsolicited_ra_delay` when to send the next one and
builds it with `router_advertisement`.

Prefixes the guest brought from another host (a live migration: guest.py finds them) are
advertised as deprecated: autonomous, preferred lifetime 0, valid lifetime two hours, the
least RFC 4862 5.5.3 (e) lets an unauthenticated RA set. The guest keeps the old address
for the connections that use it and takes ours for new ones; two hours later the old one
is gone.

Messages are validated as RFC 4861 7.1 and 6.1 ask (hop limit 255, code 0, sane options);
invalid ones are dropped.

Deliberately not done: upstream passt's mirror of the host's neighbour table (we always
answer with our own MAC), unsolicited NAs, Neighbour Unreachability Detection of the guest,
Redirects, and route information options.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from typing import Final

from . import packet
from .addrs import Ip6Config, NetConfig
from .dhcp import search_list_wire

ICMP6_RS: Final = 133
ICMP6_RA: Final = 134
ICMP6_NS: Final = 135
ICMP6_NA: Final = 136

NDP_HOP_LIMIT: Final = 255  # RFC 4861: anything less may have come through a router
NA_ROUTER: Final = 0x80000000
NA_SOLICITED: Final = 0x40000000
NA_OVERRIDE: Final = 0x20000000
RA_MANAGED: Final = 0x80
PREFIX_ON_LINK: Final = 0x80
PREFIX_AUTONOMOUS: Final = 0x40
SLAAC_PREFIX_LEN: Final = 64  # RFC 4862 with RFC 2464 interface identifiers
ROUTER_LIFETIME: Final = 65535  # the maximum (RFC 8319)
RA_CUR_HOP_LIMIT: Final = 255  # what passt advertises
INFINITE: Final = 0xFFFFFFFF
DEPRECATED_VALID_LIFETIME: Final = 7200  # seconds: RFC 4862 5.5.3 (e), two hours
MAX_RTR_ADV_INTERVAL: Final = 600  # seconds, RFC 4861 6.2.1 default
IPV6_MIN_MTU: Final = 1280  # RAs are kept within it, whatever the search list

OPT_SOURCE_LL: Final = 1
OPT_TARGET_LL: Final = 2
OPT_PREFIX_INFO: Final = 3
OPT_MTU: Final = 5
OPT_RDNSS: Final = 25
OPT_DNSSL: Final = 31

NS_HEADER: Final = struct.Struct("!BBHI16s")  # type, code, checksum, reserved, target
RS_HLEN: Final = 8  # type, code, checksum, reserved
NS_HLEN: Final = NS_HEADER.size
# cur hop limit, flags, router lifetime, reachable, retrans
RA_BODY: Final = struct.Struct("!BBHII")
PREFIX_INFO: Final = struct.Struct("!BBBBIII16s")
MTU_OPTION: Final = struct.Struct("!BBHI")
# RDNSS and DNSSL: type, length, reserved, lifetime
DNS_OPTION_HEADER: Final = struct.Struct("!BBHI")


def reply(cfg: NetConfig, pkt: packet.Packet,
          deprecated: Sequence[bytes] = ()) -> bytes | None:
    """The NA or RA frame answering one guest NS or RS, or None for anything else."""
    ip6 = cfg.ip6
    if ip6 is None or pkt.proto != packet.IPPROTO_ICMPV6:
        return None
    if len(pkt.l4) < 4:
        raise packet.Malformed("truncated ICMPv6 header")
    msg_type, code = pkt.l4[0], pkt.l4[1]
    if msg_type not in (ICMP6_NS, ICMP6_RS):
        return None
    if pkt.ttl != NDP_HOP_LIMIT or code != 0:
        return None  # RFC 4861 7.1.1, 6.1.1: not from this link, or not NDP as we know it
    if msg_type == ICMP6_NS:
        return _answer_neighbour_solicitation(cfg.mac, ip6, pkt)
    return _answer_router_solicitation(cfg, pkt, deprecated)


def dad_target(pkt: packet.Packet) -> bytes | None:
    """The address a guest is about to use, from its duplicate-address-detection probe.

    A DAD Neighbour Solicitation (from ::) names the address the guest just configured:
    with SLAAC that is the first sign of its global address, long before it sends from
    it. passt learns addresses only from traffic; knowing it earlier lets a forwarded
    connection reach a guest that has not spoken over IPv6 yet.
    """
    if pkt.src != packet.IP6_ANY or pkt.ttl != NDP_HOP_LIMIT or len(pkt.l4) < NS_HLEN:
        return None
    if pkt.l4[0] != ICMP6_NS or pkt.l4[1] != 0:
        return None
    target = bytes(NS_HEADER.unpack_from(pkt.l4, 0)[4])
    if packet.is_ipv6_multicast(target) or target == packet.IP6_ANY:
        return None
    return target


def _answer_neighbour_solicitation(mac: bytes, ip6: Ip6Config, pkt: packet.Packet) -> bytes | None:
    if len(pkt.l4) < NS_HLEN:
        raise packet.Malformed("truncated Neighbour Solicitation")
    target = bytes(NS_HEADER.unpack_from(pkt.l4, 0)[4])
    _option_types(pkt.l4[NS_HLEN:])
    if packet.is_ipv6_multicast(target) or pkt.src == packet.IP6_ANY:
        return None  # an invalid target, or a DAD probe: the address must stay free
    body = (
        struct.pack("!I", NA_ROUTER | NA_SOLICITED | NA_OVERRIDE)
        + target
        + bytes((OPT_TARGET_LL, 1))
        + mac
    )
    src = ip6.gateway
    return packet.ip_frame(
        pkt.src_mac, mac, src, pkt.src, packet.IPPROTO_ICMPV6,
        packet.icmp6_message(src, pkt.src, ICMP6_NA, 0, body),
    )


def _answer_router_solicitation(cfg: NetConfig, pkt: packet.Packet,
                                deprecated: Sequence[bytes]) -> bytes | None:
    if len(pkt.l4) < RS_HLEN:
        raise packet.Malformed("truncated Router Solicitation")
    option_types = _option_types(pkt.l4[RS_HLEN:])
    if pkt.src == packet.IP6_ANY:
        if OPT_SOURCE_LL in option_types:
            return None  # RFC 4861 6.1.1
        # no address to answer to: all nodes (6.2.6)
        return router_advertisement(cfg, deprecated=deprecated)
    return router_advertisement(cfg, pkt.src_mac, pkt.src, deprecated)


def _option_types(options: memoryview) -> set[int]:
    """Types of the NDP options in a message; every option must have a length (4.6)."""
    types = set()
    i = 0
    while i < len(options):
        if i + 2 > len(options) or options[i + 1] == 0:
            raise packet.Malformed("NDP option without a length")
        end = i + options[i + 1] * 8
        if end > len(options):
            raise packet.Malformed("NDP option overruns the message")
        types.add(options[i])
        i = end
    return types


def router_advertisement(
    cfg: NetConfig, dst_mac: bytes | None = None, dst: bytes = packet.IP6_ALL_NODES,
    deprecated: Sequence[bytes] = (),
) -> bytes:
    """A complete RA frame for the guest, multicast to all nodes unless told otherwise;
    `deprecated`: /64 prefixes (16 bytes each) the guest should stop choosing."""
    ip6 = cfg.ip6
    if ip6 is None:
        raise ValueError("router advertisement without an IPv6 configuration")
    body = bytearray(RA_BODY.pack(RA_CUR_HOP_LIMIT, RA_MANAGED, ROUTER_LIFETIME, 0, 0))
    body += bytes((OPT_SOURCE_LL, 1)) + cfg.mac
    if cfg.mtu:
        body += MTU_OPTION.pack(OPT_MTU, 1, 0, cfg.mtu)
    if ip6.address is not None:
        # always a /64, whatever the host's prefix length: SLAAC needs one on Ethernet
        prefix = (int.from_bytes(ip6.address, "big") >> 64 << 64).to_bytes(16, "big")
        body += PREFIX_INFO.pack(
            OPT_PREFIX_INFO, 4, SLAAC_PREFIX_LEN, PREFIX_ON_LINK | PREFIX_AUTONOMOUS,
            INFINITE, INFINITE, 0, prefix,
        )
    for old in deprecated:
        body += PREFIX_INFO.pack(OPT_PREFIX_INFO, 4, SLAAC_PREFIX_LEN, PREFIX_AUTONOMOUS,
                                 DEPRECATED_VALID_LIFETIME, 0, 0, old)
    if ip6.dns:
        body += DNS_OPTION_HEADER.pack(OPT_RDNSS, 1 + 2 * len(ip6.dns), 0, INFINITE)
        body += b"".join(ip6.dns)
    body += _dnssl_option(cfg.search, IPV6_MIN_MTU - packet.IPV6_HLEN - 4 - len(body))
    if dst_mac is None:
        dst_mac = b"\x33\x33" + dst[12:]  # RFC 2464 7: multicast MAC from the low 32 bits
    return packet.ip_frame(
        dst_mac, cfg.mac, ip6.gateway, dst, packet.IPPROTO_ICMPV6,
        packet.icmp6_message(ip6.gateway, dst, ICMP6_RA, 0, bytes(body)),
    )


def _dnssl_option(search: tuple[str, ...], room: int) -> bytes:
    """DNSSL with as many leading domains as fit in `room` bytes; empty if none do."""
    names = b""
    for wire in search_list_wire(search, compress=False):
        if _padded(DNS_OPTION_HEADER.size + len(names) + len(wire)) > min(room, 255 * 8):
            break
        names += wire
    if not names:
        return b""
    length = _padded(DNS_OPTION_HEADER.size + len(names))
    header = DNS_OPTION_HEADER.pack(OPT_DNSSL, length // 8, 0, INFINITE)
    return (header + names).ljust(length, b"\x00")


def _padded(length: int) -> int:
    return (length + 7) // 8 * 8


def next_unsolicited_ra_delay(rng: random.Random) -> float:
    """Seconds until the next unsolicited RA: uniform between MinRtrAdvInterval (MAX/3) and
    MaxRtrAdvInterval, their RFC 4861 6.2.1 defaults, as 6.2.4 asks."""
    return rng.uniform(MAX_RTR_ADV_INTERVAL / 3, MAX_RTR_ADV_INTERVAL)
