"""The flow timer heap (timers.py) driven with a fake clock: deadlines in, due flows out."""

from passtd.engine.flow import Flow
from passtd.engine.timers import STALE_TIMERS_MAX, FlowTimers

KEY = (17, bytes(4), 1000, bytes(4), 53)


def flow_at(deadline: float | None) -> Flow:
    flow = Flow(KEY, "guest", 0.0)
    flow.deadline = deadline
    return flow


def test_flows_come_due_in_deadline_order_and_only_when_due() -> None:
    timers = FlowTimers()
    late, early = flow_at(5.0), flow_at(2.0)
    assert timers.schedule(late) and timers.schedule(early)
    assert timers.next_deadline() == 2.0
    assert timers.due(1.9) == []
    assert timers.due(2.0) == [early]
    assert timers.next_deadline() == 5.0
    assert timers.due(10.0) == [late]
    assert timers.next_deadline() is None and len(timers) == 0


def test_a_later_deadline_keeps_its_entry_and_is_requeued_when_it_comes_up() -> None:
    timers = FlowTimers()
    flow = flow_at(1.0)
    timers.schedule(flow)
    flow.deadline = 3.0  # an ACK pushed the retransmission out: no heap work
    assert not timers.schedule(flow)
    assert timers.due(1.0) == []  # its old entry came up: re-queued, not due
    assert timers.next_deadline() == 3.0
    assert timers.due(3.0) == [flow]


def test_an_earlier_deadline_supersedes_the_entry_and_the_stale_one_never_fires() -> None:
    timers = FlowTimers()
    flow = flow_at(5.0)
    timers.schedule(flow)
    flow.deadline = 1.0
    assert timers.schedule(flow)
    assert timers.due(1.0) == [flow]
    flow.deadline = None  # the flow has nothing to wait for any more
    assert timers.due(6.0) == []
    assert timers.problems([flow]) == []


def test_cancelled_flows_never_come_due_and_stale_entries_are_rebuilt_away() -> None:
    timers = FlowTimers()
    flows = [flow_at(float(i)) for i in range(STALE_TIMERS_MAX + 10)]
    for flow in flows:
        timers.schedule(flow)
    keep = flow_at(1e9)
    timers.schedule(keep)
    for flow in flows:
        timers.cancel(flow)
        assert flow.timer_entry is None
    assert len(timers) == 1
    assert timers.due(1e9) == [keep]
    assert timers.next_deadline() is None


def test_problems_name_a_flow_whose_deadline_is_not_in_the_heap() -> None:
    timers = FlowTimers()
    flow = flow_at(4.0)
    assert timers.problems([flow]) != []
    timers.schedule(flow)
    assert timers.problems([flow]) == []
