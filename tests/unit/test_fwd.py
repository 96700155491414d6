"""The -t/-u port-spec grammar: passt(1)'s examples, errors, and random input."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from passtd.engine import fwd
from passtd.engine.fwd import ForwardRule, SpecError, find_conflict, format_rule, parse_spec

EPH = 32768  # ephemeral_start used throughout: `all` is then 1-32767


def rules(spec: str, proto: str = "tcp", ephemeral_start: int = EPH) -> list[tuple]:
    """(address, ifname, first, last, to_first, to_address, weak) per rule."""
    return [
        (r.address, r.ifname, r.first, r.last, r.to_first, r.to_address, r.weak)
        for r in parse_spec(spec, proto, ephemeral_start=ephemeral_start)
    ]


# every example of passt(1) -t (its man page, OPTIONS, -t), with the rules it must give
MAN_PAGE_EXAMPLES = {
    "22": [(None, None, 22, 22, 22, None, False)],
    "22:23": [(None, None, 22, 22, 23, None, False)],
    "22,25": [(None, None, 22, 22, 22, None, False), (None, None, 25, 25, 25, None, False)],
    "22-80": [(None, None, 22, 80, 22, None, False)],
    "22-80:32-90": [(None, None, 22, 80, 32, None, False)],
    "192.0.2.1/22": [("192.0.2.1", None, 22, 22, 22, None, False)],
    "192.0.2.1%eth0/22": [("192.0.2.1", "eth0", 22, 22, 22, None, False)],
    "%eth0/22": [(None, "eth0", 22, 22, 22, None, False)],
    "0.0.0.0/5000:192.0.2.5/6000": [("0.0.0.0", None, 5000, 5000, 6000, "192.0.2.5", False)],
    "127.0.0.6/all:192.0.2.6": [("127.0.0.6", None, 1, EPH - 1, 1, "192.0.2.6", True)],
    "2000-5000,~3000-3010": [
        (None, None, 2000, 2999, 2000, None, False),
        (None, None, 3011, 5000, 3011, None, False),
    ],
    "192.0.2.1/20-30,~25": [
        ("192.0.2.1", None, 20, 24, 20, None, False),
        ("192.0.2.1", None, 26, 30, 26, None, False),
    ],
    "~20000-20010": [
        (None, None, 1, 19999, 1, None, True),
        (None, None, 20011, EPH - 1, 20011, None, True),
    ],
    "::1/all": [("::1", None, 1, EPH - 1, 1, None, True)],
    "all": [(None, None, 1, EPH - 1, 1, None, True)],
    "none": [],
}


@pytest.mark.parametrize("spec", MAN_PAGE_EXAMPLES)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_man_page_examples(spec: str, proto: str) -> None:
    assert rules(spec, proto) == MAN_PAGE_EXAMPLES[spec]
    assert all(r.proto == proto for r in parse_spec(spec, proto, ephemeral_start=EPH))


@pytest.mark.parametrize("spec", ["auto", "::1/auto", "8000-8010,auto"])
def test_auto_is_refused_as_pasta_only(spec: str) -> None:
    with pytest.raises(SpecError, match=r"'auto' is pasta-only"):
        parse_spec(spec, "tcp", ephemeral_start=EPH)


def test_mapping_arithmetic() -> None:
    (rule,) = parse_spec("22-80:32-90", "tcp", ephemeral_start=EPH)
    assert rule.ports() == range(22, 81)
    assert [rule.guest_port(p) for p in (22, 23, 80)] == [32, 33, 90]
    assert rule.to_last == 90
    with pytest.raises(ValueError):
        rule.guest_port(81)


def test_exclude_keeps_the_mapping_offset() -> None:
    assert rules("22-80:32-90,~50") == [
        (None, None, 22, 49, 32, None, False),
        (None, None, 51, 80, 61, None, False),
    ]
    assert parse_spec("22-80:32-90,~50", "tcp")[1].guest_port(51) == 61


def test_excludes_win_wherever_they_are_written() -> None:
    assert rules("~25,20-30") == rules("20-30,~25")
    assert rules("20-30,~25,~22-26,~26") == [
        (None, None, 20, 21, 20, None, False),
        (None, None, 27, 30, 27, None, False),
    ]


def test_all_with_excludes_is_a_handful_of_rules() -> None:
    got = parse_spec("all,~22,~80-90,~443,~8080", "tcp", ephemeral_start=EPH)
    assert [(r.first, r.last) for r in got] == [
        (1, 21), (23, 79), (91, 442), (444, 8079), (8081, EPH - 1)
    ]  # fmt: skip
    assert all(r.weak for r in got)
    assert sum(len(r.ports()) for r in got) == EPH - 1 - 1 - 11 - 1 - 1


def test_includes_are_not_weak_and_may_be_ephemeral() -> None:
    assert rules("40000-40010") == [(None, None, 40000, 40010, 40000, None, False)]


def test_all_stops_below_the_ephemeral_range() -> None:
    assert rules("all", ephemeral_start=1024) == [(None, None, 1, 1023, 1, None, True)]
    assert rules("all", ephemeral_start=65536) == [(None, None, 1, 65535, 1, None, True)]


def test_ephemeral_start_read_from_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fwd, "read_ephemeral_start", lambda: 2000)
    assert [(r.first, r.last) for r in parse_spec("all", "tcp")] == [(1, 1999)]


@pytest.mark.parametrize(
    ("content", "expected"),
    [("40000\t60999\n", 40000), ("1024 65535", 1024), ("garbage", 32768), ("", 32768)],
)
def test_read_ephemeral_start(tmp_path, content: str, expected: int) -> None:
    path = tmp_path / "ip_local_port_range"
    path.write_text(content)
    assert fwd.read_ephemeral_start(str(path)) == expected
    assert fwd.read_ephemeral_start(str(tmp_path / "missing")) == 32768


@pytest.mark.parametrize(
    ("content", "expected"),
    [("40000\t60999\n", (40000, 60999)), ("1024 65535", (1024, 65535)),
     ("60999 40000", (32768, 60999)), ("1 2 3", (32768, 60999)), ("", (32768, 60999))],
)
def test_read_ephemeral_range(tmp_path, content: str, expected: tuple[int, int]) -> None:
    path = tmp_path / "ip_local_port_range"
    path.write_text(content)
    assert fwd.read_ephemeral_range(str(path)) == expected


@pytest.mark.parametrize(
    ("content", "expected"),
    [("\n", ()), ("8080\n", ((8080, 8080),)), ("123,8080,9000-9100\n",
                                              ((123, 123), (8080, 8080), (9000, 9100))),
     ("9000-8000", ()), ("x", ())],
)
def test_read_reserved_ports(tmp_path, content: str, expected: tuple) -> None:
    path = tmp_path / "ip_local_reserved_ports"
    path.write_text(content)
    assert fwd.read_reserved_ports(str(path)) == expected
    assert fwd.read_reserved_ports(str(tmp_path / "missing")) == ()


def test_adjacent_ranges_collapse() -> None:
    assert rules("22,23,24") == [(None, None, 22, 24, 22, None, False)]
    assert rules("22:32,23:33") == [(None, None, 22, 23, 32, None, False)]
    assert len(rules("22:32,23:40")) == 2
    assert len(rules("0.0.0.0/22:192.0.2.1/22,23:192.0.2.2/23")) == 2
    assert rules("30,20-29") == [(None, None, 20, 30, 20, None, False)]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("[::1]/22", [("::1", None, 22, 22, 22, None, False)]),
        ("[192.0.2.1]%eth0/22", [("192.0.2.1", "eth0", 22, 22, 22, None, False)]),
        ("*/22", [(None, None, 22, 22, 22, None, False)]),
        ("*%lo/22", [(None, "lo", 22, 22, 22, None, False)]),
        ("::/22", [("::", None, 22, 22, 22, None, False)]),
        ("::ffff:192.0.2.1/22", [("192.0.2.1", None, 22, 22, 22, None, False)]),
        ("2001:DB8::1/22", [("2001:db8::1", None, 22, 22, 22, None, False)]),
        ("fe80::1%eth0/22", [("fe80::1", "eth0", 22, 22, 22, None, False)]),
        ("192.0.2.1/22:192.0.2.9", [("192.0.2.1", None, 22, 22, 22, "192.0.2.9", False)]),
        (
            "::/22-23:2001:db8::5/32-33",
            [("::", None, 22, 23, 32, "2001:db8::5", False)],
        ),
        ("::1/22:[2001:db8::5]/23", [("::1", None, 22, 22, 23, "2001:db8::5", False)]),
        ("192.0.2.1/all,~22", [
            ("192.0.2.1", None, 1, 21, 1, None, True),
            ("192.0.2.1", None, 23, EPH - 1, 23, None, True),
        ]),
        ("0022", [(None, None, 22, 22, 22, None, False)]),
    ],
)  # fmt: skip
def test_address_forms(spec: str, expected: list[tuple]) -> None:
    assert rules(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("22-x", "'-t 22-x': bad port 'x'"),
        ("x", "'-t x': bad port 'x'"),
        ("", "'-t ': bad port ''"),
        ("22,", "'-t 22,': bad port ''"),
        ("22,,25", "'-t 22,,25': bad port ''"),
        ("22-", "'-t 22-': bad port range '22-'"),
        ("22-23-24", "'-t 22-23-24': bad port '23-24'"),
        ("0", "'-t 0': port '0' out of range 1-65535"),
        ("65536", "'-t 65536': port '65536' out of range 1-65535"),
        ("9" * 5000, "out of range 1-65535"),
        ("30-20", "'-t 30-20': bad port range '30-20': first port above last"),
        ("22-80:32-33", "'-t 22-80:32-33': target range 32-33 has 2 ports, 22-80 has 59"),
        ("65535:1-2", "target range 1-2 has 2 ports, 65535 has 1"),
        ("22:", "'-t 22:': missing target after '22:'"),
        ("22:x", "'-t 22:x': bad target address 'x'"),
        ("22:65536", "'-t 22:65536': port '65536' out of range 1-65535"),
        ("192.0.2.256/22", "'-t 192.0.2.256/22': bad listen address '192.0.2.256'"),
        ("vm/22", "bad listen address 'vm'"),
        ("%/22", "bad interface name ''"),
        ("%0123456789abcdef/22", "bad interface name '0123456789abcdef'"),
        ("%../22", "bad interface name '..'"),
        ("%a:b/22", "bad interface name 'a:b'"),
        ("192.0.2.1/", "'-t 192.0.2.1/': bad port ''"),
        ("5000:192.0.2.5/6000", "needs a listen address of its family, e.g. '0.0.0.0/...'"),
        ("all:2001:db8::5", "needs a listen address of its family, e.g. '::/...'"),
        ("::1/22:192.0.2.5", "cannot forward from IPv6 to IPv4"),
        ("0.0.0.0/22:224.0.0.1", "target address 224.0.0.1 is not a unicast address"),
        ("0.0.0.0/22:0.0.0.0", "target address 0.0.0.0 is not a unicast address"),
        ("~22:23", "exclude '~22:23' cannot have a target"),
        ("~x", "bad port 'x'"),
        ("all,22", "'all' cannot be combined with explicit port ranges"),
        ("all,all", "'all' given twice"),
        ("22,none", "'none' must be the whole spec"),
        ("22,~22", "nothing left to forward after the excludes"),
        ("~1-65535", "nothing left to forward after the excludes"),
        ("22,22", "'-t 22,22': port 22 given twice"),
        ("20-30,25-40", "port 25-30 given twice"),
        ("22, 25", "bad port ' 25'"),
        ("fe80::1%eth0%x/22", "bad interface name 'eth0%x'"),
    ],
)
def test_errors_name_the_offending_part(spec: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec, "tcp", ephemeral_start=EPH)
    assert message in str(caught.value)


def test_udp_errors_say_u() -> None:
    with pytest.raises(SpecError, match=r"^'-u 22-x': bad port 'x'$"):
        parse_spec("22-x", "udp")


def test_unknown_protocol() -> None:
    with pytest.raises(SpecError, match="unknown protocol"):
        parse_spec("22", "sctp")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"proto": "icmp"}, "unknown protocol"),
        ({"first": 0}, "port 0 out of range"),
        ({"first": 30, "last": 20}, "first port above last"),
        ({"first": 1, "last": 10, "to_first": 65530}, "goes beyond port 65535"),
        ({"ifname": "x" * 16}, "bad interface name"),
        ({"address": "fe80::1%eth0"}, "bad listen address"),
        ({"address": "localhost"}, "bad listen address 'localhost'"),
        ({"to_address": "192.0.2.5"}, "needs a listen address"),
        ({"first": True}, "out of range"),
        ({"address": 3}, "expected a string"),
    ],
)
def test_rules_built_by_hand_are_validated(kwargs: dict, message: str) -> None:
    fields = {"proto": "tcp", "address": None, "ifname": None, "first": 22, "last": 22}
    fields["to_first"] = 22
    fields.update(kwargs)
    with pytest.raises(SpecError, match=message):
        ForwardRule(**fields)


def test_rules_built_by_hand_are_canonical() -> None:
    rule = ForwardRule("tcp", "2001:0DB8::0001", None, 80, 80, 8080, "2001:db8:0::2")
    assert (rule.address, rule.to_address) == ("2001:db8::1", "2001:db8::2")
    assert ForwardRule("udp", "::ffff:192.0.2.1", None, 1, 1, 1).address == "192.0.2.1"


def test_overlaps() -> None:
    def rule(address: str | None, first: int, last: int, proto: str = "tcp") -> ForwardRule:
        return ForwardRule(proto, address, None, first, last, first)

    assert rule(None, 20, 30).overlaps(rule("192.0.2.1", 30, 40))
    assert rule("0.0.0.0", 20, 30).overlaps(rule("192.0.2.1", 25, 25))
    assert rule("::", 20, 30).overlaps(rule("2001:db8::1", 25, 25))
    assert not rule("0.0.0.0", 20, 30).overlaps(rule("2001:db8::1", 25, 25))
    assert not rule("192.0.2.1", 20, 30).overlaps(rule("192.0.2.2", 20, 30))
    assert not rule(None, 20, 30).overlaps(rule(None, 31, 40))
    assert not rule(None, 20, 30).overlaps(rule(None, 20, 30, "udp"))
    first, second = rule(None, 1, 5), rule("192.0.2.1", 5, 9)
    assert find_conflict([first, rule(None, 6, 6), second]) == (first, second)
    assert find_conflict([first, rule(None, 6, 6)]) is None


@pytest.mark.parametrize(
    ("rule", "text"),
    [
        (ForwardRule("tcp", None, None, 22, 22, 22), "22"),
        (ForwardRule("tcp", None, None, 22, 80, 32), "22-80:32-90"),
        (ForwardRule("tcp", "127.0.0.1", None, 8080, 8080, 80), "127.0.0.1/8080:80"),
        (ForwardRule("tcp", None, "eth0", 22, 22, 22), "%eth0/22"),
        (ForwardRule("tcp", "::1", "lo", 22, 22, 22), "::1%lo/22"),
        (ForwardRule("tcp", "0.0.0.0", None, 5000, 5000, 6000, "192.0.2.5"),
         "0.0.0.0/5000:192.0.2.5/6000"),
        (ForwardRule("tcp", "::", None, 1, 2, 1, "2001:db8::5"), "::/1-2:2001:db8::5/1-2"),
    ],
)  # fmt: skip
def test_format_rule(rule: ForwardRule, text: str) -> None:
    assert format_rule(rule) == text
    assert parse_spec(text, rule.proto, ephemeral_start=EPH) == [rule]


# --- hypothesis ---------------------------------------------------------------------

_ADDRESSES = ["192.0.2.1", "0.0.0.0", "::", "::1", "2001:db8::5", "[::1]", "*", "", "fe80::1"]
_TOKENS = st.one_of(
    st.sampled_from([",", ":", "-", "/", "%", "~", "all", "auto", "none", "eth0", "[", "]"]),
    st.sampled_from(_ADDRESSES),
    st.integers(0, 70000).map(str),
    st.text(max_size=3),
)


@given(st.text())
@example("\x00")
@example("%\udcff/22")
@example("2" * 5000)
@example("::ffff:1.2.3.4/22:1.2.3.5")
def test_arbitrary_text_parses_or_raises_spec_error(spec: str) -> None:
    try:
        result = parse_spec(spec, "tcp", ephemeral_start=EPH)
    except SpecError:
        return
    assert all(isinstance(r, ForwardRule) for r in result)


@given(st.lists(_TOKENS, max_size=12).map("".join), st.integers(-5, 70000))
def test_spec_like_text_parses_or_raises_spec_error(spec: str, ephemeral_start: int) -> None:
    try:
        result = parse_spec(spec, "udp", ephemeral_start=ephemeral_start)
    except SpecError:
        return
    # whatever parses is a valid, conflict-free rule set that formats back to itself
    assert find_conflict(result) is None
    for rule in result:
        assert 1 <= rule.first <= rule.last <= 65535
        assert rule.to_last <= 65535
        reparsed = parse_spec(format_rule(rule), "udp", ephemeral_start=ephemeral_start)
        assert reparsed == [ForwardRule(**{**_as_dict(rule), "weak": False})]


def _as_dict(rule: ForwardRule) -> dict:
    return rule._asdict()


@st.composite
def forward_rules(draw: st.DrawFn) -> ForwardRule:
    address = draw(st.sampled_from([None, "192.0.2.1", "0.0.0.0", "::", "2001:db8::1"]))
    ifname = draw(st.sampled_from([None, "eth0", "br-lan.10"]))
    first = draw(st.integers(1, 65535))
    last = draw(st.integers(first, 65535))
    to_first = draw(st.integers(1, 65535 - (last - first)))
    to_address = None
    if address is not None and draw(st.booleans()):
        to_address = "192.0.2.9" if ":" not in address else "2001:db8::9"
    return ForwardRule(draw(st.sampled_from(["tcp", "udp"])), address, ifname, first, last,
                       to_first, to_address)  # fmt: skip


@given(forward_rules())
def test_format_then_parse_round_trips(rule: ForwardRule) -> None:
    assert parse_spec(format_rule(rule), rule.proto, ephemeral_start=EPH) == [rule]


def test_a_rule_changed_with_replace_is_checked_and_canonical() -> None:
    """A NamedTuple's _replace would build the tuple unchecked: ForwardRule's checks."""
    rule = ForwardRule("tcp", None, None, 80, 80, 8080)
    assert rule._replace(address="2001:0DB8::0001").address == "2001:db8::1"
    with pytest.raises(SpecError):
        rule._replace(first=90)
    with pytest.raises(SpecError):
        rule._replace(proto="sctp")
