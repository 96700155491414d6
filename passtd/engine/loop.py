"""The event loop: the only place in the engine with sockets, readiness and timers.

Design: everything runs on one asyncio loop (the D-Bus API shares it). Data sockets are
raw non-blocking sockets registered with `loop.add_reader/add_writer` (epoll underneath);
asyncio transports are not used on the data path because they cannot scatter a read into
frame slots or gather a batch into one sendmsg. Protocol decisions come from the sans-IO
cores (tcp.py, udp.py, icmp.py, arp.py, dhcp.py, ndp.py, dhcpv6.py); this module turns
their answers into syscalls.

Guest frames are processed a whole read at a time: TCP segments that belong to the same
flow and follow each other are gathered and written to the host socket with one sendmsg,
and the ACKs and window updates they cause are sent once per flow at the end of the batch
(`_settle`). Host data for the guest is read per flow straight into preallocated frame
slots (tcp_buf.py) and leaves in one send.

Timers: flows keep a `deadline`; a heap holds (deadline, flow) entries and one asyncio
timer handle waits for the earliest. Entries are lazy: a flow whose deadline moved later
is re-queued when its old entry comes up, so the hot path never touches the heap just
because an ACK pushed a retransmission timeout out. With no flows and no guest the heap is
empty and the process sleeps: no periodic wakeups.

Failure policy: a malformed frame is dropped with a rate-limited debug line; a framing
error drops the qemu client; a socket error ends that one flow with the right signal to
the guest (RST, ICMP error). No exception from guest input escapes a callback.

Not done here: vhost-user, splicing between host sockets (pasta's fast path), migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import heapq
import itertools
import logging
import math
import mmap
import os
import random
import socket
import struct
import termios
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import arp, dhcp, dhcpv6, icmp, ndp, packet, tcp
from .addrs import GuestSeen, NetConfig
from .flow import GUEST, HOST, Flow, FlowTable, addr_text
from .fwd import ForwardRule, format_rule
from .pcap import PcapWriter
from .tap import FrameReader, FramingError, TapOutput
from .tcp import TcpConn
from .tcp_buf import TcpFrameBatch
from .udp import SourcePortRule, UdpFlow

log = logging.getLogger("passtd.engine")

SO_PEEK_OFF = 42
SO_MEMINFO = 55
_MEMINFO = struct.Struct("9I")
SK_MEMINFO_SNDBUF = 3
SK_MEMINFO_WMEM_QUEUED = 5
TAP_BUFFER = 4 << 20  # qemu socket buffers (passt asks for INT_MAX/2; wmem_max caps it)
LISTEN_BACKLOG = 1024
UDP_BATCH = 64  # datagrams read from one socket per wakeup
UDP_BUFFER = 4 << 20  # a burst of replies must not overflow a flow's receive queue
TCP_READ_ROUNDS = 4  # batches read from one TCP socket per wakeup before yielding
STALE_TIMERS_MAX = 4096  # stale timer-heap entries tolerated before a rebuild
ACK_DELAY = 0.0005  # how long a small ACK waits for host data to carry it
HANDOVER_TIMEOUT = 1.0  # seconds to finish a frame half sent to qemu when stopping
BUFFER_TRIM_DELAY = 10.0  # seconds without traffic before frame buffers are given back
TRIM_WORTHY = 256 << 10  # a read this size dirties enough buffer pages to give back later
ACCEPT_PAUSE = 0.5  # seconds a listener rests after accept() ran out of descriptors
TAP_SLACK = 64 << 10  # skb overhead the qemu socket's buffer accounting adds to our bytes
TAP_SEND_OVERHEAD = 2048  # what one sendmsg may add to that accounting beyond its bytes
DNS_PORTS = (53, 853)  # DNS and DNS over TLS: what a DNS redirection applies to, as in passt
_OUTQ = struct.Struct("i")
_OUTQ_ARG = bytes(_OUTQ.size)

# Ethernet + IPv4 (no options) + TCP, and Ethernet + IPv6 + TCP, read in one unpack
_FAST4 = struct.Struct("!BBHHHBBH4s4sHHIIBBH")
_FAST6 = struct.Struct("!IHBB16s16sHHIIBBH")


class ForwardError(Exception):
    """A forward cannot be opened or changed; `kind` names the D-Bus error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "InvalidArgument" | "AddressInUse" | "AccessDenied" | "NotFound"


@dataclass
class EngineSettings:
    net: NetConfig
    tcp_forwards: Sequence[ForwardRule] = ()
    udp_forwards: Sequence[ForwardRule] = ()
    pcap: str | None = None
    pcap_size: int = 256 << 20  # bytes; the capture stops there
    dhcp: bool = True
    ndp: bool = True
    dhcpv6: bool = True
    ra: bool = True
    udp_timeout: float = 30.0
    udp_stream_timeout: float = 120.0
    icmp_timeout: float = 60.0
    tcp_idle_timeout: float = 7200.0
    max_flows: int = 65536
    max_listeners: int = 65536
    tcp_sndbuf: int = 0  # 0: leave the kernel's autotuning alone
    # guest UDP source ports kept on the host: which ones, and for how many flows at once
    udp_port_rule: SourcePortRule = field(default_factory=SourcePortRule)
    udp_preserved_ports: int = 64
    # the host's own addresses (targets for map_guest_addr), and DNS redirections: guest
    # DNS (DNS_PORTS) to a key goes to the resolver named by its value (addrs.guest_dns)
    host_addr4: bytes | None = None
    host_addr6: bytes | None = None
    dns_redirect: dict[bytes, str] = field(default_factory=dict)


@dataclass
class Forward:
    """One forward rule with its listening sockets and counters."""

    id: int
    rule: ForwardRule
    origin: str  # "config" | "runtime"
    listeners: list[socket.socket] = field(default_factory=list)
    connections: int = 0
    bytes_closed: int = 0  # bytes of flows through it that have ended


class _RateLimited:
    """At most `burst` log lines per `period` seconds per category, then a summary."""

    def __init__(self, burst: int = 10, period: float = 10.0) -> None:
        self.burst = burst
        self.period = period
        self._state: dict[str, list[float | int]] = {}

    def __call__(self, level: int, category: str, msg: str, *args: Any) -> None:
        if not log.isEnabledFor(level):
            return
        now = time.monotonic()
        state = self._state.setdefault(category, [now, 0, 0])
        if now - state[0] > self.period:
            if state[2]:
                log.log(level, "%s: %d more suppressed", category, state[2])
            state[:] = [now, 0, 0]
        if state[1] < self.burst:
            state[1] += 1
            log.log(level, msg, *args)
        else:
            state[2] += 1


def _sockaddr_bytes(addr: str) -> tuple[int, bytes]:
    """(family, packed address) of a socket address string; IPv4-mapped IPv6 counts as 4."""
    if ":" in addr:
        packed = socket.inet_pton(socket.AF_INET6, addr.split("%")[0])
        if packed[:12] == b"\0" * 10 + b"\xff\xff":
            return 4, packed[12:]
        return 6, packed
    return 4, socket.inet_pton(socket.AF_INET, addr)


class Engine:
    """One instance's translator: a qemu client, flows, forwards and timers."""

    def __init__(self, settings: EngineSettings, loop: asyncio.AbstractEventLoop | None = None,
                 on_change: Callable[[set[str]], None] | None = None) -> None:
        self.settings = settings
        self.cfg: NetConfig = settings.net
        self.loop = loop or asyncio.get_event_loop()
        self.on_change = on_change  # property names that changed (D-Bus PropertiesChanged)
        self.on_client: Callable[[socket.socket | None], None] | None = None
        # asked before a qemu connection is adopted: None to accept it, else why not (the
        # service sets it from `qemu_cgroup`, passtd/qemu_peer.py); unset: anyone who may
        # open the socket is the guest's qemu
        self.accept_peer: Callable[[socket.socket], str | None] | None = None
        self.seen = GuestSeen()
        self.flows = FlowTable(settings.max_flows)
        self.forwards: dict[int, Forward] = {}
        self._next_forward_id = 1
        self._listener_count = 0
        self._udp_ports_held = 0  # guest UDP flows whose host socket has the guest's port
        self.listener: socket.socket | None = None
        self.client: socket.socket | None = None
        self.reader = FrameReader()
        self.out = TapOutput()
        self.pcap = PcapWriter.open(settings.pcap, settings.pcap_size) if settings.pcap \
            else None
        self._batches = {4: TcpFrameBatch(4), 6: TcpFrameBatch(6)}
        # acknowledged host data is dropped with MSG_TRUNC into this; the kernel never
        # writes it for TCP, so its pages stay unmapped
        self._discard = memoryview(mmap.mmap(-1, 16 << 20))
        self._peek_off = self._probe_peek_off()
        self._rcvlowat_max = _tcp_rcvlowat_max()
        self._isn_secret = os.urandom(16)
        self._hold_budget = tcp.HoldBudget()  # out-of-order guest data, all flows together
        self._timers: list[list] = []  # heap of [deadline, seq, flow or None when stale]
        self._stale_timers = 0  # heap entries whose flow closed or moved to an earlier one
        self._timer_seq = itertools.count()
        self._timer_handle: asyncio.TimerHandle | None = None
        self._timer_when = math.inf
        self._ack_due: dict[TcpConn, None] = {}
        self._resume: dict[TcpConn, None] = {}
        self._tap_waiters: dict[TcpConn, None] = {}  # flows waiting for room towards qemu
        self._tap_watching = False  # add_writer on the qemu socket is on
        self._tap_sndbuf = 0
        self._tap_room_floor = 0  # the last TIOCOUTQ reading's room, less what we sent since
        self._discard_due: dict[TcpConn, None] = {}
        self._acks_delayed: dict[TcpConn, None] = {}
        self._ack_timer: asyncio.TimerHandle | None = None
        self._reading: set[int] = set()  # fds registered with add_reader for host data
        self._writing: set[int] = set()
        self._ra_handle: asyncio.TimerHandle | None = None
        self._buffers_used_at = 0.0  # when the big I/O buffers last held data
        self._trim_handle: asyncio.TimerHandle | None = None
        self._rng = random.Random()
        self._dhcpv6_duid = dhcpv6.server_duid(self.cfg.mac)
        self._tap_side_addresses = {packet.IP4_ANY, packet.IP6_ANY}
        for net in (self.cfg.ip4, self.cfg.ip6):
            if net is not None:
                self._tap_side_addresses |= {a for a in (net.gateway, net.map_host_loopback,
                                                         net.map_guest_addr) if a}
        self.drop_log = _RateLimited()
        # a guest settles on its MAC and addresses within a few frames of booting; one that
        # keeps changing them must not get a log line per frame
        self.learn_log = _RateLimited(burst=5, period=60.0)
        self.closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    @staticmethod
    def _probe_peek_off() -> bool:
        """SO_PEEK_OFF on TCP needs Linux 6.9; older kernels re-peek sent data instead."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
            except OSError:
                log.info("kernel lacks SO_PEEK_OFF for TCP: host data is peeked again "
                         "from the last acknowledged byte (one extra copy)")
                return False
        return True

    def start(self, listener: socket.socket | None) -> None:
        """Open the configured forwards and start accepting qemu on `listener`.

        Raises ForwardError when a configured forward cannot be opened: an instance that
        silently lacks a forward it was told to have is worse than one that fails to start.
        """
        for rule in self.settings.tcp_forwards:
            self._add_forward(rule, "config")
        for rule in self.settings.udp_forwards:
            self._add_forward(rule, "config")
        if listener is not None:
            self.listener = listener
            listener.setblocking(False)
            self.loop.add_reader(listener.fileno(), self._tap_accept)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer_handle:
            self._timer_handle.cancel()
        for handle in (self._ra_handle, self._trim_handle, self._ack_timer):
            if handle is not None:
                handle.cancel()
        for flow in list(self.flows):
            self._close_flow(flow, rst_peer=False)
        for fwd in list(self.forwards.values()):
            self._close_listeners(fwd)
        if self.client is not None:
            self.loop.remove_reader(self.client.fileno())
            self.loop.remove_writer(self.client.fileno())
            self._finish_output(self.client)
            self.client = None  # the service keeps (or closes) the socket itself
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
        if self.pcap:
            self.pcap.close()

    def _finish_output(self, sock: socket.socket) -> None:
        """Send what qemu has part of, so that its reader is between two frames.

        The connection may outlive this process (systemd's FD store hands it to the next
        one): the rest of a half-sent frame must not be lost, or qemu's stream reader
        would take the next process's bytes for a length.
        """
        if not self.out.backlog:
            return
        try:
            sock.settimeout(HANDOVER_TIMEOUT)
            sock.sendall(self.out.backlog)
        except OSError as e:
            log.warning("qemu's connection may be left inside a frame: %s", e)
        finally:
            self.out.drop_all()
            with contextlib.suppress(OSError):
                sock.setblocking(False)

    def partial_input(self) -> bytes:
        """The start of a frame qemu has not finished writing (for the next process)."""
        return bytes(self.reader.buf[self.reader.start : self.reader.end])

    def _changed(self, *names: str) -> None:
        if self.on_change is not None:
            self.on_change(set(names))

    # -- the qemu side ----------------------------------------------------------------------

    def _tap_accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("accept on the qemu socket failed: %s", e)
            return
        if self.client is not None:
            log.warning("refusing a second qemu client (pid %s): one guest per instance",
                        _peer_pid(sock))
            sock.close()
            return
        refusal = self.accept_peer(sock) if self.accept_peer is not None else None
        if refusal is not None:
            self.drop_log(logging.WARNING, "refused qemu connections",
                          "refusing a connection on the qemu socket: %s; still waiting for "
                          "the guest's qemu", refusal)
            sock.close()
            return
        self.adopt_client(sock)

    def adopt_client(self, sock: socket.socket, partial: bytes = b"") -> None:
        """Serve the guest behind `sock` (freshly accepted, or kept across a restart).

        `partial`: the start of a frame the previous process had read (`partial_input`).
        """
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, TAP_BUFFER)
        self.client = sock
        self._tap_sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self._tap_room_floor = 0
        self._tap_watching = False
        self.reader.reset()
        if partial:
            self.reader.space()[: len(partial)] = partial
            self.reader.commit(len(partial))
        self.out.drop_all()
        self.loop.add_reader(sock.fileno(), self._tap_readable)
        log.info("guest connected (qemu pid %s)", _peer_pid(sock))
        if self.on_client:
            self.on_client(sock)
        self._changed("GuestConnected")
        if self.cfg.ip6 and self.settings.ndp and self.settings.ra:
            self._schedule_ra(1.0)
        self._resume_tap_waiters()

    def _client_gone(self, why: str) -> None:
        sock = self.client
        if sock is None:
            return
        log.info("guest disconnected: %s; waiting for the next qemu connection "
                 "(%d flows and %d forwards kept)", why, len(self.flows), len(self.forwards))
        self.loop.remove_reader(sock.fileno())
        self.loop.remove_writer(sock.fileno())
        self._tap_watching = False
        sock.close()
        self.client = None
        self.reader.reset()
        self.out.drop_all()
        if self._ra_handle:
            self._ra_handle.cancel()
            self._ra_handle = None
        if self.on_client:
            self.on_client(None)
        self._changed("GuestConnected")

    def _tap_readable(self) -> None:
        sock = self.client
        if sock is None:
            return
        try:
            n = sock.recv_into(self.reader.space())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._client_gone(str(e))
            return
        if n == 0:
            self._client_gone("qemu closed the connection")
            return
        self.reader.commit(n)
        now = self.loop.time()
        if n > TRIM_WORTHY:
            self._buffers_used(now)
        try:
            self._process_frames(now)
        except FramingError as e:
            log.warning("dropping qemu client: %s", e)
            self._client_gone("bad framing")
        self._settle(now)

    def _tap_writable(self) -> None:
        """qemu drained its socket: send the backlog, wake the flows that waited."""
        self._tap_watch(False)
        self._tap_flush()
        if not self.out.congested:
            self._resume_tap_waiters()
        self._settle(self.loop.time())

    def _tap_watch(self, on: bool) -> None:
        if on != self._tap_watching and self.client is not None:
            if on:
                self.loop.add_writer(self.client.fileno(), self._tap_writable)
            else:
                self.loop.remove_writer(self.client.fileno())
            self._tap_watching = on

    def _tap_room(self, need: int) -> int:
        """Bytes the qemu socket takes right now without a short write (and a copy), or
        at least `need` of them.

        qemu only ever drains the socket, so the room measured last, less what was sent
        since, is a floor: while it covers `need` the ioctl is skipped (one syscall fewer
        per request/response round trip).
        """
        if self._tap_room_floor >= need:
            return self._tap_room_floor
        assert self.client is not None
        queued = _OUTQ.unpack(fcntl.ioctl(self.client.fileno(), termios.TIOCOUTQ, _OUTQ_ARG))[0]
        self._tap_room_floor = self._tap_sndbuf - queued - TAP_SLACK
        return self._tap_room_floor

    def _tap_flush(self) -> None:
        out = self.out
        sock = self.client
        if sock is None:
            out.drop_all()
            return
        while out.pending():
            batch = out.take()
            try:
                n = sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._client_gone(str(e))
                return
            self._tap_room_floor -= n + TAP_SEND_OVERHEAD
            if not out.sent(batch, n):
                self._tap_watch(True)
                break

    def _send(self, frame: bytes) -> None:
        """Queue one frame for the guest (flushed at the end of the current callback)."""
        if self.client is None:
            return
        if self.pcap:
            self.pcap.write(frame, self.loop.time())
        self.out.frame(frame)

    @property
    def _guest_mac(self) -> bytes:
        return self.seen.mac or packet.ETH_BROADCAST

    def _settle(self, now: float) -> None:
        """End of a callback: ACKs due, flows that may send again, then flush to qemu.

        Flushing can end a congestion and so wake flows that waited for qemu: loop until
        nothing is left to do.
        """
        while True:
            discards, self._discard_due = self._discard_due, {}
            for conn in discards:
                if conn.sock is not None:
                    self._tcp_discard(conn)
            acks, self._ack_due = self._ack_due, {}
            for conn in acks:
                if conn.sock is not None:
                    self._tcp_send_ack(conn)
            resume, self._resume = self._resume, {}
            for conn in resume:
                if conn.sock is not None:
                    self._tcp_host_readable(conn, now)
            if self.out.pending():
                self._tap_flush()
            if not (self._ack_due or self._resume or self._discard_due):
                break
        if self.pcap:
            self.pcap.flush()
            if not self.pcap.active:  # it stopped (full disk, size limit): forget it
                self.pcap = None

    # -- guest frames ---------------------------------------------------------------------------

    def _process_frames(self, now: float) -> None:
        reader = self.reader
        buf = reader.buf
        mem = reader.mem
        by_key = self.flows._by_key
        pcap = self.pcap
        fast4 = _FAST4.unpack_from
        fast6 = _FAST6.unpack_from
        group: TcpConn | None = None
        views: list[memoryview] = []
        last_src_mac_at = -1
        for off, length in reader.frames():
            if pcap:
                pcap.write(mem[off : off + length], now)
            last_src_mac_at = off
            ethertype = buf[off + 12] << 8 | buf[off + 13]
            if ethertype == packet.ETH_P_IP and buf[off + 14] == 0x45 and buf[off + 23] == 6 \
                    and length >= 54:
                (_vihl, _tos, total, _ident, frag, _ttl, _proto, _csum, src, dst,
                 sport, dport, seq, ack, doff, flags, window) = fast4(buf, off + 14)
                thl = (doff >> 4) << 2
                if frag & 0x3FFF or total + 14 > length or thl < 20 or thl + 20 > total:
                    self.drop_log(logging.DEBUG, "bad-tcp4", "dropped malformed IPv4/TCP frame")
                    continue
                data = off + 34 + thl
                end = off + 14 + total
            elif ethertype == packet.ETH_P_IPV6 and buf[off + 20] == 6 and length >= 74:
                (vtcfl, plen, _nh, _hop, src, dst,
                 sport, dport, seq, ack, doff, flags, window) = fast6(buf, off + 14)
                thl = (doff >> 4) << 2
                if vtcfl >> 28 != 6 or plen + 54 > length or thl < 20 or thl > plen:
                    self.drop_log(logging.DEBUG, "bad-tcp6", "dropped malformed IPv6/TCP frame")
                    continue
                data = off + 54 + thl
                end = off + 54 + plen
            else:
                if group is not None:
                    self._tcp_guest_flush(group, views, now)
                    group, views = None, []
                self._slow_frame(mem[off : off + length], now)
                continue
            conn = by_key.get((6, src, sport, dst, dport))
            if conn is None or flags & tcp.TCP_SYN:
                if group is not None:
                    self._tcp_guest_flush(group, views, now)
                    group, views = None, []
                self._tcp_unmatched(mem[off : off + length], conn, now)
                continue
            if conn is not group:
                if group is not None:
                    self._tcp_guest_flush(group, views, now)
                    views = []
                group = conn  # type: ignore[assignment]
            actions = conn.on_segment(flags, seq, ack, window, end - data, now)  # type: ignore[union-attr]
            if conn.data_take:  # type: ignore[union-attr]
                start = data + conn.data_skip  # type: ignore[union-attr]
                views.append(mem[start : start + conn.data_take])  # type: ignore[union-attr]
            if actions:
                if actions & tcp.A_HOLD:
                    conn.hold(seq, bytes(mem[data:end]))  # type: ignore[union-attr]
                if actions & tcp.A_DUPACK and views:
                    # what came before the gap first, so the duplicates carry its ACK
                    self._tcp_guest_flush(conn, views, now)  # type: ignore[arg-type]
                    views = []
                self._tcp_actions(conn, actions, now)  # type: ignore[arg-type]
        if group is not None:
            self._tcp_guest_flush(group, views, now)
        if last_src_mac_at >= 0:
            self._learn_mac(bytes(buf[last_src_mac_at + 6 : last_src_mac_at + 12]))

    def _learn_mac(self, mac: bytes) -> None:
        if mac != self.seen.mac and not mac[0] & 1:  # never learn a multicast source
            self.seen.mac = mac
            self.learn_log(logging.INFO, "guest MAC", "guest MAC %s", mac.hex(":"))
            self._changed("GuestMac")

    def _learn_addr(self, family: int, addr: bytes) -> None:
        seen = self.seen
        if family == 4:
            if addr == packet.IP4_ANY or addr == seen.addr4:
                return
            seen.addr4 = addr
        elif packet.is_ipv6_link_local(addr):
            if addr == seen.addr6_ll:
                return
            seen.addr6_ll = addr
        else:
            if addr == packet.IP6_ANY or addr == seen.addr6:
                return
            seen.addr6 = addr
        self.learn_log(logging.INFO, "guest address", "guest uses address %s", addr_text(addr))
        self._changed("GuestAddresses")

    def _slow_frame(self, frame: memoryview, now: float) -> None:
        try:
            _dst_mac, src_mac, ethertype = packet.parse_eth(frame)
            self._learn_mac(src_mac)
            if ethertype == packet.ETH_P_ARP:
                if self.cfg.ip4 is not None:
                    reply = arp.reply(self.cfg, frame)
                    if reply:
                        self._send(reply)
                return
            if ethertype in (packet.ETH_P_IP, packet.ETH_P_IPV6):
                self._ip_packet(packet.parse_ip(frame), now)
                return
            self.drop_log(logging.DEBUG, "ethertype", "dropped frame with ethertype 0x%04x",
                          ethertype)
        except packet.Malformed as e:
            self.drop_log(logging.DEBUG, "malformed", "dropped malformed guest frame: %s", e)
        except Exception:  # a bug must cost one frame, never the instance
            log.exception("internal error on a guest frame (dropped)")

    def _acceptable(self, pkt: packet.Packet) -> bool:
        """Whether a guest packet may enter at all (see `_may_open` for the stricter rule
        on packets that open or use flows).

        Its family must be enabled, and it must not pretend to come from somewhere it
        cannot: a loopback, multicast or broadcast source, or a loopback destination; nor
        may IPv6 carry IPv4-mapped addresses (a host socket would take ::ffff:127.0.0.1 for
        IPv4 loopback, whatever map_host_loopback says).
        """
        if pkt.family == 4:
            if self.cfg.ip4 is None:
                return False
            bad = packet.is_ipv4_loopback(pkt.src) or packet.is_ipv4_loopback(pkt.dst) \
                or packet.is_ipv4_multicast_or_broadcast(pkt.src)
        else:
            if self.cfg.ip6 is None:
                return False
            bad = packet.is_ipv6_loopback(pkt.src) or packet.is_ipv6_loopback(pkt.dst) \
                or packet.is_ipv6_multicast(pkt.src) or packet.is_ipv6_v4_mapped(pkt.src) \
                or packet.is_ipv6_v4_mapped(pkt.dst)
        if bad:
            self.drop_log(logging.DEBUG, "martian", "dropped IPv%d %s -> %s", pkt.family,
                          addr_text(pkt.src), addr_text(pkt.dst))
        return not bad

    def _may_open(self, pkt: packet.Packet) -> bool:
        """Whether a packet may use or open a flow (TCP, UDP other than DHCP, ICMP echo);
        if it may, its source is an address the guest uses (`_learn_addr`).

        The unspecified source (only DHCP and DAD use it) and the addresses that are ours
        on the tap side (the gateway, the mapped host addresses) are refused as sources:
        flows are keyed by the guest's source, and a guest posing as the gateway would
        collide with the host peers that the guest sees as the gateway.
        """
        if pkt.src in self._tap_side_addresses:
            self.drop_log(logging.DEBUG, "spoofed", "dropped IPv%d from %s: not the guest's",
                          pkt.family, addr_text(pkt.src))
            return False
        self._learn_addr(pkt.family, pkt.src)
        return True

    def _ip_packet(self, pkt: packet.Packet, now: float) -> None:
        if not self._acceptable(pkt):
            return
        family = pkt.family
        proto = pkt.proto
        if proto == packet.IPPROTO_UDP:
            sport, dport, payload = packet.parse_udp(pkt)
            if family == 4 and dport == 67:
                if self.settings.dhcp:
                    reply = dhcp.reply(self.cfg, pkt, sport, dport, payload)
                    if reply:
                        self._send(reply)
                return
            if family == 6 and dport == 547 and packet.is_ipv6_multicast(pkt.dst):
                if self.settings.dhcpv6:
                    reply = dhcpv6.reply(self.cfg, pkt, sport, dport, payload, self._dhcpv6_duid)
                    if reply:
                        self._send(reply)
                return
            if self._may_open(pkt):
                self._udp_from_guest(pkt, sport, dport, payload, now)
        elif proto == packet.IPPROTO_TCP:
            if self._may_open(pkt):
                self._tcp_unmatched(None, None, now, pkt)
        elif proto == packet.IPPROTO_ICMP and family == 4:
            if self._may_open(pkt):
                self._ping_from_guest(pkt, now)
        elif proto == packet.IPPROTO_ICMPV6 and family == 6:
            if len(pkt.l4) and 133 <= pkt.l4[0] <= 137:
                target = ndp.dad_target(pkt)
                if target is not None:
                    self._learn_addr(6, target)
                if self.settings.ndp:
                    reply = ndp.reply(self.cfg, pkt)
                    if reply:
                        self._send(reply)
                return
            if self._may_open(pkt):
                self._ping_from_guest(pkt, now)
        else:
            self.drop_log(logging.DEBUG, "proto", "dropped IP protocol %d", proto)

    # -- address mapping ------------------------------------------------------------------------

    def _outbound_target(self, family: int, dst: bytes, dport: int) -> tuple | None:
        """The host socket address for a flow the guest opens towards `dst`, or None.

        The address the guest was given (the host's own, by default) is a destination
        like any other in both families, as in passt: a guest that uses it never sends
        there, and one that does not (IPv6 by SLAAC alone, a static IPv4 address) reaches
        the host at it, as a machine on the host's LAN would. Refusing it would wall the
        guest off nothing: the host's other addresses, and host loopback through the
        gateway, stay reachable.
        """
        if family == 4:
            net4 = self.cfg.ip4
            assert net4 is not None
            if dport in DNS_PORTS and dst in self.settings.dns_redirect:
                return (self.settings.dns_redirect[dst], dport)
            if net4.map_host_loopback is not None and dst == net4.map_host_loopback:
                return ("127.0.0.1", dport)
            if net4.map_guest_addr is not None and dst == net4.map_guest_addr:
                target = self.settings.host_addr4 or net4.address
                return (addr_text(target), dport)
            if dst[0] == 0 or packet.is_ipv4_multicast_or_broadcast(dst):
                return None  # 0.0.0.0/8 would be this host
            return (addr_text(dst), dport)
        net6 = self.cfg.ip6
        assert net6 is not None
        if dport in DNS_PORTS and dst in self.settings.dns_redirect:
            # the resolver may be the gateway's link-local address: scoped below
            dst = socket.inet_pton(socket.AF_INET6, self.settings.dns_redirect[dst])
        elif net6.map_host_loopback is not None and dst == net6.map_host_loopback:
            return ("::1", dport, 0, 0)
        elif net6.map_guest_addr is not None and dst == net6.map_guest_addr:
            target = self.settings.host_addr6 or net6.address
            return (addr_text(target), dport, 0, 0) if target else None
        elif dst == packet.IP6_ANY or packet.is_ipv6_multicast(dst):
            return None
        if packet.is_ipv6_link_local(dst):
            if not self.cfg.host_ifname:
                return None
            try:
                scope = socket.if_nametoindex(self.cfg.host_ifname)
            except OSError:
                return None
            return (addr_text(dst), dport, 0, scope)
        return (addr_text(dst), dport, 0, 0)

    def _inbound_peer(self, family: int, addr: bytes) -> bytes:
        """How the guest sees a host peer: loopback and the host's own address appear as
        the gateway (the guest would otherwise see its own address talking to it)."""
        if family == 4:
            net, host_addr = self.cfg.ip4, self.settings.host_addr4
            loopback = packet.is_ipv4_loopback(addr) or addr == packet.IP4_ANY
        else:
            net, host_addr = self.cfg.ip6, self.settings.host_addr6
            loopback = packet.is_ipv6_loopback(addr) or addr == packet.IP6_ANY
        assert net is not None
        if loopback:
            return net.map_host_loopback or net.gateway
        if addr in (net.address, host_addr):
            return net.map_guest_addr or net.gateway
        return addr

    def _guest_target(self, family: int, peer: bytes, rule: ForwardRule) -> bytes | None:
        """The guest address a host-initiated flow goes to: the rule's target address if it
        has one, else the address the guest was seen using (or was given)."""
        if rule.to_address is not None:
            to_family, to_addr = _sockaddr_bytes(rule.to_address)
            return to_addr if to_family == family else None
        if family == 4:
            if self.cfg.ip4 is None:
                return None
            return self.seen.addr4 or self.cfg.ip4.address
        if self.cfg.ip6 is None:
            return None
        if packet.is_ipv6_link_local(peer):
            return self.seen.addr6_ll
        return self.seen.addr6 or self.cfg.ip6.address or self.seen.addr6_ll

    def _isn(self, key: tuple, now: float) -> int:
        """RFC 6528: a keyed hash of the connection plus a 4-microsecond clock."""
        return (hash((self._isn_secret, key)) + int(now * 250_000)) & 0xFFFFFFFF

    def _our_mss(self, family: int) -> int:
        mtu = self.cfg.mtu or 65520
        return min(mtu, 65535 - 14) - (40 if family == 4 else 60)

    # -- TCP ------------------------------------------------------------------------------------

    def _tcp_unmatched(self, frame: memoryview | None, conn: TcpConn | None, now: float,
                       pkt: packet.Packet | None = None) -> None:
        """A segment that the bulk path does not take: a SYN, a new flow, or no flow."""
        try:
            if pkt is None:
                assert frame is not None
                pkt = packet.parse_ip(frame)
                if not (self._acceptable(pkt) and self._may_open(pkt)):
                    return
            l4 = pkt.l4
            if len(l4) < packet.TCP_HLEN:
                raise packet.Malformed("truncated TCP header")
            sport, dport, seq, ack, doff, flags, window, _csum, _urg = packet.TCP.unpack_from(l4)
            thl = (doff >> 4) << 2
            if thl < packet.TCP_HLEN or thl > len(l4):
                raise packet.Malformed(f"TCP header length {thl}")
            key = (packet.IPPROTO_TCP, pkt.src, sport, pkt.dst, dport)
            if conn is None:
                conn = self.flows.get(key)  # type: ignore[assignment]
            plen = len(l4) - thl
            opts = tcp.parse_options(l4[packet.TCP_HLEN : thl]) if flags & tcp.TCP_SYN \
                else tcp.SynOptions(None, None, False)
            if conn is None:
                if flags & tcp.TCP_RST:
                    return
                if flags & (tcp.TCP_SYN | tcp.TCP_ACK) == tcp.TCP_SYN:
                    self._tcp_guest_syn(pkt, key, seq, window, opts, now)
                else:
                    self._tcp_rst_unknown(pkt, sport, dport, seq, ack, flags, plen)
                return
            actions = conn.on_segment(flags, seq, ack, window, plen, now, *opts)
            if actions & tcp.A_HOLD:
                conn.hold(seq, bytes(l4[thl:]))
            written = 0
            if conn.data_take:
                start = thl + conn.data_skip
                written = self._tcp_write(conn, [l4[start : start + conn.data_take]])
                if written < 0:
                    return
            if actions:
                self._tcp_actions(conn, actions, now)
            if conn.sock is not None:
                self._tcp_commit(conn, written, now)
        except packet.Malformed as e:
            self.drop_log(logging.DEBUG, "malformed-tcp", "dropped malformed TCP segment: %s", e)

    def _tcp_rst_unknown(self, pkt: packet.Packet, sport: int, dport: int, seq: int, ack: int,
                         flags: int, plen: int) -> None:
        """RFC 9293 3.10.7.1: a segment for no connection gets a RST (never one for a RST)."""
        if flags & tcp.TCP_ACK:
            rst_seq, rst_ack, rst_flags = ack, 0, tcp.TCP_RST
        else:
            seg_len = plen + (1 if flags & tcp.TCP_SYN else 0) + (1 if flags & tcp.TCP_FIN else 0)
            rst_seq, rst_ack, rst_flags = 0, seq + seg_len, tcp.TCP_RST | tcp.TCP_ACK
        seg = packet.tcp_segment(pkt.dst, pkt.src, dport, sport, rst_seq, rst_ack, rst_flags, 0)
        self._send(packet.ip_frame(pkt.src_mac, self.cfg.mac, pkt.dst, pkt.src,
                                   packet.IPPROTO_TCP, seg))

    def _tcp_guest_syn(self, pkt: packet.Packet, key: tuple, seq: int, window: int,
                       opts: tcp.SynOptions, now: float) -> None:
        def refuse(why: str) -> None:
            log.debug("refusing guest TCP to %s:%d: %s", addr_text(pkt.dst), key[4], why)
            seg = packet.tcp_segment(pkt.dst, pkt.src, key[4], key[2], 0, seq + 1,
                                     tcp.TCP_RST | tcp.TCP_ACK, 0)
            self._send(packet.ip_frame(pkt.src_mac, self.cfg.mac, pkt.dst, pkt.src,
                                       packet.IPPROTO_TCP, seg))

        if self.flows.full:
            self.drop_log(logging.WARNING, "flow-limit",
                          "flow limit (%d) reached: refusing new connections", self.flows.max_flows)
            refuse("flow limit")
            return
        target = self._outbound_target(pkt.family, pkt.dst, key[4])
        if target is None:
            refuse("no route for that destination")
            return
        af = socket.AF_INET if len(target) == 2 else socket.AF_INET6
        try:
            sock = socket.socket(af, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:  # EMFILE, ENFILE, ENOBUFS: the guest sees a refused port
            self.drop_log(logging.WARNING, "socket", "cannot open a TCP socket: %s", e)
            refuse(str(e))
            return
        failed = self._tcp_socket_options(sock)
        if failed:
            sock.close()
            refuse(failed)
            return
        conn = TcpConn.from_guest_syn(key, now, self._isn(key, now), self._our_mss(pkt.family),
                                      seq, window, *opts,
                                      idle_timeout=self.settings.tcp_idle_timeout,
                                      hold_budget=self._hold_budget)
        conn.sock = sock
        self.flows.add(conn)
        self._changed("FlowCount")
        log.debug("%r: connecting to %s", conn, target)
        rc = sock.connect_ex(target)
        if rc == 0:
            self._tcp_connected(conn, now)
        elif rc in (errno.EINPROGRESS, errno.EAGAIN):
            self._writer(conn, self._tcp_connect_done)
            self._schedule(conn)
        else:
            log.debug("%r: connect: %s", conn, os.strerror(rc))
            self._tcp_actions(conn, conn.host_refused(), now)

    def _tcp_socket_options(self, sock: socket.socket) -> str | None:
        """Set up a new host TCP socket; what went wrong, if anything: the caller then
        closes the socket and refuses the connection."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.settings.tcp_sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.tcp_sndbuf)
            if self._peek_off:  # peeks continue after what the guest already has
                sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        # the kernel refusing a value (OSError), or Python one no C int holds (TypeError,
        # OverflowError): either way the socket must not leak, nor the exception escape
        except Exception as e:
            self.drop_log(logging.WARNING, "sockopt", "cannot set up a TCP socket: %s", e)
            return str(e)
        return None

    def _tcp_connect_done(self, conn: TcpConn) -> None:
        self._unwriter(conn)
        if conn.sock is None:
            return
        now = self.loop.time()
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        # ECONNRESET here is a peer that accepted and reset before we looked: the guest's
        # handshake is not complete, so, as in passt, it sees a refused connection.
        if err:
            log.debug("%r: connect: %s", conn, os.strerror(err))
            self._tcp_actions(conn, conn.host_refused(), now)
        else:
            self._tcp_connected(conn, now)
        self._settle(now)

    def _tcp_connected(self, conn: TcpConn, now: float) -> None:
        self._tcp_actions(conn, conn.host_connected(now), now)

    def _tcp_write(self, conn: TcpConn, views: list[memoryview]) -> int:
        """Write guest data to the host socket; -1 when the socket failed (flow reset)."""
        sock = conn.sock
        written = 0
        try:
            for i in range(0, len(views), 1024):
                chunk = views[i : i + 1024]
                n = sock.send(chunk[0]) if len(chunk) == 1 else sock.sendmsg(chunk)
                written += n
                if n < sum(map(len, chunk)):
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            log.debug("%r: write: %s", conn, e)
            self._tcp_actions(conn, conn.on_host_error(), self.loop.time())
            return -1
        return written

    def _tcp_guest_flush(self, conn: TcpConn, views: list[memoryview], now: float) -> None:
        """Write a run of guest segments' data with one sendmsg and settle the flow."""
        if conn.sock is None:
            return
        written = self._tcp_write(conn, views) if views else 0
        if written >= 0:
            self._tcp_commit(conn, written, now)

    def _tcp_commit(self, conn: TcpConn, written: int, now: float) -> None:
        """Settle a write of guest data; then write what it made contiguous, if any."""
        actions = conn.commit(written, now)
        while actions & tcp.A_RELEASE:
            released, conn.released = conn.released, []
            written = self._tcp_write(conn, released)
            if written < 0:
                return
            actions = (actions & ~tcp.A_RELEASE) | conn.commit(written, now)
            rest = b"".join(released)[written:]
            if rest:  # the socket is full: keep it for when it has room
                conn.hold(conn.rcv_nxt, rest)
        if actions:
            self._tcp_actions(conn, actions, now)

    def _tcp_actions(self, conn: TcpConn, actions: int, now: float) -> None:
        sock = conn.sock
        if sock is None:
            return
        if actions & tcp.A_CLOSE:
            if actions & tcp.A_RST_GUEST:
                self._tcp_control(conn, tcp.TCP_RST | tcp.TCP_ACK, conn.snd_nxt)
            elif actions & tcp.A_ACK:
                # the guest's last FIN: without our ACK it would wait in LAST_ACK, resend
                # it, and meet a RST from a flow that is gone
                self._tcp_control(conn, tcp.TCP_ACK, conn.snd_nxt)
            if conn.discard and not actions & tcp.A_RST_PEER:
                # bytes left in the receive queue would turn the kernel's FIN into a RST
                self._tcp_discard(conn)
            self._close_flow(conn, rst_peer=bool(actions & tcp.A_RST_PEER))
            return
        if actions & tcp.A_DISCARD:
            self._discard_due[conn] = None  # once per flow and batch, before its next read
        if actions & tcp.A_REWIND and self._peek_off:
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        if actions & tcp.A_SHUT_WR:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        if actions & tcp.A_SOCK_KEEPALIVE:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if actions & tcp.A_SYN_ACK:
            self._tcp_control(conn, tcp.TCP_SYN | tcp.TCP_ACK, conn.syn_seq,
                              tcp.syn_options(conn.our_mss, conn.our_wscale
                                              if conn.guest_wscale or conn.our_wscale else None,
                                              conn.sack_ok))
        if actions & tcp.A_SYN:
            self._tcp_control(conn, tcp.TCP_SYN, conn.syn_seq,
                              tcp.syn_options(conn.our_mss, tcp.OUR_WSCALE, True))
        if actions & tcp.A_FIN:
            self._tcp_control(conn, tcp.TCP_FIN | tcp.TCP_ACK, (conn.snd_nxt - 1) & 0xFFFFFFFF)
        if actions & tcp.A_KEEPALIVE:
            self._tcp_control(conn, tcp.TCP_ACK, (conn.snd_nxt - 1) & 0xFFFFFFFF)
        if actions & tcp.A_WAIT_WRITABLE:
            self._writer(conn, self._tcp_host_writable)
        if actions & (tcp.A_ESTABLISHED | tcp.A_RESUME):
            self._resume[conn] = None
        if actions & tcp.A_DUPACK:
            # not coalesced, and with the window unchanged: the guest counts only exact
            # duplicates towards a fast retransmission
            self._tcp_control(conn, tcp.TCP_ACK, conn.snd_nxt)
        elif actions & tcp.A_ACK:
            self._ack_due[conn] = None
        elif actions & tcp.A_ACK_DELAYED:
            self._delay_ack(conn)
        self._schedule(conn)

    def _tcp_discard(self, conn: TcpConn) -> None:
        """Drop bytes the guest acknowledged from the socket's receive queue (MSG_TRUNC:
        TCP discards without copying)."""
        left = conn.discard
        conn.discard = 0
        limit = len(self._discard)
        while left > 0:
            try:
                n = conn.sock.recv_into(self._discard, min(left, limit), socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.debug("%r: discard: %s", conn, e)
                break
            if n <= 0:
                break
            left -= n

    def _free_space(self, sock: socket.socket) -> int:
        """Room in the host socket's send buffer: the window we offer the guest."""
        try:
            info = _MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size))
        except OSError:
            return 0
        return max(0, info[SK_MEMINFO_SNDBUF] - info[SK_MEMINFO_WMEM_QUEUED])

    def _tcp_control(self, conn: TcpConn, flags: int, seq: int, options: bytes = b"") -> None:
        """A segment without payload for the guest (SYN, SYN-ACK, ACK, FIN, RST)."""
        if flags & tcp.TCP_SYN:
            conn.window_field(self._free_space(conn.sock))
            window = min(conn.wnd_to_guest, 0xFFFF)  # never scaled in a SYN (RFC 7323)
        else:
            window = conn.wnd_to_guest >> conn.our_wscale
        ack = conn.rcv_nxt if flags & tcp.TCP_ACK else 0
        if flags & tcp.TCP_ACK:
            self._ack_sent(conn)
            if conn.held and not flags & tcp.TCP_SYN:
                options = conn.sack_option()
        seg = packet.tcp_segment(conn.peer_addr, conn.guest_addr, conn.peer_port, conn.guest_port,
                                 seq, ack, flags, window, options)
        self._send(packet.ip_frame(self._guest_mac, self.cfg.mac, conn.peer_addr,
                                   conn.guest_addr, packet.IPPROTO_TCP, seg))

    def _delay_ack(self, conn: TcpConn) -> None:
        """ACK a little data a moment later: a reply from the host carries it, and the
        guest (and qemu) handle one frame instead of two per request. Bulk data is
        acknowledged at once (tcp.ACK_EVERY)."""
        self._acks_delayed[conn] = None
        if self._ack_timer is None:
            self._ack_timer = self.loop.call_later(ACK_DELAY, self._send_delayed_acks)

    def _ack_sent(self, conn: TcpConn) -> None:
        """Our ACK of rcv_nxt went out, alone or with data: the flow's delayed ACK is moot,
        and the timer goes once no flow waits (request/response would otherwise wake up
        for nothing after every reply)."""
        conn.ack_sent = conn.rcv_nxt
        if conn in self._acks_delayed:
            del self._acks_delayed[conn]
            if not self._acks_delayed and self._ack_timer is not None:
                self._ack_timer.cancel()
                self._ack_timer = None

    def _send_delayed_acks(self) -> None:
        self._ack_timer = None
        delayed, self._acks_delayed = self._acks_delayed, {}
        for conn in delayed:
            if conn.sock is not None and conn.ack_sent != conn.rcv_nxt:
                self._ack_due[conn] = None
        self._settle(self.loop.time())

    def _tcp_send_ack(self, conn: TcpConn) -> None:
        if not conn.events & tcp.ESTABLISHED:
            return
        free = self._free_space(conn.sock)
        field = conn.window_field(free)
        if field == 0 and not conn.events & tcp.TAP_FIN_RCVD:
            self._writer(conn, self._tcp_host_writable)  # tell the guest when there is room
        self._tcp_control(conn, tcp.TCP_ACK, conn.snd_nxt)

    def _tcp_host_writable(self, conn: TcpConn) -> None:
        """The host socket has room again: a window update lets the guest send more."""
        self._unwriter(conn)
        if conn.sock is None:
            return
        now = self.loop.time()
        self._tcp_commit(conn, 0, now)  # data held while the socket was full goes first
        if conn.sock is not None:
            self._ack_due[conn] = None
        self._settle(now)

    def _tcp_host_readable_cb(self, conn: TcpConn) -> None:
        now = self.loop.time()
        self._tcp_host_readable(conn, now)
        self._settle(now)

    def _tcp_host_readable(self, conn: TcpConn, now: float) -> None:
        """Host data for the guest: peek it into frame slots, up to the guest's window."""
        sock = conn.sock
        if sock is None or not conn.events & tcp.ESTABLISHED:
            return
        if self.client is None or self.out.congested:
            self._tap_wait(conn)
            return
        batch = self._batches[conn.family]
        mss = conn.mss_to_guest
        views = batch.views(mss)
        for _ in range(TCP_READ_ROUNDS):
            budget = conn.send_budget()
            if budget <= 0:
                self._unreader(conn)
                conn.window_closed(now)
                self._schedule(conn)
                return
            if budget > TAP_SLACK:
                # no more than qemu's socket takes: a short write costs a copy of the rest
                # (a small read is not worth the ioctl: its copy would be small too)
                frame = batch.head + mss
                need = min(-(-budget // mss), len(views)) * frame
                fits = self._tap_room(need) // frame * mss
                if fits <= 0:
                    self._tap_wait(conn)
                    return
                budget = min(budget, fits)
            count = min(len(views), -(-budget // mss))
            bufs = views[:count]
            want = count * mss
            if want > budget:
                bufs = [*bufs[:-1], bufs[-1][: budget - (count - 1) * mss]]
                want = budget
            in_flight = 0
            if not self._peek_off:
                in_flight = tcp.seq_diff(conn.snd_nxt, conn.snd_una)
                bufs = [self._discard[:in_flight], *bufs]
            try:
                n = sock.recvmsg_into(bufs, 0, socket.MSG_PEEK)[0] - in_flight
            except (BlockingIOError, InterruptedError):
                self._await_host_data(conn)
                return
            except OSError as e:
                log.debug("%r: read: %s", conn, e)
                self._tcp_actions(conn, conn.on_host_error(), now)
                return
            if n <= 0:
                # EOF: everything the peer sent is with the guest (or in flight)
                self._unreader(conn)
                actions = conn.on_host_eof(now)
                if actions:
                    self._tcp_actions(conn, actions, now)
                return
            if n > TRIM_WORTHY:
                self._buffers_used(now)
            frames = batch.build(n, mss, self.cfg.mac, self._guest_mac, conn.peer_addr,
                                 conn.guest_addr, conn.peer_port, conn.guest_port, conn.snd_nxt,
                                 conn.rcv_nxt, conn.wnd_to_guest >> conn.our_wscale)
            conn.on_sent(n, now)
            self._ack_sent(conn)  # every data frame carries our ACK
            if self.pcap:
                self.pcap.write_framed(frames, now)
            self.out.framed(frames)
            self._tap_flush()  # the slots are reused by the next read
            if n < want or self.out.congested or self.client is None:
                break
        self._await_host_data(conn)
        self._schedule(conn)

    def _await_host_data(self, conn: TcpConn) -> None:
        """Be woken for host data the guest does not have yet, and only for that.

        What the guest has not acknowledged stays in the socket's receive queue, so the
        socket is readable all the time: SO_RCVLOWAT at (bytes in flight + 1) makes epoll
        report it only when something new arrived (EOF always wakes it). Beyond the
        kernel's cap for SO_RCVLOWAT the reader is dropped instead: the guest's next ACK
        (A_RESUME) reads again.
        """
        lowat = tcp.seq_diff(conn.snd_nxt, conn.snd_una) + 1
        if lowat > self._rcvlowat_max:
            self._unreader(conn)
            return
        if lowat != conn.rcvlowat:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            conn.rcvlowat = lowat
        self._reader(conn)

    def _tap_wait(self, conn: TcpConn) -> None:
        """Park a flow until qemu's socket has room (or qemu is back)."""
        self._unreader(conn)
        self._tap_waiters[conn] = None
        if self.client is not None:
            self._tap_watch(True)

    def _resume_tap_waiters(self) -> None:
        waiters, self._tap_waiters = self._tap_waiters, {}
        for conn in waiters:
            if conn.sock is not None:
                self._resume[conn] = None

    # -- readiness bookkeeping ------------------------------------------------------------------

    def _reader(self, flow: Flow, callback: Callable[..., Any] | None = None) -> None:
        fd = flow.sock.fileno()
        if fd not in self._reading:
            self._reading.add(fd)
            self.loop.add_reader(fd, callback or self._tcp_host_readable_cb, flow)

    def _unreader(self, flow: Flow) -> None:
        fd = flow.sock.fileno()
        if fd in self._reading:
            self._reading.discard(fd)
            self.loop.remove_reader(fd)

    def _writer(self, flow: Flow, callback: Callable[..., Any]) -> None:
        fd = flow.sock.fileno()
        if fd not in self._writing:
            self._writing.add(fd)
            self.loop.add_writer(fd, callback, flow)

    def _unwriter(self, flow: Flow) -> None:
        if flow.sock is None:
            return
        fd = flow.sock.fileno()
        if fd in self._writing:
            self._writing.discard(fd)
            self.loop.remove_writer(fd)

    def _close_flow(self, flow: Flow, rst_peer: bool) -> None:
        sock = flow.sock
        if sock is not None:
            owned = not (isinstance(flow, UdpFlow) and flow.origin == HOST)
            if owned:
                self._unreader(flow)
                self._unwriter(flow)
                if rst_peer:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                sock.close()
            flow.sock = None
        if isinstance(flow, TcpConn):
            flow.drop_held()
        elif isinstance(flow, UdpFlow) and flow.holds_guest_port:
            flow.holds_guest_port = False
            self._udp_ports_held -= 1
        self._ack_due.pop(flow, None)  # type: ignore[call-overload]
        self._discard_due.pop(flow, None)  # type: ignore[call-overload]
        self._acks_delayed.pop(flow, None)  # type: ignore[call-overload]
        self._resume.pop(flow, None)  # type: ignore[call-overload]
        self._tap_waiters.pop(flow, None)  # type: ignore[call-overload]
        if flow.forward_id is not None:
            fwd = self.forwards.get(flow.forward_id)
            if fwd is not None:
                fwd.bytes_closed += flow.bytes_from_guest + flow.bytes_to_guest
        self.flows.remove(flow)
        flow.deadline = None
        if flow.timer_entry is not None:
            self._drop_timer(flow.timer_entry)
            flow.timer_entry = None
        log.debug("%r: closed", flow)
        self._changed("FlowCount")

    # -- timers ---------------------------------------------------------------------------------

    def _schedule(self, flow: Flow) -> None:
        at = flow.deadline
        entry = flow.timer_entry
        if at is None or (entry is not None and entry[0] <= at):
            return
        if entry is not None:
            self._drop_timer(entry)  # superseded by this earlier one
        entry = flow.timer_entry = [at, next(self._timer_seq), flow]
        heapq.heappush(self._timers, entry)
        if at < self._timer_when:
            self._arm_timer(at)

    def _drop_timer(self, entry: list) -> None:
        """Make a heap entry stale: it lets go of its flow at once and is skipped when it
        comes up. Flows closing by the thousand per second each leave one (a keepalive 30 s
        out): past a threshold the heap is rebuilt from the live entries."""
        entry[2] = None
        self._stale_timers += 1
        if self._stale_timers > STALE_TIMERS_MAX and self._stale_timers * 2 > len(self._timers):
            self._timers = [e for e in self._timers if e[2] is not None]
            heapq.heapify(self._timers)
            self._stale_timers = 0

    def _arm_timer(self, at: float) -> None:
        if self._timer_handle is not None:
            self._timer_handle.cancel()
        self._timer_when = at
        self._timer_handle = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer_handle = None
        self._timer_when = math.inf
        now = self.loop.time()
        # due entries run; stale ones (superseded by an earlier entry, or of a flow that is
        # gone) are dropped whenever they reach the top, due or not: they must not wake us
        while self._timers and (self._timers[0][2] is None or self._timers[0][0] <= now):
            _, _, flow = heapq.heappop(self._timers)
            if flow is None:
                self._stale_timers = max(0, self._stale_timers - 1)
                continue
            flow.timer_entry = None
            if flow.deadline is None:
                continue
            if flow.deadline > now:
                self._schedule(flow)
                continue
            try:
                self._flow_timer(flow, now)
            except Exception:
                log.exception("internal error in a timer of %r", flow)
                self._close_flow(flow, rst_peer=True)
        if self._timers:
            self._arm_timer(self._timers[0][0])
        self._settle(now)

    def _flow_timer(self, flow: Flow, now: float) -> None:
        if isinstance(flow, TcpConn):
            actions = flow.handle_timer(now)
            if actions & tcp.A_CLOSE:
                log.debug("%r: timed out (%s)", flow, "abort")
            self._tcp_actions(flow, actions, now)
            if actions & tcp.A_REWIND:
                self._resume[flow] = None
        elif isinstance(flow, (UdpFlow, icmp.PingFlow)):
            if flow.handle_timer(now):
                self._close_flow(flow, rst_peer=False)
                return
            self._schedule(flow)

    # -- memory --------------------------------------------------------------------------------

    def _buffers_used(self, now: float) -> None:
        """Note traffic through the big buffers; give their pages back once it stops."""
        self._buffers_used_at = now
        if self._trim_handle is None:
            self._trim_handle = self.loop.call_at(now + BUFFER_TRIM_DELAY, self._trim_buffers)

    def _trim_buffers(self) -> None:
        """Megabytes of frame buffers stay resident after a burst of traffic: once the
        instance has been quiet for BUFFER_TRIM_DELAY, hand them back to the kernel
        (MADV_DONTNEED: the next use gets zero pages). One wakeup after traffic, none while
        idle."""
        self._trim_handle = None
        now = self.loop.time()
        if now - self._buffers_used_at < BUFFER_TRIM_DELAY:
            self._trim_handle = self.loop.call_at(self._buffers_used_at + BUFFER_TRIM_DELAY,
                                                  self._trim_buffers)
            return
        if self.reader.start == self.reader.end:  # no partial frame waiting in it
            self.reader.reset()
            self.reader.buf.madvise(mmap.MADV_DONTNEED)
        for batch in self._batches.values():
            batch.area.madvise(mmap.MADV_DONTNEED)

    # -- router advertisements ------------------------------------------------------------------

    def _schedule_ra(self, delay: float) -> None:
        if self._ra_handle:
            self._ra_handle.cancel()
        self._ra_handle = self.loop.call_later(delay, self._send_unsolicited_ra)

    def _send_unsolicited_ra(self) -> None:
        self._ra_handle = None
        if self.client is None or self.cfg.ip6 is None:
            return
        self._send(ndp.router_advertisement(self.cfg))
        self._tap_flush()
        self._schedule_ra(ndp.next_unsolicited_ra_delay(self._rng))

    # -- UDP ------------------------------------------------------------------------------------

    def _udp_from_guest(self, pkt: packet.Packet, sport: int, dport: int, payload: memoryview,
                        now: float) -> None:
        key = (packet.IPPROTO_UDP, pkt.src, sport, pkt.dst, dport)
        flow = self.flows.get(key)
        if flow is None:
            flow = self._udp_open(pkt, key, sport, dport, now)
            if flow is None:
                return
        try:
            if flow.sockaddr is not None:
                flow.sock.sendto(payload, flow.sockaddr)
            else:
                flow.sock.send(payload)
        except (BlockingIOError, InterruptedError):
            self.drop_log(logging.DEBUG, "udp-full", "host UDP socket full: datagram dropped")
            return
        except OSError as e:
            self.drop_log(logging.DEBUG, "udp-send", "%r: send: %s", flow, e)
            if e.errno == errno.ECONNREFUSED:
                self._udp_unreachable(flow)
            return
        flow.from_guest(len(payload), now)
        self._schedule(flow)

    def _udp_open(self, pkt: packet.Packet, key: tuple, sport: int, dport: int,
                  now: float) -> UdpFlow | None:
        def unreachable(code4: int, code6: int) -> None:
            quoted = bytes(pkt.l4[:8])
            quoted = packet.ip_header(pkt.src, pkt.dst, pkt.proto, len(pkt.l4)) + quoted
            self._send(icmp.unreachable_frame(
                pkt.family, code4 if pkt.family == 4 else code6, self._tap_addr(pkt.family),
                quoted, self.cfg.mac, pkt.src_mac, pkt.src))

        if self.flows.full:
            self.drop_log(logging.WARNING, "flow-limit",
                          "flow limit (%d) reached: refusing new flows", self.flows.max_flows)
            unreachable(icmp.ICMP_ADMIN_PROHIBITED, icmp.ICMPV6_ADMIN_PROHIBITED)
            return None
        target = self._outbound_target(pkt.family, pkt.dst, dport)
        if target is None:
            self.drop_log(logging.DEBUG, "udp-dst", "dropped UDP to %s", addr_text(pkt.dst))
            return None
        af = socket.AF_INET if len(target) == 2 else socket.AF_INET6
        try:
            sock = socket.socket(af, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            self.drop_log(logging.WARNING, "socket", "cannot open a UDP socket: %s", e)
            unreachable(icmp.ICMP_HOST_UNREACH, icmp.ICMPV6_ADDR_UNREACH)
            return None
        keep_port = self._udp_may_keep(sport)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_BUFFER)
            wildcard = "0.0.0.0" if af == socket.AF_INET else "::"
            if keep_port:
                try:
                    sock.bind((wildcard, sport))
                except OSError:  # the host has it in use: fine, it is the host's
                    keep_port = False
            if not keep_port:
                sock.bind((wildcard, 0))
            sock.connect(target)
        except OSError as e:
            sock.close()
            self.drop_log(logging.DEBUG, "udp-connect", "UDP to %s: %s", target, e)
            unreachable(icmp.ICMP_HOST_UNREACH, icmp.ICMPV6_ADDR_UNREACH)
            return None
        flow = UdpFlow(key, GUEST, now, self.settings.udp_timeout, self.settings.udp_stream_timeout)
        flow.sock = sock
        if keep_port:
            flow.holds_guest_port = True
            self._udp_ports_held += 1
        self.flows.add(flow)
        self._schedule(flow)  # it expires even if its first datagram cannot be sent
        self._reader(flow, self._udp_host_readable)
        self._changed("FlowCount")
        return flow

    def _udp_may_keep(self, port: int) -> bool:
        """Whether a new guest flow may bind its host socket to the guest's source port
        `port` (udp.py's module docstring has the rule and why)."""
        if not self.settings.udp_port_rule.allows(port):
            return False
        for fwd in self.forwards.values():
            if fwd.rule.proto == "udp" and fwd.rule.first <= port <= fwd.rule.last:
                return False
        if self._udp_ports_held >= self.settings.udp_preserved_ports:
            self.drop_log(logging.INFO, "udp-ports",
                          "guest UDP flows hold %d host ports of their own source ports "
                          "(limits.udp_preserved_ports): new flows get ephemeral ones",
                          self._udp_ports_held)
            return False
        return True

    def _udp_host_readable(self, flow: UdpFlow) -> None:
        now = self.loop.time()
        for _ in range(UDP_BATCH):
            try:
                data = flow.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                self._udp_unreachable(flow)
                continue
            except OSError as e:
                self.drop_log(logging.DEBUG, "udp-recv", "%r: %s", flow, e)
                break
            self._udp_to_guest(flow, data, now)
        self._settle(now)

    def _udp_to_guest(self, flow: UdpFlow, data: bytes, now: float) -> None:
        msg = packet.udp_message(flow.peer_addr, flow.guest_addr, flow.peer_port,
                                 flow.guest_port, data)
        self._send(packet.ip_frame(self._guest_mac, self.cfg.mac, flow.peer_addr,
                                   flow.guest_addr, packet.IPPROTO_UDP, msg))
        flow.to_guest(len(data), now)
        self._schedule(flow)

    def _udp_unreachable(self, flow: UdpFlow) -> None:
        """The peer answered with ICMP port unreachable: tell the guest the same."""
        quoted = icmp.quote_udp(flow.guest_addr, flow.peer_addr, flow.guest_port, flow.peer_port,
                                flow.last_length)
        code = icmp.ICMP_PORT_UNREACH if flow.family == 4 else icmp.ICMPV6_PORT_UNREACH
        self._send(icmp.unreachable_frame(flow.family, code, flow.peer_addr, quoted, self.cfg.mac,
                                          self._guest_mac, flow.guest_addr))

    def _tap_addr(self, family: int) -> bytes:
        if family == 4:
            assert self.cfg.ip4 is not None
            return self.cfg.ip4.gateway
        assert self.cfg.ip6 is not None
        return self.cfg.ip6.gateway

    # -- ICMP echo ------------------------------------------------------------------------------

    def _ping_from_guest(self, pkt: packet.Packet, now: float) -> None:
        echo = icmp.parse_echo_request(pkt)
        if echo is None:
            self.drop_log(logging.DEBUG, "icmp-type", "dropped ICMP type %d", pkt.l4[0])
            return
        ident, _seq = echo
        key = (pkt.proto, pkt.src, ident, pkt.dst, 0)
        flow = self.flows.get(key)
        if flow is None:
            if self.flows.full:
                return
            target = self._outbound_target(pkt.family, pkt.dst, 0)
            if target is None:
                return
            af = socket.AF_INET if len(target) == 2 else socket.AF_INET6
            proto = socket.IPPROTO_ICMP if af == socket.AF_INET else socket.IPPROTO_ICMPV6
            try:
                sock = socket.socket(af, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK, proto)
            except OSError as e:
                self.drop_log(logging.WARNING, "ping-socket",
                              "cannot open a ping socket (%s): is net.ipv4.ping_group_range "
                              "covering our group?", e)
                return
            # where the identifier is taken, the kernel picks one; replies are rewritten back
            with contextlib.suppress(OSError):
                sock.bind(("0.0.0.0", ident) if af == socket.AF_INET else ("::", ident))
            flow = icmp.PingFlow(key, now, self.settings.icmp_timeout)
            flow.sock = sock
            flow.sockaddr = target
            self.flows.add(flow)
            self._schedule(flow)  # it expires even if its first request cannot be sent
            self._reader(flow, self._ping_readable)
            self._changed("FlowCount")
        try:
            flow.sock.sendto(pkt.l4, flow.sockaddr)
        except OSError as e:
            self.drop_log(logging.DEBUG, "ping-send", "%r: %s", flow, e)
            return
        flow.touch(len(pkt.l4), False, now)
        self._schedule(flow)

    def _ping_readable(self, flow: icmp.PingFlow) -> None:
        now = self.loop.time()
        for _ in range(UDP_BATCH):
            try:
                data = flow.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.drop_log(logging.DEBUG, "ping-recv", "%r: %s", flow, e)
                break
            frame = icmp.echo_reply_frame(flow, data, self.cfg.mac, self._guest_mac)
            if frame:
                self._send(frame)
                flow.touch(len(data), True, now)
        self._schedule(flow)
        self._settle(now)

    # -- forwards -------------------------------------------------------------------------------

    def add_forward(self, rule: ForwardRule, origin: str = "runtime") -> Forward:
        """Open a forward now; the listener is accepting when this returns."""
        return self._add_forward(rule, origin)

    def _add_forward(self, rule: ForwardRule, origin: str) -> Forward:
        for fwd in self.forwards.values():
            if fwd.rule.overlaps(rule):
                raise ForwardError("AddressInUse",
                                   f"{rule.proto} {format_rule(rule)} overlaps forward {fwd.id} "
                                   f"({format_rule(fwd.rule)})")
        if rule.proto == "udp":  # a forward's ports are never a guest flow's (udp.py)
            for flow in list(self.flows):
                if isinstance(flow, UdpFlow) and flow.holds_guest_port \
                        and rule.first <= flow.guest_port <= rule.last:
                    log.debug("%r: gives its host port to forward %s", flow, format_rule(rule))
                    self._close_flow(flow, rst_peer=False)
        fwd = Forward(self._next_forward_id, rule, origin)
        try:
            self._open_listeners(fwd)
        except ForwardError:
            self._close_listeners(fwd)
            raise
        except OSError as e:  # socket() itself failed: EMFILE, no IPv6 in this kernel...
            self._close_listeners(fwd)
            raise ForwardError("InvalidArgument", f"{rule.proto} {format_rule(rule)}: cannot open "
                                                  f"a listening socket: {e.strerror}") from e
        self._next_forward_id += 1
        self.forwards[fwd.id] = fwd
        log.info("forward %d: %s %s -> guest (%s, %d listening sockets)", fwd.id, rule.proto,
                 format_rule(rule), origin, len(fwd.listeners))
        return fwd

    def remove_forward(self, forward_id: int) -> Forward:
        """Close a forward's listeners; connections made through it live on."""
        fwd = self.forwards.pop(forward_id, None)
        if fwd is None:
            raise ForwardError("NotFound", f"no forward with id {forward_id}")
        self._close_listeners(fwd)
        log.info("forward %d removed: %s %s", fwd.id, fwd.rule.proto, format_rule(fwd.rule))
        return fwd

    def _listen_addresses(self, rule: ForwardRule) -> list[tuple[int, str, bool]]:
        """(family, address, v6only) sockets a rule needs: passt listens on :: and 0.0.0.0."""
        if rule.address is not None:
            family = 6 if ":" in rule.address else 4
            if (family == 4 and self.cfg.ip4 is None) or (family == 6 and self.cfg.ip6 is None):
                raise ForwardError("InvalidArgument",
                                   f"address {rule.address}: IPv{family} is disabled")
            return [(family, rule.address, True)]
        if self.cfg.ip6 is None:
            return [(4, "0.0.0.0", False)]
        if self.cfg.ip4 is None:
            return [(6, "::", True)]
        return [(6, "::", False)]  # one dual-stack socket takes both families

    def _open_listeners(self, fwd: Forward) -> None:
        rule = fwd.rule
        sock_type = socket.SOCK_STREAM if rule.proto == "tcp" else socket.SOCK_DGRAM
        targets = self._listen_addresses(rule)
        failures: list[str] = []
        for port in rule.ports():
            for family, address, v6only in targets:
                if self._listener_count >= self.settings.max_listeners:
                    raise ForwardError("InvalidArgument",
                                       f"{rule.proto} {format_rule(rule)}: listener limit "
                                       f"reached (limits.max_listeners = "
                                       f"{self.settings.max_listeners})")
                af = socket.AF_INET if family == 4 else socket.AF_INET6
                sock = socket.socket(af, sock_type | socket.SOCK_NONBLOCK)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if af == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
                    if rule.ifname:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                        rule.ifname.encode())
                    if sock_type == socket.SOCK_DGRAM:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_BUFFER)
                    sock.bind((address, port))
                    if sock_type == socket.SOCK_STREAM:
                        sock.listen(LISTEN_BACKLOG)
                except OSError as e:
                    sock.close()
                    if rule.weak and e.errno not in (errno.EMFILE, errno.ENFILE):
                        failures.append(f"{port}: {e.strerror}")
                        continue
                    kind = {errno.EADDRINUSE: "AddressInUse", errno.EACCES: "AccessDenied",
                            errno.EPERM: "AccessDenied"}.get(e.errno or 0, "InvalidArgument")
                    hint = " (ports below 1024 need CAP_NET_BIND_SERVICE)" \
                        if kind == "AccessDenied" and port < 1024 else ""
                    raise ForwardError(kind, f"cannot listen on {rule.proto} {address} port "
                                             f"{port}: {e.strerror}{hint}") from e
                fwd.listeners.append(sock)
                self._listener_count += 1
                callback = self._tcp_accept if sock_type == socket.SOCK_STREAM \
                    else self._udp_listener_readable
                self.loop.add_reader(sock.fileno(), callback, fwd, sock)
        if rule.weak and not fwd.listeners:
            raise ForwardError("AddressInUse",
                               f"{rule.proto} {format_rule(rule)}: no port could be bound")
        if failures:
            log.debug("forward %s: %d ports skipped (%s ...)", format_rule(rule), len(failures),
                      failures[0])

    def _close_listeners(self, fwd: Forward) -> None:
        for sock in fwd.listeners:
            self.loop.remove_reader(sock.fileno())
            sock.close()
            self._listener_count -= 1
        fwd.listeners.clear()
        # inbound UDP flows answer through the listener: they end with it
        for flow in list(self.flows):
            if isinstance(flow, UdpFlow) and flow.forward_id == fwd.id and flow.origin == HOST:
                self._close_flow(flow, rst_peer=False)

    def _tcp_accept(self, fwd: Forward, lsock: socket.socket) -> None:
        now = self.loop.time()
        for _ in range(64):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                # EMFILE, ENFILE, ENOBUFS: the connection stays queued. The listener stays
                # readable, so pause it instead of spinning; flows closing free descriptors
                self.drop_log(logging.WARNING, "accept",
                              "forward %d: cannot accept (%s): pausing it for %g s", fwd.id,
                              e.strerror, ACCEPT_PAUSE)
                self.loop.remove_reader(lsock.fileno())
                self.loop.call_later(ACCEPT_PAUSE, self._resume_listener, fwd, lsock)
                break
            self._tcp_inbound(fwd, lsock, sock, peer, now)
        self._settle(now)

    def _resume_listener(self, fwd: Forward, lsock: socket.socket) -> None:
        if self.forwards.get(fwd.id) is fwd and lsock in fwd.listeners:
            self.loop.add_reader(lsock.fileno(), self._tcp_accept, fwd, lsock)

    def _tcp_inbound(self, fwd: Forward, lsock: socket.socket, sock: socket.socket, peer: tuple,
                     now: float) -> None:
        def reject(why: str) -> None:
            log.debug("forward %d: rejecting %s: %s", fwd.id, peer, why)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

        family, peer_bytes = _sockaddr_bytes(peer[0])
        if self.client is None:
            reject("no guest connected")
            return
        if self.flows.full:
            self.drop_log(logging.WARNING, "flow-limit",
                          "flow limit (%d) reached: refusing forwarded connections",
                          self.flows.max_flows)
            reject("flow limit")
            return
        seen_peer = self._inbound_peer(family, peer_bytes) if \
            (self.cfg.ip4 if family == 4 else self.cfg.ip6) else None
        guest = self._guest_target(family, seen_peer, fwd.rule) if seen_peer else None
        if seen_peer is None or guest is None:
            reject(f"IPv{family} is not available towards the guest")
            return
        port = lsock.getsockname()[1]
        key = (packet.IPPROTO_TCP, guest, fwd.rule.guest_port(port), seen_peer, peer[1])
        if self.flows.get(key) is not None:
            reject("a flow with the same addresses exists")
            return
        sock.setblocking(False)
        failed = self._tcp_socket_options(sock)
        if failed:
            reject(failed)
            return
        conn = TcpConn.from_host_accept(key, now, self._isn(key, now), self._our_mss(family),
                                        self.settings.tcp_idle_timeout, self._hold_budget)
        conn.sock = sock
        conn.forward_id = fwd.id
        self.flows.add(conn)
        fwd.connections += 1
        self._changed("FlowCount")
        log.debug("%r: accepted through forward %d", conn, fwd.id)
        self._tcp_actions(conn, tcp.A_SYN, now)

    def _udp_listener_readable(self, fwd: Forward, lsock: socket.socket) -> None:
        now = self.loop.time()
        port = lsock.getsockname()[1]
        for _ in range(UDP_BATCH):
            try:
                data, peer = lsock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.drop_log(logging.DEBUG, "udp-listen", "forward %d: %s", fwd.id, e)
                break
            family, peer_bytes = _sockaddr_bytes(peer[0])
            if (self.cfg.ip4 if family == 4 else self.cfg.ip6) is None or self.client is None:
                continue
            seen_peer = self._inbound_peer(family, peer_bytes)
            guest = self._guest_target(family, seen_peer, fwd.rule)
            if guest is None:
                continue
            key = (packet.IPPROTO_UDP, guest, fwd.rule.guest_port(port), seen_peer, peer[1])
            flow = self.flows.get(key)
            if flow is None:
                if self.flows.full:
                    self.drop_log(logging.WARNING, "flow-limit",
                                  "flow limit reached: inbound UDP dropped")
                    continue
                flow = UdpFlow(key, HOST, now, self.settings.udp_timeout,
                               self.settings.udp_stream_timeout)
                flow.sock = lsock
                flow.sockaddr = peer
                flow.forward_id = fwd.id
                self.flows.add(flow)
                fwd.connections += 1
                self._changed("FlowCount")
            self._udp_to_guest(flow, data, now)  # type: ignore[arg-type]
        self._settle(now)

    # -- what the service and D-Bus API read ----------------------------------------------------

    def list_flows(self) -> list[dict[str, Any]]:
        now = self.loop.time()
        return [flow.describe(now) for flow in self.flows]

    def list_forwards(self) -> list[dict[str, Any]]:
        live: dict[int, int] = {}
        for flow in self.flows:
            if flow.forward_id is not None:
                live[flow.forward_id] = live.get(flow.forward_id, 0) + \
                    flow.bytes_from_guest + flow.bytes_to_guest
        out = []
        for fwd in self.forwards.values():
            rule = fwd.rule
            out.append({
                "id": fwd.id,
                "protocol": rule.proto,
                "address": rule.address or "",
                "host_port": rule.first,
                "host_port_last": rule.last,
                "guest_port": rule.to_first,
                "origin": fwd.origin,
                "spec": format_rule(rule),
                "listeners": len(fwd.listeners),
                "connections": fwd.connections,
                "bytes": fwd.bytes_closed + live.get(fwd.id, 0),
            })
        return out

    @property
    def guest_connected(self) -> bool:
        return self.client is not None

    def guest_addresses(self) -> list[str]:
        seen = self.seen
        return [addr_text(a) for a in (seen.addr4, seen.addr6, seen.addr6_ll) if a]

    def summary(self) -> str:
        guest = "guest connected" if self.client is not None else "waiting for qemu"
        return f"{guest}, {len(self.flows)} flows, {len(self.forwards)} forwards"


def _tcp_rcvlowat_max() -> int:
    """The kernel caps SO_RCVLOWAT of TCP sockets at half of tcp_rmem's maximum."""
    try:
        with open("/proc/sys/net/ipv4/tcp_rmem", encoding="ascii") as f:
            return int(f.read().split()[2]) // 2
    except (OSError, ValueError, IndexError):
        return 1 << 20


def _peer_pid(sock: socket.socket) -> str:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return str(struct.unpack("3i", creds)[0])
    except OSError:
        return "?"


