"""passtd/tools/timeline.py on `perf script` text written here: calls paired, cut into
wakeups, grouped by shape, medians. (Recording needs perf and root: not done here.)"""

from __future__ import annotations

from passtd.tools import timeline


def _script(*calls: tuple[int, float, float, int]) -> list[str]:
    """perf script lines for (syscall number, enter µs, exit µs, result) in order."""
    lines = []
    for nr, enter, exit_, result in calls:
        lines.append(f"  7.{int(enter):06d}: raw_syscalls:sys_enter: NR {nr} (8, 0, 0, 0, 0, 0)")
        lines.append(f"  7.{int(exit_):06d}:  raw_syscalls:sys_exit: NR {nr} = {result}")
    return lines


EPOLL, RECV, SEND, CLOSE = 232, 45, 46, 3

# two wakeups alike (a 58-byte read, then a 64-byte write), one of another shape, each
# closed by the next wait; timings in µs
LINES = _script(
    (EPOLL, 0, 100, 1), (RECV, 105, 106, 58), (SEND, 120, 133, 64),
    (EPOLL, 140, 200, 1), (RECV, 203, 204, 58), (SEND, 224, 231, 64),
    (EPOLL, 236, 300, 1), (RECV, 301, 302, 136), (CLOSE, 320, 329, 0),
    (EPOLL, 335, 336, 0),
)


def test_calls_pair_enters_with_exits_and_name_them() -> None:
    calls = timeline.calls_of(["noise", *LINES])
    assert [c.step for c in calls[:3]] == ["epoll_wait", "recvfrom 58", "sendmsg 64"]
    assert calls[1].enter == 7.000105 and calls[1].exit == 7.000106
    assert timeline.calls_of(_script((999, 1, 2, 0)))[0].name == "NR 999"


def test_wakeups_run_from_a_wait_to_the_next() -> None:
    found = timeline.wakeups(timeline.calls_of(LINES))
    assert [[c.step for c in w.work] for w in found] == [
        ["recvfrom 58", "sendmsg 64"], ["recvfrom 58", "sendmsg 64"],
        ["recvfrom 136", "close"]]


def test_the_commonest_shape_comes_first_with_its_medians() -> None:
    first, second = timeline.shapes(timeline.wakeups(timeline.calls_of(LINES)))
    assert first.steps == ("recvfrom 58", "sendmsg 64") and first.count == 2
    # before the read: 5 and 3 µs; before the write: 14 and 20; back to the wait: 7 and 5
    assert [round(x) for x in first.before_us] == [4, 17, 6]
    assert [round(x) for x in first.inside_us] == [1, 10]
    assert round(first.waited_us) == 80  # the waits of 100 and 60 µs
    assert second.steps == ("recvfrom 136", "close") and second.count == 1
    table = "\n".join(timeline.render([first, second], 3))
    assert "### Wakeup shape 1: 2 of 3 wakeups, after a wait of 80 µs" in table
    assert "| sendmsg 64 | 17 | 10 |" in table and "| **in all** | **27** | **11** |" in table
