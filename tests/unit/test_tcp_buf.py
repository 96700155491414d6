"""Host->guest TCP frame batches, checked with scapy as an independent decoder."""

import os
import socket
import struct
from collections.abc import Callable
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from passtd.engine import tcp_buf, tcp_seg
from passtd.engine.tcp_buf import (
    ControlFrames,
    FlowHeader,
    TcpFrameBatch,
    control_frame_python,
    write_headers_python,
)

OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST_MAC = bytes.fromhex("525400123456")
ADDRS = {
    4: (bytes([198, 51, 100, 1]), bytes([198, 51, 100, 2])),
    6: (bytes.fromhex("fe80" + "00" * 13 + "01"), bytes.fromhex("20010db8" + "00" * 11 + "02")),
}


def split_frames(data: bytes) -> list[bytes]:
    frames, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("!I", data, pos)
        frames.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    assert pos == len(data)
    return frames


def assert_checksums(layer: IP | IPv6, family: int) -> None:
    """scapy recomputes both checksums from scratch: they must match ours."""
    blank = layer.copy()
    del blank[TCP].chksum
    if family == 4:
        del blank.chksum
    rebuilt = blank.__class__(bytes(blank))
    assert rebuilt[TCP].chksum == layer[TCP].chksum
    if family == 4:
        assert rebuilt.chksum == layer.chksum


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize(("mss", "nbytes"), [(1460, 1460 * 10), (1460, 1460 * 3 + 7),
                                             (1448, 5), (1447, 4000), (65480, 65480 * 2 + 1)])
def test_batch_frames_are_valid_and_carry_the_stream(family: int, mss: int, nbytes: int) -> None:
    batch = TcpFrameBatch(family)
    payload = os.urandom(nbytes)
    views = batch.views(mss)
    for i in range(0, nbytes, mss):
        chunk = payload[i : i + mss]
        views[i // mss][: len(chunk)] = chunk
    src, dst = ADDRS[family]
    seq = 0xFFFFFF00  # wraps inside the batch
    data = bytes(batch.build(nbytes, mss, OUR_MAC, GUEST_MAC, src, dst, 80, 40000, seq, 777, 1234))
    frames = split_frames(data)
    assert len(frames) == -(-nbytes // mss)
    stream = b""
    for i, raw in enumerate(frames):
        pkt = Ether(raw)
        assert pkt.src == OUR_MAC.hex(":") and pkt.dst == GUEST_MAC.hex(":")
        layer = pkt[IP] if family == 4 else pkt[IPv6]
        tcp = pkt[TCP]
        if family == 4:
            assert layer.ttl == 255 and layer.flags == "DF"
        else:
            assert layer.hlim == 255
        assert tcp.sport == 80 and tcp.dport == 40000
        assert tcp.seq == (seq + i * mss) & 0xFFFFFFFF
        assert tcp.ack == 777 and tcp.window == 1234
        assert tcp.flags == ("PA" if i == len(frames) - 1 else "A")
        assert_checksums(layer, family)
        stream += bytes(tcp.payload)
    assert stream == payload


def test_views_follow_the_mss_and_stay_within_the_area() -> None:
    batch = TcpFrameBatch(4)
    small = batch.views(1460)
    assert len(small) == 1023 and all(len(v) == 1460 for v in small)
    big = batch.views(65480)
    assert len(big) >= 64 and all(len(v) == 65480 for v in big)


SYN_ACK_OPTIONS = tcp_seg.syn_options(1460, 7, True)
SACK_OPTIONS = b"\x01\x01" + bytes([5, 10]) + struct.pack("!II", 5000, 6000)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize(("flags", "options"), [
    ("SA", SYN_ACK_OPTIONS), ("A", b""), ("FA", b""), ("RA", b""), ("A", SACK_OPTIONS)])
def test_control_frames_are_valid_padded_and_carry_their_fields(family: int, flags: str,
                                                                 options: bytes) -> None:
    src, dst = ADDRS[family]
    flag_bits = int(TCP(flags=flags).flags)
    data = ControlFrames().frame(OUR_MAC, GUEST_MAC, src, dst, 80, 40000, 0x1_0000_0005,
                                 0xFFFFFFFF, flag_bits, 70000, options)
    (raw,) = split_frames(data)
    assert len(raw) >= 60  # the Ethernet minimum: a bare IPv4 ACK is 54 bytes, padded
    pkt = Ether(raw)
    assert pkt.src == OUR_MAC.hex(":") and pkt.dst == GUEST_MAC.hex(":")
    layer = pkt[IP] if family == 4 else pkt[IPv6]
    if family == 4:
        assert layer.ttl == 255 and layer.flags == "DF" and layer.len == 40 + len(options)
        assert len(raw) == max(60, 14 + layer.len)
    else:
        assert layer.hlim == 255 and layer.plen == 20 + len(options)
        assert len(raw) == 54 + layer.plen
    tcp = pkt[TCP]
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack) == (80, 40000, 5, 0xFFFFFFFF)
    assert tcp.flags == flags and tcp.window == 0xFFFF  # the field holds 16 bits
    assert tcp.dataofs == 5 + len(options) // 4 and not bytes(tcp.payload).strip(b"\0")
    assert bytes(raw[54 if family == 4 else 74 :][: len(options)]) == options
    assert_checksums(layer, family)


@pytest.mark.parametrize("family", [4, 6])
def test_a_batch_read_for_another_flow_carries_that_flows_header(family: int) -> None:
    """A batch keeps the header bytes and address sum of the flow it built last: flows
    that differ in addresses, in ports only, or in the guest's MAC (learned anew) each
    get their own, with valid checksums."""
    batch = TcpFrameBatch(family)
    batch.views(1460)[0][:3] = b"abc"
    first = ADDRS[family]
    other = tuple(bytes([a[0] ^ 1, *a[1:-1], a[-1] ^ 0x80]) for a in first)
    new_mac = bytes.fromhex("525400abcdef")
    for (src, dst), sport, mac in ((first, 80, GUEST_MAC), (other, 80, GUEST_MAC),
                                   (first, 80, GUEST_MAC), (first, 8080, GUEST_MAC),
                                   (first, 8080, new_mac), (first, 80, GUEST_MAC)):
        (raw,) = split_frames(bytes(batch.build(3, 1460, OUR_MAC, mac, src, dst, sport,
                                                40000, 1, 2, 3)))
        frame = Ether(raw)
        assert (frame.src, frame.dst) == (OUR_MAC.hex(":"), mac.hex(":"))
        layer = frame[IP] if family == 4 else frame[IPv6]
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        assert (socket.inet_pton(af, layer.src), socket.inet_pton(af, layer.dst)) == (src, dst)
        assert (layer[TCP].sport, layer[TCP].dport) == (sport, 40000)
        assert bytes(layer[TCP].payload) == b"abc"
        assert_checksums(layer, family)


def test_control_frames_in_turn_for_flows_of_both_families_carry_each_flows_header() -> None:
    """ControlFrames keeps the header bytes of the flow it framed last: frames for another
    family, other addresses, other ports or a MAC learned anew each get their own."""
    frames = ControlFrames()
    new_mac = bytes.fromhex("525400abcdef")
    four, six = ADDRS[4], ADDRS[6]
    other = tuple(bytes([a[0] ^ 1, *a[1:]]) for a in four)
    for (src, dst), sport, mac in ((four, 80, GUEST_MAC), (six, 80, GUEST_MAC),
                                   (four, 80, GUEST_MAC), (other, 80, GUEST_MAC),
                                   (other, 8080, GUEST_MAC), (other, 8080, new_mac),
                                   (six, 8080, new_mac), (four, 80, GUEST_MAC)):
        family = 4 if len(src) == 4 else 6
        (raw,) = split_frames(frames.frame(OUR_MAC, mac, src, dst, sport, 40000, 7, 9,
                                           int(TCP(flags="FA").flags), 1000))
        frame = Ether(raw)
        assert (frame.src, frame.dst) == (OUR_MAC.hex(":"), mac.hex(":"))
        layer = frame[IP] if family == 4 else frame[IPv6]
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        assert (socket.inet_pton(af, layer.src), socket.inet_pton(af, layer.dst)) == (src, dst)
        assert (layer[TCP].sport, layer[TCP].dport, layer[TCP].flags) == (sport, 40000, "FA")
        assert_checksums(layer, family)


def _native_tcp_buf() -> ModuleType:
    try:
        from passtd.engine import _tcp_buf
    except ImportError:
        pytest.skip("the native frame writers are not built here (./setup.sh builds them)")
    return _tcp_buf


def _native_write_headers() -> Callable[..., int]:
    return _native_tcp_buf().write_headers  # type: ignore[no-any-return]


@settings(max_examples=300, deadline=None)
@given(family=st.sampled_from([4, 6]), mss=st.integers(1, 2000), nbytes=st.integers(1, 9000),
       seq=st.integers(0, 0xFFFFFFFF), ack=st.integers(0, 0xFFFFFFFF),
       window=st.integers(0, 0xFFFF), ports=st.tuples(st.integers(0, 0xFFFF),
                                                      st.integers(0, 0xFFFF)),
       seed=st.binary(min_size=1, max_size=64))
def test_native_and_python_headers_are_the_same_bytes(
        family: int, mss: int, nbytes: int, seq: int, ack: int, window: int,
        ports: tuple[int, int], seed: bytes) -> None:
    """Every slot, odd MSS and short last segment, sequence numbers wrapping: the C
    writer and the Python reference leave the same bytes (and the same end)."""
    write = _native_write_headers()
    src, dst = ADDRS[family]
    header = FlowHeader()
    header.update(OUR_MAC, GUEST_MAC, src, dst, *ports)
    head = 58 if family == 4 else 78
    stride = head + mss
    count = -(-nbytes // mss)
    area = bytearray((seed * (count * stride // len(seed) + 1))[: count * stride + 5])
    ours, theirs = bytearray(area), bytearray(area)
    args = (head, mss, nbytes, header.frame_start, header.flow, header.addr_sum, seq, ack,
            window)
    assert write(memoryview(ours), *args) == write_headers_python(memoryview(theirs), *args)
    assert ours == theirs


def test_native_header_writer_refuses_what_does_not_fit() -> None:
    """Arguments that would write outside the buffer, or are not one family's, raise
    (no write at all); the buffer must be writable."""
    write = _native_write_headers()
    header = FlowHeader()
    header.update(OUR_MAC, GUEST_MAC, *ADDRS[4], 1, 2)
    start, flow, addr_sum = header.frame_start, header.flow, header.addr_sum
    area = memoryview(bytearray(58 + 100))
    with pytest.raises(ValueError):
        write(area, 58, 100, 101, start, flow, addr_sum, 0, 0, 0)  # a second frame
    with pytest.raises(ValueError):
        write(area, 58, 1, (1 << 62), start, flow, addr_sum, 0, 0, 0)
    with pytest.raises(ValueError):
        write(area, 78, 80, 10, start, flow, addr_sum, 0, 0, 0)  # IPv4 bytes, IPv6 head
    with pytest.raises(ValueError):
        write(area, 58, 100, 0, start, flow, addr_sum, 0, 0, 0)
    with pytest.raises(ValueError):
        write(area, 58, 100, 10, start, flow, addr_sum, 1 << 32, 0, 0)
    with pytest.raises(BufferError):
        write(bytes(158), 58, 100, 10, start, flow, addr_sum, 0, 0, 0)
    with pytest.raises(TypeError):
        write(area, 58, 100, 10, bytearray(start), flow, addr_sum, 0, 0, 0)
    assert not any(area)
    assert write(area, 58, 100, 100, start, flow, addr_sum, 0, 0, 0) == 158


@settings(max_examples=300, deadline=None)
@given(family=st.sampled_from([4, 6]), seq=st.integers(0, 0xFFFFFFFF),
       ack=st.integers(0, 0xFFFFFFFF), flags=st.integers(0, 0xFF),
       window=st.integers(0, 0xFFFF), ports=st.tuples(st.integers(0, 0xFFFF),
                                                      st.integers(0, 0xFFFF)),
       options=st.integers(0, 10).flatmap(lambda words: st.binary(min_size=4 * words,
                                                                  max_size=4 * words)))
def test_native_and_python_control_frames_are_the_same_bytes(
        family: int, seq: int, ack: int, flags: int, window: int, ports: tuple[int, int],
        options: bytes) -> None:
    """Any flags, options up to the 40 bytes TCP allows, sequence numbers at the ends of
    their range: the C frame and the Python reference are the same bytes."""
    native = _native_tcp_buf().control_frame
    header = FlowHeader()
    header.update(OUR_MAC, GUEST_MAC, *ADDRS[family], *ports)
    args = (header.frame_start, header.flow, header.addr_sum, seq, ack, flags, window,
            options)
    assert native(*args) == control_frame_python(*args)


def test_native_control_frame_refuses_what_is_no_segment() -> None:
    """Options TCP cannot carry, values outside their fields, bytes of no family: raised."""
    native = _native_tcp_buf().control_frame
    header = FlowHeader()
    header.update(OUR_MAC, GUEST_MAC, *ADDRS[4], 1, 2)
    start, flow, addr_sum = header.frame_start, header.flow, header.addr_sum
    for options in (b"\x01", bytes(44)):
        with pytest.raises(ValueError):
            native(start, flow, addr_sum, 0, 0, 0x10, 0, options)
    for seq, ack, flags, window in ((1 << 32, 0, 0, 0), (0, -1, 0, 0), (0, 0, 256, 0),
                                    (0, 0, 0, 1 << 16)):
        with pytest.raises(ValueError):
            native(start, flow, addr_sum, seq, ack, flags, window, b"")
    with pytest.raises(ValueError):
        native(start, flow[:-1], addr_sum, 0, 0, 0, 0, b"")
    with pytest.raises(TypeError):
        native(start, bytearray(flow), addr_sum, 0, 0, 0, 0, b"")
    with pytest.raises(TypeError):
        native(start, flow, addr_sum, 0, 0, 0, 0)


def test_the_frame_writers_in_use_are_said() -> None:
    assert tcp_buf.ENGINE in ("native", "python")
    if os.environ.get("PASSTD_NATIVE") == "0":
        assert tcp_buf.write_headers is write_headers_python
        assert tcp_buf.control_frame is control_frame_python
