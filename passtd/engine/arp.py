"""ARP responder: every IPv4 neighbour of the guest is us.

Design: the guest's link has exactly two stations, the guest and passtd, so any IPv4-over-
Ethernet request from the guest gets a reply with our MAC, whatever address it asks for:
traffic to the gateway, to on-link peers and to anything else all reaches the engine, which
maps it to host sockets. Two kinds of request stay unanswered, as in passt's arp.c:
gratuitous announcements (sender IP == target IP, non-zero), which ask nothing, and requests
for the guest's own address, so that its duplicate-address detection (an RFC 5227 probe from
0.0.0.0) finds no "conflict". A 0.0.0.0 probe for any other address is answered.

Deliberately not done: upstream passt's mirror of the host's neighbour table (we always
answer with our own MAC, its fallback), the ARP request and announcements passt sends on
its own initiative (those belong to the event loop), any ARP cache, and non-Ethernet or
non-IPv4 hardware/protocol types.
"""

from __future__ import annotations

import struct
from typing import Final

from . import packet
from .addrs import NetConfig

ARPHRD_ETHER: Final = 1
ARPOP_REQUEST: Final = 1
ARPOP_REPLY: Final = 2

# hardware type, protocol type, hardware/protocol address lengths, opcode
ARP_HEADER: Final = struct.Struct("!HHBBH")
# sender MAC, sender IPv4, target MAC, target IPv4 (Ethernet/IPv4 only)
ARP_BODY: Final = struct.Struct("!6s4s6s4s")


def reply(cfg: NetConfig, frame: memoryview) -> bytes | None:
    """The ARP reply frame for one guest ARP frame, or None when it needs no answer."""
    if cfg.ip4 is None:
        return None
    _dst_mac, src_mac, ethertype = packet.parse_eth(frame)
    if ethertype != packet.ETH_P_ARP:
        return None
    if len(frame) < packet.ETH_HLEN + ARP_HEADER.size:
        raise packet.Malformed("truncated ARP header")
    hrd, pro, hln, pln, op = ARP_HEADER.unpack_from(frame, packet.ETH_HLEN)
    if hrd != ARPHRD_ETHER or pro != packet.ETH_P_IP or hln != 6 or pln != 4:
        return None
    if len(frame) < packet.ETH_HLEN + ARP_HEADER.size + ARP_BODY.size:
        raise packet.Malformed("truncated ARP message")
    if op != ARPOP_REQUEST:
        return None
    sha, spa, _tha, tpa = ARP_BODY.unpack_from(frame, packet.ETH_HLEN + ARP_HEADER.size)
    if spa == tpa and spa != packet.IP4_ANY:
        return None  # a gratuitous announcement: nothing is asked
    if tpa == cfg.ip4.address:
        return None  # the guest's own address: let its duplicate-address detection pass
    message = (
        packet.eth_header(src_mac, cfg.mac, packet.ETH_P_ARP)
        + ARP_HEADER.pack(ARPHRD_ETHER, packet.ETH_P_IP, 6, 4, ARPOP_REPLY)
        + ARP_BODY.pack(cfg.mac, tpa, sha, spa)
    )
    return message + bytes(packet.ETH_MIN_FRAME - len(message))
