"""What the engine tells the service: properties that changed, flows and forwards that
came and went.

Design: the service (service.py, for the D-Bus API of dbus_api.py) hears of changed
properties (`on_change`, names as the API's) and of flows and forwards opened and closed
(`on_events`: each a kind and a call that describes the item as the API lists it, made
only if the API wants it). Both are calls into the service's interpreted code, a few
microseconds each, and a busy guest opens and closes thousands of flows a second (crr):
so flows' news is gathered over a batch of the engine's and told once at its end
(`report`, from the engine's settle), and FlowCount only when the count differs from the
one told last. Forward events and the other properties are rare: told at once.

Not done here: rate limits and signals (dbus_api.py). With no one listening (the
callbacks None, as without the D-Bus API) nothing is gathered or called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .flow import Flow

Describe = Callable[[], dict[str, Any]]
Event = tuple[str, Describe]  # "flow-opened" | "flow-closed" | "forward-added" | ...


def _describer(flow: Flow, now: float) -> Describe:
    return lambda: flow.describe(now)


class News:
    def __init__(self) -> None:
        self.on_change: Callable[[set[str]], None] | None = None
        self.on_events: Callable[[list[Event]], None] | None = None
        self._flows: list[tuple[str, Flow]] = []  # since the last report
        self._count_told = 0

    def changed(self, *names: str) -> None:
        if self.on_change is not None:
            self.on_change(set(names))

    def forward_event(self, kind: str, describe: Describe) -> None:
        if self.on_events is not None:
            self.on_events([(kind, describe)])

    def flow_opened(self, flow: Flow) -> None:
        if self.on_events is not None:
            self._flows.append(("flow-opened", flow))

    def flow_closed(self, flow: Flow) -> None:
        if self.on_events is not None:
            self._flows.append(("flow-closed", flow))

    def report(self, flow_count: int, clock: Callable[[], float]) -> None:
        """The end of a batch: the flows' news since the last report, and FlowCount if
        the count moved."""
        if self._flows:
            news, self._flows = self._flows, []
            if self.on_events is not None:
                now = clock()
                self.on_events([(kind, _describer(flow, now)) for kind, flow in news])
        if flow_count != self._count_told:
            self._count_told = flow_count
            self.changed("FlowCount")
