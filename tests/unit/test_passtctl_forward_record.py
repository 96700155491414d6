"""passtctl's forward changes and their record in the libvirt domain (passtctl._change_forward):
the instance first, the record after, and what is said when the record fails."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from passtd import passtctl


class FakeRecorder:
    def __init__(self, fails: bool) -> None:
        self.fails = fails
        self.written = self.closed = False

    def write(self) -> None:
        if self.fails:
            raise RuntimeError("libvirt: domain is being migrated")
        self.written = True

    def close(self) -> None:
        self.closed = True


async def changed() -> int:
    return 7


def change(recorder: FakeRecorder, persist: bool) -> tuple[int, object]:
    args = argparse.Namespace(persist=persist)
    return asyncio.run(passtctl._change_forward(args, recorder, changed))


def test_a_written_record_is_returned_and_closed() -> None:
    recorder = FakeRecorder(fails=False)
    assert change(recorder, persist=False) == (7, recorder)
    assert recorder.written and recorder.closed


def test_a_failed_live_record_is_a_warning_and_not_claimed(
        capsys: pytest.CaptureFixture[str]) -> None:
    recorder = FakeRecorder(fails=True)
    assert change(recorder, persist=False) == (7, None)  # nothing to report as recorded
    assert recorder.closed
    assert "warning: libvirt: domain is being migrated" in capsys.readouterr().err


def test_a_failed_persistent_record_fails_the_command() -> None:
    recorder = FakeRecorder(fails=True)
    with pytest.raises(passtctl.Failure, match="done on the instance, but not recorded"):
        change(recorder, persist=True)
    assert recorder.closed
