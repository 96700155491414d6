"""The container harness itself (tests/support/container.py): what a test starts inside
ends with the container and leaves nothing behind on the host."""

from __future__ import annotations

import pytest

from tests.support.container import Container, missing_requirements

pytestmark = pytest.mark.skipif(bool(missing_requirements()), reason="; ".join(
    missing_requirements()))


def test_processes_spawned_inside_are_reaped_at_power_off() -> None:
    # systemd-shutdown stops every process (SIGSTOP) before killing it, and nsenter, outside
    # the container, stops itself when its child stops: left so, it never reaps the child
    with Container("passtd-ctt", network=False) as ct:
        spawned = [ct.spawn(["sleep", "300"]), ct.spawn(["sh", "-c", "sleep 300"])]
    assert [proc.returncode is not None for proc in spawned] == [True, True]
