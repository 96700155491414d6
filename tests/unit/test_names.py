"""The instance name rule (passtd.names), and the command lines that take a name.

Where a name comes in from a configuration file, the bus or libvirt, the tests of those
parts check it (test_config.py, test_dbus_names.py, test_libvirt_xml.py); the units and
the hook under real systemd and libvirt: tests/integration/test_systemd.py, test_libvirt.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd import cli, libvirt, passtctl, service
from passtd.config import SUN_PATH_MAX
from passtd.names import NAME_MAX, RULE, InvalidName, check_name, is_valid_name

UNIT_NAME_MAX = 255  # systemd's UNIT_NAME_MAX (256) less the terminating NUL

GOOD = ["vm1", "VM-1", "1", "9vm", "web_01.prod", "a..b", "vm.", "vm-", "a" * NAME_MAX]
BAD = ["", ".", "..", "...", "-x", "--help", "_x", ".hidden", "a" * (NAME_MAX + 1), "a/b",
       "../x", "a b", "a\tb", "vm\n", "é", "vmé", "a:b", "a@b", "a,b", "a\\x2db", 42, None]


@pytest.mark.parametrize("name", GOOD)
def test_good_names(name: str) -> None:
    assert check_name(name) == name and is_valid_name(name)


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused_with_the_rule(name: object) -> None:
    assert not is_valid_name(name)
    with pytest.raises(InvalidName) as caught:
        check_name(name)
    assert str(caught.value) == f"instance name {name!r}: must be {RULE}"
    assert RULE == ("1 to 60 characters of A-Z a-z 0-9 _ . -, starting with a letter or a "
                    "digit")


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,59}", fullmatch=True))
def test_every_valid_name_fits_everywhere(name: str) -> None:
    """The unit names (escaped, the longest case), the socket path, the D-Bus name: the
    limit of 60 is what makes the worst case fit systemd's 255 characters."""
    assert len(libvirt.service_unit(name)) <= UNIT_NAME_MAX
    assert len(libvirt.socket_path(name).encode()) <= SUN_PATH_MAX
    assert libvirt.systemd_escape(name).count("/") == 0


def test_the_limit_is_systemd_s() -> None:
    worst = "a" + "-" * (NAME_MAX - 1)
    assert len(libvirt.service_unit(worst)) <= UNIT_NAME_MAX
    assert len(libvirt.service_unit(worst + "-")) > UNIT_NAME_MAX  # one more would not fit


# -- passtd: run, config show, check-name --------------------------------------------------


@pytest.fixture
def no_instance(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    """`passtd run` must refuse before an instance starts (and none may start here)."""
    def refuse(*_args: object) -> int:
        raise AssertionError("passtd run started an instance")

    monkeypatch.setattr(service, "run", refuse)
    monkeypatch.setenv("PASSTD_RUNTIME_DIR", str(tmp_path))


@pytest.mark.parametrize("argv", [
    ["run", "--", "-x"],  # `--`: argparse takes -x as the name
    ["run", "--bus", "none", "--", "."],
    ["run", "--", ".."],
    ["run", "--", "a/../b"],
    ["config", "show", "--", "-x"],
    ["config", "show", "."],
    ["config", "show", "my vm"],
])
def test_passtd_refuses_a_bad_name_before_anything(argv: list[str], no_instance: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    name = argv[-1]
    assert f"instance name {name!r}: must be 1 to 60 characters" in err, err


def test_passtd_run_with_an_option_for_a_name(no_instance: None) -> None:
    """Without `--`, "-x" is an option to argparse: a usage error, no instance."""
    with pytest.raises(SystemExit) as caught:
        cli.main(["run", "-x"])
    assert caught.value.code == 2


def test_check_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-name", "vm-1"]) == 0
    assert capsys.readouterr() == ("", "")
    for name in (".", "..", "-x", "a b"):
        assert cli.main(["check-name", "--", name]) == 2
        assert capsys.readouterr().err == f"passtd: instance name {name!r}: must be {RULE}\n"


# -- passtctl: NAME and DOMAIN ---------------------------------------------------------------

NOWHERE = ["--bus-address", "unix:path=/nonexistent/passtd-test-bus"]


@pytest.mark.parametrize("argv", [
    [*NOWHERE, "--", "-x", "status"],
    [*NOWHERE, ".", "forwards"],
    [*NOWHERE, "..", "flows"],
    [*NOWHERE, "a:b", "forward", "add", "tcp", "8080"],
    [*NOWHERE, "my vm", "forward", "remove", "1"],
    ["libvirt", "attach", "--", "-x"],
    ["libvirt", "attach", ".."],
])
def test_passtctl_refuses_a_bad_name_before_asking_anyone(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A usage error (2), not "not running" (3): no bus and no libvirt is asked."""
    with pytest.raises(SystemExit) as caught:
        passtctl.main(argv)
    assert caught.value.code == passtctl.EXIT_USAGE
    assert "must be 1 to 60 characters of A-Z a-z 0-9 _ . -" in capsys.readouterr().err


def test_passtctl_list_is_not_a_name() -> None:
    """`list` stays the command (and cannot be asked for as an instance, as before)."""
    assert passtctl.main([*NOWHERE, "list"]) == passtctl.EXIT_NOT_RUNNING
