"""ARP responder: scapy-built requests in, scapy-checked replies out."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.l2 import ARP, Ether

from passtd.engine import arp, packet
from passtd.engine.addrs import OUR_MAC

GUEST_MAC = "52:54:00:12:34:56"
GATEWAY = "198.51.100.1"
GUEST_IP = "198.51.100.2"


def request(pdst: str, psrc: str = GUEST_IP, op: int = 1, **fields) -> bytes:
    return bytes(
        Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
        / ARP(op=op, hwsrc=GUEST_MAC, psrc=psrc, hwdst="00:00:00:00:00:00", pdst=pdst, **fields)
    )


def answer(cfg, frame: bytes) -> bytes | None:
    return arp.reply(cfg, memoryview(frame))


@pytest.mark.parametrize("target", [GATEWAY, "198.51.100.77", "203.0.113.9"])
def test_every_request_is_answered_with_our_mac(cfg, target):
    frame = answer(cfg, request(target))
    assert frame is not None and len(frame) == 60
    reply = Ether(frame)
    assert reply.dst == GUEST_MAC
    assert reply.src == OUR_MAC.hex(":")
    assert reply.type == packet.ETH_P_ARP
    assert (reply[ARP].hwtype, reply[ARP].ptype, reply[ARP].hwlen, reply[ARP].plen) == (
        1, 0x0800, 6, 4,
    )
    assert reply[ARP].op == 2
    assert reply[ARP].hwsrc == OUR_MAC.hex(":")
    assert reply[ARP].psrc == target
    assert reply[ARP].hwdst == GUEST_MAC
    assert reply[ARP].pdst == GUEST_IP


def test_a_probe_from_0_0_0_0_for_another_address_is_answered(cfg):
    reply = Ether(answer(cfg, request(GATEWAY, psrc="0.0.0.0")))
    assert reply[ARP].psrc == GATEWAY
    assert reply[ARP].pdst == "0.0.0.0"


def test_padding_after_the_request_is_ignored(cfg):
    assert answer(cfg, request(GATEWAY) + bytes(18)) == answer(cfg, request(GATEWAY))


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(request(GUEST_IP, psrc="0.0.0.0"), id="DAD probe for the guest's address"),
        pytest.param(request(GUEST_IP, psrc=GATEWAY), id="anyone asking for the guest's address"),
        pytest.param(request(GUEST_IP, psrc=GUEST_IP), id="gratuitous ARP by the guest"),
        pytest.param(request("198.51.100.9", psrc="198.51.100.9"), id="gratuitous ARP for another"),
        pytest.param(request(GATEWAY, op=2), id="a reply"),
        pytest.param(request(GATEWAY, hwtype=6), id="not Ethernet"),
        pytest.param(request(GATEWAY, ptype=0x86DD), id="not IPv4"),
    ],
)
def test_unanswered(cfg, frame):
    assert answer(cfg, frame) is None


def test_non_ipv4_address_lengths_are_not_answered(cfg):
    frame = bytearray(request(GATEWAY))
    frame[14 + 5] = 16  # protocol address length
    assert answer(cfg, bytes(frame)) is None


def test_other_ethertypes_and_a_disabled_ipv4_are_not_answered(cfg, make_cfg):
    frame = bytearray(request(GATEWAY))
    frame[12:14] = b"\x08\x00"
    assert answer(cfg, bytes(frame)) is None
    assert answer(make_cfg(ip4=None), request(GATEWAY)) is None


@pytest.mark.parametrize("length", [0, 13, 14, 21, 22, 41])
def test_truncated_requests_are_malformed(cfg, length):
    with pytest.raises(packet.Malformed):
        answer(cfg, request(GATEWAY)[:length])


@given(frame=st.binary(max_size=80))
def test_random_bytes_never_raise_anything_but_malformed(cfg, frame):
    with contextlib.suppress(packet.Malformed):
        answer(cfg, frame)


@given(data=st.data())
def test_damaged_requests_never_raise_anything_but_malformed(cfg, mutate, data):
    try:
        reply = answer(cfg, mutate(data, request(GATEWAY)))
    except packet.Malformed:
        return
    assert reply is None or len(reply) == 60
