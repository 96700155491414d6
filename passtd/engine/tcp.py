"""TCP translation without a TCP stack: one guest connection mirrored onto one host socket.

Rules: everything that decides a TCP flow's state and numbers lives in this file (with
the stateless pieces in tcp_seg.py and the out-of-order hold in tcp_hold.py). `TcpConn`
never touches a socket or a clock: the socket half (tcp_sock.py) feeds it guest segments,
socket results and the time, and it answers with an action bitmask (the `A_*` flags
below) telling the socket half what to do (send an ACK, write guest data, shut the socket
down, retransmit...). Every segment without payload that goes to the guest comes whole
from `control` (flags, seq, ack, window, options); the socket half only addresses and
sends it. The numbers for writes travel as attributes (`data_skip`, `data_take`,
`discard`).

Theory of operation (the same as passt's tcp.c):

- Guest opens: on its SYN the loop starts a non-blocking connect(); only when it succeeds
  does the guest get our SYN-ACK (`host_connected`), so a closed port answers the guest
  with a RST (`host_refused`) instead of an accepted connection that dies.
- Host opens (port forward): the accepted socket becomes a SYN to the guest; its SYN-ACK
  establishes the flow, its RST resets the host peer.
- Guest -> host data is written to the socket as it arrives in order and acknowledged
  only as far as the socket accepted it (`on_segment` then `commit`). We never queue guest
  data ourselves: what the socket refuses the guest retransmits. The window we advertise
  is the socket's free send space, so a healthy guest never overruns it. Data that
  arrives after a gap (a frame lost on the way) is held (tcp_hold.py) and written once
  the guest fills the gap.
- Host -> guest data stays in the socket's receive queue until the guest acknowledges
  it: the loop reads with MSG_PEEK (SO_PEEK_OFF keeps the read position after what was
  already sent) and drops acknowledged bytes (`discard`). Retransmission rewinds to the
  last acknowledged byte (`A_REWIND`) and peeks again. So memory per flow is bounded by
  kernel socket buffers, not by us.
- The guest's window bounds what we send (`send_budget`); at zero the loop stops reading
  the socket, which in turn closes the host peer's window: backpressure end to end.
- FINs map to shutdown(SHUT_WR) and to socket EOF; a guest RST closes the socket with
  SO_LINGER 0 so the peer sees a RST too; a socket error becomes a RST to the guest.

The connection state is the set of events that happened (passt's approach), not an RFC
state; `state_name` maps it to the nearest RFC name for listings.

SACK: we tell the guest which segments we hold past a gap, so that it resends only the
holes; SACK blocks the guest sends about our data are ignored (RFC 2018 lets a sender
ignore them: our retransmissions go back to the last acknowledged byte).

Deliberately not implemented: timestamps, PAWS, urgent data, path MTU discovery,
congestion control towards the guest (it is one virtual hop away; the window is the
control), and TCP_WINDOW_CLAMP (it can lock the window at zero: passt bug 74).
"""

from __future__ import annotations

from typing import Final

from .flow import A_CLOSE as FLOW_CLOSE
from .flow import COUNTER_MAX, Flow, FlowKey
from .packet import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from .tcp_hold import HoldBudget, Reassembly
from .tcp_seg import MAX_WSCALE, Segment, seq_diff, syn_options
from .tcp_seg import SEQ_MASK as _SEQ_MASK

# -- events: the connection state is the set of these that happened ------------------------
SOCK_ACCEPTED: Final = 1 << 0  # host opened (forward): SYN sent to the guest
TAP_SYN_RCVD: Final = 1 << 1  # guest opened: its SYN seen, host connect() in progress
TAP_SYN_ACK_SENT: Final = 1 << 2  # guest opened: connect() done, our SYN-ACK sent
ESTABLISHED: Final = 1 << 3
SOCK_FIN_RCVD: Final = 1 << 4  # host peer shut its side (EOF on the socket)
SOCK_FIN_SENT: Final = 1 << 5  # we shut the socket's write side (after the guest's FIN)
TAP_FIN_RCVD: Final = 1 << 6  # guest FIN received (and everything before it)
TAP_FIN_SENT: Final = 1 << 7  # FIN sent to the guest
TAP_FIN_ACKED: Final = 1 << 8  # ... and acknowledged
CLOSED: Final = 1 << 9

# -- actions: what the event loop must do after a call --------------------------------------
A_ACK: Final = 1 << 0  # send an ACK (current window) to the guest
A_SHUT_WR: Final = 1 << 1  # shutdown(SHUT_WR) the host socket
A_DISCARD: Final = 1 << 2  # drop `discard` acknowledged bytes from the socket's receive queue
# (they add up over several segments until the loop drops them and zeroes `discard`)
A_REWIND: Final = 1 << 3  # retransmit: the next read peeks from the last acknowledged byte
A_RESUME: Final = 1 << 4  # the guest can take data again: read the host socket
A_RST_GUEST: Final = 1 << 5  # send a RST to the guest
A_RST_PEER: Final = 1 << 6  # close the socket with SO_LINGER 0 (RST to the host peer)
A_CLOSE: Final = FLOW_CLOSE  # the flow is over: close the socket and forget the flow (flow.py)
A_SYN_ACK: Final = 1 << 8  # send our SYN-ACK to the guest
A_SYN: Final = 1 << 9  # send our SYN to the guest
A_FIN: Final = 1 << 10  # send FIN to the guest
A_KEEPALIVE: Final = 1 << 11  # send a keepalive probe (sequence one below) to the guest
A_SOCK_KEEPALIVE: Final = 1 << 12  # enable SO_KEEPALIVE on the host socket
A_WAIT_WRITABLE: Final = 1 << 13  # the socket refused data: tell us when it has room again
A_ESTABLISHED: Final = 1 << 14  # handshake done: start reading the host socket
A_ACK_DELAYED: Final = 1 << 15  # an ACK is due but may wait a moment for data to carry it
A_HOLD: Final = 1 << 16  # keep this segment's payload aside with `hold`: it came after a gap
A_RELEASE: Final = 1 << 17  # held data is in order now: write `released`, then `commit` again
A_DUPACK: Final = 1 << 18  # a duplicate ACK, now: one per segment past a gap (RFC 5681 3.2)
A_ABORT: Final = A_RST_GUEST | A_RST_PEER | A_CLOSE

# -- timers ---------------------------------------------------------------------------------
T_NONE: Final = 0
T_CONNECT: Final = 1  # host connect() for a guest SYN takes too long
T_HANDSHAKE: Final = 2  # our SYN or SYN-ACK was not answered: send it again
T_RTO: Final = 3  # data or FIN in flight and not acknowledged: retransmit
T_PROBE: Final = 4  # the guest's window is shut and nothing is in flight: probe it
T_KEEPALIVE: Final = 5  # no guest activity for a while: keepalive probe, or reset if idle too long

CONNECT_TIMEOUT: Final = 10.0  # passt's SYN_TIMEOUT
RTO_INITIAL: Final = 1.0
RTO_MAX: Final = 60.0
MAX_RETRIES: Final = 7  # then reset (passt: TCP_MAX_RETRANS)
HANDSHAKE_RETRIES: Final = 6
KEEPALIVE_INTERVAL: Final = 30.0  # tap-side silence before we probe the guest
DEFAULT_IDLE_TIMEOUT: Final = 7200.0
DUPACK_THRESHOLD: Final = 3
# segments' worth of unacknowledged guest data that is ACKed at once (RFC 9293)
ACK_EVERY: Final = 2

OUR_WSCALE: Final = 8  # windows we advertise go up to 16 MiB: above a big socket send buffer
DEFAULT_GUEST_MSS: Final = 536  # RFC 9293 default when the SYN carries no MSS option


class TcpConn(Flow):
    """One TCP connection between the guest and a host socket. See the module docstring."""

    __slots__ = (
        "ack_sent",
        "data_skip",
        "data_take",
        "discard",
        "dupacks",
        "events",
        "fin_seq",
        "guest_fin_at",
        "guest_mss",
        "guest_wnd",
        "guest_wscale",
        "idle_timeout",
        "last_activity",
        "our_isn",
        "our_mss",
        "our_wscale",
        "rcv_nxt",
        "rcv_pending",
        "reassembly",
        "recover",
        "released",
        "retries",
        "rto",
        "rto_base",
        "sack_ok",
        "snd_max",
        "snd_nxt",
        "snd_una",
        "timer_kind",
        "wnd_to_guest",
        "zero_window",
    )

    @property
    def proto_name(self) -> str:
        return "tcp"

    # not carried: what one batch leaves (written and settled before a handover) and
    # held out-of-order data (the guest sends it again)
    HANDOVER_FIELDS = (*Flow.HANDOVER_FIELDS, "events", "our_isn", "our_mss", "snd_una",
                       "snd_nxt", "snd_max", "guest_wnd", "guest_wscale", "our_wscale",
                       "guest_mss", "zero_window", "dupacks", "recover", "discard", "fin_seq",
                       "rcv_nxt", "ack_sent", "sack_ok", "wnd_to_guest", "timer_kind",
                       "retries", "rto", "rto_base", "last_activity", "idle_timeout")
    HANDOVER_LIMITS = {  # (Flow.HANDOVER_LIMITS)
        **Flow.HANDOVER_LIMITS, "events": (0, (CLOSED << 1) - 1), "timer_kind": (0, T_KEEPALIVE),
        **dict.fromkeys(("our_isn", "snd_una", "snd_nxt", "snd_max", "recover", "fin_seq",
                         "rcv_nxt", "ack_sent"), (0, _SEQ_MASK)),
        **dict.fromkeys(("our_mss", "guest_mss"), (1, 0xFFFF)),
        **dict.fromkeys(("guest_wscale", "our_wscale"), (0, MAX_WSCALE)),
        **dict.fromkeys(("guest_wnd", "wnd_to_guest", "discard"), (0, 0xFFFF << MAX_WSCALE)),
        **dict.fromkeys(("dupacks", "retries", "idle_timeout"), (0, COUNTER_MAX)),
        "rto": (RTO_INITIAL, RTO_MAX)}

    def __init__(self, key: FlowKey, origin: str, now: float, our_isn: int, our_mss: int,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 hold_budget: HoldBudget | None = None) -> None:
        super().__init__(key, origin, now)
        self.events = 0
        self.our_isn = our_isn & _SEQ_MASK
        self.our_mss = our_mss
        # host -> guest direction (our sequence space)
        self.snd_una = self.snd_nxt = self.snd_max = self.our_isn
        self.guest_wnd = 0
        self.guest_wscale = 0
        self.our_wscale = 0
        self.guest_mss = DEFAULT_GUEST_MSS
        self.zero_window = False
        self.dupacks = 0
        self.recover = self.our_isn
        self.discard = 0
        self.fin_seq: int | None = None  # our FIN's sequence number, once sent
        # guest -> host direction (the guest's sequence space)
        self.rcv_nxt = 0
        self.ack_sent = 0  # the last ACK number the guest got from us (the loop sets it)
        self.reassembly = Reassembly(hold_budget if hold_budget is not None else HoldBudget())
        self.released: list[bytes] = []
        self.sack_ok = False  # the guest accepts SACK blocks from us (RFC 2018)
        self.rcv_pending = 0
        self.guest_fin_at: int | None = None
        self.data_skip = 0
        self.data_take = 0
        self.wnd_to_guest = 0
        # timers
        self.timer_kind = T_NONE
        self.retries = 0
        self.rto = RTO_INITIAL
        self.rto_base = now
        self.last_activity = now
        self.idle_timeout = idle_timeout

    # -- opening ------------------------------------------------------------------------------
    # (static: compiled, TcpConn(...) is a native call where cls(...) is a generic one)

    @staticmethod
    def from_guest_syn(key: FlowKey, now: float, our_isn: int, our_mss: int, seq: int,
                       window: int, mss: int | None, wscale: int | None, sack: bool = False,
                       idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                       hold_budget: HoldBudget | None = None) -> TcpConn:
        """The guest's SYN: the loop is about to connect() the host socket."""
        conn = TcpConn(key, "guest", now, our_isn, our_mss, idle_timeout, hold_budget)
        conn.events = TAP_SYN_RCVD
        conn._take_guest_syn(seq, window, mss, wscale, sack)
        conn._arm(now)
        return conn

    @staticmethod
    def from_host_accept(key: FlowKey, now: float, our_isn: int, our_mss: int,
                         idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                         hold_budget: HoldBudget | None = None) -> TcpConn:
        """A host peer connected through a forward: the loop sends our SYN (`A_SYN`)."""
        conn = TcpConn(key, "host", now, our_isn, our_mss, idle_timeout, hold_budget)
        conn.events = SOCK_ACCEPTED
        conn.our_wscale = OUR_WSCALE
        conn.snd_nxt = conn.snd_max = (conn.our_isn + 1) & _SEQ_MASK  # the SYN takes one
        conn._arm(now)
        return conn

    def _take_guest_syn(self, seq: int, window: int, mss: int | None, wscale: int | None,
                        sack: bool) -> None:
        self.rcv_nxt = self.ack_sent = (seq + 1) & _SEQ_MASK
        self.sack_ok = sack
        self.guest_mss = mss if mss else DEFAULT_GUEST_MSS
        if wscale is None:  # no scaling unless both sides offer it (RFC 7323 2.2)
            self.guest_wscale = 0
            self.our_wscale = 0
        else:
            self.guest_wscale = wscale
            self.our_wscale = OUR_WSCALE
        self.guest_wnd = window  # the window in a SYN is never scaled

    def host_connected(self, now: float) -> int:
        """connect() succeeded: answer the guest's SYN."""
        if not self.events & TAP_SYN_RCVD or self.events & TAP_SYN_ACK_SENT:
            return 0
        self.events |= TAP_SYN_ACK_SENT
        self.snd_nxt = self.snd_max = (self.our_isn + 1) & _SEQ_MASK
        self.rto_base = now
        self._arm(now)
        return A_SYN_ACK

    def after_handover(self, now: float) -> int:
        """The flow came from the previous process (handover.py) with its socket. What it
        sent the guest and the guest has not acknowledged is still in the socket: send it
        again from the last acknowledged byte, and tell the guest our window, since it may
        have waited for one while no process read qemu."""
        if not self.events & ESTABLISHED or self.events & CLOSED:
            return 0  # a handshake in progress: its timer resends what it must
        actions = A_ACK | self._rewind()
        if self.discard:
            actions |= A_DISCARD
        self._arm(now)
        return actions

    def abort(self) -> int:
        """End the flow now, with a reset both ways (a restart could not carry it)."""
        self.events |= CLOSED
        return A_ABORT

    def host_refused(self) -> int:
        """connect() failed: the guest sees a RST, as from a closed port."""
        self.events |= CLOSED
        return A_RST_GUEST | A_CLOSE

    @property
    def mss_to_guest(self) -> int:
        """Largest segment we send: the guest's MSS, within our own frame size."""
        return min(self.guest_mss, self.our_mss)

    # -- segments from the guest -------------------------------------------------------------

    def on_segment(self, flags: int, seq: int, ack: int, window: int, plen: int, now: float,
                   mss: int | None = None, wscale: int | None = None,
                   sack: bool = False) -> int:
        """One guest segment. Payload to write: `data_take` bytes from offset `data_skip`.

        The loop may call this for several segments of a batch before writing their data
        with one sendmsg; `commit` then settles what the socket took.
        """
        self.data_take = 0
        self.last_activity = now
        events = self.events
        if events & CLOSED:
            return 0
        if not events & ESTABLISHED:
            return self._handshake_segment(flags, seq, ack, window, plen, now, mss, wscale, sack)
        if flags & TCP_RST:
            # accept a RST anywhere in the window we offered (RFC 5961 would challenge
            # the inexact ones; the guest is on a private link with no blind attacker)
            if 0 <= seq_diff(seq, self.rcv_nxt) <= max(self.wnd_to_guest, 1):
                self.events |= CLOSED
                return A_RST_PEER | A_CLOSE
            return 0
        if flags & TCP_SYN:
            return A_ACK  # a stray SYN on an established flow: remind it where we are
        expected = (self.rcv_nxt + self.rcv_pending) & _SEQ_MASK
        if (
            flags & (TCP_ACK | TCP_FIN) == TCP_ACK
            and seq == expected
            and plen
            and ack == self.snd_una
            and window << self.guest_wscale == self.guest_wnd
            and not events & TAP_FIN_RCVD
            and self.guest_fin_at is None
        ):
            # the bulk of guest->host traffic: the next data in order, nothing else new
            self.data_skip = 0
            self.data_take = plen
            self.rcv_pending += plen
            return 0
        actions = self._on_ack(flags, ack, window, plen, now) if flags & TCP_ACK else 0

        offset = seq_diff(seq, expected)
        fin = flags & TCP_FIN
        # the guest's FIN ends its stream, also while it waits in this batch for commit()
        stream_ended = events & TAP_FIN_RCVD or self.guest_fin_at is not None
        if fin and stream_ended:
            return actions | A_ACK  # a retransmitted FIN: our ACK of it was lost
        if plen:
            if stream_ended:
                return actions | A_ACK  # data after the FIN: duplicate ACK
            if offset > 0:  # a gap: duplicate ACK, and keep the data if it fits
                if not fin and offset + plen <= self.wnd_to_guest \
                        and self.reassembly.admits(plen):
                    return actions | A_DUPACK | A_HOLD
                return actions | A_DUPACK
            skip = -offset
            if skip < plen:
                self.data_skip = skip
                self.data_take = plen - skip
                self.rcv_pending += self.data_take
            elif not fin or skip > plen:
                if plen == 1 and skip == 1:  # keepalive probe with one byte (RFC 9293 3.8.4)
                    return actions | A_ACK | A_SOCK_KEEPALIVE
                return actions | A_ACK  # all seen already: the guest missed our ACK
        elif offset == -1 and not fin:
            return actions | A_ACK | A_SOCK_KEEPALIVE  # zero-length keepalive probe
        if fin and seq_diff((seq + plen) & _SEQ_MASK, expected) == self.data_take:
            # the FIN follows the data we are taking: settled in commit()
            self.guest_fin_at = (seq + plen) & _SEQ_MASK
        return actions

    def in_order(self) -> tuple[int, int, int] | None:
        """Seq, ACK, window fields that on_segment's bulk branch takes now (tcp_run.py)."""
        window = self.guest_wnd >> self.guest_wscale  # (only numbers header fields hold)
        if self.events & (CLOSED | TAP_FIN_RCVD | ESTABLISHED) != ESTABLISHED \
                or self.guest_fin_at is not None or not 0 <= self.snd_una <= _SEQ_MASK \
                or not 0 <= window <= 0xFFFF or window << self.guest_wscale != self.guest_wnd:
            return None
        return (self.rcv_nxt + self.rcv_pending) & _SEQ_MASK, self.snd_una, window

    def take_in_order(self, nbytes: int) -> None:  # (on_segment's bulk branch, summed)
        self.rcv_pending += nbytes

    def _handshake_segment(self, flags: int, seq: int, ack: int, window: int, plen: int,
                           now: float, mss: int | None, wscale: int | None, sack: bool) -> int:
        events = self.events
        if flags & TCP_RST:
            if events & SOCK_ACCEPTED and not (flags & TCP_ACK and ack != self.snd_nxt):
                self.events |= CLOSED  # the guest port is closed: reset the host peer
                return A_RST_PEER | A_CLOSE
            if events & TAP_SYN_RCVD:
                self.events |= CLOSED
                return A_RST_PEER | A_CLOSE
            return 0
        if events & SOCK_ACCEPTED:
            if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK and ack == self.snd_nxt:
                self._take_guest_syn(seq, window, mss, wscale, sack)
                self.events |= ESTABLISHED
                self.snd_una = ack
                self.retries = 0
                self.rto = RTO_INITIAL
                self._arm(now)
                return A_ACK | A_ESTABLISHED
            return 0
        if not events & TAP_SYN_ACK_SENT:
            return 0  # still connecting: the guest's SYN retransmissions wait for connect()
        if flags & TCP_SYN:
            return A_SYN_ACK  # our SYN-ACK was lost
        if flags & TCP_ACK and ack == self.snd_nxt:
            self.events |= ESTABLISHED
            self.snd_una = ack
            self.guest_wnd = window << self.guest_wscale
            self.retries = 0
            self.rto = RTO_INITIAL
            self._arm(now)
            more = self.on_segment(flags & ~TCP_ACK, seq, ack, window, plen, now)
            return A_ESTABLISHED | more
        return 0

    def _on_ack(self, flags: int, ack: int, window: int, plen: int, now: float) -> int:
        actions = 0
        new_wnd = window << self.guest_wscale
        acked = seq_diff(ack, self.snd_una)
        if acked > 0 and seq_diff(self.snd_max, ack) >= 0:
            # our FIN is the last thing in our sequence space: an ACK beyond it covers it,
            # whether or not a retransmission timeout has rewound us since it was sent
            fin_acked = (self.fin_seq is not None and not self.events & TAP_FIN_ACKED
                         and seq_diff(ack, self.fin_seq) > 0)
            if fin_acked:
                self.events |= TAP_FIN_SENT | TAP_FIN_ACKED
                acked -= 1  # the FIN occupies a sequence number but no byte in the socket
            self.snd_una = ack
            if seq_diff(self.snd_nxt, ack) < 0:
                self.snd_nxt = ack  # a retransmission was overtaken by the guest's ACK
            if acked:
                self.discard += acked  # the loop drops it once per batch
                actions |= A_DISCARD
            self.dupacks = 0
            self.retries = 0
            self.rto = RTO_INITIAL
            self.rto_base = now
            actions |= A_RESUME
            if fin_acked and self.events & TAP_FIN_RCVD:
                self.events |= CLOSED
                actions |= A_CLOSE
        elif (
            acked == 0
            and not plen
            and not flags & (TCP_SYN | TCP_FIN)
            and new_wnd == self.guest_wnd
            and self.snd_nxt != self.snd_una
            and seq_diff(self.snd_una, self.recover) >= 0
        ):
            self.dupacks += 1
            if self.dupacks == DUPACK_THRESHOLD:
                # the guest lost a segment: go back to it (no SACK: resend from there)
                self.recover = self.snd_max
                actions |= self._rewind()
        if new_wnd:
            self.zero_window = False
        if new_wnd != self.guest_wnd:
            if new_wnd > self.guest_wnd:
                actions |= A_RESUME
            self.guest_wnd = new_wnd
        self._arm(now)
        return actions

    def commit(self, written: int, now: float) -> int:
        """The socket took `written` of the bytes `on_segment` asked to write this batch.

        Called with 0 and nothing pending, it only releases held data that is in order.
        """
        actions = 0
        if self.rcv_pending:
            pending = self.rcv_pending
            self.rcv_nxt = (self.rcv_nxt + written) & _SEQ_MASK
            self.bytes_from_guest += written
            if written < pending:
                # the rest is retransmitted by the guest later: tell it now where we are
                actions |= A_WAIT_WRITABLE | A_ACK
            elif seq_diff(self.rcv_nxt, self.ack_sent) < ACK_EVERY * self.mss_to_guest:
                actions |= A_ACK_DELAYED  # a reply may carry it (request/response)
            else:
                actions |= A_ACK
            self.rcv_pending = 0
        fin_in_order = self.guest_fin_at == self.rcv_nxt and not self.events & TAP_FIN_RCVD
        if fin_in_order:
            # the FIN fixes where the stream ends (RFC 9293 3.10.7.4): what is held either
            # repeats bytes this FIN's segment carried or lies past the end, where the guest
            # sent nothing; releasing it would acknowledge bytes that were never sent
            self.drop_held()
        elif self.reassembly and not actions & A_WAIT_WRITABLE:
            actions |= self._release()  # (when the socket is full: once it has room again)
        if self.guest_fin_at is not None:
            if fin_in_order:
                self.events |= TAP_FIN_RCVD | SOCK_FIN_SENT
                self.rcv_nxt = (self.rcv_nxt + 1) & _SEQ_MASK
                actions |= A_SHUT_WR | A_ACK
                if self.events & TAP_FIN_ACKED:
                    self.events |= CLOSED
                    actions |= A_CLOSE
            self.guest_fin_at = None
        if actions:
            self._arm(now)
        return actions

    def hold(self, seq: int, data: bytes) -> None:
        """Keep a segment that came after a gap (`A_HOLD`) until the gap is filled."""
        self.reassembly.add(seq, data, self.rcv_nxt)

    def drop_held(self) -> None:
        """The flow is gone: what it held goes, and back to the instance's budget."""
        self.reassembly.clear()

    def _release(self) -> int:
        """Held data that the last write made contiguous: `released`, to write next."""
        out = self.reassembly.take_contiguous(self.rcv_nxt)
        if not out:
            return 0
        self.released = out
        self.rcv_pending = sum(map(len, out))
        return A_RELEASE

    # -- segments to the guest ---------------------------------------------------------------

    def control(self, action: int, free: int | None = None) -> Segment:
        """The segment without payload that `action` asks for: one of A_SYN, A_SYN_ACK,
        A_FIN, A_KEEPALIVE, A_ACK, A_DUPACK, A_RST_GUEST. `free`: room in the host
        socket's send buffer now, for the window (None: the window last offered, as a
        duplicate ACK must repeat it exactly)."""
        if action & (A_SYN | A_SYN_ACK):
            # the window in a SYN is never scaled (RFC 7323), and the options offer
            # scaling only where the guest did (or where we open)
            self.window_field(free or 0)
            if action & A_SYN:
                flags, options = TCP_SYN, syn_options(self.our_mss, OUR_WSCALE, True)
            else:
                flags = TCP_SYN | TCP_ACK
                options = syn_options(self.our_mss, self.our_wscale or None, self.sack_ok)
            return self._segment(flags, self.our_isn, min(self.wnd_to_guest, 0xFFFF), options)
        if free is not None:
            self.window_field(free)
        window = self.wnd_to_guest >> self.our_wscale
        if action & A_RST_GUEST:
            return self._segment(TCP_RST | TCP_ACK, self.snd_nxt, window)
        sack = self.reassembly.sack_option() if self.sack_ok else b""
        if action & A_FIN:  # on_host_eof moved snd_nxt past it
            return self._segment(TCP_FIN | TCP_ACK, (self.snd_nxt - 1) & _SEQ_MASK, window, sack)
        if action & A_KEEPALIVE:  # one below: the guest answers with its window
            return self._segment(TCP_ACK, (self.snd_nxt - 1) & _SEQ_MASK, window, sack)
        return self._segment(TCP_ACK, self.snd_nxt, window, sack)

    def _segment(self, flags: int, seq: int, window: int, options: bytes = b"") -> Segment:
        ack = 0
        if flags & TCP_ACK:
            ack = self.ack_sent = self.rcv_nxt
        return Segment(flags, seq, ack, window, options)

    # -- data from the host ------------------------------------------------------------------

    def send_budget(self) -> int:
        """Bytes of new host data the guest's window has room for now."""
        if self.events & (TAP_FIN_SENT | CLOSED) or not self.events & ESTABLISHED:
            return 0
        return max(0, self.guest_wnd - seq_diff(self.snd_nxt, self.snd_una))

    def on_sent(self, nbytes: int, now: float) -> None:
        """`nbytes` of host data went to the guest, starting at `snd_nxt`, each frame with
        our ACK of `rcv_nxt`."""
        self.ack_sent = self.rcv_nxt
        if self.snd_nxt == self.snd_una:
            self.rto_base = now
        self.snd_nxt = (self.snd_nxt + nbytes) & _SEQ_MASK
        beyond = seq_diff(self.snd_nxt, self.snd_max)
        if beyond > 0:
            self.bytes_to_guest += beyond
            self.snd_max = self.snd_nxt
        self._arm(now)

    def window_closed(self, now: float) -> None:
        """The loop found data it cannot send: the guest's window is full."""
        if self.guest_wnd == 0 and self.snd_nxt == self.snd_una:
            self.zero_window = True
            self.rto_base = now
            self._arm(now)

    def on_host_eof(self, now: float) -> int:
        """The host peer shut its side and everything before it was sent: FIN the guest."""
        self.events |= SOCK_FIN_RCVD
        if self.events & (TAP_FIN_SENT | CLOSED) or not self.events & ESTABLISHED:
            return 0
        self.events |= TAP_FIN_SENT
        self.fin_seq = self.snd_nxt
        if self.snd_nxt == self.snd_una:
            self.rto_base = now
        self.snd_nxt = (self.snd_nxt + 1) & _SEQ_MASK
        if seq_diff(self.snd_nxt, self.snd_max) > 0:
            self.snd_max = self.snd_nxt
        self._arm(now)
        return A_FIN

    def on_host_error(self) -> int:
        """The host socket failed (reset by the peer, or an error): reset the guest."""
        self.events |= CLOSED
        return A_RST_GUEST | A_CLOSE

    def _rewind(self) -> int:
        self.snd_nxt = self.snd_una
        if self.events & TAP_FIN_SENT and not self.events & TAP_FIN_ACKED:
            self.events &= ~TAP_FIN_SENT  # resent when the read reaches EOF again
        return A_REWIND | A_RESUME

    # -- window we advertise -------------------------------------------------------------------

    def window_field(self, free: int) -> int:
        """The 16-bit window field for `free` bytes of room in the host socket."""
        wnd = min(free, 0xFFFF << self.our_wscale)
        self.wnd_to_guest = wnd
        return wnd >> self.our_wscale

    # -- timers ------------------------------------------------------------------------------

    def _arm(self, now: float) -> None:
        events = self.events
        if events & CLOSED:
            kind, at = T_NONE, None
        elif events & TAP_SYN_RCVD and not events & TAP_SYN_ACK_SENT:
            kind, at = T_CONNECT, self.created + CONNECT_TIMEOUT
        elif not events & ESTABLISHED:
            kind, at = T_HANDSHAKE, self.rto_base + self.rto
        elif self.snd_nxt != self.snd_una:
            kind, at = T_RTO, self.rto_base + self.rto
        elif self.zero_window:
            kind, at = T_PROBE, self.rto_base + self.rto
        else:
            kind, at = T_KEEPALIVE, max(self.last_activity, self.rto_base) + KEEPALIVE_INTERVAL
        self.timer_kind = kind
        self.deadline = at

    def get_timer(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> int:
        """The deadline passed (the loop checks): retransmit, probe, or give up."""
        kind = self.timer_kind
        actions = 0
        if kind == T_CONNECT:
            self.events |= CLOSED
            actions = A_ABORT
        elif kind == T_HANDSHAKE:
            self.retries += 1
            if self.retries > HANDSHAKE_RETRIES:
                self.events |= CLOSED
                actions = A_ABORT
            else:
                self._back_off(now)
                actions = A_SYN if self.events & SOCK_ACCEPTED else A_SYN_ACK
        elif kind == T_RTO:
            self.retries += 1
            if self.retries > MAX_RETRIES:
                self.events |= CLOSED
                actions = A_ABORT
            else:
                self._back_off(now)
                actions = self._rewind()
        elif kind == T_PROBE:
            self._back_off(now)
            actions = A_KEEPALIVE  # an old sequence number makes the guest state its window
        elif kind == T_KEEPALIVE:
            if now - self.last_activity >= self.idle_timeout:
                self.events |= CLOSED
                actions = A_ABORT
            else:
                self.rto_base = now  # the next probe counts from this one
                actions = A_KEEPALIVE
        self._arm(now)
        return actions

    def _back_off(self, now: float) -> None:
        self.rto = min(self.rto * 2, RTO_MAX)
        self.rto_base = now

    # -- presentation ------------------------------------------------------------------------

    def state_name(self) -> str:
        e = self.events
        if e & CLOSED:
            return "CLOSED"
        if not e & ESTABLISHED:
            return "SYN_SENT" if e & SOCK_ACCEPTED else "SYN_RCVD"
        guest_done = e & TAP_FIN_RCVD
        host_done = e & SOCK_FIN_RCVD
        if guest_done and host_done:
            return "LAST_ACK" if not e & TAP_FIN_ACKED else "CLOSING"
        if guest_done:
            return "CLOSE_WAIT"  # the guest closed, the host peer may still send
        if host_done:
            return "FIN_WAIT" if not e & TAP_FIN_ACKED else "FIN_WAIT_2"
        return "ESTABLISHED"
