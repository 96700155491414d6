"""dbus_api.FlowBatch: flow signals batched so that a busy guest cannot flood the bus."""

from __future__ import annotations

from passtd.dbus_api import FlowBatch


def flow(n: int) -> dict[str, int]:
    return {"id": n}


def test_the_first_flow_after_a_quiet_second_goes_at_once_the_rest_wait() -> None:
    batch = FlowBatch(interval=1.0, limit=3)
    assert batch.add(lambda: flow(1), 10.0)  # quiet before: at once
    assert batch.take(10.0) == ([flow(1)], 0)
    assert batch.wakeup() is None
    assert not batch.add(lambda: flow(2), 10.2)  # within the second: wait
    assert batch.wakeup() == 11.0
    for n in range(3, 7):
        batch.add(lambda n=n: flow(n), 10.5)
    assert batch.take(11.0) == ([flow(2), flow(3), flow(4)], 2)  # 3 described, 2 counted
    assert batch.wakeup() is None


def test_flows_beyond_the_limit_are_not_even_described() -> None:
    described = []

    def describe(n: int) -> dict[str, int]:
        described.append(n)
        return flow(n)

    batch = FlowBatch(interval=1.0, limit=2)
    batch.take(0.0)
    for n in range(100):
        batch.add(lambda n=n: describe(n), 0.5)
    assert described == [0, 1]  # the cost of a flood is bounded too
    assert batch.take(1.0) == ([flow(0), flow(1)], 98)
