"""DHCPv4 responder: scapy-built DISCOVER/REQUEST/... in, scapy-checked OFFER/ACK out."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dns import dns_get_str
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import mac2str

from passtd.engine import dhcp, packet
from passtd.engine.addrs import OUR_MAC

GUEST_MAC = "52:54:00:12:34:56"
XID = 0x3903F326
COOKIE = b"\x63\x82\x53\x63"
RFC3397_EXAMPLE = bytes.fromhex("03656e67056170706c6503636f6d00096d61726b6574696e67c004")


def frame_with(payload, src: str = "0.0.0.0", dport: int = 67) -> bytes:
    return bytes(
        Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
        / IP(src=src, dst="255.255.255.255")
        / UDP(sport=68, dport=dport)
        / payload
    )


def bootp(options, flags: int = 0, ciaddr: str = "0.0.0.0", **fields) -> BOOTP:
    header = BOOTP(chaddr=mac2str(GUEST_MAC), xid=XID, flags=flags, ciaddr=ciaddr, **fields)
    return header / DHCP(options=[*options, "end"])


def message(msg_type: str, *options, **fields) -> bytes:
    return frame_with(bootp([("message-type", msg_type), *options], **fields))


def answer(cfg, frame: bytes) -> bytes | None:
    pkt = packet.parse_ip(memoryview(frame))
    sport, dport, payload = packet.parse_udp(pkt)
    return dhcp.reply(cfg, pkt, sport, dport, payload)


def options(reply: Ether) -> dict[str, tuple]:
    """scapy's view of the options: name (or code) -> values."""
    return {o[0]: o[1:] for o in reply[DHCP].options if isinstance(o, tuple)}


def option_codes(reply: Ether) -> list[int]:
    """Option codes in the order they were sent (pad skipped, end excluded)."""
    data = bytes(reply[BOOTP])[240:]
    codes, i = [], 0
    while data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        codes.append(data[i])
        i += 2 + data[i + 1]
    return codes


def raw_option(reply: Ether, code: int) -> bytes:
    """The value of an option, its instances concatenated (RFC 3396)."""
    data = bytes(reply[BOOTP])[240:]
    value, i = b"", 0
    while data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        if data[i] == code:
            value += data[i + 2 : i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    return value


def decode_names(wire: bytes) -> list[str]:
    """A list of domain names, decompressed by scapy's DNS code."""
    names, rest = [], wire
    while rest:
        name, rest = dns_get_str(rest, full=wire)
        names.append(name.decode())
    return names


def test_discover_gets_an_offer_with_the_whole_lease(cfg, parse_reply):
    reply = parse_reply(answer(cfg, message("discover")))
    assert reply.dst == GUEST_MAC  # no broadcast flag: unicast to chaddr and yiaddr
    assert reply.src == OUR_MAC.hex(":")
    assert (reply[IP].src, reply[IP].dst) == ("198.51.100.1", "198.51.100.2")
    assert (reply[IP].ttl, reply[IP].flags, reply[IP].id) == (255, "DF", 0)
    assert (reply[UDP].sport, reply[UDP].dport) == (67, 68)
    assert reply[BOOTP].op == 2
    assert (reply[BOOTP].htype, reply[BOOTP].hlen, reply[BOOTP].hops) == (1, 6, 0)
    assert reply[BOOTP].xid == XID
    assert reply[BOOTP].yiaddr == "198.51.100.2"
    assert reply[BOOTP].ciaddr == reply[BOOTP].siaddr == reply[BOOTP].giaddr == "0.0.0.0"
    assert reply[BOOTP].chaddr[:6] == mac2str(GUEST_MAC)
    assert reply[BOOTP].options[:4] == COOKIE
    got = options(reply)
    assert got["message-type"] == (2,)
    assert got["subnet_mask"] == ("255.255.255.0",)
    assert got["router"] == ("198.51.100.1",)
    assert got["name_server"] == ("198.51.100.53", "203.0.113.53")
    assert got["hostname"] == (b"guest",)
    assert got["interface-mtu"] == (65520,)
    assert got["lease_time"] == (0xFFFFFFFF,)
    assert got["server_id"] == ("198.51.100.1",)
    assert decode_names(got[119][0]) == ["example.com.", "eng.example.com."]
    assert "rapid_commit" not in got
    assert "classless_static_routes" not in got
    assert option_codes(reply)[0] == 53


def test_request_gets_an_ack_for_our_address_whatever_it_asks(cfg, parse_reply):
    reply = parse_reply(
        answer(cfg, message("request", ("requested_addr", "198.51.100.200")))
    )
    assert options(reply)["message-type"] == (5,)
    assert reply[BOOTP].yiaddr == "198.51.100.2"
    assert options(reply)["lease_time"] == (0xFFFFFFFF,)


def test_bootp_without_a_message_type_gets_an_ack(cfg, parse_reply):
    reply = parse_reply(answer(cfg, frame_with(bootp([]))))
    assert options(reply)["message-type"] == (5,)
    assert reply[BOOTP].yiaddr == "198.51.100.2"


def test_broadcast_flag_sends_to_the_broadcast_address(cfg, parse_reply):
    reply = parse_reply(answer(cfg, message("discover", flags=0x8000)))
    assert reply.dst == "ff:ff:ff:ff:ff:ff"
    assert reply[IP].dst == "255.255.255.255"
    assert reply[BOOTP].flags == 0x8000


def test_a_configured_client_is_answered_at_its_address(cfg, parse_reply):
    frame = message("request", ciaddr="198.51.100.2", flags=0x8000)
    reply = parse_reply(answer(cfg, frame))
    assert reply.dst == GUEST_MAC
    assert reply[IP].dst == "198.51.100.2"
    assert reply[BOOTP].ciaddr == "198.51.100.2"  # kept in an ACK (RFC 2131 table 3)


def test_rapid_commit_gets_an_ack_straight_away(cfg, parse_reply):
    reply = parse_reply(answer(cfg, message("discover", ("rapid_commit", b""))))
    got = options(reply)
    assert got["message-type"] == (5,)
    assert got["rapid_commit"] == (b"",)


def test_rapid_commit_is_only_for_discover(cfg, parse_reply):
    reply = parse_reply(answer(cfg, message("request", ("rapid_commit", b""))))
    assert "rapid_commit" not in options(reply)


@pytest.mark.parametrize("msg_type", ["decline", "release", "inform", "offer", "ack", "nak"])
def test_other_messages_get_nothing(cfg, msg_type):
    assert answer(cfg, message(msg_type)) is None


def test_only_port_67_and_only_with_ipv4(cfg, make_cfg):
    assert answer(cfg, frame_with(bootp([("message-type", "discover")]), dport=68)) is None
    assert answer(make_cfg(ip4=None), message("discover")) is None


def test_requested_options_come_first_in_the_clients_order(cfg, parse_reply):
    reply = parse_reply(answer(cfg, message("discover", ("param_req_list", [6, 3, 1, 119, 26]))))
    assert option_codes(reply) == [53, 6, 3, 1, 119, 26, 12, 51, 54]


def test_the_message_type_goes_where_the_client_asked(cfg, parse_reply):
    reply = parse_reply(answer(cfg, message("discover", ("param_req_list", [1, 53, 3]))))
    assert option_codes(reply) == [1, 53, 3, 6, 12, 26, 51, 54, 119]  # the rest by number


def test_a_request_list_split_in_two_instances_is_concatenated(cfg, parse_reply):
    frame = message("discover", ("param_req_list", [26]), ("param_req_list", [6, 3]))
    assert option_codes(parse_reply(answer(cfg, frame)))[:4] == [53, 26, 6, 3]


def test_classless_routes_only_when_the_gateway_is_off_the_subnet(cfg, make_cfg, parse_reply):
    assert "classless_static_routes" not in options(parse_reply(answer(cfg, message("discover"))))
    host_route = make_cfg(ip4=cfg.ip4._replace(prefix_len=32))
    got = options(parse_reply(answer(host_route, message("discover"))))
    routes = ["198.51.100.1/32:0.0.0.0", "0.0.0.0/0:198.51.100.1"]  # on-link /32, then default
    assert got["classless_static_routes"] == (routes,)
    assert got["subnet_mask"] == ("255.255.255.255",)


def test_mtu_0_is_not_advertised(make_cfg, parse_reply):
    got = options(parse_reply(answer(make_cfg(mtu=0), message("discover"))))
    assert "interface-mtu" not in got


def test_no_hostname_no_dns_no_search_and_the_bootp_minimum_size(make_cfg, cfg, parse_reply):
    bare = make_cfg(hostname=None, search=(), ip4=cfg.ip4._replace(dns=()))
    reply = parse_reply(answer(bare, message("discover")))
    assert set(option_codes(reply)) == {1, 3, 26, 51, 53, 54}
    assert len(reply[BOOTP]) == 300  # padded to RFC 951's 64-byte vendor area


def test_at_most_three_dns_servers(cfg, make_cfg, parse_reply):
    servers = tuple(bytes((198, 51, 100, n)) for n in range(50, 55))
    many = make_cfg(ip4=cfg.ip4._replace(dns=servers))
    got = options(parse_reply(answer(many, message("discover"))))
    assert got["name_server"] == ("198.51.100.50", "198.51.100.51", "198.51.100.52")


def test_search_list_is_the_rfc_3397_example(make_cfg, parse_reply):
    rfc = make_cfg(search=("eng.apple.com", "marketing.apple.com"))
    assert raw_option(parse_reply(answer(rfc, message("discover"))), 119) == RFC3397_EXAMPLE


def test_search_list_skips_unusable_names_and_points_at_repeats(make_cfg, parse_reply):
    names = ("a.example.org.", ".", "b.example.org", "x" * 64 + ".example.org", "a.example.org")
    wire = raw_option(parse_reply(answer(make_cfg(search=names), message("discover"))), 119)
    assert decode_names(wire) == ["a.example.org.", "b.example.org.", "a.example.org."]
    assert wire.endswith(b"\xc0\x00")  # the repeat is a single pointer to the first name


labels = st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=5).map(".".join)


@given(names=st.lists(domains, max_size=10))
def test_search_list_wire_decodes_back_to_the_names(names):
    expected = [name + "." for name in names]
    for compress in (True, False):
        entries = dhcp.search_list_wire(names, compress)
        assert decode_names(b"".join(entries)) == expected
        for n in range(len(entries)):  # every leading run is a valid list on its own
            assert decode_names(b"".join(entries[:n])) == expected[:n]


LONG_SEARCH = tuple(f"host{i}-{'x' * 40}.zone{i}.example" for i in range(20))


def test_options_fit_in_576_bytes_the_search_list_being_cut(make_cfg, parse_reply):
    reply = parse_reply(answer(make_cfg(search=LONG_SEARCH), message("discover")))
    assert reply[IP].len <= 576
    names = decode_names(raw_option(reply, 119))
    assert 0 < len(names) < len(LONG_SEARCH)
    assert names == [name + "." for name in LONG_SEARCH[: len(names)]]
    assert {1, 3, 6, 12, 26, 51, 53, 54} <= set(option_codes(reply))


def test_a_larger_max_message_size_is_used_with_long_options_split(make_cfg, parse_reply):
    long_cfg = make_cfg(search=LONG_SEARCH)
    small = parse_reply(answer(long_cfg, message("discover")))
    large = parse_reply(answer(long_cfg, message("discover", ("max_dhcp_size", 1500))))
    assert 576 < large[IP].len <= 1500
    names = decode_names(raw_option(large, 119))
    assert len(names) > len(decode_names(raw_option(small, 119)))
    assert names == [name + "." for name in LONG_SEARCH[: len(names)]]
    assert option_codes(large).count(119) > 1  # RFC 3396: more than 255 bytes


def test_a_max_message_size_below_576_is_raised_to_576(make_cfg):
    long_cfg = make_cfg(search=LONG_SEARCH)
    assert answer(long_cfg, message("discover", ("max_dhcp_size", 300))) == answer(
        long_cfg, message("discover")
    )


def test_mandatory_options_are_kept_before_requested_ones(make_cfg, parse_reply):
    long_name = make_cfg(hostname="h" * 280, search=LONG_SEARCH)
    reply = parse_reply(answer(long_name, message("discover", ("param_req_list", [12, 119]))))
    codes = option_codes(reply)
    assert {51, 53, 54} <= set(codes)
    assert raw_option(reply, 12) == b"h" * 280 and codes.count(12) == 2
    assert 119 not in codes and reply[IP].len <= 576


def test_pad_options_are_skipped(cfg, parse_reply):
    frame = frame_with(Raw(header(options=COOKIE + b"\x00\x00\x35\x01\x01\x00\xff")))
    assert options(parse_reply(answer(cfg, frame)))["message-type"] == (2,)


def header(**fields) -> bytes:
    return bytes(BOOTP(chaddr=mac2str(GUEST_MAC), xid=XID, **fields))


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(header()[:235], id="short of a BOOTP header"),
        pytest.param(header(), id="no magic cookie"),
        pytest.param(header(options=b"\x63\x82\x53\x64\xff"), id="wrong magic cookie"),
        pytest.param(header(op=2, options=COOKIE + b"\xff"), id="a BOOTREPLY"),
        pytest.param(header(htype=6, options=COOKIE + b"\xff"), id="not Ethernet"),
        pytest.param(header(hlen=16, options=COOKIE + b"\xff"), id="not a MAC"),
        pytest.param(header(options=COOKIE + b"\x35\x01\x01\x0c\x10abc"), id="option overrun"),
        pytest.param(header(options=COOKIE + b"\x35\x01\x01\x0c"), id="option without length"),
        pytest.param(header(options=COOKIE + b"\x35\x02\x01\x01\xff"), id="message type length"),
    ],
)
def test_malformed(cfg, payload):
    with pytest.raises(packet.Malformed):
        answer(cfg, frame_with(Raw(payload)))


@given(payload=st.binary(max_size=400))
def test_random_payloads_never_raise_anything_but_malformed(cfg, payload):
    with contextlib.suppress(packet.Malformed):
        answer(cfg, frame_with(Raw(payload)))


@given(area=st.binary(max_size=120), max_size=st.integers(0, 0xFFFF))
def test_random_options_never_raise_anything_but_malformed(make_cfg, area, max_size):
    long_cfg = make_cfg(search=LONG_SEARCH)
    size = b"\x39\x02" + max_size.to_bytes(2, "big")
    for options_area in (area, b"\x35\x01\x01" + size + area):
        with contextlib.suppress(packet.Malformed):
            answer(long_cfg, frame_with(Raw(header(options=COOKIE + options_area))))


VALID = message("discover", ("param_req_list", [1, 3, 6, 12, 119]), ("max_dhcp_size", 1500))


@given(data=st.data())
def test_damaged_frames_never_raise_anything_but_malformed(cfg, mutate, data):
    with contextlib.suppress(packet.Malformed):
        answer(cfg, mutate(data, VALID))


@given(data=st.data())
def test_damaged_messages_never_raise_anything_but_malformed(cfg, mutate, data):
    damaged = mutate(data, bytes(Ether(VALID)[BOOTP]))
    try:
        reply = answer(cfg, frame_with(Raw(damaged)))
    except packet.Malformed:
        return
    if reply is not None:
        assert Ether(reply)[IP].len <= 1500
