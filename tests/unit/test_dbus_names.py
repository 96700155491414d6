"""Bus names of instances: the escaping the users' issue specifies, its inverse, and the
name rule (passtd.names) on the bus."""

from __future__ import annotations

import re

import pytest
from dbus_fast.validators import is_bus_name_valid
from hypothesis import given
from hypothesis import strategies as st

from passtd.dbus_api import BUS_NAME_PREFIX, bus_name, instance_name
from passtd.names import NAME_MAX, InvalidName

# the D-Bus specification's grammar for one element of a well-known name
ELEMENT = re.compile(r"[A-Za-z_-][A-Za-z0-9_-]*")


@pytest.mark.parametrize(("name", "escaped"), [
    ("vm1", "vm1"),
    ("vm-1", "vm_2d1"),
    ("1vm", "_31vm"),
    ("9", "_39"),
    ("a_b", "a_5fb"),  # "_" is escaped too: otherwise "a_2d" would be ambiguous
    ("web.example", "web_2eexample"),
    ("VM-Name", "VM_2dName"),
    ("a..b-", "a_2e_2eb_2d"),
])
def test_examples(name: str, escaped: str) -> None:
    assert bus_name(name) == BUS_NAME_PREFIX + escaped
    assert instance_name(BUS_NAME_PREFIX + escaped) == name


def test_the_issue_examples() -> None:
    assert bus_name("vm-1") == "org.passtd.Passtd1.vm_2d1"
    assert bus_name("1vm") == "org.passtd.Passtd1._31vm"


@pytest.mark.parametrize("name", ["", ".", "..", "-x", "_x", "x" * 61, "a/b", "a b", "é",
                                  "user@host:1", "vm\n"])
def test_names_that_are_no_instance_names_get_no_bus_name(name: str) -> None:
    """The name rule (passtd.names) holds on the bus too: passtctl cannot address, and an
    instance cannot own, a bus name for "." or "-x"."""
    with pytest.raises(InvalidName, match="must be 1 to 60 characters"):
        bus_name(name)


def test_the_longest_names_fit() -> None:
    longest = "a" + "-" * (NAME_MAX - 1)  # each "-" escaped to three characters
    assert len(bus_name(longest)) <= 255
    assert is_bus_name_valid(bus_name(longest))


@pytest.mark.parametrize("name", [
    "org.passtd.Passtd1.vm_2D1",  # uppercase hex: not what bus_name writes
    "org.passtd.Passtd1.vm_2",  # truncated escape
    "org.passtd.Passtd1.vm_zz",  # not hex
    "org.passtd.Passtd1._61",  # "a" spelt escaped: the canonical spelling is "a"
    "org.passtd.Passtd1.1vm",  # a leading digit must be escaped
    "org.passtd.Passtd1.",  # nothing after the prefix
    "org.passtd.Passtd1.a.b",  # a second element
    "org.passtd.Passtd1._ff",  # not UTF-8
    "org.passtd.Passtd1._2e",  # "." is no instance name
    "org.passtd.Passtd1._2e_2e",  # nor ".."
    "org.passtd.Passtd1._2dx",  # nor "-x"
    "org.passtd.Passtd1.a_3ab",  # nor "a:b" (an instance name before the rule tightened)
    "org.passtd.Passtd1._c3_a9",  # nor "é"
    "org.passtd.Passtd1",  # the prefix without its dot
    "org.example.Other.vm1",
    ":1.42",
])
def test_instance_name_refuses_what_bus_name_never_writes(name: str) -> None:
    assert instance_name(name) is None


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,59}", fullmatch=True)


@given(names)
def test_round_trip_and_validity(name: str) -> None:
    escaped = bus_name(name)
    assert instance_name(escaped) == name
    assert is_bus_name_valid(escaped)
    element = escaped[len(BUS_NAME_PREFIX):]
    assert ELEMENT.fullmatch(element)
    assert re.fullmatch(r"(?:[A-Za-z0-9]|_[0-9a-f]{2})+", element)


@given(names, names)
def test_distinct_names_get_distinct_bus_names(a: str, b: str) -> None:
    if a != b:
        assert bus_name(a) != bus_name(b)
