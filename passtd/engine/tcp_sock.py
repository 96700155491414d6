"""The TCP socket half: host sockets for TCP flows, driven by what tcp.py's TcpConn decides.

Design: tcp.py decides, this module executes (`execute` turns an action bitmask into
syscalls and frames). A guest SYN becomes a non-blocking connect() (the SYN-ACK waits for
it: a closed port answers with a RST, as in passt; a handshake the kernel completed inside
connect(), as to the host's loopback, is answered in the same batch, checked with
TCP_INFO, instead of one event loop turn later); a connection accepted by a forward
becomes our SYN to the guest. Guest data is written as it arrives in order, a run of
segments of one flow with one sendmsg (`end_run`), and acknowledged as far as the socket
took it. Host data goes to the guest through tcp_peek.py.

Work that several segments of a batch may each ask for is done once per flow at the end
of the batch (`settle`): dropping acknowledged bytes, the ACK with the current window,
reading the socket again. A small ACK waits ACK_DELAY for host data to carry it (request
and response then cost the guest one frame, not two); bulk data is acknowledged at once.

Every segment without payload comes whole from `TcpConn.control`; this module addresses it
and hands it to the link. Segments for no flow get tcp_seg.py's answers.

Not done here: TCP state (tcp.py), reading host data (tcp_peek.py), listening sockets
(forwards.py), splicing host sockets together (pasta's path: a VM has no peer namespace).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Sequence
from typing import Final, cast

from . import events, nat, packet, tcp, tcp_seg
from .context import EngineContext
from .flow import Flow, FlowKey, addr_text
from .forwards import Forward, PeerAddress
from .tcp import TcpConn
from .tcp_buf import ControlFrames
from .tcp_hold import HoldBudget, Reassembly
from .tcp_peek import HostData, free_space

log = logging.getLogger("passtd.engine")

ACK_DELAY: Final = 0.0005  # how long a small ACK waits for host data to carry it
WRITE_CHUNK: Final = 1024  # iovecs per sendmsg (IOV_MAX)
_CONTROLS: Final = tcp.A_SYN_ACK | tcp.A_SYN | tcp.A_FIN | tcp.A_KEEPALIVE
# tcpi_state (TCP_INFO's first byte, linux/tcp.h) once connect() is done: ESTABLISHED, or
# CLOSE_WAIT if the peer closed already (the guest gets its SYN-ACK, then the FIN)
CONNECTED_STATES: Final = (1, 8)


def _tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of `sock` (TCP_INFO's first byte); 0 if it cannot say."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return 0


class TcpSockets:
    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.host = HostData(ctx, self._host_readable)
        self._isn_secret = os.urandom(16)
        self._hold_budget = HoldBudget()  # out-of-order guest data, all flows together
        self._frames = ControlFrames()
        # once per flow and batch, at the end of it (settle)
        self._discard_due: dict[TcpConn, None] = {}
        self._ack_due: dict[TcpConn, None] = {}
        self._resume: dict[TcpConn, None] = {}
        self._acks_delayed: dict[TcpConn, None] = {}
        self._ack_deadline = ctx.loop.poller.deadline(self._send_delayed_acks)

    # -- guest segments -----------------------------------------------------------------------

    def guest_packet(self, pkt: packet.Packet, conn: TcpConn | None, now: float) -> None:
        """A segment that the frame loop's fast path does not take: a SYN, a new flow, no
        flow, options. Raises packet.Malformed for a broken header."""
        l4 = pkt.l4
        if len(l4) < packet.TCP_HLEN:
            raise packet.Malformed("truncated TCP header")
        sport, dport, seq, ack, doff, flags, window, _csum, _urg = packet.TCP.unpack_from(l4)
        thl = (doff >> 4) << 2
        if thl < packet.TCP_HLEN or thl > len(l4):
            raise packet.Malformed(f"TCP header length {thl}")
        key = (packet.IPPROTO_TCP, pkt.src, sport, pkt.dst, dport)
        if conn is None:
            found = self.ctx.flows.get(key)  # (a TCP key: a TCP flow, if any)
            conn = found if isinstance(found, TcpConn) else None
        plen = len(l4) - thl
        syn = tcp_seg.parse_options(l4[packet.TCP_HLEN : thl]) if flags & packet.TCP_SYN \
            else tcp_seg.NO_SYN_OPTIONS
        if conn is None:
            if flags & (packet.TCP_SYN | packet.TCP_ACK | packet.TCP_RST) == packet.TCP_SYN:
                self._guest_syn(pkt, key, seq, window, syn, now)
            else:
                self._answer(pkt, tcp_seg.reset_for_unknown(flags, seq, ack, plen), now)
            return
        actions = conn.on_segment(flags, seq, ack, window, plen, now, syn.mss, syn.wscale, syn.sack)
        if actions & tcp.A_HOLD:
            conn.hold(seq, bytes(l4[thl:]))
        written = 0
        if conn.data_take:
            start = thl + conn.data_skip
            written = self._write(conn, [l4[start : start + conn.data_take]], now)
            if written < 0:
                return
        if actions:
            self.execute(conn, actions, now)
        if conn.sock is not None:
            self._commit(conn, written, now)

    def end_run(self, conn: TcpConn, views: list[memoryview], now: float) -> None:
        """Write a run of one flow's segments with one sendmsg and settle the flow."""
        if conn.sock is None:
            return
        written = self._write(conn, views, now) if views else 0
        if written >= 0:
            self._commit(conn, written, now)

    def _answer(self, pkt: packet.Packet, seg: tcp_seg.Segment | None, now: float) -> None:
        """A segment for the sender of `pkt`, from its destination (no flow involved)."""
        if seg is None:
            return
        sport, dport = struct.unpack_from("!HH", pkt.l4)
        self.ctx.link.send_prefixed(self._frames.frame(
            self.ctx.net.mac, pkt.src_mac, pkt.dst, pkt.src, dport, sport, seg.seq, seg.ack,
            seg.flags, seg.window, seg.options), now)

    def _guest_syn(self, pkt: packet.Packet, key: FlowKey, seq: int, window: int,
                   syn: tcp_seg.SynOptions, now: float) -> None:
        ctx = self.ctx

        def refuse(why: str) -> None:
            log.debug("refusing guest TCP to %s:%d: %s", addr_text(pkt.dst), key[4], why)
            self._answer(pkt, tcp_seg.refusal(seq), now)

        if ctx.flow_limit_reached("new connections"):
            refuse("flow limit")
            return
        target = nat.nat_from_tap(ctx.settings, pkt.family, pkt.dst, key[4], nat.interface_index)
        if target is None:
            refuse("no route for that destination")
            return
        af = socket.AF_INET if len(target) == 2 else socket.AF_INET6
        try:
            sock = ctx.sockets.stream(af)
        except OSError as e:  # EMFILE, ENFILE, ENOBUFS: the guest sees a refused port
            ctx.drop_log(logging.WARNING, "socket", "cannot open a TCP socket: %s", e)
            refuse(str(e))
            return
        failed = self._prepare(sock)
        if failed:
            sock.close()
            refuse(failed)
            return
        conn = TcpConn.from_guest_syn(key, now, self._isn(key, now),
                                      tcp_seg.our_mss(pkt.family, ctx.net.mtu), seq, window,
                                      syn.mss, syn.wscale, syn.sack,
                                      idle_timeout=ctx.settings.tcp_idle_timeout,
                                      hold_budget=self._hold_budget)
        conn.sock = sock
        ctx.flows.add(conn)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%r: connecting to %s", conn, target, extra=events.fields(
                flow_id=conn.id, guest=conn.guest_addr))
        rc = sock.connect_ex(target)
        if rc == 0:
            self.execute(conn, conn.host_connected(now), now)
        elif rc in (errno.EINPROGRESS, errno.EAGAIN):
            # to a local destination (the host's loopback, a forwarded port) the kernel has
            # usually run the whole handshake inside connect(): answer the guest in this
            # batch rather than one event loop turn later (crr: a turn per connection)
            if _tcp_state(sock) in CONNECTED_STATES:
                self.execute(conn, conn.host_connected(now), now)
            else:
                ctx.readiness.write(conn, self._connect_done)
                ctx.schedule(conn)
        else:
            log.debug("%r: connect: %s", conn, os.strerror(rc))
            self.execute(conn, conn.host_refused(), now)

    def _isn(self, key: FlowKey, now: float) -> int:
        return tcp_seg.initial_sequence(self._isn_secret, key, now)

    def _prepare(self, sock: socket.socket) -> str | None:
        """Set up a new host TCP socket; what went wrong, if anything: the caller then
        closes the socket and refuses the connection."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ctx.settings.tcp_sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.ctx.settings.tcp_sndbuf)
            self.host.prepare(sock)
        # the kernel refusing a value (OSError), or Python one no C int holds (TypeError,
        # OverflowError): either way the socket must not leak, nor the exception escape
        except Exception as e:
            self.ctx.drop_log(logging.WARNING, "sockopt", "cannot set up a TCP socket: %s", e)
            return str(e)
        return None

    def _connect_done(self, conn: TcpConn) -> None:
        self.ctx.readiness.stop_writing(conn)
        if conn.sock is None:
            return
        now = self.ctx.loop.time()
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        # ECONNRESET: the peer accepted and reset before we looked; as in passt, refused
        if err:
            log.debug("%r: connect: %s", conn, os.strerror(err))
            self.execute(conn, conn.host_refused(), now)
        else:
            self.execute(conn, conn.host_connected(now), now)
        self.ctx.settle(now)

    def _write(self, conn: TcpConn, views: Sequence[bytes | memoryview], now: float) -> int:
        """Write guest data to the host socket; -1 when the socket failed (flow reset)."""
        sock = conn.sock
        written = 0
        try:
            if len(views) == 1:  # a request, or one segment: no chunks to cut
                written = sock.send(views[0])
            else:
                for i in range(0, len(views), WRITE_CHUNK):
                    chunk = views[i : i + WRITE_CHUNK]
                    n = sock.send(chunk[0]) if len(chunk) == 1 else sock.sendmsg(chunk)
                    written += n
                    if n < sum(map(len, chunk)):
                        break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            log.debug("%r: write: %s", conn, e)
            self.execute(conn, conn.on_host_error(), now)
            return -1
        return written

    def _commit(self, conn: TcpConn, written: int, now: float) -> None:
        """Settle a write of guest data; then write what it made contiguous, if any."""
        actions = conn.commit(written, now)
        while actions & tcp.A_RELEASE:
            released, conn.released = conn.released, []
            written = self._write(conn, released, now)
            if written < 0:
                return
            actions = (actions & ~tcp.A_RELEASE) | conn.commit(written, now)
            rest = b"".join(released)[written:]
            if rest:  # the socket is full: keep it for when it has room
                conn.hold(conn.rcv_nxt, rest)
        if actions:
            self.execute(conn, actions, now)

    # -- executing tcp.py's decisions ---------------------------------------------------------

    def execute(self, conn: TcpConn, actions: int, now: float) -> None:
        sock = conn.sock
        if sock is None:
            return
        if actions & tcp.A_CLOSE:
            if actions & tcp.A_RST_GUEST:
                self._control(conn, tcp.A_RST_GUEST, now)
            elif actions & tcp.A_ACK:
                # the guest's last FIN: without our ACK it would wait in LAST_ACK, resend
                # it, and meet a RST from a flow that is gone
                self._control(conn, tcp.A_ACK, now)
            if conn.discard and not actions & tcp.A_RST_PEER:
                # bytes left in the receive queue would turn the kernel's FIN into a RST
                self.host.drop_acknowledged(conn)
            # close() (~10 us) after the batch's frames: a SYN-ACK in it (crr) goes first
            self.ctx.close_flow(conn, rst_peer=bool(actions & tcp.A_RST_PEER), after_flush=True)
            return
        if actions & tcp.A_DISCARD:
            self._discard_due[conn] = None  # once per flow and batch, before its next read
        if actions & tcp.A_REWIND:
            self.host.rewind(sock)
        if actions & tcp.A_SHUT_WR:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        if actions & tcp.A_SOCK_KEEPALIVE:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if actions & _CONTROLS:  # (a request's actions have none: no tuple walked)
            for control in (tcp.A_SYN_ACK, tcp.A_SYN, tcp.A_FIN, tcp.A_KEEPALIVE):
                if actions & control:  # a SYN tells the window: our send buffer's room
                    opening = control in (tcp.A_SYN_ACK, tcp.A_SYN)
                    self._control(conn, control, now, free_space(sock) if opening else None)
        if actions & tcp.A_WAIT_WRITABLE:
            self.ctx.readiness.write(conn, self._host_writable)
        if actions & (tcp.A_REWIND | tcp.A_ESTABLISHED) or (
                actions & tcp.A_RESUME and conn.read_pending):
            # tcp_peek.py: Wakeups. Once established, read (a read that finds nothing
            # registers): what the peer did meanwhile (crr: close) saves a wakeup
            self._resume[conn] = None
        if actions & tcp.A_DUPACK:
            # not coalesced, and with the window unchanged: the guest counts only exact
            # duplicates towards a fast retransmission
            self._control(conn, tcp.A_DUPACK, now)
        elif actions & tcp.A_ACK:
            self._ack_due[conn] = None
        elif actions & tcp.A_ACK_DELAYED:
            self._delay_ack(conn)
        self.ctx.schedule(conn)

    def _control(self, conn: TcpConn, action: int, now: float, free: int | None = None) -> None:
        """Send the guest the segment `conn.control` builds for `action`."""
        seg = conn.control(action, free)
        ctx = self.ctx
        ctx.link.send_prefixed(self._frames.frame(
            ctx.net.mac, ctx.guest_mac, conn.peer_addr, conn.guest_addr, conn.peer_port,
            conn.guest_port, seg.seq, seg.ack, seg.flags, seg.window, seg.options), now)
        self._acked(conn)

    def timer(self, conn: TcpConn, now: float) -> None:
        actions = conn.handle_timer(now)
        if actions & tcp.A_CLOSE:
            log.debug("%r: timed out", conn)
        self.execute(conn, actions, now)

    # -- ACKs ---------------------------------------------------------------------------------

    def _delay_ack(self, conn: TcpConn) -> None:
        """ACK a little data a moment later: a host reply carries it, and the guest (and
        qemu) handle one frame, not two, per request (bulk: tcp.ACK_EVERY). The deadline,
        armed at the batch's end if no reply carried the ACK, is a poller.Deadline: two
        attribute writes, where a timer's call_later and cancel would cost more."""
        self._acks_delayed[conn] = None

    def _acked(self, conn: TcpConn) -> None:
        """Our ACK of rcv_nxt went out, alone or with data: the flow's delayed ACK is moot,
        and the timer goes once no flow waits (else rr wakes up for nothing per reply)."""
        if conn in self._acks_delayed and conn.ack_sent == conn.rcv_nxt:
            del self._acks_delayed[conn]
            if not self._acks_delayed:
                self._ack_deadline.cancel()

    def _send_delayed_acks(self) -> None:
        delayed, self._acks_delayed = self._acks_delayed, {}
        for conn in delayed:
            if conn.sock is not None and conn.ack_sent != conn.rcv_nxt:
                self._ack_due[conn] = None
        self.ctx.settle(self.ctx.loop.time())

    def _send_ack(self, conn: TcpConn, now: float) -> None:
        if not conn.events & tcp.ESTABLISHED:
            return
        free = free_space(conn.sock)
        if conn.window_field(free) == 0 and not conn.events & tcp.TAP_FIN_RCVD:
            self.ctx.readiness.write(conn, self._host_writable)  # tell the guest when there is room
        self._control(conn, tcp.A_ACK, now, free)

    # -- host socket events -------------------------------------------------------------------

    def _host_writable(self, conn: TcpConn) -> None:
        """The host socket has room again: a window update lets the guest send more."""
        self.ctx.readiness.stop_writing(conn)
        if conn.sock is None:
            return
        now = self.ctx.loop.time()
        self._commit(conn, 0, now)  # data held while the socket was full goes first
        if conn.sock is not None:
            self._ack_due[conn] = None
        self.ctx.settle(now)

    def _host_readable(self, conn: TcpConn) -> None:
        now = self.ctx.loop.time()
        self._read(conn, now)
        self.ctx.settle(now)

    def _read(self, conn: TcpConn, now: float) -> None:
        if conn.sock is None or not conn.events & tcp.ESTABLISHED:
            return
        if self.ctx.link.congested:
            self.host.wait_for_room(conn)
            return
        actions = self.host.read(conn, now)
        self._acked(conn)
        if actions:
            self.execute(conn, actions, now)

    def resume(self, conns: Sequence[Flow]) -> None:
        """Flows that waited for room towards qemu read again when the engine settles."""
        for conn in conns:
            if conn.sock is not None:
                self._resume[cast(TcpConn, conn)] = None

    def inbound(self, fwd: Forward, lsock: socket.socket, sock: socket.socket, peer: PeerAddress,
                now: float) -> None:
        """A connection accepted by a forward's listener: our SYN to the guest."""
        ctx = self.ctx

        def reject(why: str) -> None:
            log.debug("forward %d: rejecting %s: %s", fwd.id, peer, why)
            fwd.refused += 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

        family, peer_bytes = nat.sockaddr_bytes(peer[0])
        if not ctx.link.connected:
            reject("no guest connected")
            return
        if ctx.flow_limit_reached("forwarded connections"):
            reject("flow limit")
            return
        seen_peer = nat.nat_from_host(ctx.settings, family, peer_bytes) \
            if (ctx.net.ip4 if family == 4 else ctx.net.ip6) else None
        guest = nat.guest_target(ctx.net, ctx.seen, family, seen_peer, fwd.rule) \
            if seen_peer else None
        if seen_peer is None or guest is None:
            reject(f"IPv{family} is not available towards the guest")
            return
        key = (packet.IPPROTO_TCP, guest, fwd.rule.guest_port(lsock.getsockname()[1]),
               seen_peer, peer[1])
        if ctx.flows.get(key) is not None:
            reject("a flow with the same addresses exists")
            return
        sock.setblocking(False)
        failed = self._prepare(sock)
        if failed:
            reject(failed)
            return
        conn = TcpConn.from_host_accept(key, now, self._isn(key, now),
                                        tcp_seg.our_mss(family, ctx.net.mtu),
                                        ctx.settings.tcp_idle_timeout, self._hold_budget)
        conn.sock = sock
        conn.forward_id = fwd.id
        ctx.flows.add(conn)
        fwd.connections += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%r: accepted through forward %d", conn, fwd.id, extra=events.fields(
                flow_id=conn.id, forward_id=fwd.id, guest=conn.guest_addr))
        self.execute(conn, tcp.A_SYN, now)

    # -- flows from the previous process (handover.py) ----------------------------------------

    def adopt(self, conn: TcpConn, now: float) -> None:
        """A flow the previous process handed over, with its socket: carry on (tcp.py's
        `after_handover` says how). A connect() still in progress is watched again."""
        conn.reassembly = Reassembly(self._hold_budget)
        self.host.adopt(conn)
        if conn.events & tcp.TAP_SYN_RCVD and not conn.events & tcp.TAP_SYN_ACK_SENT:
            self.ctx.readiness.write(conn, self._connect_done)
        self.execute(conn, conn.after_handover(now), now)
        self.ctx.schedule(conn)

    def reset(self, conn: TcpConn, now: float) -> None:
        """End a flow a restart cannot carry: a reset to the guest and, where the flow
        still has its socket, to the host peer."""
        if conn.sock is None:
            self._control(conn, tcp.A_RST_GUEST, now)
        else:
            self.execute(conn, conn.abort(), now)

    # -- the end of a batch, and flows that end -----------------------------------------------

    def settle(self, now: float) -> bool:
        """Do the once-per-flow work the batch asked for; True if that asked for more."""
        if self._discard_due:  # (a new set only after work: most settles have none)
            discards, self._discard_due = self._discard_due, {}
            for conn in discards:
                if conn.sock is not None:
                    self.host.drop_acknowledged(conn)
        if self._ack_due:
            acks, self._ack_due = self._ack_due, {}
            for conn in acks:
                if conn.sock is not None:
                    self._send_ack(conn, now)
        if self._resume:
            resume, self._resume = self._resume, {}
            for conn in resume:
                self._read(conn, now)
        if self._acks_delayed and not self._ack_deadline.armed:
            self._ack_deadline.arm(now + ACK_DELAY)
        return bool(self._ack_due or self._resume or self._discard_due)

    def release(self, conn: TcpConn) -> bool:
        """The flow is closing: it leaves every pending set, and what it held goes."""
        conn.drop_held()
        for pending in (self._ack_due, self._discard_due, self._acks_delayed, self._resume):
            pending.pop(conn, None)
        return True

    def close(self) -> None:
        self.ctx.loop.poller.remove_deadline(self._ack_deadline)

    def trim(self) -> None:
        self.host.trim()

    def problems(self, flows: dict[int, Flow]) -> list[str]:
        """TCP flows closed but kept, or without a timer; delayed ACKs without one; pending
        work for flows that are gone (the fuzz targets check)."""
        out = [f"{conn!r} closed but still in the table" for conn in flows.values()
               if isinstance(conn, TcpConn) and conn.events & tcp.CLOSED]
        out += [f"{conn!r} has no timer: it never ends" for conn in flows.values()
                if isinstance(conn, TcpConn) and conn.deadline is None]
        if self._acks_delayed and not self._ack_deadline.armed:
            out.append(f"{len(self._acks_delayed)} delayed ACKs and no timer to send them")
        return out + [f"{conn!r} pending but not in the table"
                      for pending in (self._ack_due, self._resume, self._discard_due,
                                      self._acks_delayed)
                      for conn in pending if flows.get(conn.id) is not conn]
