"""DHCPv4 server for one client: the guest always gets the same single address.

Design, after passt's dhcp.c: there is no lease database and no state. Whatever the guest
asks, it is offered `cfg.ip4.address` with an infinite lease; the reply is built from
`NetConfig` alone. DISCOVER gets an OFFER (an ACK straight away when the client asked for
Rapid Commit, RFC 4039), REQUEST and plain BOOTP requests (no message type) get an ACK.
Options: the client's parameter request list (55) sets the order (RFC 2132 9.8), after the
message type (53) unless the list places it: some small stacks (wattcp32, mTCP) expect it
first. The options not asked for follow by number. Everything must fit in the size the
client accepts (option 57, never less than RFC 2131's 576-byte messages); what does not fit
is left out, the mandatory message type, server id and lease time (RFC 2131 table 3) being
kept first, then the requested options, then the rest; a long search list is shortened
rather than dropped. Options longer than 255 bytes are split into several instances
(RFC 3396), and repeated options from the client are concatenated.

This module also holds the DNS name wire encoding that the NDP (DNSSL) and DHCPv6 (search
list, client FQDN) responders share.

Deliberately not done: NAK (a REQUEST for another address is simply ACKed with ours, the
client takes yiaddr), DECLINE/RELEASE/INFORM handling, relay agents (giaddr is copied but
never used: the guest is on our link), option overload (52) in sname/file, and the client
FQDN option 81 (NetConfig carries a host name, sent as option 12).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Final

from . import packet
from .addrs import Ip4Config, NetConfig

SERVER_PORT: Final = 67
CLIENT_PORT: Final = 68

BOOTREQUEST: Final = 1
BOOTREPLY: Final = 2
HTYPE_ETHER: Final = 1
FLAG_BROADCAST: Final = 0x8000
MAGIC_COOKIE: Final[bytes] = b"\x63\x82\x53\x63"

# op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname, file
BOOTP: Final = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
OPTIONS_OFFSET: Final = BOOTP.size + len(MAGIC_COOKIE)
BOOTP_MIN_LEN: Final = 300  # RFC 951's fixed 64-byte vendor area; RFC 1542 relays drop shorter
# RFC 2131 2: every client accepts this much (IP and UDP headers included)
MIN_MAX_MESSAGE: Final = 576
IP_UDP_HLEN: Final = packet.IPV4_HLEN + packet.UDP_HLEN

OPT_PAD: Final = 0
OPT_NETMASK: Final = 1
OPT_ROUTER: Final = 3
OPT_DNS: Final = 6
OPT_HOSTNAME: Final = 12
OPT_MTU: Final = 26
OPT_LEASE_TIME: Final = 51
OPT_MESSAGE_TYPE: Final = 53
OPT_SERVER_ID: Final = 54
OPT_PARAMETER_LIST: Final = 55
OPT_MAX_MESSAGE: Final = 57
OPT_RAPID_COMMIT: Final = 80
OPT_SEARCH: Final = 119
OPT_CLASSLESS_ROUTES: Final = 121
OPT_END: Final = 255

DHCPDISCOVER: Final = 1
DHCPOFFER: Final = 2
DHCPREQUEST: Final = 3
DHCPACK: Final = 5

MAX_DNS_SERVERS: Final = 3  # resolv.conf's MAXNS, as passt
INFINITE_LEASE: Final = b"\xff\xff\xff\xff"
MANDATORY_OPTIONS: Final = (OPT_MESSAGE_TYPE, OPT_SERVER_ID, OPT_LEASE_TIME)
MAX_COMPRESSION_OFFSET: Final = 0x3FFF  # a 14-bit pointer (RFC 1035 4.1.4)


# -- DNS names in wire form (RFC 1035 3.1), shared with ndp.py and dhcpv6.py ---------------


def domain_labels(name: str) -> list[bytes] | None:
    """The labels of a domain name, or None if it is empty, the root or breaks RFC 1035 limits."""
    encoded = name.removesuffix(".").encode()
    if not encoded:
        return None
    labels = encoded.split(b".")
    # wire length: a length byte per label, the labels, the root byte: len(encoded) + 2
    if len(encoded) + 2 > 255 or any(not 0 < len(label) <= 63 for label in labels):
        return None
    return labels


def domain_name_wire(name: str) -> bytes | None:
    """A fully qualified name in uncompressed wire form, or None if it cannot be one."""
    labels = domain_labels(name)
    if labels is None:
        return None
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


def search_list_wire(names: Iterable[str], compress: bool) -> list[bytes]:
    """Wire form of each usable domain of a search list, in order (unusable ones skipped).

    With `compress`, a suffix already written becomes a pointer to its offset from the start
    of the concatenated list (RFC 1035 4.1.4 as RFC 3397 applies it), so any leading run of
    entries, concatenated, is itself a valid encoding: callers may cut the list short.
    """
    entries: list[bytes] = []
    offsets: dict[tuple[bytes, ...], int] = {}
    position = 0
    for name in names:
        labels = domain_labels(name)
        if labels is None:
            continue
        wire = bytearray()
        for i in range(len(labels)):
            suffix = tuple(labels[i:])
            if compress and suffix in offsets:
                wire += struct.pack("!H", 0xC000 | offsets[suffix])
                break
            if compress and position + len(wire) <= MAX_COMPRESSION_OFFSET:
                offsets[suffix] = position + len(wire)
            wire += bytes((len(labels[i]),)) + labels[i]
        else:
            wire.append(0)
        entries.append(bytes(wire))
        position += len(wire)
    return entries


# -- the responder -------------------------------------------------------------------------


def reply(
    cfg: NetConfig, pkt: packet.Packet, sport: int, dport: int, payload: memoryview
) -> bytes | None:
    """The OFFER or ACK frame answering one guest BOOTP/DHCP message, or None."""
    if dport != SERVER_PORT or cfg.ip4 is None:
        return None
    if len(payload) < OPTIONS_OFFSET:
        raise packet.Malformed(f"BOOTP message of {len(payload)} bytes")
    (op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yiaddr, _siaddr, giaddr, chaddr,
     _sname, _file) = BOOTP.unpack_from(payload, 0)
    if op != BOOTREQUEST or htype != HTYPE_ETHER or hlen != 6:
        raise packet.Malformed(f"BOOTP op {op}, hardware type {htype}, length {hlen}")
    if payload[BOOTP.size : OPTIONS_OFFSET] != MAGIC_COOKIE:
        raise packet.Malformed("BOOTP message without the DHCP magic cookie")
    options = _parse_options(payload[OPTIONS_OFFSET:])

    message_type = options.get(OPT_MESSAGE_TYPE)
    if message_type is not None and len(message_type) != 1:
        raise packet.Malformed(f"DHCP message type option of {len(message_type)} bytes")
    rapid_commit = False
    if message_type is None or message_type[0] == DHCPREQUEST:
        reply_type = DHCPACK
    elif message_type[0] == DHCPDISCOVER:
        rapid_commit = OPT_RAPID_COMMIT in options
        reply_type = DHCPACK if rapid_commit else DHCPOFFER
    else:
        return None  # DECLINE, RELEASE, INFORM, ...: no NAK, nothing

    max_message = MIN_MAX_MESSAGE
    client_max = options.get(OPT_MAX_MESSAGE, b"")
    if len(client_max) == 2:
        max_message = max(max_message, int.from_bytes(client_max, "big"))
    room = max_message - IP_UDP_HLEN - OPTIONS_OFFSET - 1  # the end option always goes in
    body = _select_options(
        _lease_options(cfg, cfg.ip4, reply_type, rapid_commit),
        options.get(OPT_PARAMETER_LIST, b""),
        room,
    ) + bytes((OPT_END,))

    message = (
        BOOTP.pack(
            BOOTREPLY, HTYPE_ETHER, 6, 0, xid, 0, flags,
            # RFC 2131 table 3: ciaddr is 0 in an OFFER, the client's in an ACK
            packet.IP4_ANY if reply_type == DHCPOFFER else ciaddr,
            cfg.ip4.address, packet.IP4_ANY, giaddr, chaddr, b"", b"",
        )
        + MAGIC_COOKIE
        + body
    )
    if len(message) < BOOTP_MIN_LEN:
        message += bytes(BOOTP_MIN_LEN - len(message))  # pad options (0)

    # RFC 2131 4.1: unicast to a configured client (ciaddr), broadcast when a client without
    # an address asks for it (its stack may drop unicast to an address it does not have
    # yet), otherwise unicast to yiaddr at chaddr. passt ignores ciaddr; for the usual
    # client (ciaddr == yiaddr or 0) the result is the same.
    client_mac = bytes(chaddr[:6])
    if ciaddr != packet.IP4_ANY:
        dst, dst_mac = ciaddr, client_mac
    elif flags & FLAG_BROADCAST:
        dst, dst_mac = packet.IP4_BROADCAST, packet.ETH_BROADCAST
    else:
        dst, dst_mac = cfg.ip4.address, client_mac
    gateway = cfg.ip4.gateway
    return packet.ip_frame(
        dst_mac, cfg.mac, gateway, dst, packet.IPPROTO_UDP,
        packet.udp_message(gateway, dst, SERVER_PORT, CLIENT_PORT, message),
    )


def _parse_options(data: memoryview) -> dict[int, bytes]:
    """Client options by code; repeated ones are concatenated (RFC 3396)."""
    options: dict[int, bytearray] = {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == OPT_END:
            break
        if code == OPT_PAD:
            i += 1
            continue
        if i + 2 > len(data):
            raise packet.Malformed(f"DHCP option {code} without a length")
        end = i + 2 + data[i + 1]
        if end > len(data):
            raise packet.Malformed(f"DHCP option {code} overruns the message")
        options.setdefault(code, bytearray()).extend(data[i + 2 : end])
        i = end
    return {code: bytes(value) for code, value in options.items()}


def _lease_options(
    cfg: NetConfig, ip4: Ip4Config, reply_type: int, rapid_commit: bool
) -> dict[int, list[bytes]]:
    """What we would send, by option code: alternative values, preferred first."""
    options = {
        OPT_MESSAGE_TYPE: [bytes((reply_type,))],
        OPT_NETMASK: [ip4.netmask],
        OPT_ROUTER: [ip4.gateway],
        OPT_LEASE_TIME: [INFINITE_LEASE],
        OPT_SERVER_ID: [ip4.gateway],
    }
    if rapid_commit:
        options[OPT_RAPID_COMMIT] = [b""]
    if ip4.dns:
        options[OPT_DNS] = [b"".join(ip4.dns[:MAX_DNS_SERVERS])]
    if cfg.hostname:
        options[OPT_HOSTNAME] = [cfg.hostname.encode()]
    if cfg.mtu:
        options[OPT_MTU] = [struct.pack("!H", min(cfg.mtu, 0xFFFF))]
    search = search_list_wire(cfg.search, compress=True)
    if search:
        # shorter lists as fallbacks: the leading domains matter most to a resolver
        options[OPT_SEARCH] = [b"".join(search[:n]) for n in range(len(search), 0, -1)]
    if not ip4.on_link(ip4.gateway):
        # RFC 3442: a client given option 121 ignores option 3, so the default route goes
        # in too, after an on-link /32 (router 0.0.0.0) that makes the gateway reachable
        options[OPT_CLASSLESS_ROUTES] = [
            bytes((32,)) + ip4.gateway + packet.IP4_ANY + bytes((0,)) + ip4.gateway
        ]
    return options


def _encode_option(code: int, value: bytes) -> bytes:
    """One option; past 255 bytes, several instances of it (RFC 3396)."""
    if not value:
        return bytes((code, 0))
    return b"".join(
        bytes((code, len(chunk))) + chunk
        for chunk in (value[i : i + 255] for i in range(0, len(value), 255))
    )


def _select_options(
    candidates: dict[int, list[bytes]], requested: Sequence[int], room: int
) -> bytes:
    """The options that fit in `room` bytes, chosen by priority, in the client's order."""
    chosen: dict[int, bytes] = {}
    for code in dict.fromkeys([*MANDATORY_OPTIONS, *requested, *sorted(candidates)]):
        for value in candidates.get(code, ()):
            encoded = _encode_option(code, value)
            if len(encoded) <= room:
                chosen[code] = encoded
                room -= len(encoded)
                break
    # the message type first, as some small stacks expect, unless the client placed it
    first = () if OPT_MESSAGE_TYPE in requested else (OPT_MESSAGE_TYPE,)
    order = dict.fromkeys([*first, *requested, *sorted(candidates)])
    return b"".join(chosen[code] for code in order if code in chosen)
