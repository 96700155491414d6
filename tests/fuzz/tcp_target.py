"""TCP segment sequences against `TcpConn`, driven as the event loop drives it, with a model
of the host socket beside it and invariants checked after every step.

The input is a little program. After a header that opens the connection (from a guest SYN
or from a host accept: ISNs, window, MSS and window-scale options, our MSS), each op byte
picks one of:

  segments   1-4 guest segments (flags, sequence and acknowledgement numbers relative to
             what each side has sent, or raw 32-bit values; the last window or a new one;
             payload length; SYN options), then `commit` with what the "socket" took: all,
             nothing, part, or a write error (on_host_error), as TcpSockets.end_run does
  connect    the host connect() finished (host_connected) or failed (host_refused), once
  peer data  the host peer writes N bytes into the socket's receive queue
  peer eof   the host peer shuts its side
  read       tcp_peek.HostData.read: peek up to the send budget, on_sent, on_host_eof at
             the end of the data after EOF, window_closed when the budget is spent
  error      the host socket fails (on_host_error)
  time       the clock moves on; due timers fire (handle_timer) as Engine._on_timer does
  window     window_field(free) for a free send-buffer size, as TcpSockets._send_ack asks

The model is what the kernel would hold: the receive queue of the host socket (bytes the
peer wrote, minus those discarded) and the SO_PEEK_OFF position (advanced by peeks, set
back by discards, reset by A_REWIND). Invariants (a violation is a corrupted flow):

- sequence space: snd_una <= snd_nxt <= snd_max; in flight is exactly what was peeked
  (plus a FIN); the queue head is snd_una: a discard never drops a byte the guest did not
  acknowledge, nor more than the queue holds;
- guest data: every byte taken from a segment starts exactly at rcv_nxt (+ pending), no
  data after the guest's FIN, `commit` advances rcv_nxt by what was written (+1 for the
  FIN), and the socket is shut down once;
- windows and budgets never negative, window fields 16-bit, the RTO within its bounds;
- timers: an open connection always has a finite deadline, and after a timer fired the
  next one lies in the future (no busy loop); CLOSED is set exactly when A_CLOSE is
  returned, after which the loop forgets the flow (the program ends there);
- every control segment (TcpConn.control) acknowledges exactly rcv_nxt, never a byte the
  socket did not take, and carries a sequence number within what we sent.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from passtd.engine import tcp, tcp_seg
from passtd.engine.packet import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN
from passtd.engine.tcp import TcpConn, seq_diff

from .driver import Target

M32 = 0xFFFFFFFF
KEY = (6, bytes([198, 51, 100, 2]), 40000, bytes([198, 51, 100, 1]), 80)
TIME_STEPS = (0.001, 0.2, 1.0, 2.5, 10.0, 31.0, 61.0, 200.0, 7201.0)
PLENS = (0, 0, 1, 1, 7, 536, 1460, 65480)
FLAG_MASK = TCP_FIN | TCP_SYN | TCP_RST | TCP_PSH | TCP_ACK
# the actions tcp_sock.py answers with a segment built by TcpConn.control
CONTROLS = (tcp.A_SYN_ACK, tcp.A_SYN, tcp.A_FIN, tcp.A_KEEPALIVE, tcp.A_DUPACK, tcp.A_ACK)
WITH_ROOM = (tcp.A_SYN_ACK, tcp.A_SYN, tcp.A_ACK)


class Program:
    """Reads the input as numbers; past its end every read is 0 (the program stops)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.u8() << 8 | self.u8()

    def u32(self) -> int:
        return self.u16() << 16 | self.u16()

    def s8(self) -> int:
        v = self.u8()
        return v - 256 if v & 0x80 else v


class Model:
    """One connection, the host socket beside it, and the invariants."""

    def __init__(self, prog: Program) -> None:
        self.prog = prog
        self.now = 1000.0
        self.closed = False
        self.connect_settled = False  # host_connected / host_refused already happened
        self.queue = 0  # bytes in the host socket's receive queue
        self.peek = 0  # SO_PEEK_OFF
        self.discarded = 0
        self.peer_data = 0  # bytes the host peer wrote in all
        self.peer_eof = False
        self.written = 0  # guest bytes the host socket took
        self.shut_wr = False
        self.guest_isn: int | None = None
        self.guest_next = 0  # where the guest's next new byte goes, as it believes
        self.guest_window: int | None = None  # the window field of its last segment

        head = prog.u8()
        self.our_isn = prog.u32()
        our_mss = (65480, 1460, 536, 65461)[head >> 1 & 3]
        if head & 1:
            self.origin = "host"
            self.conn = TcpConn.from_host_accept(KEY, self.now, self.our_isn, our_mss)
        else:
            self.origin = "guest"
            seq, window = prog.u32(), prog.u16()
            mss, wscale = self._syn_options()
            self.conn = TcpConn.from_guest_syn(KEY, self.now, self.our_isn, our_mss, seq,
                                               window, mss, wscale)
            self.guest_isn = seq
            self.guest_next = (seq + 1) & M32
        self.check()

    def _syn_options(self) -> tuple[int | None, int | None]:
        """MSS and window scale as tcp_seg.parse_options can return them."""
        which = self.prog.u8()
        mss = self.prog.u16() if which & 1 else None
        wscale = min(self.prog.u8(), tcp_seg.MAX_WSCALE) if which & 2 else None
        return mss, wscale

    # -- the loop's reactions ---------------------------------------------------------------

    def apply(self, actions: int, events_before: int) -> None:
        conn = self.conn
        newly_closed = conn.events & tcp.CLOSED and not events_before & tcp.CLOSED
        assert bool(actions & tcp.A_CLOSE) == bool(newly_closed), \
            f"actions {actions:#x}, CLOSED {'set now' if newly_closed else 'unchanged'}"
        if actions & tcp.A_CLOSE:
            self.closed = True  # TcpSockets.execute: RST if asked, close, forget the flow
            return
        if actions & tcp.A_DISCARD:
            assert 0 < conn.discard <= self.queue, \
                f"discarding {conn.discard} bytes of a queue of {self.queue}"
            self.queue -= conn.discard
            self.discarded += conn.discard
            self.peek = max(0, self.peek - conn.discard)  # the kernel's sk_peek_offset_bwd
            conn.discard = 0
        if actions & tcp.A_REWIND:
            self.peek = 0
        if actions & tcp.A_SHUT_WR:
            assert not self.shut_wr, "shutdown(SHUT_WR) twice"
            self.shut_wr = True
        assert not actions & tcp.A_SYN_ACK or self.origin == "guest"
        assert not actions & tcp.A_SYN or self.origin == "host"
        for control in CONTROLS:
            if actions & control:
                # the window of SYNs and plain ACKs is the socket's room now; duplicate
                # ACKs, FINs and probes repeat the last one
                free = self.prog.u16() << 4 if control in WITH_ROOM else None
                self.check_segment(control, conn.control(control, free))

    def check_segment(self, action: int, seg: tcp_seg.Segment) -> None:
        """A control segment as TcpConn.control builds it: the numbers the guest gets."""
        conn = self.conn
        assert 0 <= seg.window <= 0xFFFF, f"window field {seg.window}"
        if seg.flags & TCP_ACK:
            assert seg.ack == conn.rcv_nxt == conn.ack_sent, "an ACK of something else"
            if self.guest_isn is not None:
                assert 0 <= seq_diff(seg.ack, self.guest_isn + 1) <= self.written + 1, \
                    "an ACK of bytes the socket did not take"
        if seg.flags & TCP_SYN:
            assert seg.seq == self.our_isn and seg.options[:2] == bytes((2, 4))
        else:
            behind = seq_diff(conn.snd_max, seg.seq)
            assert 0 <= behind <= seq_diff(conn.snd_max, conn.snd_una) + 1, \
                f"sequence number {seg.seq} outside what we sent"

    def check(self) -> None:
        conn = self.conn
        if self.closed:
            return
        events = conn.events
        assert not events & tcp.CLOSED
        in_flight = seq_diff(conn.snd_nxt, conn.snd_una)
        assert in_flight >= 0, f"snd_nxt {conn.snd_nxt} before snd_una {conn.snd_una}"
        assert seq_diff(conn.snd_max, conn.snd_nxt) >= 0, "snd_nxt beyond snd_max"
        assert conn.guest_wnd >= 0 and conn.wnd_to_guest >= 0 and conn.send_budget() >= 0
        assert tcp.RTO_INITIAL <= conn.rto <= tcp.RTO_MAX and conn.retries >= 0
        assert conn.rcv_pending == 0 and conn.discard == 0
        assert conn.deadline is not None and math.isfinite(conn.deadline), \
            "an open connection without a timer never ends"
        assert conn.bytes_from_guest == self.written
        assert conn.bytes_to_guest <= self.peer_data
        if events & tcp.ESTABLISHED:
            fin_in_flight = 1 if events & tcp.TAP_FIN_SENT and not events & tcp.TAP_FIN_ACKED \
                else 0
            assert self.peek == in_flight - fin_in_flight, \
                f"peek offset {self.peek}, but {in_flight - fin_in_flight} bytes in flight"
            assert self.peek <= self.queue, "more in flight than the socket holds"
            fin_acked = 1 if events & tcp.TAP_FIN_ACKED else 0
            head = (self.our_isn + 1 + self.discarded + fin_acked) & M32
            assert conn.snd_una == head, \
                f"snd_una {conn.snd_una}, but the socket queue starts at {head}"
            if self.guest_isn is not None:
                fin = 1 if events & tcp.TAP_FIN_RCVD else 0
                assert seq_diff(conn.rcv_nxt, self.guest_isn + 1) == self.written + fin, \
                    "rcv_nxt does not match the guest bytes written"
            assert bool(events & tcp.TAP_FIN_RCVD) == self.shut_wr

    # -- ops ----------------------------------------------------------------------------------

    def segments(self) -> None:
        prog, conn = self.prog, self.conn
        count = 1 + prog.u8() % 4
        taken = 0
        rcv_before = conn.rcv_nxt
        fin_before = conn.events & tcp.TAP_FIN_RCVD
        was_established = conn.events & tcp.ESTABLISHED  # a SYN-ACK sets rcv_nxt anew
        for _ in range(count):
            head = prog.u8()
            flags = head & FLAG_MASK
            seq = self._number(prog.u8(), (self.guest_next, conn.rcv_nxt,
                                           conn.rcv_nxt + conn.rcv_pending))
            ack = self._number(prog.u8(), (conn.snd_nxt, conn.snd_una, conn.snd_max))
            if head & 0x80 or self.guest_window is None:  # else the same as last time
                self.guest_window = prog.u16()
            window = self.guest_window
            pick = prog.u8()
            plen = PLENS[pick & 7] if pick < 0xF0 else prog.u16()
            mss, wscale = self._syn_options() if flags & TCP_SYN else (None, None)
            expected = (conn.rcv_nxt + conn.rcv_pending) & M32
            events = conn.events
            established = events & tcp.ESTABLISHED
            actions = conn.on_segment(flags, seq, ack, window, plen, self.now, mss, wscale)
            if conn.data_take:
                assert conn.data_skip >= 0 and conn.data_skip + conn.data_take <= plen
                assert (seq + conn.data_skip) & M32 == expected, \
                    f"data taken from {seq + conn.data_skip}, the stream is at {expected}"
                assert not events & tcp.TAP_FIN_RCVD, "data taken after the guest's FIN"
                taken += conn.data_take
            if not established and conn.events & tcp.ESTABLISHED and self.origin == "host":
                self.guest_isn = (conn.rcv_nxt - 1) & M32
            self.guest_next = (seq + plen + (1 if flags & (TCP_SYN | TCP_FIN) else 0)) & M32
            self.apply(actions, events)
            if self.closed:
                return  # the flow is gone: the rest of the batch finds no connection
        # the batch's data goes out in one sendmsg; the socket takes some of it
        how = prog.u8() & 3
        if how == 3 and taken:
            events = conn.events
            self.apply(conn.on_host_error(), events)
            return
        written = (taken, 0, taken // 2 + (1 if taken & 1 else 0), taken)[how]
        events = conn.events
        actions = conn.commit(written, self.now)
        self.written += written
        self.apply(actions, events)
        if self.closed:
            return
        fin = 1 if conn.events & tcp.TAP_FIN_RCVD and not fin_before else 0
        if was_established:
            assert seq_diff(conn.rcv_nxt, rcv_before) == written + fin
        if fin:
            assert actions & tcp.A_SHUT_WR

    def _number(self, mode: int, bases: tuple[int, int, int]) -> int:
        """A sequence or acknowledgement number: near one of `bases`, or anything."""
        if mode & 3 == 3:
            return self.prog.u32()
        value = bases[mode & 3]
        if mode & 4:
            value += self.prog.s8()
        return value & M32

    def connect(self) -> None:
        if self.origin != "guest" or self.connect_settled:
            return
        self.connect_settled = True
        events = self.conn.events
        refuse = self.prog.u8() & 1
        self.apply(self.conn.host_refused() if refuse else self.conn.host_connected(self.now),
                   events)

    def peer_write(self) -> None:
        if not self.peer_eof:
            n = self.prog.u16() * (1 + (self.prog.u8() & 3))
            self.peer_data += n
            self.queue += n

    def peer_shutdown(self) -> None:
        self.peer_eof = True

    def read(self) -> None:
        """loop._tcp_host_readable (each round peeks what the slots and the budget take)."""
        conn = self.conn
        if not conn.events & tcp.ESTABLISHED:
            return
        slots = 1 + self.prog.u8() % 64
        for _ in range(4):  # TCP_READ_ROUNDS
            budget = conn.send_budget()
            if budget <= 0:
                conn.window_closed(self.now)
                return
            available = self.queue - self.peek
            if available <= 0:
                if self.peer_eof:
                    events = conn.events
                    self.apply(conn.on_host_eof(self.now), events)
                return
            n = min(budget, available, slots * conn.mss_to_guest)
            assert n > 0
            before = conn.snd_nxt
            conn.on_sent(n, self.now)
            self.peek += n
            assert conn.snd_nxt == (before + n) & M32
            self.check()

    def host_error(self) -> None:
        events = self.conn.events
        self.apply(self.conn.on_host_error(), events)

    def advance(self) -> None:
        self.now += TIME_STEPS[self.prog.u8() % len(TIME_STEPS)]
        conn = self.conn
        for _ in range(64):
            if self.closed or conn.deadline is None or conn.deadline > self.now:
                return
            events = conn.events
            actions = conn.handle_timer(self.now)
            self.apply(actions, events)
            if not self.closed:
                assert conn.deadline is not None and conn.deadline > self.now, \
                    f"timer kind {conn.timer_kind} due again at once after firing"
        raise AssertionError("a timer keeps firing without time passing")

    def window(self) -> None:
        free = self.prog.u32() >> (self.prog.u8() & 31)
        value = self.conn.window_field(free)
        assert 0 <= value <= 0xFFFF and 0 <= self.conn.wnd_to_guest <= free


OPS = ("segments", "segments", "segments", "connect", "peer_write", "peer_shutdown", "read",
       "read", "host_error", "advance", "window")


def run_tcp(data: bytes, trace: Callable[[str], None] | None = None) -> None:
    """Run one program; `trace` (run.py --repro --verbose) is told each op and its result."""
    prog = Program(data)
    model = Model(prog)
    steps = 0
    while not prog.done and not model.closed and steps < 200:
        op = OPS[prog.u8() % len(OPS)]
        if op == "host_error" and prog.u8() & 7:  # keep the end of everything rare
            continue
        getattr(model, op)()
        if trace:
            trace(f"{op:13} -> {_state(model)}")
        model.check()
        steps += 1


def _state(model: Model) -> str:
    conn = model.conn
    return (f"{conn.state_name()} events {conn.events:#x} una {conn.snd_una} nxt {conn.snd_nxt} "
            f"max {conn.snd_max} rcv {conn.rcv_nxt} wnd {conn.guest_wnd} deadline "
            f"{conn.deadline} | socket queue {model.queue} peek {model.peek} "
            f"written {model.written} now {model.now}")


def _seeds() -> list[bytes]:
    """Hand-written programs: open, data both ways, FINs, retransmission, a zero window."""
    guest_open = bytes.fromhex("00" "00001388" "000003e8" "ffff" "03" "05b4" "07")
    host_open = bytes.fromhex("01" "fffffff0")
    new_window = 0x80
    connect = bytes((3, 0))
    # one segment: ACK of everything sent, window 65535, no data; the socket takes all
    ack = bytes((0, 0, new_window | TCP_ACK, 0, 0, 0xFF, 0xFF, 0, 0))
    dupack = bytes((0, 0, TCP_ACK, 0, 1, 0, 0))  # ACK of snd_una again, same window
    data = bytes((0, 1, TCP_ACK | TCP_PSH, 0, 0, 5, TCP_ACK, 0, 0, 6, 0))  # 536 + 1460 bytes
    fin = bytes((0, 0, TCP_FIN | TCP_ACK, 0, 0, 0, 0))
    syn_ack = bytes((0, 0, new_window | TCP_SYN | TCP_ACK, 3, 0, 0, 0x10, 0, 0, 0xFF, 0xFF, 0,
                     3, 0x05, 0xB4, 7, 0))
    peer = bytes((4, 0x40, 0, 1))
    read = bytes((6, 8))
    eof = bytes((5,))
    rto = bytes((9, 3))
    long_wait = bytes((9, 8))
    zero = bytes((0, 0, new_window | TCP_ACK, 0, 2, 0, 0, 0, 0))  # ACK of all, window 0
    return [
        guest_open + connect + ack + data + peer + read + ack + fin + eof + read + rto + ack,
        guest_open + connect + ack + peer + read + rto + read + ack + eof + read + fin + ack,
        guest_open + connect + ack + zero + peer + read + rto + rto + ack + read,
        guest_open + connect + ack + peer + read + dupack * 4 + read + ack,
        guest_open + connect + ack + peer + (read + long_wait) * 9,
        host_open + syn_ack + peer + read + eof + read + rto + ack + fin + long_wait,
        host_open + long_wait * 8,
        guest_open + bytes((9, 5)) + connect,
    ]


TCP_TARGET = Target("tcp", run_tcp, _seeds, max_len=1024,
                    doc="TcpConn under segment sequences, socket results and time")
