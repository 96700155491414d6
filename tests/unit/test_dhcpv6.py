"""DHCPv6 responder: scapy-built client messages in, scapy-checked ADVERTISE/REPLY out."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.dhcp6 import (
    DUID_LL,
    DHCP6_Confirm,
    DHCP6_InfoRequest,
    DHCP6_Rebind,
    DHCP6_Release,
    DHCP6_Renew,
    DHCP6_Request,
    DHCP6_Solicit,
    DHCP6OptClientFQDN,
    DHCP6OptClientId,
    DHCP6OptDNSDomains,
    DHCP6OptDNSServers,
    DHCP6OptElapsedTime,
    DHCP6OptIA_NA,
    DHCP6OptIA_PD,
    DHCP6OptIAAddress,
    DHCP6OptOptReq,
    DHCP6OptRapidCommit,
    DHCP6OptServerId,
    DHCP6OptStatusCode,
)
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from passtd.engine import dhcpv6, packet
from passtd.engine.addrs import OUR_MAC

GUEST_MAC = "52:54:00:12:34:56"
GUEST_LL = "fe80::5054:ff:fe12:3456"
OUR_LL = "fe80::1"
ALL_SERVERS = "ff02::1:2"
TRID = 0x2A5B3C
IAID = 0xDEADBEEF
INFINITE = 0xFFFFFFFF
DUID = dhcpv6.server_duid(OUR_MAC)
CLIENT_ID = DHCP6OptClientId(duid=DUID_LL(lladdr=GUEST_MAC))
OUR_SERVER_ID = DHCP6OptServerId(duid=DUID_LL(lladdr=OUR_MAC.hex(":")))
OTHER_SERVER_ID = DHCP6OptServerId(duid=DUID_LL(lladdr="02:00:00:00:00:01"))


def frame_with(payload, dst: str = ALL_SERVERS, dport: int = 547) -> bytes:
    return bytes(
        Ether(src=GUEST_MAC, dst="33:33:00:01:00:02")
        / IPv6(src=GUEST_LL, dst=dst)
        / UDP(sport=546, dport=dport)
        / payload
    )


def ia_na(*addresses: str, iaid: int = IAID) -> DHCP6OptIA_NA:
    return DHCP6OptIA_NA(
        iaid=iaid, ianaopts=[DHCP6OptIAAddress(addr=a, preflft=0, validlft=0) for a in addresses]
    )


def client_message(kind, *options, client_id=CLIENT_ID) -> bytes:
    msg = kind(trid=TRID) / DHCP6OptElapsedTime()
    if client_id is not None:
        msg /= client_id
    for option in options:
        if option is not None:
            msg /= option
    return frame_with(msg)


def answer(cfg, frame: bytes) -> bytes | None:
    pkt = packet.parse_ip(memoryview(frame))
    sport, dport, payload = packet.parse_udp(pkt)
    return dhcpv6.reply(cfg, pkt, sport, dport, payload, DUID)


def top_options(reply: Ether) -> dict[type, list[Packet]]:
    """The message's own options (not those nested in IAs), by scapy class."""
    found: dict[type, list[Packet]] = {}
    layer = reply[UDP].payload.payload
    while layer:
        option = layer.copy()
        option.remove_payload()
        found.setdefault(type(layer), []).append(option)
        layer = layer.payload
    return found


def check_header(reply: Ether, msg_type: int) -> None:
    assert reply.dst == GUEST_MAC
    assert reply.src == OUR_MAC.hex(":")
    assert (reply[IPv6].src, reply[IPv6].dst, reply[IPv6].hlim) == (OUR_LL, GUEST_LL, 255)
    assert (reply[UDP].sport, reply[UDP].dport) == (547, 546)
    assert reply[UDP].payload.msgtype == msg_type
    assert reply[UDP].payload.trid == TRID


def check_lease(reply: Ether, iaid: int = IAID) -> None:
    (ia,) = top_options(reply)[DHCP6OptIA_NA]
    assert (ia.iaid, ia.T1, ia.T2) == (iaid, INFINITE, INFINITE)
    (address,) = ia.ianaopts
    assert isinstance(address, DHCP6OptIAAddress)
    assert (address.addr, address.preflft, address.validlft) == ("2001:db8::2", INFINITE, INFINITE)


def check_identifiers_and_dns(reply: Ether) -> None:
    options = top_options(reply)
    assert bytes(options[DHCP6OptClientId][0]) == bytes(CLIENT_ID)
    assert bytes(options[DHCP6OptServerId][0]) == bytes(OUR_SERVER_ID)
    assert options[DHCP6OptDNSServers][0].dnsservers == ["2001:db8::53", "2001:db8::54"]
    assert options[DHCP6OptDNSDomains][0].dnsdomains == ["example.com.", "eng.example.com."]


def test_server_duid_is_a_stable_duid_ll():
    assert DUID == b"\x00\x03\x00\x01" + OUR_MAC
    assert dhcpv6.server_duid(OUR_MAC) == DUID


def test_solicit_gets_an_advertise_with_the_address(cfg, parse_reply):
    solicit = client_message(DHCP6_Solicit, ia_na(), DHCP6OptOptReq(reqopts=[23, 24]),
                             DHCP6OptRapidCommit())
    reply = parse_reply(answer(cfg, solicit))
    check_header(reply, 2)  # ADVERTISE: we never do Rapid Commit
    check_lease(reply)
    check_identifiers_and_dns(reply)
    options = top_options(reply)
    assert DHCP6OptRapidCommit not in options
    assert DHCP6OptStatusCode not in options
    fqdn = options[DHCP6OptClientFQDN][0]
    assert (fqdn.fqdn, fqdn.flags) == (b"guest.", 0)


def test_solicit_hints_for_another_address_are_ignored(cfg, parse_reply):
    reply = parse_reply(answer(cfg, client_message(DHCP6_Solicit, ia_na("2001:db8::99"))))
    check_lease(reply)


def test_each_ia_na_keeps_its_iaid(cfg, parse_reply):
    frame = client_message(DHCP6_Request, OUR_SERVER_ID, ia_na(iaid=1), ia_na(iaid=2))
    ias = top_options(parse_reply(answer(cfg, frame)))[DHCP6OptIA_NA]
    assert [ia.iaid for ia in ias] == [1, 2]


@pytest.mark.parametrize(
    "kind, server_id",
    [(DHCP6_Request, OUR_SERVER_ID), (DHCP6_Renew, OUR_SERVER_ID), (DHCP6_Rebind, None)],
)
def test_request_renew_rebind_get_a_reply_with_the_address(cfg, parse_reply, kind, server_id):
    options = [ia_na("2001:db8::2")] + ([server_id] if server_id else [])
    reply = parse_reply(answer(cfg, client_message(kind, *options)))
    check_header(reply, 7)
    check_lease(reply)
    check_identifiers_and_dns(reply)


@pytest.mark.parametrize(
    "kind, server_id",
    [
        (DHCP6_Request, None),
        (DHCP6_Request, OTHER_SERVER_ID),
        (DHCP6_Renew, None),
        (DHCP6_Renew, OTHER_SERVER_ID),
        (DHCP6_Rebind, OUR_SERVER_ID),
        (DHCP6_Solicit, OUR_SERVER_ID),
        (DHCP6_Confirm, OUR_SERVER_ID),
        (DHCP6_InfoRequest, OTHER_SERVER_ID),
    ],
)
def test_wrong_or_misplaced_server_id_is_ignored(cfg, kind, server_id):
    options = [ia_na("2001:db8::2")] if kind is not DHCP6_InfoRequest else []
    assert answer(cfg, client_message(kind, server_id, *options)) is None


def test_a_foreign_address_gets_not_on_link_in_its_ia(cfg, parse_reply):
    frame = client_message(DHCP6_Request, OUR_SERVER_ID, ia_na("2001:db8::99"))
    reply = parse_reply(answer(cfg, frame))
    check_header(reply, 7)
    (ia,) = top_options(reply)[DHCP6OptIA_NA]
    assert ia.iaid == IAID
    (status,) = ia.ianaopts
    assert isinstance(status, DHCP6OptStatusCode)
    assert status.statuscode == 4  # NotOnLink
    assert DHCP6OptStatusCode not in top_options(reply)


@pytest.mark.parametrize(
    "addresses, status", [(["2001:db8::2"], 0), (["2001:db8::2", "2001:db8:1::2"], 4)]
)
def test_confirm_gets_a_top_level_status(cfg, parse_reply, addresses, status):
    reply = parse_reply(answer(cfg, client_message(DHCP6_Confirm, ia_na(*addresses))))
    check_header(reply, 7)
    options = top_options(reply)
    assert options[DHCP6OptStatusCode][0].statuscode == status
    assert DHCP6OptIA_NA not in options


def test_confirm_without_addresses_gets_nothing(cfg):
    assert answer(cfg, client_message(DHCP6_Confirm, ia_na())) is None


def test_information_request_gets_dns_and_search_only(cfg, parse_reply):
    reply = parse_reply(answer(cfg, client_message(DHCP6_InfoRequest)))
    check_header(reply, 7)
    check_identifiers_and_dns(reply)
    assert set(top_options(reply)) == {
        DHCP6OptClientId, DHCP6OptServerId, DHCP6OptDNSServers, DHCP6OptDNSDomains,
    }


def test_information_request_without_client_id(cfg, parse_reply):
    reply = parse_reply(answer(cfg, client_message(DHCP6_InfoRequest, client_id=None)))
    assert DHCP6OptClientId not in top_options(reply)
    assert top_options(reply)[DHCP6OptDNSServers][0].dnsservers == ["2001:db8::53", "2001:db8::54"]


@pytest.mark.parametrize("ia", [ia_na(), DHCP6OptIA_PD(iaid=1)])
def test_information_request_asking_for_addresses_is_ignored(cfg, ia):
    assert answer(cfg, client_message(DHCP6_InfoRequest, ia)) is None


def test_no_address_means_no_addrs_avail_in_the_ia(cfg, make_cfg, parse_reply):
    no_address = make_cfg(ip6=cfg.ip6._replace(address=None))
    reply = parse_reply(answer(no_address, client_message(DHCP6_Solicit, ia_na())))
    (ia,) = top_options(reply)[DHCP6OptIA_NA]
    (status,) = ia.ianaopts
    assert isinstance(status, DHCP6OptStatusCode)
    assert status.statuscode == 2  # NoAddrsAvail


def test_no_dns_search_or_hostname_when_not_configured(cfg, make_cfg, parse_reply):
    bare = make_cfg(search=(), hostname=None, ip6=cfg.ip6._replace(dns=()))
    reply = parse_reply(answer(bare, client_message(DHCP6_Solicit, ia_na())))
    assert set(top_options(reply)) == {DHCP6OptClientId, DHCP6OptServerId, DHCP6OptIA_NA}


def test_client_fqdn_update_request_is_overridden(cfg, parse_reply):
    frame = client_message(DHCP6_Solicit, ia_na(), DHCP6OptClientFQDN(flags="S", fqdn=b"vm."))
    fqdn = top_options(parse_reply(answer(cfg, frame)))[DHCP6OptClientFQDN][0]
    assert (fqdn.fqdn, fqdn.flags) == (b"guest.", 0x02)  # O: we update nothing


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(client_message(DHCP6_Solicit, ia_na(), client_id=None), id="no client id"),
        pytest.param(client_message(DHCP6_Solicit), id="solicit without IA_NA"),
        pytest.param(client_message(DHCP6_Release, OUR_SERVER_ID, ia_na("2001:db8::2")),
                     id="release"),
        pytest.param(frame_with(DHCP6_Solicit() / CLIENT_ID / ia_na(), dst=OUR_LL), id="unicast"),
        pytest.param(frame_with(DHCP6_Solicit() / CLIENT_ID / ia_na(), dport=546), id="port 546"),
    ],
)
def test_unanswered(cfg, frame):
    assert answer(cfg, frame) is None


def test_nothing_without_ipv6(make_cfg):
    assert answer(make_cfg(ip6=None), client_message(DHCP6_Solicit, ia_na())) is None


SOLICIT_HEADER = b"\x01" + TRID.to_bytes(3, "big")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x01\x00\x00", id="truncated header"),
        pytest.param(SOLICIT_HEADER + b"\x00\x01\x00", id="truncated option header"),
        pytest.param(SOLICIT_HEADER + bytes(CLIENT_ID)[:-1], id="option overrun"),
        pytest.param(SOLICIT_HEADER + bytes(CLIENT_ID) + b"\x00\x03\x00\x04" + bytes(4),
                     id="short IA_NA"),
        pytest.param(SOLICIT_HEADER + bytes(CLIENT_ID) + b"\x00\x03\x00\x10" + bytes(12)
                     + b"\x00\x05\x00\x00", id="short IA address"),
        pytest.param(SOLICIT_HEADER + bytes(CLIENT_ID) + b"\x00\x03\x00\x10" + bytes(12)
                     + b"\x00\x05\x00\x18", id="IA address overrun"),
        pytest.param(SOLICIT_HEADER + b"\x00\x01\x00\x84" + bytes(132), id="client id too long"),
        pytest.param(SOLICIT_HEADER + b"\x00\x01\x00\x02\x00\x03", id="client id too short"),
    ],
)
def test_malformed(cfg, payload):
    with pytest.raises(packet.Malformed):
        answer(cfg, frame_with(Raw(payload)))


@given(payload=st.binary(max_size=200))
def test_random_payloads_never_raise_anything_but_malformed(cfg, payload):
    with contextlib.suppress(packet.Malformed):
        answer(cfg, frame_with(Raw(payload)))


@given(msg_type=st.sampled_from([1, 3, 4, 5, 6, 11]), options=st.binary(max_size=120))
def test_random_options_never_raise_anything_but_malformed(cfg, msg_type, options):
    header = bytes((msg_type,)) + TRID.to_bytes(3, "big")
    for area in (options, bytes(CLIENT_ID) + bytes(OUR_SERVER_ID) + options):
        with contextlib.suppress(packet.Malformed):
            answer(cfg, frame_with(Raw(header + area)))


VALID = [
    client_message(DHCP6_Solicit, ia_na("2001:db8::2"), DHCP6OptClientFQDN(flags="S", fqdn=b"vm.")),
    client_message(DHCP6_Request, OUR_SERVER_ID, ia_na("2001:db8::2")),
    client_message(DHCP6_Confirm, ia_na("2001:db8::2")),
    client_message(DHCP6_InfoRequest),
]


@given(data=st.data(), base=st.sampled_from(VALID))
def test_damaged_messages_never_raise_anything_but_malformed(cfg, mutate, data, base):
    message = mutate(data, bytes(Ether(base)[UDP].payload))
    for damaged in (frame_with(Raw(message)), mutate(data, base)):
        with contextlib.suppress(packet.Malformed):
            answer(cfg, damaged)
