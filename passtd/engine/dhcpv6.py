"""DHCPv6 server for one client: the guest's exact global address as a /128, plus DNS.

Design, after passt's dhcpv6.c: stateless in the server sense too. SOLICIT gets an
ADVERTISE (never a Rapid Commit REPLY), REQUEST and RENEW (for our server id) and REBIND
(without one) a REPLY: every IA_NA the client sent is answered, under its own IAID, with
`cfg.ip6.address` and infinite lifetimes and T1/T2 (the lease never needs renewing), or
with the NotOnLink status if it names another address, so that a guest moved to another
host drops a stale lease. CONFIRM (without a server id) gets a REPLY whose status says
whether the addresses still fit. INFORMATION-REQUEST gets the DNS servers (23) and search
list (24) only. Replies go from our link-local address to the client's source address and
MAC.

Where we part from passt on purpose (RFC 8415 reasons given in the code): the server DUID
is a DUID-LL, REBIND must not carry a server id, the reply to CONFIRM carries the
top-level status the client looks for, and an INFORMATION-REQUEST needs no client id.

Deliberately not done: IA_TA and IA_PD (temporary addresses and prefix delegation; their
IAs are left unanswered), RELEASE and DECLINE (there is nothing to free: dropped), relay
messages, Reconfigure, authentication, and the option request option (6): all we have is
sent to everyone.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final, NamedTuple

from . import packet
from .addrs import Ip6Config, NetConfig
from .dhcp import domain_name_wire, search_list_wire

SERVER_PORT: Final = 547
CLIENT_PORT: Final = 546

SOLICIT: Final = 1
ADVERTISE: Final = 2
REQUEST: Final = 3
CONFIRM: Final = 4
RENEW: Final = 5
REBIND: Final = 6
REPLY: Final = 7
INFORMATION_REQUEST: Final = 11

OPT_CLIENTID: Final = 1
OPT_SERVERID: Final = 2
OPT_IA_NA: Final = 3
OPT_IA_TA: Final = 4
OPT_IAADDR: Final = 5
OPT_STATUS_CODE: Final = 13
OPT_DNS_SERVERS: Final = 23
OPT_DOMAIN_LIST: Final = 24
OPT_IA_PD: Final = 25
OPT_CLIENT_FQDN: Final = 39

STATUS_SUCCESS: Final = 0
STATUS_NOADDRSAVAIL: Final = 2
STATUS_NOTONLINK: Final = 4
STATUS_MESSAGES: Final = {
    STATUS_SUCCESS: b"Addresses are appropriate for the link.",
    STATUS_NOADDRSAVAIL: b"No addresses available.",
    STATUS_NOTONLINK: b"Prefix not appropriate for link.",
}

FQDN_S: Final = 0x01  # client: "server, update the AAAA record"
FQDN_O: Final = 0x02  # server: "we override your S bit" (we update nothing)

DUID_LL: Final = 3
HWTYPE_ETHERNET: Final = 1
MAX_DUID_LEN: Final = 2 + 128  # type code + at most 128 octets (RFC 8415 11.1)
INFINITE: Final = 0xFFFFFFFF

OPTION_HEADER: Final = struct.Struct("!HH")
IA_NA_HEADER: Final = struct.Struct("!III")  # IAID, T1, T2
IAADDR: Final = struct.Struct("!16sII")  # address, preferred and valid lifetimes


class _IaNa(NamedTuple):
    iaid: int
    addresses: tuple[bytes, ...]


def server_duid(mac: bytes) -> bytes:
    """Our DUID: a DUID-LL from our MAC.

    passt uses a DUID-LLT, whose time changes at every restart; the guest then sees a new
    server, and its RENEWs for the old one are dropped until it falls back to REBIND.
    A DUID-LL stays the same for as long as the MAC does.
    """
    return struct.pack("!HH", DUID_LL, HWTYPE_ETHERNET) + mac


def reply(
    cfg: NetConfig,
    pkt: packet.Packet,
    sport: int,
    dport: int,
    payload: memoryview,
    duid: bytes,
) -> bytes | None:
    """The ADVERTISE or REPLY frame answering one guest DHCPv6 message, or None."""
    ip6 = cfg.ip6
    if dport != SERVER_PORT or ip6 is None:
        return None
    if not packet.is_ipv6_multicast(pkt.dst) or pkt.src == packet.IP6_ANY:
        return None  # clients send to All_DHCP_Relay_Agents_and_Servers, from link-local
    if len(payload) < 4:
        raise packet.Malformed("truncated DHCPv6 header")
    msg_type = payload[0]
    options = list(_options(payload[4:]))
    client_id = _first(options, OPT_CLIENTID)
    server_id = _first(options, OPT_SERVERID)
    if client_id is not None and not 2 < len(client_id) <= MAX_DUID_LEN:
        raise packet.Malformed(f"DHCPv6 client id of {len(client_id)} bytes")

    decision = _decide(ip6, msg_type, options, client_id, server_id, duid)
    if decision is None:
        return None
    reply_type, answer = decision
    # INFORMATION-REQUEST: DNS information only
    fqdn_flags = None if msg_type == INFORMATION_REQUEST else _fqdn_flags(options)
    return _frame(cfg, ip6, pkt, bytes((reply_type,)) + payload[1:4], client_id, duid, answer,
                  fqdn_flags)


def _decide(
    ip6: Ip6Config,
    msg_type: int,
    options: list[tuple[int, memoryview]],
    client_id: bytes | None,
    server_id: bytes | None,
    duid: bytes,
) -> tuple[int, bytes] | None:
    """(reply type, the options that answer the message), or None to stay silent."""
    if msg_type == INFORMATION_REQUEST:
        # RFC 8415 16.12: the client id is optional here, a server id must be ours, and
        # asking for addresses makes no sense
        if server_id not in (None, duid) or any(
            code in (OPT_IA_NA, OPT_IA_TA, OPT_IA_PD) for code, _ in options
        ):
            return None
        return REPLY, b""

    if client_id is None:
        return None  # RFC 8415 16: every other client message carries one
    ia_nas = [_parse_ia_na(value) for code, value in options if code == OPT_IA_NA]
    if msg_type == SOLICIT:
        if server_id is not None or not ia_nas:
            return None
        # a hint for another address is ignored (RFC 8415 18.3.1): we have only one
        return ADVERTISE, b"".join(_lease(ip6, ia.iaid) for ia in ia_nas)
    if msg_type in (REQUEST, RENEW):
        if server_id != duid:
            return None
    elif msg_type == REBIND:
        if server_id is not None:
            return None  # RFC 8415 16.7 (passt wants ours here, which no client sends)
    elif msg_type == CONFIRM:
        if server_id is not None:
            return None
        addresses = [addr for ia in ia_nas for addr in ia.addresses]
        if not addresses:
            return None  # RFC 8415 18.3.3: nothing to confirm, no reply
        # RFC 8415 18.2.10: the client reads the top-level status of this reply (passt
        # sends IAs without one, which the client takes as Success)
        fits = all(addr == ip6.address for addr in addresses)
        return REPLY, _status(STATUS_SUCCESS if fits else STATUS_NOTONLINK)
    else:
        return None  # RELEASE, DECLINE, server and relay messages
    return REPLY, b"".join(
        _option(OPT_IA_NA, IA_NA_HEADER.pack(ia.iaid, 0, 0) + _status(STATUS_NOTONLINK))
        if any(addr != ip6.address for addr in ia.addresses)
        else _lease(ip6, ia.iaid)
        for ia in ia_nas
    )


def _options(data: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(code, value) of each option in a DHCPv6 option area."""
    i = 0
    while i < len(data):
        if i + OPTION_HEADER.size > len(data):
            raise packet.Malformed("truncated DHCPv6 option header")
        code, length = OPTION_HEADER.unpack_from(data, i)
        start = i + OPTION_HEADER.size
        if start + length > len(data):
            raise packet.Malformed(f"DHCPv6 option {code} overruns its container")
        yield code, data[start : start + length]
        i = start + length


def _first(options: list[tuple[int, memoryview]], code: int) -> bytes | None:
    return next((bytes(value) for c, value in options if c == code), None)


def _parse_ia_na(value: memoryview) -> _IaNa:
    if len(value) < IA_NA_HEADER.size:
        raise packet.Malformed(f"IA_NA of {len(value)} bytes")
    addresses = []
    for code, sub in _options(value[IA_NA_HEADER.size :]):
        if code == OPT_IAADDR:
            if len(sub) < IAADDR.size:
                raise packet.Malformed(f"IA address option of {len(sub)} bytes")
            addresses.append(bytes(sub[:16]))
    return _IaNa(IA_NA_HEADER.unpack_from(value, 0)[0], tuple(addresses))


def _option(code: int, value: bytes) -> bytes:
    return OPTION_HEADER.pack(code, len(value)) + value


def _status(code: int) -> bytes:
    return _option(OPT_STATUS_CODE, struct.pack("!H", code) + STATUS_MESSAGES[code])


def _lease(ip6: Ip6Config, iaid: int) -> bytes:
    """The IA_NA giving our one address to the client's IA, or saying there is none."""
    if ip6.address is None:
        return _option(OPT_IA_NA, IA_NA_HEADER.pack(iaid, 0, 0) + _status(STATUS_NOADDRSAVAIL))
    address = _option(OPT_IAADDR, IAADDR.pack(ip6.address, INFINITE, INFINITE))
    return _option(OPT_IA_NA, IA_NA_HEADER.pack(iaid, INFINITE, INFINITE) + address)


def _frame(
    cfg: NetConfig,
    ip6: Ip6Config,
    pkt: packet.Packet,
    header: bytes,
    client_id: bytes | None,
    duid: bytes,
    answer: bytes,
    fqdn_flags: int | None,
) -> bytes:
    """The whole reply: header, identifiers, the answer proper, then DNS information (and
    the client FQDN unless `fqdn_flags` is None)."""
    message = bytearray(header)
    if client_id is not None:
        message += _option(OPT_CLIENTID, client_id)
    message += _option(OPT_SERVERID, duid) + answer
    if ip6.dns:
        message += _option(OPT_DNS_SERVERS, b"".join(ip6.dns))
    search = search_list_wire(cfg.search, compress=False)  # RFC 8415 10: no compression
    if search:
        message += _option(OPT_DOMAIN_LIST, b"".join(search))
    hostname = domain_name_wire(cfg.hostname) if cfg.hostname else None
    if hostname is not None and fqdn_flags is not None:
        message += _option(OPT_CLIENT_FQDN, bytes((fqdn_flags,)) + hostname)
    src = ip6.gateway
    return packet.ip_frame(
        pkt.src_mac, cfg.mac, src, pkt.src, packet.IPPROTO_UDP,
        packet.udp_message(src, pkt.src, SERVER_PORT, CLIENT_PORT, bytes(message)),
    )


def _fqdn_flags(options: list[tuple[int, memoryview]]) -> int:
    """RFC 4704 4.2: we update no DNS record, so a client asking us to (S) is overridden."""
    client_fqdn = _first(options, OPT_CLIENT_FQDN)
    return FQDN_O if client_fqdn and client_fqdn[0] & FQDN_S else 0
