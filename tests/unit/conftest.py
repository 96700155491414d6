"""Fixtures shared by the responder tests: a NetConfig on documentation addresses, a scapy
check of the frames we build, and a mutator of valid guest input for hypothesis."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator

import pytest
from hypothesis import strategies as st
from scapy.layers.l2 import Ether

from passtd.engine.addrs import Ip4Config, Ip6Config, NetConfig


def addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


BASE_CFG = NetConfig(
    mtu=65520,
    ip4=Ip4Config(
        address=addr("198.51.100.2"),
        prefix_len=24,
        gateway=addr("198.51.100.1"),
        dns=(addr("198.51.100.53"), addr("203.0.113.53")),
    ),
    ip6=Ip6Config(
        address=addr("2001:db8::2"),
        prefix_len=64,
        gateway=addr("fe80::1"),
        dns=(addr("2001:db8::53"), addr("2001:db8::54")),
    ),
    search=("example.com", "eng.example.com"),
    hostname="guest",
)


@pytest.fixture(scope="session")
def cfg() -> NetConfig:
    return BASE_CFG


@pytest.fixture(scope="session")
def make_cfg() -> Callable[..., NetConfig]:
    """BASE_CFG with some fields replaced (NetConfig is frozen)."""
    return lambda **changes: BASE_CFG._replace(**changes)


@pytest.fixture(scope="session")
def parse_reply() -> Callable[[bytes], Ether]:
    """Dissect one of our frames with scapy, after checking that it is padded to the 802.3
    minimum and that scapy computes the same IP, UDP and ICMPv6 checksums as we did."""

    def parse(frame: bytes) -> Ether:
        assert len(frame) >= 60
        recomputed = Ether(frame)
        layer = recomputed
        while layer:
            for field in ("chksum", "cksum"):
                if field in layer.fields:
                    delattr(layer, field)
            layer = layer.payload
        assert bytes(recomputed) == frame
        return Ether(frame)

    return parse


@pytest.fixture(scope="session")
def mutate() -> Callable[[st.DataObject, bytes], bytes]:
    """Draw a damaged copy of `base`: bytes overwritten, then maybe cut or extended."""

    def draw(data: st.DataObject, base: bytes) -> bytes:
        buf = bytearray(base)
        overwrites = st.tuples(st.integers(0, len(buf) - 1), st.integers(0, 255))
        for pos, value in data.draw(st.lists(overwrites, max_size=6)):
            buf[pos] = value
        cut = data.draw(st.none() | st.integers(0, len(buf)))
        if cut is not None:
            del buf[cut:]
        return bytes(buf) + data.draw(st.binary(max_size=16))

    return draw


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """A host server on loopback, listening (the tests accept its connections); the engine
    tests aim the guest's connections at it."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        yield srv
