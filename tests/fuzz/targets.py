"""The pure fuzz targets: everything a guest can send, short of sockets.

Each target is `run(data: bytes) -> None` that raises only on a bug: a parser or responder
raising anything but `packet.Malformed` (or `tap.FramingError` for the stream), a reply
that the independent checks of oracle.py reject, or a broken invariant of the target
(AssertionError). The engine-level target, which needs sockets and a network namespace,
lives in engine_target.py; the TCP state machine in tcp_target.py.

Input layouts (first bytes select variants, the rest is what the guest sent):

  framing   [mode][split seed][stream...]   mode bit 0: the stream is the input itself, or
            frames synthesised from 2-byte length records (streams of any size, and length
            words out of range); the split seed cuts the stream into reads of random sizes.
            Checked against a plain re-parse of the whole stream.
  frame     [config][Ethernet frame...]     one frame through the engine's slow-path
            dispatch (ARP, IPv4/IPv6, UDP, TCP header and options, ICMP, NDP, DHCP, DHCPv6).
  arp       [config][Ethernet frame...]
  dhcp      [config][knobs][BOOTP message...]   wrapped in IPv4/UDP to port 67
  dhcpv6    [config][knobs][DHCPv6 message...]  wrapped in IPv6/UDP to port 547
  ndp       [config][knobs][ICMPv6 message...]  wrapped in IPv6 (hop limit 255 unless told)
  tcp_run   [first][cut][stream...]   length-prefixed frames, as in the read buffer; the run
            starts at frame `first` (its sequence number as the seed's), the read ends
            `cut` bytes early. Both engines of tcp_run.gather must agree, and both of
            tcp_run.segment on every frame (kind, numbers, flow found).
  tcp_buf   [family+flags, MSS: 3][seq, ack: 8][window, ports: 6][payload...]   host data
            in a batch's slots, and a control segment with the payload's first words as
            options; both engines of tcp_buf.write_headers and of tcp_buf.control_frame
            must write the same bytes, and every frame must pass oracle.py.

Wrapping the message bodies keeps the IP and UDP lengths right whatever the fuzzer inserts
or deletes, so mutations reach the option parsers instead of dying on a length check.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable

from passtd.engine import arp, dhcp, dhcpv6, icmp, ndp, packet, tcp_buf, tcp_run, tcp_seg
from passtd.engine.addrs import NetConfig
from passtd.engine.flow import Flow, FlowKey
from passtd.engine.tap import MAX_FRAME, MIN_FRAME, FrameReader, FramingError

from . import frames, oracle
from .driver import Target
from .tcp_target import TCP_TARGET

CONFIGS = frames.CONFIGS
GUEST_MAC = frames.GUEST_MAC_BYTES


def _config(selector: int) -> NetConfig:
    return CONFIGS[selector % len(CONFIGS)]


# -- framing --------------------------------------------------------------------------------


def _synthetic_stream(records: bytes) -> bytes:
    """A stream from 2-byte records: a length (14..65535 mostly, sometimes out of range)
    and frames whose bytes say which frame they are, so a mix-up cannot go unseen."""
    out = bytearray()
    for i in range(0, len(records) - 1, 2):
        (word,) = struct.unpack_from("!H", records, i)
        if word >> 14 == 3:  # a quarter of the records: lengths near or past the limits
            length = (MIN_FRAME - 8, MIN_FRAME - 1, MIN_FRAME, MAX_FRAME, MAX_FRAME + 1,
                      1 << 31, 0)[word % 7]
        else:
            length = MIN_FRAME + word % (MAX_FRAME - MIN_FRAME + 1)
        out += struct.pack("!I", length & 0xFFFFFFFF)
        if length > MAX_FRAME or length < MIN_FRAME:
            out += bytes(range(256))  # whatever follows a bad length is never a frame
            continue
        out += (bytes((i // 2 & 0xFF,)) * length)
        if len(out) > 1 << 20:
            break
    return bytes(out)


def _reference_frames(stream: bytes) -> tuple[list[bytes], bool]:
    """Frames of a whole stream read at once, and whether a bad length word ends it."""
    found = []
    pos = 0
    while len(stream) - pos >= 4:
        (length,) = struct.unpack_from("!I", stream, pos)
        if not MIN_FRAME <= length <= MAX_FRAME:
            return found, True
        if len(stream) - pos - 4 < length:
            break
        found.append(stream[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return found, False


def run_framing(data: bytes) -> None:
    if len(data) < 2:
        return
    stream = data[2:] if data[0] & 1 else _synthetic_stream(data[2:])
    expected, bad_length = _reference_frames(stream)
    rng = random.Random(data[1])
    # the smallest buffer allowed: a frame cut at its end must move to the front
    reader = FrameReader(MAX_FRAME + 4 + (data[0] >> 1) * 61)
    got: list[bytes] = []
    failed = False
    pos = 0
    while pos < len(stream) and not failed:
        space = reader.space()
        assert len(space) > 0, "no room to read although no complete frame is left"
        want = rng.choice((1, 2, 3, 5, 64, 1500, 4096, 65539, rng.randint(1, 200000)))
        n = min(len(space), want, len(stream) - pos)
        space[:n] = stream[pos : pos + n]
        reader.commit(n)
        pos += n
        try:
            while (off := reader.next_frame()) >= 0:
                length = reader.frame_len
                assert off >= 0 and off + length <= reader.end <= len(reader.buf)
                got.append(bytes(reader.buf[off : off + length]))
        except FramingError:
            failed = True
            assert reader.start == reader.end == 0, "framing error left data behind"
        assert 0 <= reader.start <= reader.end <= len(reader.buf)
    assert failed == bad_length, f"framing error {failed}, expected {bad_length}"
    assert got == expected, f"{len(got)} frames read, {len(expected)} in the stream"


# -- single frames --------------------------------------------------------------------------


def _check_packet(frame: memoryview, pkt: packet.Packet) -> None:
    """What parse_ip returned agrees with the frame, read independently."""
    raw = bytes(frame)
    assert pkt.family in (4, 6)
    size = 4 if pkt.family == 4 else 16
    assert len(pkt.src) == len(pkt.dst) == size
    if pkt.family == 4:
        hlen = (raw[14] & 15) * 4
        (total,) = struct.unpack_from("!H", raw, 16)
        assert raw[14] >> 4 == 4 and hlen >= 20 and 14 + total <= len(raw)
        assert bytes(pkt.l4) == raw[14 + hlen : 14 + total]
        assert (pkt.src, pkt.dst, pkt.proto) == (raw[26:30], raw[30:34], raw[23])
        assert not struct.unpack_from("!H", raw, 20)[0] & 0x3FFF, "a fragment was accepted"
    else:
        (plen,) = struct.unpack_from("!H", raw, 18)
        end = 54 + plen
        assert raw[14] >> 4 == 6 and end <= len(raw)
        assert bytes(pkt.l4) == raw[end - len(pkt.l4) : end]
        assert (pkt.src, pkt.dst) == (raw[22:38], raw[38:54])
        assert pkt.proto not in (0, 43, 44, 60), f"extension header {pkt.proto} left as L4"


def dispatch(cfg: NetConfig, frame: memoryview) -> list[bytes]:
    """The replies to one frame, as Engine._other_frame/_ip_packet reach the responders
    (the socket-bound paths stop at their parsers). Raises Malformed as they do."""
    _dst, _src, ethertype = packet.parse_eth(frame)
    replies: list[bytes | None] = []
    if ethertype == packet.ETH_P_ARP:
        replies.append(arp.reply(cfg, frame))
    elif ethertype in (packet.ETH_P_IP, packet.ETH_P_IPV6):
        pkt = packet.parse_ip(frame)
        _check_packet(frame, pkt)
        if pkt.proto == packet.IPPROTO_UDP:
            sport, dport, payload = packet.parse_udp(pkt)
            assert len(payload) == struct.unpack_from("!H", pkt.l4, 4)[0] - 8
            if pkt.family == 4 and dport == dhcp.SERVER_PORT:
                replies.append(dhcp.reply(cfg, pkt, sport, dport, payload))
            elif pkt.family == 6 and dport == dhcpv6.SERVER_PORT \
                    and packet.is_ipv6_multicast(pkt.dst):
                replies.append(dhcpv6.reply(cfg, pkt, sport, dport, payload,
                                            frames.SERVER_DUID))
        elif pkt.proto == packet.IPPROTO_TCP:
            _check_tcp_header(pkt.l4)
        elif pkt.proto == packet.IPPROTO_ICMPV6 and pkt.family == 6 and len(pkt.l4) \
                and 133 <= pkt.l4[0] <= 137:
            target = ndp.dad_target(pkt)
            assert target is None or len(target) == 16
            replies.append(ndp.reply(cfg, pkt))
        elif pkt.proto in (packet.IPPROTO_ICMP, packet.IPPROTO_ICMPV6):
            echo = icmp.parse_echo_request(pkt)
            assert echo is None or all(0 <= v <= 0xFFFF for v in echo)
    return [r for r in replies if r is not None]


def _check_tcp_header(l4: memoryview) -> None:
    """What the engine reads of a segment it may open a flow for (TcpSockets.guest_packet)."""
    if len(l4) < packet.TCP_HLEN:
        return
    thl = (l4[12] >> 4) * 4
    if thl < packet.TCP_HLEN or thl > len(l4):
        return
    mss, wscale, _sack = tcp_seg.parse_options(l4[packet.TCP_HLEN : thl]).fields()
    assert mss is None or 0 <= mss <= 0xFFFF
    assert wscale is None or 0 <= wscale <= tcp_seg.MAX_WSCALE


def run_frame(data: bytes) -> None:
    if not data:
        return
    cfg = _config(data[0])
    frame = memoryview(data[1:])
    try:
        replies = dispatch(cfg, frame)
    except packet.Malformed:
        return
    for reply in replies:
        oracle.check_frame(reply, cfg.mac)


# -- responders -----------------------------------------------------------------------------


def run_arp(data: bytes) -> None:
    if not data:
        return
    cfg = _config(data[0])
    frame = memoryview(data[1:])
    try:
        reply = arp.reply(cfg, frame)
    except packet.Malformed:
        return
    if reply is None:
        return
    assert cfg.ip4 is not None
    sent = oracle.check_frame(reply, cfg.mac)
    hrd, pro, hln, pln, op = struct.unpack_from("!HHBBH", reply, 14)
    assert (sent.ethertype, hrd, pro, hln, pln, op) == (0x0806, 1, 0x0800, 6, 4, 2)
    sha, spa, tha, tpa = reply[22:28], reply[28:32], reply[32:38], reply[38:42]
    asked = bytes(frame[38:42])
    assert (sha, spa) == (cfg.mac, asked), "the reply does not answer the question"
    assert (tha, tpa) == (bytes(frame[22:28]), bytes(frame[28:32]))
    assert sent.dst_mac == bytes(frame[6:12])
    assert asked != cfg.ip4.address, "answered for the guest's own address (breaks its DAD)"
    assert len(reply) >= 60


def _lenient_dhcp_options(area: bytes) -> dict[int, bytes]:
    """The client's options as a tolerant reader sees them (RFC 3396 concatenation)."""
    found: dict[int, bytes] = {}
    i = 0
    while i < len(area) and area[i] != 255:
        if area[i] == 0:
            i += 1
            continue
        if i + 2 > len(area) or i + 2 + area[i + 1] > len(area):
            break
        found[area[i]] = found.get(area[i], b"") + area[i + 2 : i + 2 + area[i + 1]]
        i += 2 + area[i + 1]
    return found


def run_dhcp(data: bytes) -> None:
    if len(data) < 2:
        return
    cfg, knobs, message = _config(data[0]), data[1], data[2:]
    src = (packet.IP4_ANY, frames.addr(frames.GUEST4))[knobs & 1]
    dst = (packet.IP4_BROADCAST, frames.addr(frames.GW4))[knobs >> 1 & 1]
    sport = (dhcp.CLIENT_PORT, 40000)[knobs >> 2 & 1]
    frame = packet.ip_frame(packet.ETH_BROADCAST, GUEST_MAC, src, dst, packet.IPPROTO_UDP,
                            packet.udp_message(src, dst, sport, dhcp.SERVER_PORT, message))
    try:
        pkt = packet.parse_ip(memoryview(frame))
        _, dport, payload = packet.parse_udp(pkt)
        reply = dhcp.reply(cfg, pkt, sport, dport, payload)
    except packet.Malformed:
        return
    if reply is None:
        return
    assert cfg.ip4 is not None
    sent = oracle.check_frame(reply, cfg.mac)
    assert sent.proto == 17 and struct.unpack_from("!HH", sent.l4) == (67, 68)
    body = sent.l4[8:]
    assert len(body) >= dhcp.BOOTP_MIN_LEN
    assert body[0] == 2 and body[4:8] == message[4:8], "not a reply to this transaction"
    assert body[16:20] == cfg.ip4.address, "yiaddr is not the guest's address"
    assert body[236:240] == dhcp.MAGIC_COOKIE
    options = dict(oracle.dhcp_options(body[240:]))
    assert options.get(53) in (b"\x02", b"\x05"), f"message type {options.get(53)!r}"
    assert options.get(54) == cfg.ip4.gateway and options.get(51) == b"\xff\xff\xff\xff"
    asked = _lenient_dhcp_options(message[240:])
    limit = dhcp.MIN_MAX_MESSAGE
    if len(asked.get(57, b"")) == 2:
        limit = max(limit, int.from_bytes(asked[57], "big"))
    total = 20 + len(sent.l4)
    assert total <= limit, f"a {total}-byte reply to a client that takes {limit}"


def run_dhcpv6(data: bytes) -> None:
    if len(data) < 2:
        return
    cfg, knobs, message = _config(data[0]), data[1], data[2:]
    src = (frames.addr(frames.GUEST_LL), frames.addr(frames.GUEST6), packet.IP6_ANY,
           frames.addr("fe80::1"))[knobs & 3]
    dst = (frames.addr(frames.DHCP6_MCAST), frames.addr("ff05::1:3"),
           frames.addr(frames.GW6), packet.IP6_ALL_NODES)[knobs >> 2 & 3]
    frame = packet.ip_frame(b"\x33\x33\x00\x01\x00\x02", GUEST_MAC, src, dst,
                            packet.IPPROTO_UDP,
                            packet.udp_message(src, dst, dhcpv6.CLIENT_PORT, dhcpv6.SERVER_PORT,
                                               message))
    try:
        pkt = packet.parse_ip(memoryview(frame))
        sport, dport, payload = packet.parse_udp(pkt)
        reply = dhcpv6.reply(cfg, pkt, sport, dport, payload, frames.SERVER_DUID)
    except packet.Malformed:
        return
    if reply is None:
        return
    assert cfg.ip6 is not None and packet.is_ipv6_multicast(dst) and src != packet.IP6_ANY
    sent = oracle.check_frame(reply, cfg.mac)
    assert sent.proto == 17 and struct.unpack_from("!HH", sent.l4) == (547, 546)
    assert sent.src == cfg.ip6.gateway and sent.dst == src
    body = sent.l4[8:]
    assert body[0] in (dhcpv6.ADVERTISE, dhcpv6.REPLY)
    assert body[1:4] == message[1:4], "transaction id not echoed"
    options = oracle.dhcpv6_options(body[4:])
    servers = [v for c, v in options if c == dhcpv6.OPT_SERVERID]
    assert servers == [frames.SERVER_DUID], f"server ids {servers}"
    clients = [v for c, v in options if c == dhcpv6.OPT_CLIENTID]
    assert len(clients) <= 1
    for code, value in options:
        if code == dhcpv6.OPT_IA_NA:
            assert len(value) >= 12
            oracle.dhcpv6_options(value[12:])


def run_ndp(data: bytes) -> None:
    if len(data) < 2:
        return
    cfg, knobs, message = _config(data[0]), data[1], data[2:]
    src = (packet.IP6_ANY, frames.addr(frames.GUEST_LL), frames.addr(frames.GUEST6),
           frames.addr("ff02::1"))[knobs & 3]
    dst = (frames.addr("ff02::2"), frames.addr("ff02::1:ff00:1"), frames.addr(frames.GW6),
           packet.IP6_ALL_NODES)[knobs >> 2 & 3]
    hop = 64 if knobs & 0xF0 == 0xF0 else 255
    frame = bytearray(packet.ip_frame(b"\x33\x33\x00\x00\x00\x02", GUEST_MAC, src, dst,
                                      packet.IPPROTO_ICMPV6, message))
    frame[21] = hop
    try:
        pkt = packet.parse_ip(memoryview(frame))
        target = ndp.dad_target(pkt)
        reply = ndp.reply(cfg, pkt)
    except packet.Malformed:
        return
    if target is not None:
        assert src == packet.IP6_ANY and len(target) == 16
    if reply is None:
        return
    assert cfg.ip6 is not None and hop == 255
    sent = oracle.check_frame(reply, cfg.mac)
    assert sent.proto == 58 and sent.ttl == 255 and sent.src == cfg.ip6.gateway
    kind = sent.l4[0]
    if kind == ndp.ICMP6_NA:
        assert message[0] == ndp.ICMP6_NS and src != packet.IP6_ANY
        assert sent.l4[8:24] == message[8:24], "advertised another target than solicited"
        assert sent.dst == src
        opts = oracle.ndp_options(sent.l4[24:])
        assert (ndp.OPT_TARGET_LL, bytes((2, 1)) + cfg.mac) in opts
    else:
        assert kind == ndp.ICMP6_RA and message[0] == ndp.ICMP6_RS
        assert sent.dst in (src, packet.IP6_ALL_NODES)
        oracle.ndp_options(sent.l4[16:])
        assert 40 + len(sent.l4) <= ndp.IPV6_MIN_MTU, "RA larger than the IPv6 minimum MTU"


# -- the registry ---------------------------------------------------------------------------


# -- runs of in-order segments ----------------------------------------------------------------


def _native_walk() -> tuple[Callable[..., tuple[int, int, int, int]] | None,
                            Callable[..., tcp_run.GuestSegment] | None]:
    try:
        from passtd.engine._tcp_run import gather, segment
    except ImportError:  # not built: the target still checks the Python walk's bounds
        return None, None
    return gather, segment


_NATIVE_GATHER, _NATIVE_SEGMENT = _native_walk()


def _seed_flows() -> dict[FlowKey, Flow]:
    """The flows of the seeds' segments (frames.run_segments), so that lookups find some."""
    keys = [(6, socket.inet_pton(socket.AF_INET, frames.GUEST4), 40004,
             socket.inet_pton(socket.AF_INET, frames.GW4), 5201),
            (6, socket.inet_pton(socket.AF_INET6, frames.GUEST6), 40004,
             socket.inet_pton(socket.AF_INET6, frames.GW6), 5201)]
    return {key: Flow(key, "guest", 0.0) for key in keys}


_SEED_FLOWS = _seed_flows()


def run_tcp_run(data: bytes) -> None:
    if len(data) < 2:
        return
    mem = memoryview(bytearray(data[2:]))
    offsets, pos = [], 0
    while len(mem) - pos >= 4:  # where the frames start, as far as the length words go
        offsets.append(pos + 4)
        pos += 4 + int.from_bytes(mem[pos : pos + 4], "big")
    if not offsets:
        return
    start = data[0] % len(offsets)
    first = offsets[start]
    after = offsets[start + 1] - 4 if start + 1 < len(offsets) else min(pos, len(mem))
    end = max(after, len(mem) - data[1])
    args = (first, after, end, 1000 + 64 * (start + 1), 7000, 502)
    results: list[object] = []
    for walk in (tcp_run.gather_python, _NATIVE_GATHER):
        if walk is None:
            continue
        views: list[memoryview] = []
        try:
            pos_after, count, nbytes, last = walk(mem, *args, views)
        except ValueError as e:
            results.append(str(e))
            continue
        assert after <= pos_after <= end and len(views) == count
        assert sum(map(len, views)) == nbytes and (last == -1) == (count == 0)
        results.append((pos_after, count, nbytes, last, [bytes(v) for v in views]))
    assert len(set(map(repr, results))) == 1, f"the engines disagree: {results}"
    for off in offsets:  # each frame as the loop's fast path parses it
        length = int.from_bytes(mem[off - 4 : off], "big")
        parsed: list[object] = []
        for parse in (tcp_run.segment_python, _NATIVE_SEGMENT):
            if parse is None:
                continue
            try:
                kind, flow, *numbers, data, data_end = parse(mem, off, length, _SEED_FLOWS)
            except ValueError as e:  # a length word beyond the buffer, or below a header
                parsed.append(str(e))
                continue
            if kind == tcp_run.SEG_TCP:
                assert off < data <= data_end <= off + length, "payload outside its frame"
            parsed.append((kind, flow, numbers, data, data_end))
        assert len(set(map(repr, parsed))) == 1, f"the engines disagree: {parsed}"


def _tcp_run_seeds() -> list[bytes]:
    seeds = []
    for v6 in (False, True):
        run = frames.run_segments(v6)
        stream = b"".join(struct.pack("!I", len(f)) + f for f in run)
        seeds += [b"\x00\x00" + stream, b"\x02\x05" + stream]
    return seeds


# -- host->guest frame headers ------------------------------------------------------------------


def _native_frame_writers() -> tuple[Callable[..., int] | None, Callable[..., bytes] | None]:
    try:
        from passtd.engine._tcp_buf import control_frame, write_headers
    except ImportError:  # not built: the target still checks the Python writers' frames
        return None, None
    return write_headers, control_frame


_NATIVE_WRITE_HEADERS, _NATIVE_CONTROL_FRAME = _native_frame_writers()
_FLOW_ADDRS = {4: (frames.addr(frames.GW4), frames.addr(frames.GUEST4)),
               6: (frames.addr(frames.GW6), frames.addr(frames.GUEST6))}


def run_tcp_buf(data: bytes) -> None:
    if len(data) < 18:
        return
    family = 6 if data[0] & 1 else 4
    mss = 1 + int.from_bytes(data[1:3], "big") % 2048
    seq, ack, window, sport, dport = struct.unpack_from("!IIHHH", data, 3)
    payload = data[17:]
    head = 58 if family == 4 else 78
    stride = head + mss
    count = -(-len(payload) // mss)
    area = bytearray(count * stride)
    for i in range(count):
        chunk = payload[i * mss : (i + 1) * mss]
        area[i * stride + head : i * stride + head + len(chunk)] = chunk
    header = tcp_buf.FlowHeader()
    header.update(frames.OUR_MAC, GUEST_MAC, *_FLOW_ADDRS[family], sport, dport)
    args = (head, mss, len(payload), header.frame_start, header.flow, header.addr_sum, seq,
            ack, window)
    results = []
    for write in (tcp_buf.write_headers_python, _NATIVE_WRITE_HEADERS):
        if write is None:
            continue
        written = bytearray(area)
        end = write(memoryview(written), *args)
        results.append((end, bytes(written)))
    assert len(set(results)) == 1, "the engines wrote different bytes"
    end, written = results[0]
    sent = oracle.split_stream(written[:end])
    assert not sent[1] and len(sent[0]) == count, "the frames do not fill the batch"
    for frame in sent[0]:
        oracle.check_frame(frame, frames.OUR_MAC)
    # the same flow's control segment: any flags, the payload's first words as options
    options = payload[: min(len(payload) // 4, 10) * 4]
    control_args = (header.frame_start, header.flow, header.addr_sum, seq, ack, data[0] >> 1,
                    window, options)
    controls = {write(*control_args) for write in (tcp_buf.control_frame_python,
                                                    _NATIVE_CONTROL_FRAME) if write is not None}
    assert len(controls) == 1, "the engines framed the control segment differently"
    (control,) = oracle.split_stream(controls.pop())[0]
    oracle.check_frame(control, frames.OUR_MAC)


def _tcp_buf_seeds() -> list[bytes]:
    numbers = struct.pack("!IIHHH", 0xFFFFFFF0, 7000, 502, 15201, 40000)
    return [b"\x00\x05\xb4" + numbers + bytes(range(256)) * 12,
            b"\x01\x00\x07" + numbers + b"odd length",
            b"\x00\x00\x00" + numbers + b"x"]


def _prefixed(prefix: bytes, items: list[bytes]) -> list[bytes]:
    return [prefix + item for item in items]


def _configs_times(items: list[bytes], knobs: bytes = b"") -> list[bytes]:
    return [bytes((c,)) + knobs + item for c in range(len(CONFIGS)) for item in items]


def _framing_seeds() -> list[bytes]:
    frames_ = frames.all_guest_frames()
    stream = b"".join(struct.pack("!I", len(f)) + f for f in frames_)
    return [b"\x01\x00" + stream, b"\x01\x07" + stream[:-3], b"\x00\x05" + bytes(40),
            b"\x00\x09\xff\xff\x00\x10\xc0\x03\x00\x00", b"\x01\x00\x00\x00\x00\x0d" + bytes(13)]


DHCP_TOKENS = (dhcp.MAGIC_COOKIE, b"\x35\x01\x01", b"\x35\x01\x03", b"\x37\x03\x01\x03\x06",
               b"\x39\x02\x05\xdc", b"\x39\x02\xff\xff", b"\x50\x00", b"\xff", b"\x00")
DHCPV6_TOKENS = (b"\x00\x01\x00\x0a\x00\x03\x00\x01", b"\x00\x02\x00\x0a" + frames.SERVER_DUID,
                 b"\x00\x03\x00\x28", b"\x00\x05\x00\x18" + frames.addr(frames.GUEST6),
                 b"\x00\x27\x00\x01\x01", b"\x00\x19\x00\x0c")
NDP_TOKENS = (b"\x01\x01" + GUEST_MAC, b"\x01\x00", b"\x05\x01\x00\x00\x00\x00\x05\xdc",
              bytes((135, 0)), bytes((133, 0)))
FRAME_TOKENS = (b"\x08\x00\x45\x00", b"\x86\xdd\x60\x00\x00\x00", b"\x08\x06\x00\x01",
                b"\x02\x04\x05\xb4", b"\x03\x03\x0e", b"\x00\x43", b"\x02\x23", b"\x3a\xff")

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("framing", run_framing, _framing_seeds, max_len=1 << 16,
               doc="qemu's stream framing: FrameReader over reads of random sizes"),
        Target("frame", run_frame, lambda: _configs_times(frames.all_guest_frames()),
               max_len=2048, dictionary=FRAME_TOKENS,
               doc="one frame of any ethertype through the slow-path dispatch"),
        Target("arp", run_arp, lambda: _configs_times(frames.arp_frames()), max_len=128,
               doc="the ARP responder"),
        Target("dhcp", run_dhcp,
               lambda: _configs_times([bytes(m) for m in frames.dhcp_messages()], b"\x00"),
               max_len=1500, dictionary=DHCP_TOKENS, doc="the DHCP server: BOOTP + options"),
        Target("dhcpv6", run_dhcpv6,
               lambda: _configs_times([bytes(m) for m in frames.dhcpv6_messages()], b"\x00"),
               max_len=1500, dictionary=DHCPV6_TOKENS, doc="the DHCPv6 server and its options"),
        Target("ndp", run_ndp, lambda: [
            bytes((c, knob)) + frame[54:]
            for c in range(len(CONFIGS))
            for knob, frame in zip(frames.NDP_SOURCE_KNOBS, frames.ndp_frames(), strict=True)
        ], max_len=512, dictionary=NDP_TOKENS, doc="NDP: NS/RS in, NA/RA out, options"),
        Target("tcp_run", run_tcp_run, _tcp_run_seeds, max_len=4096,
               doc="tcp_run.gather, C against Python: runs of in-order segments, mangled"),
        Target("tcp_buf", run_tcp_buf, _tcp_buf_seeds, max_len=4096,
               doc="tcp_buf's frame writers, C against Python: frames for the guest"),
        TCP_TARGET,
    )
}
