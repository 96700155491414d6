"""Bus names of instances: the escaping the users' issue specifies, and its inverse."""

from __future__ import annotations

import re

import pytest
from dbus_fast.validators import is_bus_name_valid
from hypothesis import given
from hypothesis import strategies as st

from passtd.dbus_api import BUS_NAME_PREFIX, bus_name, instance_name

# the D-Bus specification's grammar for one element of a well-known name
ELEMENT = re.compile(r"[A-Za-z_-][A-Za-z0-9_-]*")


@pytest.mark.parametrize(("name", "escaped"), [
    ("vm1", "vm1"),
    ("vm-1", "vm_2d1"),
    ("1vm", "_31vm"),
    ("9", "_39"),
    ("a_b", "a_5fb"),  # "_" is escaped too: otherwise "a_2d" would be ambiguous
    ("web.example", "web_2eexample"),
    ("user@host:1", "user_40host_3a1"),
    ("VM-Name", "VM_2dName"),
    ("é", "_c3_a9"),  # UTF-8 bytes, each escaped
    ("-", "_2d"),
])
def test_examples(name: str, escaped: str) -> None:
    assert bus_name(name) == BUS_NAME_PREFIX + escaped
    assert instance_name(BUS_NAME_PREFIX + escaped) == name


def test_the_issue_examples() -> None:
    assert bus_name("vm-1") == "org.passtd.Passtd1.vm_2d1"
    assert bus_name("1vm") == "org.passtd.Passtd1._31vm"


def test_empty_and_too_long_names_are_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        bus_name("")
    with pytest.raises(ValueError, match="too long"):
        bus_name("-" * 80)  # 240 escaped characters + the prefix > 255
    assert len(bus_name("-" * 78)) <= 255  # while the config's 64-character names all fit
    assert is_bus_name_valid(bus_name("-" * 64))


@pytest.mark.parametrize("name", [
    "org.passtd.Passtd1.vm_2D1",  # uppercase hex: not what bus_name writes
    "org.passtd.Passtd1.vm_2",  # truncated escape
    "org.passtd.Passtd1.vm_zz",  # not hex
    "org.passtd.Passtd1._61",  # "a" spelt escaped: the canonical spelling is "a"
    "org.passtd.Passtd1.1vm",  # a leading digit must be escaped
    "org.passtd.Passtd1.",  # nothing after the prefix
    "org.passtd.Passtd1.a.b",  # a second element
    "org.passtd.Passtd1._ff",  # not UTF-8
    "org.passtd.Passtd1",  # the prefix without its dot
    "org.example.Other.vm1",
    ":1.42",
])
def test_instance_name_refuses_what_bus_name_never_writes(name: str) -> None:
    assert instance_name(name) is None


@given(st.text(min_size=1, max_size=64))
def test_round_trip_and_validity(name: str) -> None:
    try:
        escaped = bus_name(name)
    except ValueError:  # only too-long names are refused
        assert len(name.encode()) * 3 + len(BUS_NAME_PREFIX) > 255
        return
    assert instance_name(escaped) == name
    assert is_bus_name_valid(escaped)
    element = escaped[len(BUS_NAME_PREFIX):]
    assert ELEMENT.fullmatch(element)
    assert re.fullmatch(r"(?:[A-Za-z0-9]|_[0-9a-f]{2})+", element)


@given(st.text(min_size=1, max_size=64), st.text(min_size=1, max_size=64))
def test_distinct_names_get_distinct_bus_names(a: str, b: str) -> None:
    if a != b and len(a.encode()) <= 64 and len(b.encode()) <= 64:
        assert bus_name(a) != bus_name(b)
