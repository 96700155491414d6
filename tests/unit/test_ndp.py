"""NDP responder: scapy-built NS/RS in, scapy-checked NA/RA out."""

from __future__ import annotations

import contextlib
import ipaddress
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6NDOptDNSSL,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptRDNSS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from passtd.engine import ndp, packet
from passtd.engine.addrs import OUR_MAC

GUEST_MAC = "52:54:00:12:34:56"
GUEST_LL = "fe80::5054:ff:fe12:3456"
OUR_LL = "fe80::1"
INFINITE = 0xFFFFFFFF


def frame_with(icmp, src: str = GUEST_LL, dst: str = "ff02::2", hlim: int = 255) -> bytes:
    return bytes(
        Ether(src=GUEST_MAC, dst="33:33:00:00:00:02") / IPv6(src=src, dst=dst, hlim=hlim) / icmp
    )


def solicitation(target: str = OUR_LL, src: str = GUEST_LL, **fields) -> bytes:
    icmp = ICMPv6ND_NS(tgt=target, **fields)
    if src != "::":
        icmp /= ICMPv6NDOptSrcLLAddr(lladdr=GUEST_MAC)
    return frame_with(icmp, src=src, dst="ff02::1:ff00:1")


def router_solicitation(src: str = GUEST_LL, **ip_fields) -> bytes:
    icmp = ICMPv6ND_RS()
    if src != "::":
        icmp /= ICMPv6NDOptSrcLLAddr(lladdr=GUEST_MAC)
    return frame_with(icmp, src=src, **ip_fields)


def answer(cfg, frame: bytes) -> bytes | None:
    return ndp.reply(cfg, packet.parse_ip(memoryview(frame)))


@pytest.mark.parametrize("target", [OUR_LL, "2001:db8::1", "2001:db8::99", "fe80::77"])
def test_solicitation_gets_an_advertisement_with_our_mac(cfg, parse_reply, target):
    reply = parse_reply(answer(cfg, solicitation(target)))
    assert reply.dst == GUEST_MAC
    assert reply.src == OUR_MAC.hex(":")
    assert (reply[IPv6].src, reply[IPv6].dst, reply[IPv6].hlim) == (OUR_LL, GUEST_LL, 255)
    na = reply[ICMPv6ND_NA]
    assert (na.type, na.code) == (136, 0)
    assert (na.R, na.S, na.O) == (1, 1, 1)
    assert na.tgt == target
    assert reply[ICMPv6NDOptDstLLAddr].lladdr == OUR_MAC.hex(":")
    assert reply[ICMPv6NDOptDstLLAddr].len == 1


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(solicitation(GUEST_LL, src="::"), id="DAD probe"),
        pytest.param(solicitation("2001:db8::2", src="::"), id="DAD probe for the global"),
        pytest.param(frame_with(ICMPv6ND_NS(tgt=OUR_LL), hlim=64), id="routed NS"),
        pytest.param(frame_with(ICMPv6ND_NS(tgt=OUR_LL, code=1)), id="NS code 1"),
        pytest.param(frame_with(ICMPv6ND_NS(tgt="ff02::1")), id="multicast target"),
        pytest.param(frame_with(ICMPv6ND_RS(), hlim=64), id="routed RS"),
        pytest.param(frame_with(ICMPv6ND_RS(code=1)), id="RS code 1"),
        pytest.param(
            frame_with(ICMPv6ND_RS() / ICMPv6NDOptSrcLLAddr(lladdr=GUEST_MAC), src="::"),
            id="RS from :: with a link-layer address",
        ),
        pytest.param(frame_with(ICMPv6EchoRequest(id=1, seq=1)), id="echo request"),
        pytest.param(frame_with(ICMPv6ND_NA(tgt=GUEST_LL)), id="NA"),
        pytest.param(frame_with(ICMPv6ND_RA()), id="RA"),
    ],
)
def test_unanswered(cfg, frame):
    assert answer(cfg, frame) is None


def test_nothing_without_ipv6_or_for_other_protocols(cfg, make_cfg):
    assert answer(make_cfg(ip6=None), solicitation()) is None
    udp = bytes(Ether(src=GUEST_MAC) / IPv6(src=GUEST_LL, dst="ff02::2") / UDP() / Raw(b"x"))
    assert answer(cfg, udp) is None


def test_router_solicitation_gets_the_whole_advertisement(cfg, parse_reply):
    reply = parse_reply(answer(cfg, router_solicitation()))
    assert reply.dst == GUEST_MAC
    assert reply.src == OUR_MAC.hex(":")
    assert (reply[IPv6].src, reply[IPv6].dst, reply[IPv6].hlim) == (OUR_LL, GUEST_LL, 255)
    ra = reply[ICMPv6ND_RA]
    assert (ra.type, ra.code) == (134, 0)
    assert ra.chlim == 255
    assert (ra.M, ra.O) == (1, 0)
    assert ra.routerlifetime == 65535
    assert (ra.reachabletime, ra.retranstimer) == (0, 0)
    prefix = reply[ICMPv6NDOptPrefixInfo]
    assert (prefix.prefix, prefix.prefixlen) == ("2001:db8::", 64)
    assert (prefix.L, prefix.A) == (1, 1)
    assert prefix.validlifetime == prefix.preferredlifetime == INFINITE
    assert reply[ICMPv6NDOptMTU].mtu == 65520
    assert reply[ICMPv6NDOptRDNSS].dns == ["2001:db8::53", "2001:db8::54"]
    assert reply[ICMPv6NDOptRDNSS].lifetime == INFINITE
    assert reply[ICMPv6NDOptDNSSL].searchlist == ["example.com.", "eng.example.com."]
    assert reply[ICMPv6NDOptDNSSL].lifetime == INFINITE
    assert reply[ICMPv6NDOptSrcLLAddr].lladdr == OUR_MAC.hex(":")


def test_router_solicitation_from_unspecified_gets_a_multicast_advertisement(cfg, parse_reply):
    reply = parse_reply(answer(cfg, router_solicitation(src="::")))
    assert reply.dst == "33:33:00:00:00:01"
    assert reply[IPv6].dst == "ff02::1"
    assert reply[ICMPv6ND_RA].routerlifetime == 65535
    assert ndp.router_advertisement(cfg) == bytes(reply)


def test_unsolicited_advertisement_to_a_given_destination(cfg, parse_reply):
    mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
    guest = bytes.fromhex("fe800000000000005054" + "00fffe123456")
    reply = parse_reply(ndp.router_advertisement(cfg, mac, guest))
    assert (reply.dst, reply[IPv6].dst) == (GUEST_MAC, GUEST_LL)


def test_optional_options_follow_the_configuration(cfg, make_cfg, parse_reply):
    bare = make_cfg(mtu=0, search=(), ip6=cfg.ip6._replace(address=None, dns=()))
    reply = parse_reply(ndp.router_advertisement(bare))
    for option in (ICMPv6NDOptMTU, ICMPv6NDOptPrefixInfo, ICMPv6NDOptRDNSS, ICMPv6NDOptDNSSL):
        assert option not in reply
    assert reply[ICMPv6NDOptSrcLLAddr].lladdr == OUR_MAC.hex(":")
    assert reply[ICMPv6ND_RA].M == 1


def test_search_list_without_dns_servers(cfg, make_cfg, parse_reply):
    search_only = make_cfg(ip6=cfg.ip6._replace(dns=()))
    reply = parse_reply(ndp.router_advertisement(search_only))
    assert ICMPv6NDOptRDNSS not in reply
    assert reply[ICMPv6NDOptDNSSL].searchlist == ["example.com.", "eng.example.com."]


def test_prefix_is_the_64_of_the_address_whatever_its_length(cfg, make_cfg, parse_reply):
    address = bytes.fromhex("20010db8000000070001" + "00" * 5 + "02")  # 2001:db8:0:7:1::2
    odd = make_cfg(ip6=cfg.ip6._replace(address=address, prefix_len=80))
    prefix = parse_reply(ndp.router_advertisement(odd))[ICMPv6NDOptPrefixInfo]
    assert (prefix.prefix, prefix.prefixlen) == ("2001:db8:0:7::", 64)


def test_prefixes_from_another_host_are_advertised_deprecated(cfg, parse_reply):
    """A guest that migrated here with a SLAAC address of another host's prefix: our RA
    deprecates that prefix (preferred 0, valid two hours: RFC 4862 5.5.3 e) beside ours."""
    old = ipaddress.IPv6Address("2001:db8:a::").packed
    solicited = parse_reply(ndp.reply(cfg, packet.parse_ip(memoryview(router_solicitation())),
                                      deprecated=[old]))
    unsolicited = parse_reply(ndp.router_advertisement(cfg, deprecated=[old]))
    for reply in (solicited, unsolicited):
        ours = reply[ICMPv6NDOptPrefixInfo]
        assert ours.prefix == "2001:db8::" and ours.preferredlifetime == INFINITE
        theirs = ours.payload[ICMPv6NDOptPrefixInfo]
        assert (theirs.prefix, theirs.prefixlen) == ("2001:db8:a::", 64)
        assert (theirs.L, theirs.A) == (0, 1)
        assert (theirs.preferredlifetime, theirs.validlifetime) == (0, 7200)


def test_a_long_search_list_is_cut_to_fit_the_minimum_mtu(make_cfg, parse_reply):
    names = tuple(f"host{i}-{'x' * 40}.zone{i}.example" for i in range(40))
    reply = parse_reply(ndp.router_advertisement(make_cfg(search=names)))
    assert len(reply[IPv6]) <= 1280
    got = reply[ICMPv6NDOptDNSSL].searchlist
    assert 0 < len(got) < len(names)
    assert got == [name + "." for name in names[: len(got)]]


def test_dnssl_is_padded_to_eight_bytes(make_cfg, parse_reply):
    reply = parse_reply(ndp.router_advertisement(make_cfg(search=("a.example",))))
    dnssl = reply[ICMPv6NDOptDNSSL]
    assert dnssl.len == 3  # 8-byte header + 11 bytes of name, padded to 24
    assert dnssl.searchlist == ["a.example."]


@pytest.mark.parametrize(
    "icmp",
    [
        pytest.param(b"\x87\x00", id="truncated ICMPv6 header"),
        pytest.param(bytes(ICMPv6ND_NS(tgt=OUR_LL, cksum=0))[:20], id="truncated NS"),
        pytest.param(bytes(ICMPv6ND_RS(cksum=0))[:6], id="truncated RS"),
        pytest.param(
            bytes(ICMPv6ND_NS(tgt=OUR_LL, cksum=0)) + b"\x01\x00" + bytes(6), id="option length 0"
        ),
        pytest.param(bytes(ICMPv6ND_RS(cksum=0)) + b"\x01\x02" + bytes(6), id="option overrun"),
        pytest.param(bytes(ICMPv6ND_RS(cksum=0)) + b"\x01", id="half an option header"),
    ],
)
def test_malformed(cfg, icmp):
    ip = IPv6(src=GUEST_LL, dst="ff02::2", nh=58, hlim=255)
    frame = bytes(Ether(src=GUEST_MAC) / ip / Raw(icmp))
    with pytest.raises(packet.Malformed):
        answer(cfg, frame)


def test_unsolicited_delay_is_uniform_between_a_third_of_600_and_600():
    rng = random.Random(1)
    delays = [ndp.next_unsolicited_ra_delay(rng) for _ in range(2000)]
    assert all(200 <= d <= 600 for d in delays)
    assert min(delays) < 210 and max(delays) > 590
    assert 380 < sum(delays) / len(delays) < 420
    assert ndp.next_unsolicited_ra_delay(random.Random(7)) == ndp.next_unsolicited_ra_delay(
        random.Random(7)
    )


@given(
    msg_type=st.sampled_from([133, 135]),
    body=st.binary(max_size=64),
    hlim=st.sampled_from([255, 1]),
)
def test_random_solicitations_never_raise_anything_but_malformed(cfg, msg_type, body, hlim):
    frame = bytes(
        Ether(src=GUEST_MAC)
        / IPv6(src=GUEST_LL, dst="ff02::2", nh=58, hlim=hlim)
        / Raw(bytes((msg_type, 0, 0, 0)) + body)
    )
    with contextlib.suppress(packet.Malformed):
        answer(cfg, frame)


@given(data=st.data(), base=st.sampled_from([solicitation(), router_solicitation()]))
def test_damaged_solicitations_never_raise_anything_but_malformed(cfg, mutate, data, base):
    icmp = mutate(data, bytes(Ether(base)[IPv6].payload))
    frame = bytes(Ether(src=GUEST_MAC) / IPv6(src=GUEST_LL, dst="ff02::2", nh=58) / Raw(icmp))
    for damaged in (frame, mutate(data, base)):
        try:
            pkt = packet.parse_ip(memoryview(damaged))
            ndp.reply(cfg, packet.Packet(pkt.src_mac, pkt.dst_mac, pkt.family, pkt.src, pkt.dst,
                                         pkt.proto, 255, pkt.l4))
        except packet.Malformed:
            pass


def test_dad_probe_names_the_guests_new_address() -> None:
    """The target of a DAD NS (from ::) is the address the guest is about to use."""
    target = "2001:db8::5054:ff:fe12:3456"
    probe = Ether(src=GUEST_MAC, dst="33:33:ff:12:34:56") / IPv6(
        src="::", dst="ff02::1:ff12:3456", hlim=255) / ICMPv6ND_NS(tgt=target)
    pkt = packet.parse_ip(memoryview(bytes(probe)))
    assert ndp.dad_target(pkt) == ipaddress.IPv6Address(target).packed
    regular = Ether(src=GUEST_MAC) / IPv6(src="fe80::1234", dst="ff02::1:ff00:1",
                                          hlim=255) / ICMPv6ND_NS(tgt="fe80::1")
    assert ndp.dad_target(packet.parse_ip(memoryview(bytes(regular)))) is None
