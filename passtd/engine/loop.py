"""The engine: one instance's dispatcher, its lifecycle, and the facade the service uses.

Design: everything runs on one MainLoop (mainloop.py; with the D-Bus API, asyncio's loop
runs it, aioloop.py). Data sockets are raw non-blocking sockets registered with its poller
(TCP's edge-triggered), not asyncio transports, which cannot scatter a read into frame
slots or gather a batch into one sendmsg. The engine is a short dispatch over parts named
after what they own (context.py says how they meet; docs/ARCHITECTURE.md lists them): the
qemu link, the guest's identity, a socket half per protocol, forwards, the timer heap, the
handover of flows across a restart, the pure responders.

Guest frames are processed a whole read at a time. Here, the fast path walks the read for
IPv4/IPv6 TCP segments of known flows (tcp_run.segment per frame) and gathers the payloads of
consecutive segments of one flow into one write (`TcpSockets.end_run`); everything else
goes through `_other_frame`. The ACKs and window updates a batch causes go out once per
flow when the engine settles (`settle`), then the link flushes to qemu in one sendmsg.

Timers: one poller deadline (poller.py) waits for timers.py's earliest; idle, nothing wakes us.

Failure policy: a malformed frame is dropped with a rate-limited debug line; a framing error
drops the qemu client; a socket error ends that one flow with the right signal to the guest
(RST, ICMP error); an internal error costs one frame or one flow, logged; none escapes a callback.

Not done here: vhost-user, splicing between host sockets (pasta's fast path), migration.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

from . import arp, dhcp, dhcpv6, events, ndp, packet, tcp, tcp_run
from .context import BufferTrim, EngineContext, RateLimitedLog, SocketHalf
from .flow import Flow, FlowTable
from .forwards import Forward, Forwards
from .fwd import ForwardRule, format_rule
from .guest import GuestIdentity, RouterAdvertiser
from .handover import Handover
from .icmp_sock import IcmpSockets
from .link import GuestLink, PeerVerdict, peer_pid
from .mainloop import MainLoop
from .news import News
from .settings import EngineSettings
from .sockets import HostSockets, KernelSockets
from .tcp import TcpConn
from .tcp_sock import TcpSockets
from .timers import FlowTimers
from .udp_sock import UdpSockets

log = logging.getLogger("passtd.engine")


class Engine:
    """One instance's translator: a qemu client, flows, forwards and timers."""

    def __init__(self, settings: EngineSettings, loop: MainLoop,
                 sockets: HostSockets | None = None) -> None:
        self.settings = settings
        self.net = settings.net
        self.loop = loop
        self.on_client: Callable[[socket.socket | None], None] | None = None
        self.news = News()  # for the service to hear (news.py): set its on_change, on_events
        self.drop_log = RateLimitedLog()
        self.trim = BufferTrim(self.loop, self._trim_buffers)
        self.link = GuestLink(self.loop, settings.pcap, settings.pcap_size,
                              on_input=self._process_frames, on_client=self._client_changed,
                              on_room=self._room_towards_qemu, settle=self.settle,
                              buffers_used=self.trim.used, refused=self._qemu_refused)
        ctx = self.ctx = EngineContext(settings, self.loop, self.link,
                                       sockets or KernelSockets())
        ctx.drop_log = self.drop_log
        ctx.schedule = self._schedule
        ctx.close_flow = self.close_flow
        ctx.settle = self.settle
        ctx.changed = self.news.changed
        ctx.buffers_used = self.trim.used
        self.flows: FlowTable = ctx.flows
        self.flows.on_add = self.news.flow_opened
        self.tcp = TcpSockets(ctx)
        self.udp = UdpSockets(ctx, lambda port: self.forwards.takes_udp_port(port))
        self.forwards = Forwards(self.loop, self.net, ctx.sockets, settings.max_listeners,
                                 on_accept=self.tcp.inbound,
                                 on_datagrams=self.udp.listener_readable,
                                 settle=self.settle, drop_log=self.drop_log)
        self.icmp = IcmpSockets(ctx)
        self._halves: dict[int, SocketHalf] = {
            packet.IPPROTO_TCP: self.tcp, packet.IPPROTO_UDP: self.udp,
            packet.IPPROTO_ICMP: self.icmp, packet.IPPROTO_ICMPV6: self.icmp}
        self.timers = FlowTimers()
        self.handover = Handover(ctx, self.forwards, self._halves)
        self._timer = self.loop.poller.deadline(self._on_timer)  # the earliest flow deadline
        self._dhcpv6_duid = dhcpv6.server_duid(self.net.mac)
        self.guest = GuestIdentity(self.net, ctx.seen, self.drop_log, self.news.changed)
        self.adverts = RouterAdvertiser(self.loop, self.net, self.link,
                                        self.guest.foreign_prefixes)
        self.guest.on_foreign_prefix = self.adverts.soon
        self.closed = False
        self._closing: list[socket.socket] = []  # of flows that ended in this batch

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, listener: socket.socket | None) -> None:
        """Open the configured forwards and start accepting qemu on `listener`. Raises
        ForwardError when a configured forward cannot be opened: an instance that silently
        lacks a forward it was told to have is worse than one that fails to start."""
        for rule in (*self.settings.tcp_forwards, *self.settings.udp_forwards):
            self.add_forward(rule, "config")
        if listener is not None:
            self.link.listen(listener)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.poller.remove_deadline(self._timer)
        self.trim.cancel()
        self.adverts.stop()
        self.tcp.close()
        for flow in list(self.flows):
            self.close_flow(flow, rst_peer=False)
        self._close_sockets()  # a batch that ended without its settle (an exception)
        self.forwards.close()
        self.link.close()

    def adopt_client(self, sock: socket.socket, partial: bytes = b"") -> None:
        """Serve the guest behind `sock` (freshly accepted, or kept across a restart);
        `partial`: the start of a frame the previous process had read (`partial_input`)."""
        self.link.adopt(sock, partial)

    def partial_input(self) -> bytes:
        """The start of a frame qemu has not finished writing (for the next process)."""
        return self.link.partial_input()

    def hand_over(self, carry: Callable[[list[socket.socket]], int]) -> bytes:
        """The state document for the next process (handover.py); `carry` takes the
        sockets it numbers. Then `close` (the carried sockets live on in the carrier)."""
        now = self.loop.time()
        self.settle(now)
        state = self.handover.write(now, carry)
        self.settle(now)  # the resets of flows that could not be carried
        return state

    def inherit(self, state: bytes, socks: list[socket.socket | None]) -> bool:
        """The previous process's state and sockets, before `start`; `resume_inherited`
        once the forwards and qemu are back. False (flows reset, logged) if unreadable."""
        return self.handover.read(state, socks)

    def resume_inherited(self) -> None:
        now = self.loop.time()
        self.handover.resume(now)
        self.settle(now)

    @property
    def accept_peer(self) -> Callable[[socket.socket], PeerVerdict] | None:
        """Asked before a qemu connection is adopted (link.py; the service sets it from
        `qemu_cgroup`); unset: anyone who may open the socket is the guest's qemu."""
        return self.link.accept_peer

    @accept_peer.setter
    def accept_peer(self, check: Callable[[socket.socket], PeerVerdict] | None) -> None:
        self.link.accept_peer = check
        self.link.recheck_held()  # connections waiting for a verdict get the new one

    def _client_changed(self, sock: socket.socket | None, why: str) -> None:
        if sock is not None:
            log.info("guest connected (qemu pid %s)", peer_pid(sock),
                     extra=events.fields(events.GUEST_CONNECTED))
            if self.net.ip6 and self.settings.ndp and self.settings.ra:
                self.adverts.start()
        else:
            log.info("guest disconnected: %s; waiting for the next qemu connection "
                     "(%d flows and %d forwards kept)", why, len(self.flows), len(self.forwards),
                     extra=events.fields(events.GUEST_DISCONNECTED))
            self.adverts.stop()
        if self.on_client:
            self.on_client(sock)
        self.news.changed("GuestConnected")

    def _qemu_refused(self, why: str) -> None:
        waiting = "" if self.link.connected else "; still waiting for the guest's qemu"
        self.drop_log(logging.WARNING, "refused qemu connections",
                      "refusing a connection on the qemu socket: %s%s", why, waiting,
                      extra=events.fields(events.QEMU_REFUSED))

    def _room_towards_qemu(self, flows: list[Flow]) -> None:
        self.tcp.resume(flows)  # (only TCP flows wait for room: tcp_peek.py)

    def settle(self, now: float) -> None:
        """End of a callback: the once-per-flow work of the batch, then flush to qemu.

        Flushing can end a congestion and so wake flows that waited for qemu: loop until
        nothing is left to do.
        """
        while True:
            more = self.tcp.settle(now)
            self.link.end_batch()
            if not more:
                break
        self._close_sockets()
        self.news.report(len(self.flows), self.loop.time)

    def _close_sockets(self) -> None:
        """Close the sockets of flows that ended in this batch (`close_flow`)."""
        if self._closing:
            closing, self._closing = self._closing, []
            for sock in closing:
                sock.close()

    # -- guest frames ---------------------------------------------------------------------------

    def _process_frames(self, now: float) -> None:
        reader = self.link.reader
        buf = reader.buf
        mem = reader.mem
        by_key = self.flows.by_key
        pcap = self.link.pcap
        tcp_half = self.tcp
        run: TcpConn | None = None  # the flow whose consecutive segments are gathered
        views: list[memoryview] = []
        last_src_mac_at = -1
        segment = tcp_run.segment
        while (off := reader.next_frame()) >= 0:
            length = reader.frame_len
            if pcap:
                pcap.write(mem[off : off + length], now)
            last_src_mac_at = off
            kind, found, flags, seq, ack, window, data, end = segment(mem, off, length, by_key)
            if kind != tcp_run.SEG_TCP:
                if kind == tcp_run.SEG_OTHER:
                    if run is not None:
                        tcp_half.end_run(run, views, now)
                        run, views = None, []
                    self._other_frame(mem[off : off + length], now)
                elif kind == tcp_run.SEG_BAD4:
                    self.drop_log(logging.DEBUG, "bad-tcp4", "dropped malformed IPv4/TCP frame")
                else:
                    self.drop_log(logging.DEBUG, "bad-tcp6", "dropped malformed IPv6/TCP frame")
                continue
            conn = cast(TcpConn | None, found)  # (a TCP key: a TCP flow, if any)
            if conn is None or flags & packet.TCP_SYN:
                if run is not None:
                    tcp_half.end_run(run, views, now)
                    run, views = None, []
                self._tcp_frame(mem[off : off + length], conn, now)
                continue
            if conn is not run:
                if run is not None:
                    tcp_half.end_run(run, views, now)
                    views = []
                run = conn
            actions = conn.on_segment(flags, seq, ack, window, end - data, now)
            if conn.data_take:
                start = data + conn.data_skip
                views.append(mem[start : start + conn.data_take])
                if not actions and pcap is None and reader.end - reader.start >= tcp_run.ROOM:
                    last_src_mac_at = tcp_run.extend(conn, reader, off, views)
            if actions:
                if actions & tcp.A_HOLD:
                    conn.hold(seq, bytes(mem[data:end]))
                if actions & tcp.A_DUPACK and views:
                    # what came before the gap first, so the duplicates carry its ACK
                    tcp_half.end_run(conn, views, now)
                    views = []
                tcp_half.execute(conn, actions, now)
        if run is not None:
            tcp_half.end_run(run, views, now)
        if last_src_mac_at >= 0:
            # (a slice of the mmap is bytes already)
            self.guest.learn_mac(buf[last_src_mac_at + 6 : last_src_mac_at + 12])

    def _tcp_frame(self, frame: memoryview, conn: TcpConn | None, now: float) -> None:
        """A TCP segment the fast path leaves to the socket half's full parse."""
        try:
            pkt = packet.parse_ip(frame)
            if self.guest.admit(pkt) and self.guest.may_open(pkt):
                self.tcp.guest_packet(pkt, conn, now)
        except packet.Malformed as e:
            self.drop_log(logging.DEBUG, "malformed-tcp", "dropped malformed TCP segment: %s", e)

    def _other_frame(self, frame: memoryview, now: float) -> None:
        try:
            _dst_mac, src_mac, ethertype = packet.parse_eth(frame)
            self.guest.learn_mac(src_mac)
            if ethertype == packet.ETH_P_ARP:
                if self.net.ip4 is not None:
                    self._reply(arp.reply(self.net, frame), now)
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

    def _reply(self, frame: bytes | None, now: float) -> None:
        if frame:
            self.link.send(frame, now)

    def _ip_packet(self, pkt: packet.Packet, now: float) -> None:
        if not self.guest.admit(pkt):
            return
        family, proto = pkt.family, pkt.proto
        if proto == packet.IPPROTO_UDP:
            sport, dport, payload = packet.parse_udp(pkt)
            if family == 4 and dport == 67:
                if self.settings.dhcp:
                    self._reply(dhcp.reply(self.net, pkt, sport, dport, payload), now)
            elif family == 6 and dport == 547 and packet.is_ipv6_multicast(pkt.dst):
                if self.settings.dhcpv6:
                    self._reply(dhcpv6.reply(self.net, pkt, sport, dport, payload,
                                             self._dhcpv6_duid), now)
            elif self.guest.may_open(pkt):
                self.udp.guest_datagram(pkt, sport, dport, payload, now)
        elif proto == packet.IPPROTO_TCP:
            if self.guest.may_open(pkt):
                self.tcp.guest_packet(pkt, None, now)
        elif proto == packet.IPPROTO_ICMP and family == 4:
            if self.guest.may_open(pkt):
                self.icmp.guest_echo(pkt, now)
        elif proto == packet.IPPROTO_ICMPV6 and family == 6:
            if len(pkt.l4) and 133 <= pkt.l4[0] <= 137:
                target = ndp.dad_target(pkt)
                if target is not None:
                    self.guest.learn_addr(6, target)
                if self.settings.ndp:
                    self._reply(ndp.reply(self.net, pkt, self.guest.foreign_prefixes), now)
            elif self.guest.may_open(pkt):
                self.icmp.guest_echo(pkt, now)
        else:
            self.drop_log(logging.DEBUG, "proto", "dropped IP protocol %d", proto)

    # -- flows: the end, and timers -------------------------------------------------------------

    def close_flow(self, flow: Flow, rst_peer: bool, after_flush: bool = False) -> None:
        """The flow ends now; `after_flush`: its socket closes at the end of `settle`,
        once the batch's frames are with qemu (the caller is a callback, which settles)."""
        sock = flow.sock
        owned = self._halves[flow.key[0]].release(flow)
        if sock is not None:
            if owned:
                self.ctx.readiness.forget(flow)
                if rst_peer:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                if after_flush:
                    self._closing.append(sock)
                else:
                    sock.close()
            flow.sock = None
        self.link.forget(flow)
        self.forwards.flow_closed(flow)
        self.news.flow_closed(flow)
        self.flows.remove(flow)
        flow.deadline = None
        self.timers.cancel(flow)
        if log.isEnabledFor(logging.DEBUG):  # (fields cost more than the call)
            log.debug("%r: closed", flow, extra=events.fields(
                flow_id=flow.id, forward_id=flow.forward_id, guest=flow.guest_addr))

    def _schedule(self, flow: Flow) -> None:
        if self.timers.schedule(flow) and flow.deadline is not None \
                and flow.deadline < self._timer.when:
            self._timer.arm(flow.deadline)

    def _on_timer(self) -> None:
        now = self.loop.time()
        for flow in self.timers.due(now):
            if flow.sock is None:
                continue  # closed by an earlier flow's timer in this round
            try:
                self._halves[flow.key[0]].timer(flow, now)
            except Exception:
                log.exception("internal error in a timer of %r", flow)
                self.close_flow(flow, rst_peer=True)
        at = self.timers.next_deadline()
        if at is not None and at < self._timer.when:
            self._timer.arm(at)
        self.settle(now)

    def _trim_buffers(self) -> None:
        self.link.trim()
        self.tcp.trim()

    # -- forwards -------------------------------------------------------------------------------

    def add_forward(self, rule: ForwardRule, origin: str = "runtime") -> Forward:
        """Open a forward now; the listener is accepting when this returns."""
        if rule.proto == "udp":  # a forward's ports are never a guest flow's (udp.py)
            for flow in self.udp.flows_in_the_way(rule.first, rule.last):
                log.debug("%r: gives its host port to forward %s", flow, format_rule(rule))
                self.close_flow(flow, rst_peer=False)
        fwd = self.forwards.add(rule, origin)
        self.news.report(len(self.flows), self.loop.time)  # UDP flows that gave way
        self.news.forward_event("forward-added", fwd.describe)
        return fwd

    def remove_forward(self, forward_id: int) -> Forward:
        """Close a forward's listeners; connections made through it live on (inbound UDP
        flows answer through the listener: they end with it)."""
        fwd = self.forwards.remove(forward_id)
        for flow in self.udp.flows_of_forward(fwd.id):
            self.close_flow(flow, rst_peer=False)
        self.news.report(len(self.flows), self.loop.time)
        self.news.forward_event("forward-removed", fwd.describe)
        return fwd

    # -- what the service and D-Bus API read ----------------------------------------------------

    def forwards_from(self, origin: str) -> list[Forward]:  # "config" or "runtime"
        return [fwd for fwd in self.forwards if fwd.origin == origin]

    def flow_page(self, after_id: int, count: int) -> list[dict[str, Any]]:
        """Up to `count` flows with ids above `after_id`, as ListFlows shows them; the
        D-Bus API builds long listings a slice at a time (dbus_listing.py)."""
        now = self.loop.time()
        return [flow.describe(now) for flow in self.flows.page(after_id, count)]

    def list_forwards(self) -> list[dict[str, Any]]:
        return self.forwards.describe(self.flows)

    def statistics(self) -> dict[str, Any]:
        """Counters since the process started: the qemu stream both ways, flows, drops by
        kind (context.py's DROP_REASONS)."""
        link = self.link
        return {"frames_from_guest": link.reader.frames_read, "bytes_from_guest": link.bytes_read,
                "frames_to_guest": link.out.frames_queued, "bytes_to_guest": link.bytes_sent,
                "frames_dropped_to_guest": link.out.dropped, "flows": len(self.flows),
                "flows_opened": self.flows.opened, "drops": self.drop_log.drops()}

    @property
    def guest_connected(self) -> bool:
        return self.link.connected

    @property
    def guest_mac(self) -> str:  # as text ("" before the guest's first frame)
        return self.guest.mac_text

    def guest_addresses(self) -> list[str]:
        return self.guest.addresses()

    @property
    def started_at(self) -> float:  # Unix time; a restart keeps it (handover.py)
        return self.ctx.started_at

    @property
    def mtu(self) -> int:
        return self.net.mtu

    @property
    def flow_count(self) -> int:
        return len(self.flows)

    def summary(self) -> str:
        guest = "guest connected" if self.link.connected else "waiting for qemu"
        return f"{guest}, {len(self.flows)} flows, {len(self.forwards)} forwards"

    def problems(self) -> list[str]:
        """Where the engine's own bookkeeping disagrees with itself: the flow table, the
        timer heap, readiness registrations, pending work. Empty when healthy (the fuzz
        targets check after every step)."""
        flows = list(self.flows)
        return (self.flows.problems() + self.timers.problems(flows, self._timer.when)
                + self.ctx.readiness.problems(flows)
                + self.tcp.problems({flow.id: flow for flow in flows}))
