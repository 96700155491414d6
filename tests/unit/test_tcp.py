"""The TCP state machine, driven as the event loop drives it: segments, socket results, time."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from passtd.engine import tcp, tcp_hold, tcp_seg
from passtd.engine.packet import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from passtd.engine.tcp import TcpConn

KEY = (6, bytes([198, 51, 100, 2]), 40000, bytes([198, 51, 100, 1]), 80)
GUEST_ISN = 1000
OUR_ISN = 5000


def established_from_guest(window: int = 65535, wscale: int | None = 7) -> TcpConn:
    conn = TcpConn.from_guest_syn(KEY, 0.0, OUR_ISN, 65480, GUEST_ISN, window, 1460, wscale)
    assert conn.state_name() == "SYN_RCVD"
    assert conn.host_connected(0.1) == tcp.A_SYN_ACK
    actions = conn.on_segment(TCP_ACK, GUEST_ISN + 1, OUR_ISN + 1, window, 0, 0.2)
    assert actions & tcp.A_ESTABLISHED
    assert conn.state_name() == "ESTABLISHED"
    return conn


def test_guest_open_waits_for_connect_and_ignores_syn_retransmissions() -> None:
    conn = TcpConn.from_guest_syn(KEY, 0.0, OUR_ISN, 65480, GUEST_ISN, 64240, 1460, 7)
    assert conn.on_segment(TCP_SYN, GUEST_ISN, 0, 64240, 0, 0.5, 1460, 7) == 0
    assert conn.get_timer() == tcp.CONNECT_TIMEOUT
    assert conn.handle_timer(tcp.CONNECT_TIMEOUT) == tcp.A_ABORT


def test_refused_connect_resets_the_guest() -> None:
    conn = TcpConn.from_guest_syn(KEY, 0.0, OUR_ISN, 65480, GUEST_ISN, 64240, 1460, 7)
    assert conn.host_refused() == tcp.A_RST_GUEST | tcp.A_CLOSE


def test_lost_syn_ack_is_resent_on_syn_and_on_timer() -> None:
    conn = TcpConn.from_guest_syn(KEY, 0.0, OUR_ISN, 65480, GUEST_ISN, 64240, 1460, 7)
    conn.host_connected(0.0)
    assert conn.on_segment(TCP_SYN, GUEST_ISN, 0, 64240, 0, 0.5, 1460, 7) == tcp.A_SYN_ACK
    at = conn.get_timer()
    assert at is not None
    assert conn.handle_timer(at) == tcp.A_SYN_ACK


def test_window_scale_only_when_both_offer_it() -> None:
    conn = established_from_guest(window=100, wscale=None)
    assert conn.our_wscale == 0 and conn.guest_wnd == 100
    conn = established_from_guest(window=100, wscale=7)
    assert conn.our_wscale == tcp.OUR_WSCALE and conn.guest_wnd == 100 << 7
    assert conn.window_field(1 << 20) == (1 << 20) >> tcp.OUR_WSCALE
    assert conn.window_field(1 << 30) == 0xFFFF


def test_in_order_data_is_written_and_acknowledged_as_the_socket_takes_it() -> None:
    conn = established_from_guest()
    seq = GUEST_ISN + 1
    conn.on_segment(TCP_ACK, seq, OUR_ISN + 1, 512, 1000, 1.0)
    assert (conn.data_skip, conn.data_take) == (0, 1000)
    conn.on_segment(TCP_ACK, seq + 1000, OUR_ISN + 1, 512, 1000, 1.0)
    assert (conn.data_skip, conn.data_take) == (0, 1000)
    actions = conn.commit(1500, 1.0)  # the socket took 1500 of 2000
    assert actions & tcp.A_ACK and actions & tcp.A_WAIT_WRITABLE
    assert conn.rcv_nxt == seq + 1500
    assert conn.bytes_from_guest == 1500
    # the guest retransmits from 1500: the first 500 of its segment are skipped
    conn.on_segment(TCP_ACK, seq + 1000, OUR_ISN + 1, 512, 1000, 2.0)
    assert (conn.data_skip, conn.data_take) == (500, 500)


def test_in_order_describes_the_bulk_branch_and_only_numbers_a_header_holds() -> None:
    """What tcp_run.gather takes without on_segment: the next data, this ACK, this window."""
    conn = established_from_guest()
    assert conn.in_order() == (GUEST_ISN + 1, OUR_ISN + 1, 65535)
    conn.on_segment(TCP_ACK, GUEST_ISN + 1, OUR_ISN + 1, 65535, 1000, 1.0)
    conn.take_in_order(3000)  # three more segments of 1000, taken by the walk
    assert conn.in_order() == (GUEST_ISN + 4001, OUR_ISN + 1, 65535)
    assert conn.commit(4000, 1.0) & tcp.A_ACK and conn.rcv_nxt == GUEST_ISN + 4001
    conn.guest_wnd += 1  # no window field scales to it: no segment takes the branch
    assert conn.in_order() is None
    conn.guest_wnd, conn.snd_una = 1 << 40, OUR_ISN + 1  # (numbers no header field holds:
    assert conn.in_order() is None  # the walk is never handed those)
    conn.guest_wnd, conn.snd_una = 65535 << 7, 1 << 33
    assert conn.in_order() is None
    conn.guest_wnd, conn.snd_una = -(1 << 7), -1
    assert conn.in_order() is None
    conn.guest_wnd = 65535 << 7
    assert conn.in_order() is None
    conn.snd_una = OUR_ISN + 1
    conn.on_segment(TCP_ACK | TCP_FIN, GUEST_ISN + 4001, OUR_ISN + 1, 65535, 0, 2.0)
    assert conn.in_order() is None  # the guest's FIN is in: its stream has ended


def test_gap_and_old_data_get_a_duplicate_ack_and_nothing_written() -> None:
    conn = established_from_guest()
    seq = GUEST_ISN + 1
    assert conn.on_segment(TCP_ACK, seq + 100, OUR_ISN + 1, 512, 50, 1.0) & tcp.A_DUPACK
    assert conn.data_take == 0
    assert conn.on_segment(TCP_ACK, seq - 50, OUR_ISN + 1, 512, 50, 1.0) & tcp.A_ACK
    assert conn.data_take == 0


def test_guest_fin_after_data_shuts_the_socket_once_the_data_is_written() -> None:
    conn = established_from_guest()
    seq = GUEST_ISN + 1
    conn.on_segment(TCP_ACK | TCP_FIN, seq, OUR_ISN + 1, 512, 10, 1.0)
    actions = conn.commit(5, 1.0)  # half the data: the FIN must wait
    assert not actions & tcp.A_SHUT_WR
    conn.on_segment(TCP_ACK | TCP_FIN, seq, OUR_ISN + 1, 512, 10, 2.0)
    assert (conn.data_skip, conn.data_take) == (5, 5)
    actions = conn.commit(5, 2.0)
    assert actions & tcp.A_SHUT_WR and actions & tcp.A_ACK
    assert conn.rcv_nxt == seq + 11
    assert conn.state_name() == "CLOSE_WAIT"
    # a retransmitted FIN is acknowledged again
    assert conn.on_segment(TCP_ACK | TCP_FIN, seq + 10, OUR_ISN + 1, 512, 0, 3.0) & tcp.A_ACK


def test_host_data_respects_the_guest_window_and_is_discarded_when_acked() -> None:
    conn = established_from_guest(window=100, wscale=0)
    assert conn.send_budget() == 100
    conn.on_sent(60, 1.0)
    assert conn.send_budget() == 40
    assert conn.get_timer() == 1.0 + tcp.RTO_INITIAL
    actions = conn.on_segment(TCP_ACK, GUEST_ISN + 1, OUR_ISN + 1 + 60, 100, 0, 1.1)
    assert actions & tcp.A_DISCARD and conn.discard == 60
    assert conn.send_budget() == 100
    assert conn.bytes_to_guest == 60


def test_three_duplicate_acks_rewind_once() -> None:
    conn = established_from_guest(window=65535, wscale=0)
    conn.on_sent(3000, 1.0)
    ack = OUR_ISN + 1 + 1000
    assert conn.on_segment(TCP_ACK, GUEST_ISN + 1, ack, 65535, 0, 1.1) & tcp.A_DISCARD
    for _ in range(2):
        assert not conn.on_segment(TCP_ACK, GUEST_ISN + 1, ack, 65535, 0, 1.2) & tcp.A_REWIND
    assert conn.on_segment(TCP_ACK, GUEST_ISN + 1, ack, 65535, 0, 1.2) & tcp.A_REWIND
    assert conn.snd_nxt == ack
    conn.on_sent(2000, 1.3)
    # more duplicates of the same ACK (for segments already in flight) do not rewind again
    for _ in range(5):
        assert not conn.on_segment(TCP_ACK, GUEST_ISN + 1, ack, 65535, 0, 1.4) & tcp.A_REWIND


def test_ack_beyond_a_rewound_send_point_moves_it_forward() -> None:
    conn = established_from_guest(window=65535, wscale=0)
    conn.on_sent(3000, 1.0)
    conn.handle_timer(1.0 + tcp.RTO_INITIAL)  # rewound to snd_una
    assert conn.snd_nxt == OUR_ISN + 1
    conn.on_segment(TCP_ACK, GUEST_ISN + 1, OUR_ISN + 1 + 2000, 65535, 0, 2.5)
    assert conn.snd_nxt == conn.snd_una == OUR_ISN + 1 + 2000
    assert conn.discard == 2000


def test_retransmission_backs_off_then_gives_up() -> None:
    conn = established_from_guest(window=65535, wscale=0)
    conn.on_sent(100, 0.0)
    now, rtos = 0.0, []
    for _ in range(tcp.MAX_RETRIES):
        at = conn.get_timer()
        assert at is not None
        rtos.append(at - now)
        now = at
        assert conn.handle_timer(now) & tcp.A_REWIND
        conn.on_sent(100, now)
    assert rtos[1:4] == [2.0, 4.0, 8.0]
    assert conn.handle_timer(conn.get_timer() or 0) == tcp.A_ABORT


def test_host_eof_sends_fin_and_closes_when_both_sides_are_done() -> None:
    conn = established_from_guest(window=65535, wscale=0)
    conn.on_sent(10, 1.0)
    assert conn.on_host_eof(1.0) == tcp.A_FIN
    assert conn.send_budget() == 0
    assert conn.state_name() == "FIN_WAIT"
    actions = conn.on_segment(TCP_ACK, GUEST_ISN + 1, OUR_ISN + 1 + 11, 65535, 0, 1.1)
    assert conn.discard == 10  # the FIN is not a byte in the socket
    assert not actions & tcp.A_CLOSE
    conn.on_segment(TCP_ACK | TCP_FIN, GUEST_ISN + 1, OUR_ISN + 12, 65535, 0, 1.2)
    assert conn.commit(0, 1.2) & tcp.A_CLOSE


def test_lost_fin_is_resent_after_a_rewind() -> None:
    conn = established_from_guest(window=65535, wscale=0)
    conn.on_host_eof(1.0)
    actions = conn.handle_timer(conn.get_timer() or 0)
    assert actions & tcp.A_REWIND
    assert conn.on_host_eof(3.0) == tcp.A_FIN


def test_rst_in_window_resets_the_peer_and_out_of_window_is_ignored() -> None:
    conn = established_from_guest()
    conn.window_field(1 << 16)
    assert conn.on_segment(TCP_RST, GUEST_ISN + 1 + (1 << 20), 0, 0, 0, 1.0) == 0
    assert conn.on_segment(TCP_RST, GUEST_ISN + 1, 0, 0, 0, 1.0) == tcp.A_RST_PEER | tcp.A_CLOSE


def test_keepalive_probe_from_the_guest_sets_socket_keepalive() -> None:
    conn = established_from_guest()
    actions = conn.on_segment(TCP_ACK, GUEST_ISN, OUR_ISN + 1, 512, 0, 5.0)
    assert actions & tcp.A_SOCK_KEEPALIVE and actions & tcp.A_ACK


def test_idle_connection_gets_keepalives_then_is_reset() -> None:
    conn = established_from_guest()
    conn.idle_timeout = 100.0
    at = conn.get_timer()
    assert at == pytest.approx(0.2 + tcp.KEEPALIVE_INTERVAL)
    assert conn.handle_timer(at) == tcp.A_KEEPALIVE
    assert conn.get_timer() == pytest.approx(at + tcp.KEEPALIVE_INTERVAL)
    assert conn.handle_timer(200.0) == tcp.A_ABORT


def test_zero_window_is_probed() -> None:
    conn = established_from_guest(window=0, wscale=0)
    assert conn.send_budget() == 0
    conn.window_closed(1.0)
    assert conn.get_timer() == 1.0 + tcp.RTO_INITIAL
    assert conn.handle_timer(2.0) == tcp.A_KEEPALIVE
    # a window update resumes sending
    assert conn.on_segment(TCP_ACK, GUEST_ISN + 1, OUR_ISN + 1, 1000, 0, 2.5) & tcp.A_RESUME
    assert conn.send_budget() == 1000


def test_host_open_handshake() -> None:
    conn = TcpConn.from_host_accept(KEY, 0.0, OUR_ISN, 65480)
    assert conn.state_name() == "SYN_SENT"
    # wrong ACK number: ignored
    assert conn.on_segment(TCP_SYN | TCP_ACK, GUEST_ISN, OUR_ISN + 7, 64240, 0, 0.1, 1460, 7) == 0
    actions = conn.on_segment(TCP_SYN | TCP_ACK, GUEST_ISN, OUR_ISN + 1, 64240, 0, 0.1, 1460, 7)
    assert actions == tcp.A_ACK | tcp.A_ESTABLISHED
    assert conn.rcv_nxt == GUEST_ISN + 1 and conn.guest_mss == 1460


def test_host_open_refused_by_the_guest_resets_the_peer() -> None:
    conn = TcpConn.from_host_accept(KEY, 0.0, OUR_ISN, 65480)
    actions = conn.on_segment(TCP_RST | TCP_ACK, 0, OUR_ISN + 1, 0, 0, 0.1)
    assert actions == tcp.A_RST_PEER | tcp.A_CLOSE


def test_host_open_unanswered_syn_is_retried_then_abandoned() -> None:
    conn = TcpConn.from_host_accept(KEY, 0.0, OUR_ISN, 65480)
    for _ in range(tcp.HANDSHAKE_RETRIES):
        assert conn.handle_timer(conn.get_timer() or 0) == tcp.A_SYN
    assert conn.handle_timer(conn.get_timer() or 0) == tcp.A_ABORT


def test_options_parser_handles_garbage() -> None:
    def parsed(options: bytes) -> tuple[int | None, int | None, bool]:
        return tcp_seg.parse_options(options).fields()

    assert parsed(bytes.fromhex("020405b4010303070402")) == (1460, 7, True)
    assert parsed(bytes.fromhex("0303ff")) == (None, 14, False)  # scale capped
    assert parsed(b"\x02") == (None, None, False)
    assert parsed(bytes.fromhex("0200")) == (None, None, False)
    opts = tcp_seg.syn_options(1460, 7, True)
    assert parsed(opts) == (1460, 7, True) and len(opts) % 4 == 0


def test_syn_options_built_once_each_and_kept_bounded() -> None:
    """The options are built once per distinct value (the SYN path reuses them) and the
    kept blocks never outgrow SYN_OPTIONS_KEPT, however many MSS values an instance sees."""
    first = tcp_seg.syn_options(1460, 7, True)
    assert tcp_seg.syn_options(1460, 7, True) is first
    assert tcp_seg.syn_options(1460, None, False) == bytes.fromhex("020405b4")
    assert tcp_seg.syn_options(1460, 0, True) == bytes.fromhex("020405b4010303000101 0402")
    for mss in range(1000, 1000 + 3 * tcp_seg.SYN_OPTIONS_KEPT):
        assert parsed_mss(tcp_seg.syn_options(mss, 7, True)) == mss
    assert len(tcp_seg._syn_options_built) <= tcp_seg.SYN_OPTIONS_KEPT


def parsed_mss(options: bytes) -> int | None:
    return tcp_seg.parse_options(options).fields()[0]


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from([TCP_ACK, TCP_ACK | TCP_FIN, TCP_RST, TCP_SYN,
                                           TCP_SYN | TCP_ACK, 0, 0xFF]),
                          st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                          st.integers(0, 0xFFFF), st.integers(0, 70000),
                          st.integers(0, 70000)), max_size=40))
def test_any_segment_sequence_keeps_invariants(segments: list) -> None:
    """Whatever a guest sends, the connection's bookkeeping stays consistent."""
    conn = established_from_guest()
    now = 1.0
    for flags, seq, ack, window, plen, written in segments:
        now += 0.01
        conn.on_segment(flags, seq, ack, window, plen, now)
        assert 0 <= conn.data_take <= plen
        assert conn.data_skip + conn.data_take <= max(plen, conn.data_skip + conn.data_take)
        conn.commit(min(written, conn.rcv_pending), now)
        assert conn.rcv_pending == 0
        assert tcp.seq_diff(conn.snd_nxt, conn.snd_una) >= 0
        assert tcp.seq_diff(conn.snd_max, conn.snd_nxt) >= 0
        assert conn.send_budget() >= 0
        if conn.get_timer() is not None:
            conn.handle_timer(now)


def test_data_after_a_gap_is_held_and_released_when_the_gap_fills() -> None:
    conn = established_from_guest()
    conn.window_field(1 << 20)
    seq = GUEST_ISN + 1
    # segments 2 and 3 arrive, segment 1 was lost: duplicate ACKs, data held
    for n in (1, 2):
        actions = conn.on_segment(TCP_ACK, seq + n * 100, OUR_ISN + 1, 512, 100, 1.0)
        assert actions & tcp.A_DUPACK and actions & tcp.A_HOLD and conn.data_take == 0
        conn.hold(seq + n * 100, bytes([n]) * 100)
    conn.hold(seq + 100, b"\1" * 100)  # a duplicate is kept once
    assert conn.reassembly.bytes == 200
    conn.commit(0, 1.0)
    # the retransmission of segment 1 fills the gap
    conn.on_segment(TCP_ACK, seq, OUR_ISN + 1, 512, 100, 1.1)
    assert conn.data_take == 100
    actions = conn.commit(100, 1.1)
    assert actions & tcp.A_RELEASE
    assert b"".join(conn.released) == b"\1" * 100 + b"\2" * 100
    assert not conn.commit(200, 1.1) & tcp.A_RELEASE
    assert conn.rcv_nxt == seq + 300 and conn.reassembly.bytes == 0


def test_held_data_beyond_the_window_or_the_cap_is_not_kept() -> None:
    conn = established_from_guest()
    conn.window_field(1000)
    actions = conn.on_segment(TCP_ACK, GUEST_ISN + 1 + 950, OUR_ISN + 1, 512, 100, 1.0)
    assert actions & tcp.A_DUPACK and not actions & tcp.A_HOLD  # past the window we offered
    conn.window_field(1 << 24)
    conn.hold(GUEST_ISN + 1 + 2000, bytes(tcp_hold.HOLD_MAX - 50))
    actions = conn.on_segment(TCP_ACK, GUEST_ISN + 1 + 950, OUR_ISN + 1, 512, 100, 1.0)
    assert not actions & tcp.A_HOLD


def test_flows_of_one_instance_hold_no_more_than_its_budget_together() -> None:
    budget = tcp_hold.HoldBudget(limit=150)
    first, second = (TcpConn.from_guest_syn(KEY, 0.0, OUR_ISN, 65480, GUEST_ISN, 65535, 1460, 7,
                                            hold_budget=budget) for _ in range(2))
    gap = GUEST_ISN + 1 + 100
    for conn in (first, second):
        conn.host_connected(0.0)
        conn.window_field(1 << 20)
    assert first.on_segment(TCP_ACK, gap, OUR_ISN + 1, 512, 100, 1.0) & tcp.A_HOLD
    first.hold(gap, b"\1" * 100)
    assert budget.used == 100
    actions = second.on_segment(TCP_ACK, gap, OUR_ISN + 1, 512, 100, 1.0)
    assert actions & tcp.A_DUPACK and not actions & tcp.A_HOLD  # 200 would pass the limit
    first.drop_held()  # the flow closed
    assert budget.used == 0 and first.reassembly.bytes == 0
    assert second.on_segment(TCP_ACK, gap, OUR_ISN + 1, 512, 100, 1.0) & tcp.A_HOLD
    second.hold(gap, b"\2" * 100)
    second.on_segment(TCP_ACK, GUEST_ISN + 1, OUR_ISN + 1, 512, 100, 1.1)  # fills the gap
    assert second.commit(100, 1.1) & tcp.A_RELEASE
    assert budget.used == 0  # released data is no longer held


def test_sack_blocks_describe_what_is_held_latest_first() -> None:
    conn = TcpConn.from_guest_syn(KEY, 0.0, OUR_ISN, 65480, GUEST_ISN, 65535, 1460, 7, True)
    conn.host_connected(0.0)
    conn.on_segment(TCP_ACK, GUEST_ISN + 1, OUR_ISN + 1, 65535, 0, 0.1)
    base = GUEST_ISN + 1
    assert conn.control(tcp.A_ACK).options == b""
    for offset in (1000, 1100, 3000, 5000, 7000, 9000):  # 1000-1200 merge into one block
        conn.hold(base + offset, b"x" * 100)
    conn.hold(base + 3000, b"x" * 100)  # again: the latest arrival is in the 3000 block
    opt = conn.control(tcp.A_ACK).options
    assert opt[:4] == bytes((1, 1, 5, 2 + 8 * 4))
    blocks = [struct.unpack_from("!II", opt, 4 + 8 * i) for i in range(4)]
    assert blocks[0] == (base + 3000, base + 3100)
    assert (base + 1000, base + 1200) in blocks
    conn.sack_ok = False
    assert conn.control(tcp.A_ACK).options == b""


# -- every number of the segments we send comes from the core --------------------------------


def test_guest_syn_then_host_connected_gives_exactly_this_syn_ack() -> None:
    conn = TcpConn.from_guest_syn(KEY, 0.0, OUR_ISN, 1460, GUEST_ISN, 64240, 1400, 7, True)
    assert conn.host_connected(0.1) == tcp.A_SYN_ACK
    # 300,000 bytes of room: the window field of a SYN is never scaled, so it saturates
    assert conn.control(tcp.A_SYN_ACK, free=300_000) == tcp_seg.Segment(
        TCP_SYN | TCP_ACK, OUR_ISN, GUEST_ISN + 1, 0xFFFF,
        tcp_seg.syn_options(1460, tcp.OUR_WSCALE, True))
    # a guest that offered neither scaling nor SACK gets neither
    plain = TcpConn.from_guest_syn(KEY, 0.0, OUR_ISN, 1460, GUEST_ISN, 64240, None, None)
    plain.host_connected(0.1)
    assert plain.control(tcp.A_SYN_ACK, free=1000) == tcp_seg.Segment(
        TCP_SYN | TCP_ACK, OUR_ISN, GUEST_ISN + 1, 1000, tcp_seg.syn_options(1460, None, False))


def test_host_accept_sends_a_syn_offering_scaling_and_sack() -> None:
    conn = TcpConn.from_host_accept(KEY, 0.0, OUR_ISN, 65480)
    assert conn.control(tcp.A_SYN, free=70_000) == tcp_seg.Segment(
        TCP_SYN, OUR_ISN, 0, 0xFFFF, tcp_seg.syn_options(65480, tcp.OUR_WSCALE, True))


def test_acks_fins_keepalives_and_resets_carry_the_connection_s_numbers() -> None:
    conn = established_from_guest(wscale=7)
    field = conn.window_field(1 << 16)  # scaled by ours, 8
    assert field == (1 << 16) >> tcp.OUR_WSCALE
    ack = conn.control(tcp.A_ACK)
    assert ack == tcp_seg.Segment(TCP_ACK, OUR_ISN + 1, GUEST_ISN + 1, field)
    assert conn.ack_sent == GUEST_ISN + 1
    assert conn.control(tcp.A_ACK, free=512).window == 512 >> tcp.OUR_WSCALE
    assert conn.control(tcp.A_KEEPALIVE).seq == OUR_ISN  # one below: the guest answers
    assert conn.on_host_eof(1.0) == tcp.A_FIN
    assert conn.control(tcp.A_FIN).fields()[:3] == (TCP_FIN | TCP_ACK, OUR_ISN + 1, GUEST_ISN + 1)
    assert conn.control(tcp.A_RST_GUEST).fields()[:2] == (TCP_RST | TCP_ACK, OUR_ISN + 2)


def test_segments_for_no_connection_get_the_rfc_9293_reset() -> None:
    assert tcp_seg.reset_for_unknown(TCP_ACK, 100, 5000, 10) == tcp_seg.Segment(TCP_RST, 5000, 0, 0)
    assert tcp_seg.reset_for_unknown(TCP_SYN | TCP_FIN, 100, 0, 10) == \
        tcp_seg.Segment(TCP_RST | TCP_ACK, 0, 112, 0)
    assert tcp_seg.reset_for_unknown(TCP_RST, 100, 0, 0) is None  # never a RST for a RST
    assert tcp_seg.refusal(0xFFFFFFFF) == tcp_seg.Segment(TCP_RST | TCP_ACK, 0, 0, 0)


def test_our_mss_and_initial_sequence_numbers() -> None:
    assert tcp_seg.our_mss(4, 1500) == 1460 and tcp_seg.our_mss(6, 1500) == 1440
    assert tcp_seg.our_mss(4, 0) == 65480  # no MTU given: the largest frame
    secret = b"s" * 16
    first = tcp_seg.initial_sequence(secret, KEY, 1.0)
    # RFC 6528: the same connection a second later starts 250,000 further on
    assert tcp_seg.initial_sequence(secret, KEY, 2.0) == (first + 250_000) & 0xFFFFFFFF
    assert tcp_seg.initial_sequence(b"t" * 16, KEY, 1.0) != first
