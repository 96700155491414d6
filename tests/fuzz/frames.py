"""Configurations and valid guest frames for the fuzz targets (documentation addresses only).

`CONFIGS` are the NetConfig variants a target picks from with one input byte: both
families with everything set, IPv4 alone with nothing optional, IPv6 alone without a
global address (SLAAC only), and an IPv4 link whose gateway is off-link with long DNS
data, so that the size limits of DHCP replies and RAs are reached.

The seed frames are built with scapy, an independent implementation, so the corpus
starts from what real stacks send rather than from what our codecs expect.
"""

from __future__ import annotations

import ipaddress

from scapy.layers.dhcp import BOOTP, DHCP
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
    DHCP6OptElapsedTime,
    DHCP6OptIA_NA,
    DHCP6OptIA_PD,
    DHCP6OptIAAddress,
    DHCP6OptOptReq,
    DHCP6OptRapidCommit,
    DHCP6OptServerId,
)
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RS,
    ICMPv6NDOptMTU,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

from passtd.engine.addrs import Ip4Config, Ip6Config, NetConfig


def addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST_MAC = "52:54:00:12:34:56"
GUEST_MAC_BYTES = bytes.fromhex("525400123456")
GUEST4, GW4 = "198.51.100.2", "198.51.100.1"
GUEST6, GW6 = "2001:db8::2", "fe80::1"
GUEST_LL = "fe80::5054:ff:fe12:3456"
DHCP6_MCAST = "ff02::1:2"

_IP4 = Ip4Config(
    address=addr(GUEST4),
    prefix_len=24,
    gateway=addr(GW4),
    dns=(addr("198.51.100.53"), addr("203.0.113.53")),
    map_host_loopback=addr(GW4),
)
_IP6 = Ip6Config(
    address=addr(GUEST6),
    prefix_len=64,
    gateway=addr(GW6),
    dns=(addr("2001:db8::53"), addr("2001:db8::54")),
    map_host_loopback=addr(GW6),
)
_LONG_SEARCH = (
    *(f"{'x' * 60}.zone{i}.example.com" for i in range(12)),
    "bad..name", "", ".", "y" * 70 + ".example", "example.org",
)

CONFIGS: tuple[NetConfig, ...] = (
    NetConfig(mtu=65520, ip4=_IP4, ip6=_IP6, search=("example.com", "eng.example.com"),
              hostname="guest"),
    NetConfig(mtu=0, ip4=Ip4Config(addr(GUEST4), 24, addr(GW4))),
    NetConfig(mtu=1500, ip6=Ip6Config(None, 64, addr(GW6)), search=_LONG_SEARCH,
              hostname="h" * 80),
    NetConfig(
        mtu=1280,
        ip4=Ip4Config(addr("203.0.113.9"), 32, addr(GW4),
                      dns=tuple(addr(f"198.51.100.{i}") for i in range(50, 56))),
        ip6=Ip6Config(addr("2001:db8:1::9"), 128, addr(GW6),
                      dns=tuple(addr(f"2001:db8::{i}") for i in range(1, 40))),
        search=_LONG_SEARCH,
        hostname="guest.example.com",
    ),
)
# the DUID the engine derives from CONFIGS[*].mac (all use passt's default MAC)
SERVER_DUID = b"\x00\x03\x00\x01" + OUR_MAC


# -- seeds --------------------------------------------------------------------------------


def _eth(dst: str = "ff:ff:ff:ff:ff:ff") -> Ether:
    return Ether(src=GUEST_MAC, dst=dst)


def arp_frames() -> list[bytes]:
    return [bytes(p) for p in (
        _eth() / ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST4, pdst=GW4),
        _eth() / ARP(op=1, hwsrc=GUEST_MAC, psrc="0.0.0.0", pdst=GUEST4),  # DAD probe
        _eth() / ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST4, pdst=GUEST4),  # announcement
        _eth() / ARP(op=1, hwsrc=GUEST_MAC, psrc="0.0.0.0", pdst="198.51.100.77"),
        _eth() / ARP(op=2, hwsrc=GUEST_MAC, psrc=GUEST4, pdst=GW4),
    )]


def dhcp_messages() -> list[Packet]:
    """BOOTP/DHCP payloads (the UDP payload) a client sends to port 67."""
    chaddr = GUEST_MAC_BYTES + bytes(10)

    def bootp(options: list, **kw: object) -> Packet:
        return BOOTP(op=1, chaddr=chaddr, xid=0x12345678, **kw) / DHCP(options=[*options, "end"])

    params = ("param_req_list", [1, 3, 6, 12, 15, 26, 28, 42, 51, 54, 119, 121, 53])
    return [
        bootp([("message-type", "discover"), params, ("max_dhcp_size", 1500)]),
        bootp([("message-type", "discover"), ("rapid_commit", b"")], flags=0x8000),
        bootp([("message-type", "request"), ("requested_addr", GUEST4),
               ("server_id", GW4), params]),
        bootp([("message-type", "request"), ("max_dhcp_size", 576)], ciaddr=GUEST4),
        bootp([("message-type", "inform")], ciaddr=GUEST4),
        bootp([("message-type", "release")], ciaddr=GUEST4),
        bootp([("param_req_list", [53, 1, 3, 119, 121, 6, 12, 26]), ("max_dhcp_size", 300)]),
        BOOTP(op=1, chaddr=chaddr, xid=7),  # plain BOOTP: no cookie options at all
    ]


def dhcp_frames() -> list[bytes]:
    return [bytes(_eth() / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
                  / msg) for msg in dhcp_messages()]


def dhcpv6_messages() -> list[Packet]:
    client = DHCP6OptClientId(duid=DUID_LL(lladdr=GUEST_MAC))
    server = DHCP6OptServerId(duid=DUID_LL(lladdr=OUR_MAC.hex(":")))
    ia = DHCP6OptIA_NA(iaid=0xAABB, ianaopts=[DHCP6OptIAAddress(addr=GUEST6)])
    other = DHCP6OptIA_NA(iaid=7, ianaopts=[DHCP6OptIAAddress(addr="2001:db8:99::1")])
    fqdn = DHCP6OptClientFQDN(flags=1, fqdn=b"\x05guest\x07example\x03com\x00")
    oro = DHCP6OptOptReq(reqopts=[23, 24, 39])
    return [
        DHCP6_Solicit(trid=0x123456) / client / DHCP6OptElapsedTime() / ia / oro / fqdn
        / DHCP6OptRapidCommit(),
        DHCP6_Request(trid=1) / client / server / ia / other / fqdn,
        DHCP6_Renew(trid=2) / client / server / ia,
        DHCP6_Rebind(trid=3) / client / ia,
        DHCP6_Confirm(trid=4) / client / ia / other,
        DHCP6_InfoRequest(trid=5) / oro,
        DHCP6_Release(trid=6) / client / server / ia,
        DHCP6_Solicit(trid=8) / client / DHCP6OptIA_PD(iaid=1),
    ]


def dhcpv6_frames() -> list[bytes]:
    return [bytes(_eth("33:33:00:01:00:02") / IPv6(src=GUEST_LL, dst=DHCP6_MCAST, hlim=1)
                  / UDP(sport=546, dport=547) / msg) for msg in dhcpv6_messages()]


def ndp_frames() -> list[bytes]:
    sll = ICMPv6NDOptSrcLLAddr(lladdr=GUEST_MAC)
    return [bytes(_eth("33:33:00:00:00:02") / IPv6(src=src, dst="ff02::2", hlim=255) / msg)
            for src, msg in (
                ("::", ICMPv6ND_RS()),
                (GUEST_LL, ICMPv6ND_RS() / sll),
                (GUEST_LL, ICMPv6ND_NS(tgt=GW6) / sll),
                ("::", ICMPv6ND_NS(tgt=GUEST6)),  # duplicate address detection
                (GUEST6, ICMPv6ND_NS(tgt="2001:db8::77") / sll / ICMPv6NDOptMTU()),
                (GUEST_LL, ICMPv6ND_NA(tgt=GUEST_LL, R=0) / Raw(b"\x02\x01" + GUEST_MAC_BYTES)),
            )]


# the IPv6 source of each of ndp_frames(), as the ndp target's knob selects it
NDP_SOURCE_KNOBS = (0, 1, 1, 0, 2, 1)


def ip_frames() -> list[bytes]:
    """Frames of every other kind a guest sends: echo, UDP, TCP, options, extension headers."""
    gw = "9a:55:9a:55:9a:55"
    syn_opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None),
                ("WScale", 7)]
    v4 = Ether(src=GUEST_MAC, dst=gw) / IP(src=GUEST4, dst=GW4)
    v4_far = Ether(src=GUEST_MAC, dst=gw) / IP(src=GUEST4, dst="203.0.113.7")
    v6 = Ether(src=GUEST_MAC, dst=gw) / IPv6(src=GUEST6, dst=GW6)
    v6_far = Ether(src=GUEST_MAC, dst=gw) / IPv6(src=GUEST6, dst="2001:db8:77::1")
    return [bytes(p) for p in (
        v4 / ICMP(id=0x4242, seq=1) / Raw(b"ping" * 8),
        v6 / ICMPv6EchoRequest(id=0x4242, seq=1, data=b"ping" * 8),
        v4 / UDP(sport=40000, dport=53) / Raw(b"\x12\x34\x01\x00\x00\x01" + bytes(6)),
        v6_far / UDP(sport=40000, dport=9) / Raw(b"discard me"),
        v4 / TCP(sport=40001, dport=80, flags="S", seq=1000, options=syn_opts),
        v6 / TCP(sport=40001, dport=80, flags="S", seq=1000, options=syn_opts),
        v4_far / TCP(sport=40002, dport=80, flags="A", seq=5, ack=9) / Raw(b"data"),
        v4 / TCP(sport=40003, dport=80, flags="R", seq=5),
        Ether(src=GUEST_MAC, dst=gw) / IP(src=GUEST4, dst=GW4, options=[IPOption_RR()])
        / UDP(sport=1, dport=7) / Raw(b"options"),
        Ether(src=GUEST_MAC, dst=gw) / IP(src=GUEST4, dst=GW4, flags="MF") / UDP() / Raw(b"f"),
        v6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP(sport=5, dport=7) / Raw(b"ext"),
        v6 / IPv6ExtHdrFragment() / UDP(sport=5, dport=7),
        Ether(src=GUEST_MAC, dst=gw, type=0x8100) / Raw(bytes(46)),
    )]


def run_segments(v6: bool, count: int = 6, seq: int = 1000) -> list[bytes]:
    """In-order data segments of one guest flow, the bulk of guest->host (tcp_run.py)."""
    gw = "9a:55:9a:55:9a:55"
    net = IPv6(src=GUEST6, dst=GW6) if v6 else IP(src=GUEST4, dst=GW4)
    return [bytes(Ether(src=GUEST_MAC, dst=gw) / net
                  / TCP(sport=40004, dport=5201, flags="PA" if i % 2 else "A",
                        seq=seq + 64 * i, ack=7000, window=502) / Raw(bytes([i]) * 64))
            for i in range(count)]


def all_guest_frames() -> list[bytes]:
    return arp_frames() + dhcp_frames() + dhcpv6_frames() + ndp_frames() + ip_frames()
