"""The whole Engine on a real event loop, fed by a fuzzed guest over a real socketpair.

Network safety: frames make the engine open host sockets towards the addresses they name.
This module refuses to run outside a network namespace of its own (`require_lab`): run.py
builds a passtd.tools.lab.HostNamespace (lo, and eth0 towards a dead end that forwards nothing)
and runs the target inside it. Every address here is a documentation address or loopback
of that namespace.

Each input is a fresh Engine (NetConfig of the lab: 198.51.100.2/24 via 198.51.100.1,
2001:db8::2/64 via fe80::1, the gateway mapped to loopback, 203.0.113.254 and 2001:db8::fe
mapped to the host's address, DNS to the gateway redirected to loopback; TCP forward
10022->22, UDP 10023->23; a flow cap of 6 or 64; MTU and socket buffer variants) with a
socketpair as its qemu connection, and a little program of ops:

  raw        a frame from the input, framed correctly
  template   a scapy-built valid frame (frames.py) with bytes overwritten
  garbage    unframed bytes into the stream (framing errors drop the client: we reconnect)
  tcp-open   a guest SYN, with options, to our servers (through the gateway or the host's
             address), a closed port, the redirected resolver, a dead end, an unreachable
             or link-local neighbour, the guest itself or a multicast group
  tcp-send   a segment on a guest connection: flags, sequence/ack near or far from what
             each side has seen, window, payload; the SYN-ACK for connections a host opened
  host-*     the host's peers, on loopback and on eth0's addresses: connect through the
             forward, write, shut down, close with RST, stop or start reading (zero
             windows), UDP datagrams both ways (and the guest's answer to the last one)
  clock      the loop's clock jumps ahead (timers: RTO, keepalive, idle, UDP/ICMP expiry)
  batch      the next frames go out in one write (the fast path's batches)
  split      from now on the stream goes out in pieces of fuzzed sizes
  pause      qemu stops (or resumes) reading: the engine's output backs up
  disconnect qemu goes away until the guest sends again; reconnect: away and back at once

The loop runs until it has nothing left to do after each op. Checked throughout (any
failure raises): no exception reached the loop's exception handler and the engine logged
no internal error; every frame sent to the guest passes oracle.check_frame; host data
reaches the guest with the bytes the host wrote at the sequence numbers they belong to;
guest data reaches the host socket in order and unchanged; the engine never acknowledges
guest bytes the guest did not send; the flow table, timer heap and reader/writer sets are
consistent and no socket leaks. At the end a well-formed ARP request and DHCP DISCOVER
must still get their answers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from passtd.engine import packet, tcp
from passtd.engine.addrs import Ip4Config, Ip6Config, NetConfig
from passtd.engine.fwd import ForwardRule
from passtd.engine.loop import Engine
from passtd.engine.mainloop import MainLoop
from passtd.engine.settings import EngineSettings
from tests.support.engine_harness import EngineHarness as InProcessEngine

from . import frames, oracle
from .driver import Target
from .isolation import require_lab
from .tcp_target import Program

M32 = 0xFFFFFFFF
LISTEN_PORT = 18080  # TCP servers (on loopback and eth0's addresses) the guest reaches
CLOSED_PORT = 18099
ECHO_PORT = 18081  # UDP echo, likewise
FWD_TCP, FWD_UDP = 10022, 10023
GUEST_MAC = frames.GUEST_MAC_BYTES
OUR_MAC = frames.OUR_MAC
G4, GW4 = frames.addr("198.51.100.2"), frames.addr("198.51.100.1")
G6, GW6 = frames.addr("2001:db8::2"), frames.addr("fe80::1")
MAP4, MAP6 = frames.addr("203.0.113.254"), frames.addr("2001:db8::fe")  # -> the host's address
# where guest TCP goes: (family, destination, port)
TCP_DESTINATIONS = (
    (4, GW4, LISTEN_PORT), (6, GW6, LISTEN_PORT), (4, GW4, CLOSED_PORT),
    (6, frames.addr("2001:db8::1"), 80),  # the dead end itself: it resets
    (4, frames.addr("203.0.113.7"), 80),  # beyond the dead end: never answers
    (4, frames.addr("198.51.100.77"), 80),  # on-link, nobody there: unreachable
    (4, MAP4, LISTEN_PORT), (6, MAP6, LISTEN_PORT),  # the host's own address, our servers
    (4, GW4, 53),  # redirected to the host's resolver on 127.0.0.1: nothing listens
    (4, G4, 80),  # the guest's address, the host's too: nothing listens there
    (6, frames.addr("ff02::1"), 80),  # multicast: refused
    (6, frames.addr("fe80::99"), 80),  # link-local: scoped to eth0, nobody there
)
FINAL_ARP = frames.addr("198.51.100.123")  # asked at the end of every input: must be answered
FINAL_XID = 0xFEEDFACE
TIME_STEPS = (0.05, 1.0, 3.0, 11.0, 31.0, 61.0, 130.0, 7201.0)
PATTERN_G = bytes((i * 13 + 5) & 0xFF for i in range(256))  # guest -> host byte at offset i
PATTERN_H = bytes((i * 7 + 3) & 0xFF for i in range(256))  # host -> guest


def pattern(table: bytes, offset: int, length: int) -> bytes:
    start = offset % 256
    return (table * ((start + length) // 256 + 1))[start : start + length]


# -- wire helpers (our own builders, independent of passtd.engine.packet) -------------------


def ip_frame(family: int, src: bytes, dst: bytes, proto: int, l4: bytes, hop: int = 64,
             dst_mac: bytes = OUR_MAC) -> bytes:
    if family == 4:
        hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, hop,
                                    proto, 0, src, dst))
        hdr[10:12] = struct.pack("!H", oracle.rfc1071(hdr))
        return struct.pack("!6s6sH", dst_mac, GUEST_MAC, 0x0800) + bytes(hdr) + l4
    hdr = struct.pack("!IHBB16s16s", 0x60000000, len(l4), proto, hop, src, dst)
    return struct.pack("!6s6sH", dst_mac, GUEST_MAC, 0x86DD) + hdr + l4


def _l4_checksum(family: int, src: bytes, dst: bytes, proto: int, l4: bytearray, at: int) -> None:
    if family == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, proto, len(l4))
    else:
        pseudo = src + dst + struct.pack("!IxxxB", len(l4), proto)
    l4[at : at + 2] = struct.pack("!H", oracle.rfc1071(pseudo + bytes(l4)))


def tcp_frame(family: int, src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
              flags: int, window: int, options: bytes = b"", payload: bytes = b"") -> bytes:
    options += bytes(-len(options) % 4)
    seg = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & M32, ack & M32,
                                (20 + len(options)) // 4 << 4, flags, window, 0, 0))
    seg += options + payload
    _l4_checksum(family, src, dst, 6, seg, 16)
    return ip_frame(family, src, dst, 6, bytes(seg))


def udp_frame(family: int, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes,
              dst_mac: bytes = OUR_MAC) -> bytes:
    seg = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)) + payload
    _l4_checksum(family, src, dst, 17, seg, 6)
    return ip_frame(family, src, dst, 17, bytes(seg), dst_mac=dst_mac)


def arp_request(target: bytes) -> bytes:
    return (b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + GUEST_MAC + G4 + bytes(6) + target)


def dhcp_discover(xid: int) -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4),
                        bytes(4), bytes(4), bytes(4), GUEST_MAC + bytes(10), b"", b"")
    message = bootp + b"\x63\x82\x53\x63" + b"\x35\x01\x01\x37\x03\x01\x03\x06\xff"
    return udp_frame(4, bytes(4), b"\xff" * 4, 68, 67, message, dst_mac=b"\xff" * 6)


# -- the guest's and the host's side of connections -------------------------------------------


@dataclass
class GuestConn:
    """A TCP connection as the guest sees it."""

    family: int
    guest: bytes
    gport: int
    peer: bytes
    pport: int
    origin: str  # "guest" (we sent the SYN) or "host" (a forward: the engine sent it)
    isn: int = 0
    snd_nxt: int = 0
    sent_hi: int = 0  # highest sequence number the guest has sent, +1
    peer_isn: int | None = None
    rcv_nxt: int = 0
    window: int = 65535
    answered: bool = False  # our SYN-ACK went out (host-opened connections)
    reopening: bool = False  # the guest sent a SYN again: a new flow (new ISN) may answer
    tainted: bool = False  # a raw frame hit this 4-tuple: its numbers are not ours alone

    @property
    def key(self) -> tuple[bytes, int, bytes, int]:
        return (self.guest, self.gport, self.peer, self.pport)


@dataclass
class HostConn:
    """A loopback peer socket: accepted by our server, or connected through the forward."""

    sock: socket.socket
    kind: str
    received: int = 0
    sent: int = 0
    write_shut: bool = False


@dataclass
class Run:
    """What one input did: the state the checks need."""

    engine: Engine
    qemu: socket.socket  # our end of the qemu connection
    rx: bytearray = field(default_factory=bytearray)
    aligned: bool = True  # no garbage went into the stream since the last (re)connect
    split: list[int] = field(default_factory=list)
    conns: dict[tuple[bytes, int, bytes, int], GuestConn] = field(default_factory=dict)
    hosts: list[HostConn] = field(default_factory=list)
    host_rx_trusted: bool = True
    drain: bool = True
    guest_reading: bool = True  # off: qemu stops reading, the engine's output backs up
    batch: list[bytes] = field(default_factory=list)  # frames to go out in one write
    batch_left: int = 0
    last_udp: tuple[int, bytes, int, bytes, int] | None = None  # a datagram to answer
    answers: dict[tuple[str, bytes], int] = field(default_factory=dict)
    next_port: int = 41000


class EngineHarness:
    """One loop, loopback servers and a logger trap shared by all inputs."""

    def __init__(self) -> None:
        require_lab()
        self.skew = 0.0  # the loop's clock runs this far ahead of time.monotonic
        self.loop = MainLoop(clock=lambda: time.monotonic() + self.skew)
        self.errors: list[str] = []
        self.loop.set_exception_handler(self._loop_exception)
        trap = _ErrorTrap(self.errors)
        logging.getLogger("passtd").addHandler(trap)
        logging.getLogger("passtd").setLevel(logging.WARNING)
        self.servers: list[socket.socket] = []
        self.echo: list[socket.socket] = []
        for af, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            # on every address of the lab namespace: loopback, and eth0's (map_guest_addr)
            srv = socket.socket(af, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            udp = socket.socket(af, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # small receive buffers (accepted sockets inherit them): when we stop reading,
            # the engine's socket fills soon and it must close its window to the guest
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            if af == socket.AF_INET6:
                for sock in (srv, udp):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            srv.bind((host, LISTEN_PORT))
            srv.listen(128)
            self.servers.append(srv)
            udp.bind((host, ECHO_PORT))
            self.echo.append(udp)
        self.templates = frames.all_guest_frames()
        self.baseline_fds = -1

    def _loop_exception(self, loop: MainLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.errors.append(f"loop exception handler: {context.get('message')}: {exc!r}")

    # -- one input ---------------------------------------------------------------------------

    def run(self, data: bytes) -> None:
        prog = Program(data)
        self.errors.clear()
        run = self._start(prog.u8())
        try:
            steps = 0
            while not prog.done and steps < 64:
                op = OPS[prog.u8() % len(OPS)]
                op(self, run, prog)
                self.pump(run)
                self.check(run)
                steps += 1
            self.final_check(run)
        finally:
            self._stop(run)
        fds = len(os.listdir("/proc/self/fd"))
        if self.baseline_fds < 0:
            self.baseline_fds = fds
        assert fds <= self.baseline_fds + 2, f"{fds - self.baseline_fds} file descriptors leak"

    def _start(self, knobs: int) -> Run:
        net = NetConfig(
            mtu=(65520, 1500)[knobs & 1],
            ip4=Ip4Config(G4, 24, GW4, dns=(GW4,), map_host_loopback=GW4, map_guest_addr=MAP4),
            ip6=Ip6Config(G6, 64, GW6, dns=(GW6,), map_host_loopback=GW6, map_guest_addr=MAP6),
            search=("example.com",), hostname="guest", host_ifname="eth0",
        )
        settings = EngineSettings(
            net=net,
            tcp_forwards=[ForwardRule("tcp", None, None, FWD_TCP, FWD_TCP, 22)],
            udp_forwards=[ForwardRule("udp", None, None, FWD_UDP, FWD_UDP, 23)],
            max_flows=(64, 6)[knobs >> 1 & 1],
            tcp_sndbuf=(0, 4096)[knobs >> 2 & 1],  # small: zero windows come quickly
            host_addr4=G4, host_addr6=G6,
            dns_redirect={GW4: "127.0.0.1", GW6: "::1"},
        )
        self.harness = InProcessEngine(settings, loop=self.loop)
        self.harness.engine.start(None)
        run = Run(self.harness.engine, self.harness.qemu)
        self.pump(run)
        return run

    def _stop(self, run: Run) -> None:
        self.harness.close()
        for host in run.hosts:
            host.sock.close()
        for srv in self.servers:  # connections the engine made and we never accepted
            with contextlib.suppress(BlockingIOError):
                while True:
                    srv.accept()[0].close()
        self.pump_loop(2)

    # -- moving things along -----------------------------------------------------------------

    def pump_loop(self, rounds: int = 3) -> None:
        for _ in range(rounds):
            self.loop.poller.select(0)

    def pump(self, run: Run, rounds: int = 12) -> None:
        """Run the loop and both peers until nothing moves any more."""
        for _ in range(rounds):
            self.pump_loop(1)
            moved = self._guest_read(run)
            moved |= self._host_side(run)
            if not moved:
                self.pump_loop(2)
                if not (self._guest_read(run) or self._host_side(run)):
                    return

    def send(self, run: Run, stream: bytes) -> None:
        """Write bytes into the qemu connection (in pieces when `split` says so)."""
        pieces = []
        if run.split:
            pos = 0
            for size in run.split * (len(stream) // max(1, sum(run.split)) + 1):
                if pos >= len(stream):
                    break
                pieces.append(stream[pos : pos + size])
                pos += size
            if pos < len(stream):
                pieces.append(stream[pos:])
        else:
            pieces = [stream]
        for piece in pieces:
            view = memoryview(piece)
            for _ in range(1000):
                if not view or not run.engine.guest_connected:
                    break
                try:
                    n = run.qemu.send(view)
                except BlockingIOError:
                    n = 0
                except OSError:  # the engine dropped us (framing error)
                    break
                view = view[n:]
                self.pump_loop(1)
                self._guest_read(run)
            self.pump_loop(1)
            self._guest_read(run)

    def frame(self, run: Run, frame: bytes) -> None:
        if len(frame) < 14:
            frame += bytes(14 - len(frame))
        framed = struct.pack("!I", len(frame[:65535])) + frame[:65535]
        if run.batch_left:  # several frames in one read: the fast path's batches
            run.batch.append(framed)
            run.batch_left -= 1
            if run.batch_left:
                return
            framed = b"".join(run.batch)
            run.batch.clear()
        if not run.engine.guest_connected:
            reconnect(self, run, None)  # qemu is back
        self.send(run, framed)

    def _guest_read(self, run: Run) -> bool:
        moved = False
        while run.guest_reading:
            try:
                chunk = run.qemu.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                break
            run.rx += chunk
            moved = True
        if moved:
            got, rest = oracle.split_stream(bytes(run.rx))
            run.rx = bytearray(rest)
            for raw in got:
                self._guest_frame(run, oracle.check_frame(raw, OUR_MAC))
        return moved

    def _guest_frame(self, run: Run, sent: oracle.SentFrame) -> None:
        if sent.ethertype == 0x0806:
            if struct.unpack_from("!H", sent.raw, 20)[0] == 2:  # a reply, for its sender IP
                answer = ("arp", sent.raw[28:32])
                run.answers[answer] = run.answers.get(answer, 0) + 1
            return
        if sent.proto == 17 and struct.unpack_from("!H", sent.l4, 0)[0] == 67 \
                and len(sent.l4) > 8 + 240:  # a DHCP reply, for its transaction id
            answer = ("dhcp", sent.l4[8 + 4 : 8 + 8])
            run.answers[answer] = run.answers.get(answer, 0) + 1
        if sent.proto == 17:
            sport, dport = struct.unpack_from("!HH", sent.l4)
            run.last_udp = (sent.family, sent.dst, dport, sent.src, sport)
        if sent.proto == 6:
            self._guest_tcp(run, sent)

    def _guest_tcp(self, run: Run, sent: oracle.SentFrame) -> None:
        l4 = sent.l4
        sport, dport, seq, ack, doff, flags = struct.unpack_from("!HHIIBB", l4)
        payload = l4[(doff >> 4) * 4 :]
        key = (sent.dst, dport, sent.src, sport)
        conn = run.conns.get(key)
        if conn is None:
            if flags & packet.TCP_SYN and not flags & packet.TCP_ACK:  # a forwarded connection
                conn = GuestConn(sent.family, sent.dst, dport, sent.src, sport, "host",
                                 peer_isn=seq, rcv_nxt=(seq + 1) & M32)
                run.conns[key] = conn
            return
        if conn.tainted:
            return
        if flags & packet.TCP_SYN:
            if conn.peer_isn is None:
                conn.peer_isn, conn.rcv_nxt = seq, (seq + 1) & M32
            elif seq != conn.peer_isn:
                if not conn.reopening:
                    raise oracle.BadOutput(f"SYN with ISN {seq}, earlier {conn.peer_isn}")
                conn.peer_isn, conn.rcv_nxt = seq, (seq + 1) & M32  # a new flow
                conn.reopening = False
            return
        if flags & packet.TCP_ACK and not flags & packet.TCP_RST \
                and (conn.origin == "guest" or conn.answered) \
                and tcp.seq_diff(ack, conn.sent_hi) > 0:
            raise oracle.BadOutput(
                f"the engine acknowledges {tcp.seq_diff(ack, conn.sent_hi)} guest bytes "
                f"beyond what the guest sent")
        if conn.peer_isn is None or flags & packet.TCP_RST:
            return
        offset = tcp.seq_diff(seq, conn.peer_isn + 1)
        if payload:
            if offset < 0 or bytes(payload) != pattern(PATTERN_H, offset, len(payload)):
                raise oracle.BadOutput(
                    f"host data corrupted: {len(payload)} bytes at stream offset {offset}")
            end = (seq + len(payload)) & M32
            if tcp.seq_diff(seq, conn.rcv_nxt) <= 0 < tcp.seq_diff(end, conn.rcv_nxt):
                conn.rcv_nxt = end
        if flags & packet.TCP_FIN and (seq + len(payload)) & M32 == conn.rcv_nxt:
            conn.rcv_nxt = (conn.rcv_nxt + 1) & M32

    def _host_side(self, run: Run) -> bool:
        moved = False
        for srv in self.servers:
            while True:
                try:
                    sock, _ = srv.accept()
                except BlockingIOError:
                    break
                sock.setblocking(False)
                run.hosts.append(HostConn(sock, "accepted"))
                moved = True
        if run.drain:
            for host in run.hosts:
                moved |= self._host_read(run, host)
        for udp in self.echo:
            for _ in range(64):
                try:
                    data, peer = udp.recvfrom(65535)
                except BlockingIOError:
                    break
                with contextlib.suppress(OSError):
                    udp.sendto(data, peer)
                moved = True
        return moved

    def _host_read(self, run: Run, host: HostConn) -> bool:
        moved = False
        while True:
            try:
                data = host.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if not data:
                break
            if run.host_rx_trusted and data != pattern(PATTERN_G, host.received, len(data)):
                raise oracle.BadOutput(f"guest data corrupted: {len(data)} bytes at offset "
                                       f"{host.received} of a host socket")
            host.received += len(data)
            moved = True
        return moved

    # -- checks ------------------------------------------------------------------------------

    def check(self, run: Run) -> None:
        assert not self.errors, "\n".join(self.errors)
        problems = run.engine.problems() + self.loop.poller.problems()
        assert not problems, "\n".join(problems)

    def final_check(self, run: Run) -> None:
        engine = run.engine
        run.guest_reading = True
        run.batch_left = 0
        if run.batch:
            self.send(run, b"".join(run.batch))
            run.batch.clear()
        if not engine.guest_connected or not run.aligned:
            reconnect(self, run, None)
        self.pump(run)
        run.answers.clear()  # the program itself may have asked the same
        self.frame(run, arp_request(FINAL_ARP))
        self.frame(run, dhcp_discover(FINAL_XID))
        self.pump(run)
        self.check(run)
        assert run.answers.get(("arp", FINAL_ARP)) == 1, \
            "a well-formed ARP request got no reply (or several)"
        assert run.answers.get(("dhcp", FINAL_XID.to_bytes(4, "big"))) == 1, \
            "a well-formed DHCP DISCOVER got no offer (or several)"


class _ErrorTrap(logging.Handler):
    """Engine log records at ERROR and above (log.exception: an internal error)."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + "".join(logging.Formatter().formatException(record.exc_info))
        self.errors.append(f"engine logged {record.levelname}: {text}")


# -- ops --------------------------------------------------------------------------------------


def op_raw(h: EngineHarness, run: Run, prog: Program) -> None:
    length = prog.u16() % 1600
    raw = bytes(prog.u8() for _ in range(length))
    _taint(run, raw)
    h.frame(run, raw)


def op_template(h: EngineHarness, run: Run, prog: Program) -> None:
    frame = bytearray(h.templates[prog.u8() % len(h.templates)])
    for _ in range(prog.u8() % 6):
        frame[prog.u16() % len(frame)] = prog.u8()
    _taint(run, bytes(frame))
    h.frame(run, bytes(frame))


def _taint(run: Run, frame: bytes) -> None:
    """A raw frame that is TCP on one of our 4-tuples makes that connection's (and the host
    side's) numbers and bytes no longer the model's alone."""
    if len(frame) < 14:
        return
    ethertype = frame[12] << 8 | frame[13]
    if ethertype == 0x0800 and len(frame) >= 34 and frame[23] == 6:
        src, dst, l4 = frame[26:30], frame[30:34], frame[14 + (frame[14] & 15) * 4 :]
    elif ethertype == 0x86DD and len(frame) >= 54:
        src, dst, l4 = frame[22:38], frame[38:54], frame[54:]
    else:
        return
    run.host_rx_trusted = False
    if len(l4) >= 4:
        sport, dport = struct.unpack_from("!HH", l4)
        conn = run.conns.get((src, sport, dst, dport))
        if conn is not None:
            conn.tainted = True


def op_garbage(h: EngineHarness, run: Run, prog: Program) -> None:
    raw = bytes(prog.u8() for _ in range(prog.u8() % 64))
    run.aligned = False
    run.host_rx_trusted = False  # misaligned frames may land on any flow
    for conn in run.conns.values():
        conn.tainted = True
    h.send(run, raw)
    if not run.engine.guest_connected:
        reconnect(h, run, prog)


def op_tcp_open(h: EngineHarness, run: Run, prog: Program) -> None:
    family, dst, port = TCP_DESTINATIONS[prog.u8() % len(TCP_DESTINATIONS)]
    src = G4 if family == 4 else G6
    isn = prog.u32()
    run.next_port += 1
    conn = GuestConn(family, src, run.next_port, dst, port, "guest", isn=isn,
                     snd_nxt=(isn + 1) & M32, sent_hi=(isn + 1) & M32,
                     window=prog.u16() | 1)
    run.conns[conn.key] = conn
    which = prog.u8()
    options = b""
    if which & 1:
        options += struct.pack("!BBH", 2, 4, prog.u16())
    if which & 2:
        options += bytes((1, 3, 3, prog.u8()))
    if which & 4:
        options += bytes((4, 2, 8, 10)) + bytes(8)  # SACK permitted, timestamps
    h.frame(run, tcp_frame(family, src, dst, conn.gport, port, isn, 0, packet.TCP_SYN,
                           conn.window, options))


def op_tcp_send(h: EngineHarness, run: Run, prog: Program) -> None:
    if not run.conns:
        return
    conns = list(run.conns.values())
    conn = conns[prog.u8() % len(conns)]
    head = prog.u8()
    if conn.origin == "host" and not conn.answered and conn.peer_isn is not None:
        conn.isn = prog.u32()
        conn.snd_nxt = conn.sent_hi = (conn.isn + 1) & M32
        conn.answered = True
        h.frame(run, tcp_frame(conn.family, conn.guest, conn.peer, conn.gport, conn.pport,
                               conn.isn, conn.rcv_nxt, packet.TCP_SYN | packet.TCP_ACK, conn.window,
                               struct.pack("!BBHBBBB", 2, 4, 1460, 1, 3, 3, 7)))
        return
    if head & 7 == 7:
        flags = prog.u8() & 0x3F
    else:
        ack_only, fin, push = packet.TCP_ACK, packet.TCP_ACK | packet.TCP_FIN, \
            packet.TCP_ACK | packet.TCP_PSH
        flags = (ack_only, push, fin, packet.TCP_RST, ack_only, push, packet.TCP_SYN)[head & 7]
    seq = conn.snd_nxt
    if head & 0x08:
        seq += prog.s8() * (1 if head & 0x10 else 1000)
    ack = conn.rcv_nxt
    if head & 0x20:
        ack += prog.s8()
    if head & 0x40:
        conn.window = prog.u16()
    plen = 0 if flags & (packet.TCP_RST | packet.TCP_SYN) else (0, 1, 100, 1460, 4000, 8960)[
        prog.u8() % 6]
    offset = tcp.seq_diff(seq, conn.isn + 1)
    payload = pattern(PATTERN_G, offset, plen) if offset >= 0 else bytes(plen)
    if offset < 0 and plen:
        conn.tainted = True  # bytes before the stream's start: nothing to compare with
        run.host_rx_trusted = False
    if flags & (packet.TCP_SYN | packet.TCP_ACK) == packet.TCP_SYN:
        # if the flow is gone, this opens a new one: new numbers, a new host socket
        conn.reopening = True
        run.host_rx_trusted = False
    end = (seq + plen + (1 if flags & (packet.TCP_SYN | packet.TCP_FIN) else 0)) & M32
    if not flags & packet.TCP_RST and tcp.seq_diff(end, conn.sent_hi) > 0:
        conn.sent_hi = end
    if seq == conn.snd_nxt and not flags & packet.TCP_RST:
        conn.snd_nxt = end
    h.frame(run, tcp_frame(conn.family, conn.guest, conn.peer, conn.gport, conn.pport,
                           seq, ack, flags, conn.window, payload=payload))


HOST_PEERS = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"),
              (socket.AF_INET, "198.51.100.2"), (socket.AF_INET6, "2001:db8::2"))  # eth0's


def op_host_connect(h: EngineHarness, run: Run, prog: Program) -> None:
    af, addr = HOST_PEERS[prog.u8() % len(HOST_PEERS)]
    sock = socket.socket(af, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    rc = sock.connect_ex((addr, FWD_TCP))
    assert rc in (0, errno.EINPROGRESS, errno.ECONNREFUSED), os.strerror(rc)
    run.hosts.append(HostConn(sock, "forward"))


def op_host_write(h: EngineHarness, run: Run, prog: Program) -> None:
    if not run.hosts:
        return
    host = run.hosts[prog.u8() % len(run.hosts)]
    size = (1, 100, 1460, 20000, 300000)[prog.u8() % 5]
    if host.write_shut:
        return
    with contextlib.suppress(OSError):
        host.sent += host.sock.send(pattern(PATTERN_H, host.sent, size))


def op_host_close(h: EngineHarness, run: Run, prog: Program) -> None:
    if not run.hosts:
        return
    index = prog.u8()
    host = run.hosts[index % len(run.hosts)]
    how = prog.u8() % 3
    if how == 0:
        with contextlib.suppress(OSError):
            host.sock.shutdown(socket.SHUT_WR)
        host.write_shut = True
        return
    if how == 2:
        host.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    host.sock.close()
    run.hosts.remove(host)


def op_host_drain(h: EngineHarness, run: Run, prog: Program) -> None:
    run.drain = not run.drain


def op_udp(h: EngineHarness, run: Run, prog: Program) -> None:
    which = prog.u8()
    payload = pattern(PATTERN_G, 0, (0, 1, 512, 1400, 8000)[prog.u8() % 5])
    if which & 1:  # a host peer through the UDP forward
        af, addr = HOST_PEERS[which >> 1 & 3]
        with socket.socket(af, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.sendto(payload, (addr, FWD_UDP))
        return
    if which & 0x80 and run.last_udp is not None:  # the guest answers the last datagram
        family, guest, gport, peer, pport = run.last_udp
        h.frame(run, udp_frame(family, guest, peer, gport, pport, payload))
        return
    family = 4 if which & 2 else 6
    src, dst = (G4, GW4) if family == 4 else (G6, GW6)
    port = (ECHO_PORT, 53, 9)[(which >> 2) % 3]
    h.frame(run, udp_frame(family, src, dst, 40000 + (which >> 4), port, payload))


def op_clock(h: EngineHarness, run: Run, prog: Program) -> None:
    h.skew += TIME_STEPS[prog.u8() % len(TIME_STEPS)]
    h.pump_loop(2)


def op_batch(h: EngineHarness, run: Run, prog: Program) -> None:
    run.batch_left = 2 + prog.u8() % 15


def op_guest_pause(h: EngineHarness, run: Run, prog: Program) -> None:
    run.guest_reading = not run.guest_reading


def op_disconnect(h: EngineHarness, run: Run, prog: Program) -> None:
    """qemu goes away and stays away until the guest sends again (forwards are refused)."""
    _hang_up(h, run)


def _hang_up(h: EngineHarness, run: Run) -> None:
    engine = run.engine
    if not engine.guest_connected:
        return
    run.qemu.close()
    h.pump(run)
    assert not engine.guest_connected, "qemu hung up and the engine kept the client"


def op_split(h: EngineHarness, run: Run, prog: Program) -> None:
    run.split = [1 + prog.u8() * (1 + prog.u8() % 3) for _ in range(1 + prog.u8() % 4)]


def reconnect(h: EngineHarness, run: Run, prog: Program | None) -> None:
    """qemu reconnects (after a hang-up, or a framing error that dropped it)."""
    engine = run.engine
    _hang_up(h, run)  # the engine sees EOF and drops the client
    run.qemu.close()
    run.qemu = h.harness.reconnect()
    run.rx.clear()
    run.aligned = True
    h.pump(run)
    assert engine.guest_connected


def op_reconnect(h: EngineHarness, run: Run, prog: Program) -> None:
    reconnect(h, run, prog)


OPS = (op_raw, op_template, op_template, op_template, op_garbage, op_tcp_open, op_tcp_open,
       op_tcp_send, op_tcp_send, op_tcp_send, op_tcp_send, op_host_connect, op_host_write,
       op_host_write, op_host_close, op_host_drain, op_udp, op_clock, op_clock, op_split,
       op_reconnect, op_batch, op_guest_pause, op_disconnect)
_OP_INDEX = {op: i for i, op in enumerate(OPS)}


def _op(op: Any, *args: int) -> bytes:
    return bytes((_OP_INDEX[op], *args))


def _seeds() -> list[bytes]:
    """Programs: every template; a guest connection with data both ways and FINs; a
    forwarded connection; retransmissions and idle timeouts; UDP; split streams."""
    n_templates = len(frames.all_guest_frames())
    every_template = b"".join(_op(op_template, i, 0) for i in range(n_templates))
    isn = (0x10, 0, 0, 0)
    open_gw4 = _op(op_tcp_open, 0, *isn, 0xFF, 0xFF, 3, 0x05, 0xB4, 7)
    open_gw6 = _op(op_tcp_open, 1, *isn, 0xFF, 0xFF, 1, 0x05, 0xA0)
    send = _op(op_tcp_send, 0, 1, 3)  # conn 0: ACK+PSH, 1460 bytes
    ack = _op(op_tcp_send, 0, 0, 0)
    fin = _op(op_tcp_send, 0, 2, 0)
    write = _op(op_host_write, 0, 2)
    return [
        bytes((0,)) + every_template,
        bytes((1,)) + open_gw4 + ack + send + write + ack + send + fin
        + _op(op_host_close, 0, 0) + ack + _op(op_clock, 1),
        bytes((2,)) + open_gw6 + ack + write + _op(op_clock, 2) + _op(op_clock, 3) + ack
        + _op(op_host_close, 0, 2),
        bytes((4,)) + _op(op_host_connect, 0) + _op(op_tcp_send, 0, 0, *isn)
        + _op(op_tcp_send, 0, 0, 0) + _op(op_host_write, 0, 3) + _op(op_host_drain)
        + _op(op_tcp_send, 0, 1, 5) * 3 + _op(op_clock, 7) * 3,
        bytes((0,)) + _op(op_split, 7, 0, 2) + open_gw4 + ack + send * 3
        + _op(op_udp, 2, 2) + _op(op_udp, 1, 3) + _op(op_udp, 0, 1),
        bytes((2,)) + _op(op_tcp_open, 2, *isn, 1, 0, 0) + _op(op_tcp_open, 4, *isn, 1, 0, 0)
        + _op(op_tcp_open, 3, *isn, 1, 0, 0) + _op(op_clock, 3) * 2 + _op(op_reconnect)
        + _op(op_garbage, 6, 0, 0, 0, 3, 1, 2),
        # several segments of one flow, and of two, in one read
        bytes((0,)) + open_gw4 + open_gw6 + ack + _op(op_tcp_send, 1, 0, 0)
        + _op(op_batch, 4) + send * 3 + _op(op_tcp_send, 1, 1, 3) * 3 + write,
        # qemu stops reading while the host sends; qemu goes away; a forward meanwhile
        bytes((1,)) + open_gw4 + ack + _op(op_guest_pause) + _op(op_host_write, 0, 4) * 4
        + ack + _op(op_disconnect) + _op(op_host_connect, 0) + _op(op_clock, 1) + ack,
        # UDP through the forward from eth0's address, answered by the guest; the host's own
        # address through map_guest_addr; DNS redirected to nothing
        bytes((0,)) + _op(op_udp, 5, 2) + _op(op_udp, 0x80, 1) + _op(op_tcp_open, 6, *isn, 1, 0, 0)
        + _op(op_tcp_send, 0, 0, 0) + _op(op_tcp_open, 8, *isn, 1, 0, 0)
        + _op(op_tcp_open, 9, *isn, 1, 0, 0) + _op(op_tcp_open, 11, *isn, 1, 0, 0),
    ]


_HARNESS: EngineHarness | None = None


def run_engine(data: bytes) -> None:
    global _HARNESS
    if _HARNESS is None:
        _HARNESS = EngineHarness()
    _HARNESS.run(data)


ENGINE_TARGET = Target("engine", run_engine, _seeds, max_len=4096,
                       doc="the whole Engine on an event loop (lab namespace only)")
