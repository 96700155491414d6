"""passtd.libvirt without libvirt: metadata <-> settings <-> runtime config, the attach and
detach edits of a domain's XML, the hook's prepare/release with a stand-in systemctl, and
--persist against a stand-in of libvirt-python."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from passtd import libvirt as lv
from passtd.libvirt import (
    DomainError,
    Forward,
    HookError,
    IpSettings,
    MetadataError,
    NetworkSettings,
    SettingsChange,
)

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "libvirt-hook" / "passtd"
NS = lv.NAMESPACE
QNS = lv.QEMU_NAMESPACE
UUID = "097b6206-ed53-48db-90ff-5eb6824746e3"

PLAIN = f"""\
<domain type='qemu'>
  <name>vm1</name>
  <uuid>{UUID}</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='network'>
      <mac address='52:54:00:11:22:33'/><source network='default'/>
    </interface>
  </devices>
</domain>
"""

FULL_METADATA = f"""\
<passtd:network xmlns:passtd="{NS}" mtu="1500">
  <passtd:forward proto="tcp" host="2222" guest="22"/>
  <passtd:forward proto="tcp" host="8000-8010" guest="9000-9010" address="127.0.0.1"/>
  <passtd:forward proto="udp" host="5353" address="::1"/>
  <passtd:ipv4 enabled="yes" address="198.51.100.10/24" gateway="198.51.100.1"/>
  <passtd:ipv6 address="2001:db8::10/64"/>
  <passtd:dns address="198.51.100.53"/>
  <passtd:dns address="2001:db8::53"/>
</passtd:network>
"""


def with_metadata(network: str, domain: str = PLAIN) -> str:
    return domain.replace("  </metadata>", f"{network}  </metadata>")


def parse(network: str) -> NetworkSettings:
    return lv.parse_metadata(ET.fromstring(network))


def net(body: str = "", attrs: str = "") -> str:
    return f'<passtd:network xmlns:passtd="{NS}" {attrs}>{body}</passtd:network>'


def canonical(xml: str) -> str:
    """The XML without formatting differences (whitespace between elements, quotes)."""
    root = ET.fromstring(xml)
    for node in root.iter():
        if node.text is not None and not node.text.strip():
            node.text = None
        if node.tail is not None and not node.tail.strip():
            node.tail = None
    return ET.canonicalize(ET.tostring(root, encoding="unicode"))


def qemu_args(xml: str) -> list[str]:
    root = ET.fromstring(xml)
    return [a.get("value", "") for a in root.iterfind(f"{{{QNS}}}commandline/{{{QNS}}}arg")]


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The runtime directory (config.load reads NAME.yaml there): never the host's."""
    path = tmp_path / "run-passtd"
    monkeypatch.setenv("PASSTD_RUNTIME_DIR", str(path))
    return path


# -- the hook script ---------------------------------------------------------------------------


def test_hook_namespace_is_the_module_s() -> None:
    m = re.search(r'^NAMESPACE = b"([^"]+)"', HOOK.read_text(), re.MULTILINE)
    assert m and m[1] == lv.NAMESPACE


def test_hook_is_executable_and_ignores_other_domains_at_once() -> None:
    assert HOOK.stat().st_mode & stat.S_IXUSR
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-I", str(HOOK), "vm1", "prepare", "begin", "-"],
                         input=PLAIN.encode(), capture_output=True, check=False)
    assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")
    assert time.monotonic() - started < 5  # a python start; the test asserts no hang


def test_hook_ignores_operations_other_than_prepare_started_and_release() -> None:
    # `-I` and no PYTHONPATH: importing passtd would fail, so it is not imported
    for operation in (["start", "begin"], ["stopped", "end"],
                      ["reconnect", "begin"], ["migrate", "begin"], ["restore", "begin"]):
        res = subprocess.run([sys.executable, "-I", str(HOOK), "vm1", *operation, "-"],
                             input=with_metadata(FULL_METADATA).encode(), capture_output=True,
                             check=False, cwd="/")
        assert (res.returncode, res.stdout, res.stderr) == (0, b"", b""), operation


# -- metadata -> settings -> runtime config ----------------------------------------------------


def test_full_metadata() -> None:
    settings = parse(FULL_METADATA)
    assert settings == NetworkSettings(
        mtu=1500,
        forwards=(Forward("tcp", "2222", "22"),
                  Forward("tcp", "8000-8010", "9000-9010", "127.0.0.1"),
                  Forward("udp", "5353", None, "::1")),
        ipv4=IpSettings(True, "198.51.100.10/24", "198.51.100.1"),
        ipv6=IpSettings(address="2001:db8::10/64"),
        dns=("198.51.100.53", "2001:db8::53"),
    )
    assert lv.runtime_config(settings) == {
        "mtu": 1500,
        "tcp_forwards": ["2222:22", "127.0.0.1/8000-8010:9000-9010"],
        "udp_forwards": ["::1/5353"],
        "ipv4": {"enabled": True, "address": "198.51.100.10/24", "gateway": "198.51.100.1"},
        "ipv6": {"address": "2001:db8::10/64"},
        "dns": ["198.51.100.53", "2001:db8::53"],
    }
    lv.check_settings("vm1", settings)


def test_empty_metadata_sets_nothing() -> None:
    settings = parse(net())
    assert settings == NetworkSettings()
    assert lv.runtime_config(settings) == {}


def test_settings_from_domain() -> None:
    assert lv.settings_from_domain(PLAIN) is None
    assert lv.settings_from_domain(with_metadata(FULL_METADATA)) == parse(FULL_METADATA)
    assert lv.domain_name(PLAIN) == "vm1"


@pytest.mark.parametrize(("network", "message"), [
    (net("<passtd:forwards proto='tcp' host='1'/>"), "unknown element"),
    (net("<forward proto='tcp' host='1'/>"), "unknown element"),
    (net(attrs="mtus='1500'"), "unknown attribute 'mtus'"),
    (net(attrs="mtu='big'"), "mtu must be a number"),
    (net("<passtd:forward proto='sctp' host='1'/>"), "proto must be tcp or udp"),
    (net("<passtd:forward proto='tcp'/>"), "forward #1: proto and host are required"),
    (net("<passtd:forward proto='tcp' host='22' port='1'/>"), "unknown attribute 'port'"),
    (net("<passtd:forward proto='tcp' host='all'/>"), "host must be a port or a range"),
    (net("<passtd:forward proto='tcp' host='70000'/>"), "out of range"),
    (net("<passtd:forward proto='tcp' host='20-10'/>"), "first port above last"),
    (net("<passtd:forward proto='tcp' host='8000-8010' guest='22'/>"), "has 1 ports"),
    (net("<passtd:forward proto='tcp' host='22' address='*'/>"), "must be an IP address"),
    (net("<passtd:forward proto='tcp' host='22' address='127.0.0.1%lo'/>"),
     "must be an IP address"),
    (net("<passtd:ipv4 enabled='true'/>"), "enabled must be yes or no"),
    (net("<passtd:ipv4/><passtd:ipv4/>"), "ipv4 given twice"),
    (net("<passtd:dns/>"), "dns #1: address is required"),
    (net("<passtd:forward proto='tcp' host='2222' guest='22'/>"
         "<passtd:forward proto='tcp' host='2200-2300'/>"), "both listen on tcp port 2222"),
    ("<network xmlns='urn:other'/>", "expected <passtd:network>"),
])
def test_bad_metadata_is_refused_with_the_reason(network: str, message: str) -> None:
    with pytest.raises(MetadataError, match=re.escape(message)):
        parse(network)


@pytest.mark.parametrize(("settings", "message"), [
    (NetworkSettings(mtu=9), "mtu: must be 0 or between 68 and 65520, got 9"),
    (NetworkSettings(ipv4=IpSettings(address="300.1.1.1")), "ipv4.address: bad address"),
    (NetworkSettings(ipv4=IpSettings(gateway="127.0.0.1")), "is not a unicast address"),
    (NetworkSettings(dns=("nameserver",)), "dns[0]: bad address"),
    (NetworkSettings(ipv4=IpSettings(enabled=False), ipv6=IpSettings(enabled=False)),
     "IPv4 and IPv6 cannot both be disabled"),
])
def test_passtd_config_checks_the_values(settings: NetworkSettings, message: str) -> None:
    with pytest.raises(MetadataError) as info:
        lv.check_settings("vm1", settings)
    assert message in str(info.value)
    assert "passtd-check-" not in str(info.value)  # the scratch file's name is gone


def test_check_settings_refuses_an_unusable_instance_name() -> None:
    with pytest.raises(MetadataError, match="instance name 'my vm': must be 1 to 60"):
        lv.check_settings("my vm", NetworkSettings())


_ports = st.integers(1, 65000)
_forwards = st.builds(
    lambda proto, first, span, offset, address: Forward(
        proto, f"{first}-{first + span}" if span else str(first),
        None if offset is None else
        (f"{offset}-{offset + span}" if span else str(offset)), address),
    st.sampled_from(["tcp", "udp"]), _ports, st.integers(0, 100),
    st.one_of(st.none(), st.integers(1, 65000)),
    st.sampled_from([None, "127.0.0.1", "::1", "198.51.100.7"]))
_ips = st.builds(IpSettings, st.sampled_from([None, True, False]),
                 st.sampled_from([None, "198.51.100.10/24", "2001:db8::10"]),
                 st.sampled_from([None, "198.51.100.1", "fe80::1"]))


@given(mtu=st.one_of(st.none(), st.integers(0, 65520)),
       forwards=st.lists(_forwards, max_size=4, unique_by=lambda f: (f.proto, f.host)),
       ipv4=_ips, ipv6=_ips,
       dns=st.lists(st.sampled_from(["198.51.100.53", "2001:db8::53"]), max_size=2))
def test_element_round_trip(mtu: int | None, forwards: list[Forward], ipv4: IpSettings,
                            ipv6: IpSettings, dns: list[str]) -> None:
    """metadata_element and parse_metadata are inverses (structurally valid settings)."""
    settings = NetworkSettings(mtu, (), ipv4, ipv6, tuple(dns))
    for forward in forwards:
        with contextlib.suppress(MetadataError):  # overlapping ones are left out
            settings = settings.with_forward(forward)
    element = lv.metadata_element(settings)
    assert lv.parse_metadata(ET.fromstring(ET.tostring(element))) == settings
    # and setMetadata's form: the same element without the namespace
    bare = ET.fromstring(lv.metadata_xml(settings))
    assert bare.tag == "network" and all("}" not in n.tag for n in bare.iter())


def test_forward_spec_and_parse_forward() -> None:
    cases = {
        "tcp:2222:22": Forward("tcp", "2222", "22"),
        "udp:5353": Forward("udp", "5353"),
        "tcp:127.0.0.1/8080:80": Forward("tcp", "8080", "80", "127.0.0.1"),
        "tcp:::1/8080:80": Forward("tcp", "8080", "80", "::1"),
        "tcp:[::1]/8080": Forward("tcp", "8080", None, "::1"),
        "tcp:8000-8010:9000-9010": Forward("tcp", "8000-8010", "9000-9010"),
    }
    for text, forward in cases.items():
        assert lv.parse_forward(text) == forward, text
    assert Forward("tcp", "8080", "80", "::1").spec == "::1/8080:80"
    for bad in ("2222:22", "sctp:1", "tcp:", "tcp:x/22", "tcp:22:70000", "tcp:all",
                "tcp:1-3:1-2", "tcp:*/22"):
        with pytest.raises(MetadataError):
            lv.parse_forward(bad)


def test_with_forward() -> None:
    settings = NetworkSettings(forwards=(Forward("tcp", "2222", "22"),))
    assert settings.with_forward(Forward("tcp", "2222", "22")) is settings
    assert settings.with_forward(Forward("udp", "2222", "22")).forwards[-1].proto == "udp"
    assert settings.with_forward(Forward("tcp", "2223", "22")).forwards[-1].host == "2223"
    with pytest.raises(MetadataError, match="overlaps tcp 2222:22"):
        settings.with_forward(Forward("tcp", "2222", "23", "127.0.0.1"))


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vm1", "my-vm", ".hidden", "a@b:c_d.e", "x\\y", "ü-vm"])
def test_systemd_escape_agrees_with_systemd(name: str) -> None:
    if shutil.which("systemd-escape") is None:
        pytest.skip("systemd-escape not installed")
    expected = subprocess.run(["systemd-escape", name], capture_output=True, text=True,
                              check=True).stdout.strip()
    assert lv.systemd_escape(name) == expected


# libvirt's own examples (tests/virsystemdtest.c, libvirt 9 to 11): domain name and id ->
# the machine name systemd-machined registers
@pytest.mark.parametrize(("name", "domain_id", "machine"), [
    ("demo", 1, "qemu-1-demo"),
    ("demo-name", 2, "qemu-2-demo-name"),
    ("demo!name", 3, "qemu-3-demoname"),
    (".demo", 4, "qemu-4-demo"),
    ("bull\U0001f4a9", 5, "qemu-5-bull"),
    ("demo..name", 6, "qemu-6-demo.name"),
    ("1234567890" * 6, 8, "qemu-8-" + "1234567890" * 5 + "1234567"),
    ("kstest-network-device-default-httpks_(c9eed63e-981e-48ec--cdc-56b3f8c5f678)", 10,
     "qemu-10-kstest-network-device-default-httpksc9eed63e-981e-48ec-c"),
    ("demo.-.test.", 11, "qemu-11-demo.test"),
    ("|.-m", 1, "qemu-1-m"),
    ("web_01", 7, "qemu-7-web01"),  # "_" is dropped: one more reason for the domain's id
])
def test_machine_name_is_libvirt_s(name: str, domain_id: int, machine: str) -> None:
    assert lv.machine_name(domain_id, name) == machine


@pytest.mark.parametrize(("domain", "scope"), [
    # as libvirt 9 made it for domain lv-x1, seen in /proc/PID/cgroup of its qemu
    ("<domain type='qemu' id='1'><name>lv-x1</name></domain>",
     "/machine.slice/machine-qemu\\x2d1\\x2dlv\\x2dx1.scope"),
    ("<domain id='42'><name>vm1</name><resource><partition>/machine/prod-eu</partition>"
     "</resource></domain>",
     "/machine.slice/machine-prod\\x2deu.slice/machine-qemu\\x2d42\\x2dvm1.scope"),
    ("<domain id='3'><name>a</name><resource><partition>/machine</partition></resource>"
     "</domain>", "/machine.slice/machine-qemu\\x2d3\\x2da.scope"),
    (PLAIN, None),  # no id: not what libvirt gives the hook
    ("<domain id='-1'><name>vm1</name></domain>", None),
])
def test_qemu_scope(domain: str, scope: str | None) -> None:
    assert lv.qemu_scope(domain) == scope


def test_machined_available(tmp_path: Path) -> None:
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert not lv.machined_available(dirs)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "org.freedesktop.machine1.service").touch()
    assert lv.machined_available(dirs)


def test_unit_and_socket_names() -> None:
    assert lv.socket_unit("my-vm") == "passtd@my\\x2dvm.socket"
    assert lv.service_unit("my-vm") == "passtd@my\\x2dvm.service"
    assert lv.socket_path("my-vm") == "/run/passtd/my-vm.sock"  # %I: unescaped


# -- attach ------------------------------------------------------------------------------------


def test_attach_wires_a_plain_domain() -> None:
    edit = lv.attach_xml(PLAIN, SettingsChange(forwards=(lv.parse_forward("tcp:2222:22"),)))
    assert edit.changed and edit.notes == ()
    root = ET.fromstring(edit.xml)
    network = root.find(f"metadata/{{{NS}}}network")
    assert network is not None and lv.parse_metadata(network) == edit.settings
    assert edit.settings == NetworkSettings(forwards=(Forward("tcp", "2222", "22"),))
    # the other metadata and its prefix stay
    assert root.find("metadata/{http://libosinfo.org/xmlns/libvirt/domain/1.0}libosinfo") \
        is not None
    assert "libosinfo:os" in edit.xml and "ns0:" not in edit.xml
    assert edit.mac == lv.stable_mac(UUID, ["52:54:00:11:22:33"])
    assert qemu_args(edit.xml) == [
        "-netdev", "stream,id=passtd0,server=off,addr.type=unix,addr.path=/run/passtd/vm1.sock",
        "-device", f"virtio-net-pci,id=passtd0-nic,netdev=passtd0,mac={edit.mac}",
    ]
    # the rest of the domain is untouched
    plain, wired = ET.fromstring(PLAIN), ET.fromstring(edit.xml)
    for path in ("name", "uuid", "memory", "os/type", "devices/interface/mac"):
        before, after = plain.find(path), wired.find(path)
        assert before is not None and after is not None
        assert (before.attrib, before.text) == (after.attrib, after.text), path


def test_attach_is_idempotent() -> None:
    change = SettingsChange(forwards=(lv.parse_forward("tcp:2222:22"),), mtu=1500)
    first = lv.attach_xml(PLAIN, change)
    again = lv.attach_xml(first.xml, change)
    assert not again.changed and again.xml == first.xml and again.mac == first.mac
    # and as libvirt gives it back (reformatted): still nothing to change
    assert not lv.attach_xml(canonical(first.xml), change).changed
    assert not lv.attach_xml(first.xml).changed  # nothing asked: nothing changes


def test_attach_updates_settings_and_keeps_the_rest() -> None:
    first = lv.attach_xml(PLAIN, SettingsChange(forwards=(lv.parse_forward("tcp:2222:22"),),
                                                mtu=1500, dns=("198.51.100.53",)))
    second = lv.attach_xml(first.xml, SettingsChange(
        forwards=(lv.parse_forward("udp:5353"),), ipv4_address="198.51.100.10/24",
        ipv6_gateway="fe80::1"))
    assert second.changed and second.mac == first.mac
    assert second.settings == NetworkSettings(
        mtu=1500, forwards=(Forward("tcp", "2222", "22"), Forward("udp", "5353")),
        ipv4=IpSettings(address="198.51.100.10/24"), ipv6=IpSettings(gateway="fe80::1"),
        dns=("198.51.100.53",))
    assert qemu_args(second.xml) == qemu_args(first.xml)


def test_attach_refuses_invalid_or_overlapping_settings() -> None:
    first = lv.attach_xml(PLAIN, SettingsChange(forwards=(lv.parse_forward("tcp:2222:22"),)))
    with pytest.raises(MetadataError, match="overlaps"):
        lv.attach_xml(first.xml, SettingsChange(forwards=(lv.parse_forward("tcp:2222:23"),)))
    with pytest.raises(MetadataError, match="mtu"):
        lv.attach_xml(PLAIN, SettingsChange(mtu=70000))
    with pytest.raises(MetadataError, match="not a unicast MAC"):
        lv.attach_xml(PLAIN, SettingsChange(mac="01:00:5e:00:00:01"))
    with pytest.raises(DomainError, match="instance name") as info:
        lv.attach_xml(PLAIN.replace("<name>vm1</name>", "<name>my vm</name>"))
    assert info.value.kind == DomainError.REFUSED


def test_attach_keeps_other_qemu_arguments() -> None:
    domain = PLAIN.replace("</domain>", f"""\
  <qemu:commandline xmlns:qemu="{QNS}">
    <qemu:arg value="-netdev"/>
    <qemu:arg value="user,id=other0"/>
    <qemu:arg value="-device"/>
    <qemu:arg value="e1000,netdev=other0"/>
    <qemu:env name="FOO" value="bar"/>
  </qemu:commandline>
</domain>""")
    edit = lv.attach_xml(domain)
    assert qemu_args(edit.xml)[:4] == ["-netdev", "user,id=other0", "-device",
                                       "e1000,netdev=other0"]
    assert qemu_args(edit.xml)[4] == "-netdev"
    assert ET.fromstring(edit.xml).find(f"{{{QNS}}}commandline/{{{QNS}}}env") is not None
    detached = lv.detach_xml(edit.xml)
    assert canonical(detached.xml) == canonical(domain)


def _with_args(*values: str) -> str:
    args = "".join(f'<qemu:arg value="{v}"/>' for v in values)
    return PLAIN.replace("</domain>", f'<qemu:commandline xmlns:qemu="{QNS}">{args}'
                                      "</qemu:commandline></domain>")


@pytest.mark.parametrize(("args", "message"), [
    (("-netdev", "user,id=passtd0"), "already has a netdev with id passtd0 that is not"),
    (("-netdev", "stream,id=passtd0,server=off,addr.type=unix,addr.path=/tmp/x.sock"),
     "that is not passtd's"),
    (("-netdev", "stream,id=mine,server=off,addr.type=unix,addr.path=/run/passtd/vm1.sock"),
     "already connects a netdev to /run/passtd/vm1.sock"),
    (("--netdev", "tap,id=passtd0"), "already has a netdev with id passtd0"),
])
def test_attach_refuses_a_conflicting_netdev(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(DomainError, match=re.escape(message)) as info:
        lv.attach_xml(_with_args(*args))
    assert info.value.kind == DomainError.REFUSED


def test_attach_after_a_rename_points_the_netdev_at_the_new_socket() -> None:
    old = lv.attach_xml(PLAIN.replace("<name>vm1</name>", "<name>old</name>"))
    renamed = old.xml.replace("<name>old</name>", "<name>vm1</name>")
    edit = lv.attach_xml(renamed)
    assert edit.changed and edit.mac == old.mac
    assert qemu_args(edit.xml)[1].endswith("addr.path=/run/passtd/vm1.sock")
    assert edit.notes == ("netdev passtd0 now connects to /run/passtd/vm1.sock "
                          "(was /run/passtd/old.sock)",)


def test_attach_mac() -> None:
    wired = lv.attach_xml(PLAIN, SettingsChange(mac="52:54:00:AA:BB:CC"))
    assert wired.mac == "52:54:00:aa:bb:cc"
    assert qemu_args(wired.xml)[3].endswith(",mac=52:54:00:aa:bb:cc")
    changed = lv.attach_xml(wired.xml, SettingsChange(mac="52:54:00:aa:bb:cd"))
    assert changed.changed
    assert qemu_args(changed.xml)[3] == \
        "virtio-net-pci,id=passtd0-nic,netdev=passtd0,mac=52:54:00:aa:bb:cd"
    assert not lv.attach_xml(changed.xml, SettingsChange(mac="52:54:00:AA:BB:CD")).changed


def test_stable_mac() -> None:
    mac = lv.stable_mac(UUID)
    assert mac == lv.stable_mac(UUID) != lv.stable_mac("another")
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac)
    assert lv.stable_mac(UUID, [mac.upper()]) not in (mac, mac.upper())


def test_qemu_option_syntax() -> None:
    options = lv._qemu_options("stream,id=a,,b,addr.path=/x,,y.sock")
    assert options == {"": "stream", "id": "a,b", "addr.path": "/x,y.sock"}
    assert lv._qemu_options(lv._format_qemu_options(options)) == options


# -- detach ------------------------------------------------------------------------------------


def test_detach_undoes_attach() -> None:
    wired = lv.attach_xml(PLAIN, SettingsChange(forwards=(lv.parse_forward("tcp:2222:22"),)))
    edit = lv.detach_xml(wired.xml)
    assert edit.changed and edit.notes == ()
    assert canonical(edit.xml) == canonical(PLAIN)
    assert not lv.detach_xml(edit.xml).changed
    assert not lv.detach_xml(PLAIN).changed and lv.detach_xml(PLAIN).xml == PLAIN


def test_detach_removes_an_empty_metadata_element() -> None:
    bare = PLAIN.replace(PLAIN[PLAIN.index("  <metadata>"):PLAIN.index("  <memory")], "")
    edit = lv.detach_xml(lv.attach_xml(bare).xml)
    assert ET.fromstring(edit.xml).find("metadata") is None
    assert canonical(edit.xml) == canonical(bare)


def test_detach_leaves_a_foreign_netdev_alone() -> None:
    domain = with_metadata(net(), _with_args("-netdev", "user,id=passtd0", "-device",
                                             "e1000,netdev=passtd0"))
    edit = lv.detach_xml(domain)
    assert edit.changed  # the metadata went
    assert qemu_args(edit.xml) == ["-netdev", "user,id=passtd0", "-device",
                                   "e1000,netdev=passtd0"]
    assert "left netdev passtd0 and its NIC alone" in edit.notes[0]


def test_bad_domain_xml() -> None:
    with pytest.raises(MetadataError, match="does not parse"):
        lv.settings_from_domain("<domain>")
    with pytest.raises(MetadataError, match="expected a <domain>"):
        lv.settings_from_domain("<network/>")


# -- the hook's actions (systemctl and the socket stood in) --------------------------------------


class FakeSystemctl:
    """systemctl stood in: records the calls; `fail` makes that verb fail; `status` is
    what `show --property=StatusText` prints (what the unit's process last said)."""

    def __init__(self, fail: str | None = None, status: str = "") -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail = fail
        self.status = status

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        if args[0] == "show":
            return subprocess.CompletedProcess(["systemctl", *args], 0, self.status + "\n", "")
        self.calls.append(args)
        failed = self.fail is not None and args[0] == self.fail
        return subprocess.CompletedProcess(["systemctl", *args], 1 if failed else 0, "",
                                           "Job failed (stand-in)" if failed else "")


@pytest.fixture
def etc(tmp_path: Path) -> str:
    path = tmp_path / "etc" / "passtd.yaml"
    path.parent.mkdir()
    path.write_text("defaults:\n  log_level: info\n")
    return str(path)


def test_prepare_writes_the_runtime_file_and_starts_the_instance(runtime_dir: Path,
                                                                 etc: str) -> None:
    systemctl = FakeSystemctl()
    assert lv.prepare("my-vm", with_metadata(FULL_METADATA), systemctl=systemctl,
                      config_file=etc)
    assert systemctl.calls == [("restart", "passtd@my\\x2dvm.socket"),
                               ("start", "passtd@my\\x2dvm.service")]
    path = runtime_dir / "my-vm.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o755
    assert yaml.safe_load(path.read_text()) == lv.runtime_config(parse(FULL_METADATA))
    assert [p.name for p in runtime_dir.iterdir()] == ["my-vm.yaml"]  # no scratch file left
    loaded = lv.config.load("my-vm", config_file=etc)
    assert loaded.mtu == 1500 and loaded.tcp_forward_specs == ("2222:22",
                                                               "127.0.0.1/8000-8010:9000-9010")


def test_prepare_names_the_scope_of_the_domain_s_qemu(runtime_dir: Path, etc: str) -> None:
    """Under systemd-machined, the instance is told which qemu is the domain's (its scope,
    from the id libvirt gives the domain before "prepare"); without machined, nobody."""
    domain = with_metadata(net()).replace("<domain type='qemu'>",
                                          "<domain type='qemu' id='7'>")
    scope = "/machine.slice/machine-qemu\\x2d7\\x2dvm1.scope"
    assert lv.prepare("vm1", domain, systemctl=FakeSystemctl(), config_file=etc,
                      machined=True)
    assert yaml.safe_load((runtime_dir / "vm1.yaml").read_text()) == {"qemu_cgroup": scope}
    assert lv.config.load("vm1", config_file=etc).qemu_cgroup == scope
    assert lv.prepare("vm1", domain, systemctl=FakeSystemctl(), config_file=etc)
    assert yaml.safe_load((runtime_dir / "vm1.yaml").read_text()) == {}


@pytest.mark.parametrize("name", ["-x", ".", "..", "a b", "a:b", "vm\n", "é", "x" * 61])
def test_prepare_refuses_a_domain_whose_name_is_no_instance_name(
        runtime_dir: Path, etc: str, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """"-x" would become `passtd run -x` (no instance: the VM's NIC dead), "." the unit
    whose state directory is every instance's: the domain does not start, and virsh start
    says why (the hook's last line on stderr)."""
    systemctl = FakeSystemctl()
    domain = with_metadata(net())
    with pytest.raises(HookError) as caught:
        lv.prepare(name, domain, systemctl=systemctl, config_file=etc)
    assert str(caught.value) == (
        f"domain {name!r} cannot have a passtd instance: instance name {name!r}: must be 1 "
        "to 60 characters of A-Z a-z 0-9 _ . -, starting with a letter or a digit; rename "
        "the domain (virsh domrename)")
    assert systemctl.calls == [] and not runtime_dir.exists()
    assert lv.hook_main([name, "prepare", "begin", "-"], domain.encode()) == 1
    assert capsys.readouterr().err == f"passtd: {caught.value}\n"
    assert not lv.release(name, domain, systemctl=systemctl)  # nothing was started
    assert systemctl.calls == []
    # a domain without passtd metadata is none of our business, whatever its name
    assert lv.hook_main([name, "prepare", "begin", "-"], PLAIN.encode()) == 0


def test_attach_refuses_a_domain_whose_name_is_no_instance_name() -> None:
    domain = PLAIN.replace("<name>vm1</name>", "<name>-x</name>")
    with pytest.raises(DomainError, match=r"domain '-x': instance name '-x': must be 1 to 60"):
        lv.attach_xml(domain)


def test_prepare_and_release_leave_other_domains_alone(runtime_dir: Path) -> None:
    systemctl = FakeSystemctl()
    assert not lv.prepare("vm1", PLAIN, systemctl=systemctl)
    assert not lv.release("vm1", PLAIN, systemctl=systemctl)
    assert systemctl.calls == [] and not runtime_dir.exists()


@pytest.mark.parametrize(("network", "message"), [
    (net(attrs="mtu='9'"), "domain vm1: its passtd metadata is refused: mtu: must be"),
    (net("<passtd:bogus/>"), "domain vm1: its passtd metadata is invalid: unknown element"),
])
def test_prepare_refuses_bad_metadata_before_anything(runtime_dir: Path, network: str,
                                                      message: str) -> None:
    systemctl = FakeSystemctl()
    with pytest.raises(HookError, match=re.escape(message)):
        lv.prepare("vm1", with_metadata(network), systemctl=systemctl)
    assert systemctl.calls == [] and not (runtime_dir / "vm1.yaml").exists()


def test_prepare_refuses_what_etc_makes_invalid(runtime_dir: Path, tmp_path: Path) -> None:
    """The metadata alone is fine; merged with /etc/passtd.yaml it is not."""
    etc = tmp_path / "passtd.yaml"
    etc.write_text("instances:\n  vm1:\n    ipv6:\n      enabled: false\n")
    systemctl = FakeSystemctl()
    metadata = net("<passtd:forward proto='tcp' host='2222' address='::1'/>")
    with pytest.raises(HookError, match=r"passtd's configuration is refused: .*IPv6, disabled"):
        lv.prepare("vm1", with_metadata(metadata), systemctl=systemctl, config_file=str(etc))
    assert systemctl.calls == [] and not (runtime_dir / "vm1.yaml").exists()


def test_prepare_undoes_a_failed_socket_start(runtime_dir: Path, etc: str) -> None:
    systemctl = FakeSystemctl(fail="restart")
    with pytest.raises(HookError, match=r"cannot start passtd@vm1\.socket: Job failed"):
        lv.prepare("vm1", with_metadata(net()), systemctl=systemctl, config_file=etc)
    assert not (runtime_dir / "vm1.yaml").exists()


def test_prepare_fails_with_what_the_instance_said_when_it_cannot_start(
        runtime_dir: Path, etc: str) -> None:
    """A forward's port taken on this host: the instance fails its start and says why
    (STATUS=); the hook fails the domain's start (or incoming migration) with that, and
    leaves nothing behind."""
    said = "forward: cannot listen on tcp 0.0.0.0 port 2222: address already in use"
    systemctl = FakeSystemctl(fail="start", status=f"failed: {said}")
    with pytest.raises(HookError) as caught:
        lv.prepare("vm1", with_metadata(net()), systemctl=systemctl, config_file=etc)
    assert str(caught.value) == (f"domain vm1: its passtd instance cannot start: {said} "
                                 "(journalctl -u passtd@vm1.service)")
    assert systemctl.calls == [("restart", "passtd@vm1.socket"), ("start", "passtd@vm1.service"),
                               ("stop", "passtd@vm1.service", "passtd@vm1.socket")]
    assert not (runtime_dir / "vm1.yaml").exists()
    # nothing said (killed before it could): systemctl's own words
    with pytest.raises(HookError, match=r"cannot start: Job failed \(stand-in\) \(journalctl"):
        lv.prepare("vm1", with_metadata(net()), systemctl=FakeSystemctl(fail="start"),
                   config_file=etc)


def test_prepare_refuses_when_qemu_may_not_connect(runtime_dir: Path, etc: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    socket = runtime_dir / "vm1.sock"
    monkeypatch.setattr(lv, "socket_path", lambda name: str(socket))
    runtime_dir.mkdir()
    socket.touch(0o600)  # what systemd would have created: root's only
    systemctl = FakeSystemctl()
    with pytest.raises(HookError, match="domain vm1: qemu runs as nobody, which may not "
                                        "connect to"):
        lv.prepare("vm1", with_metadata(net()), systemctl=systemctl, user="nobody",
                   config_file=etc)
    assert systemctl.calls == [("restart", "passtd@vm1.socket"),
                               ("stop", "passtd@vm1.service", "passtd@vm1.socket")]
    assert not (runtime_dir / "vm1.yaml").exists()


def test_release_stops_the_instance_and_removes_the_runtime_file(runtime_dir: Path,
                                                                 etc: str) -> None:
    domain = with_metadata(net(attrs="mtu='1500'"))
    lv.prepare("vm1", domain, systemctl=FakeSystemctl(), config_file=etc)
    systemctl = FakeSystemctl()
    assert lv.release("vm1", domain, systemctl=systemctl)
    assert systemctl.calls == [("stop", "passtd@vm1.service", "passtd@vm1.socket")]
    assert not (runtime_dir / "vm1.yaml").exists()
    # after a refused prepare, or twice: nothing there, still fine
    assert lv.release("vm1", with_metadata(net(attrs="mtu='9'")), systemctl=systemctl)
    with pytest.raises(HookError, match="cannot stop its passtd instance"):
        lv.release("vm1", domain, systemctl=FakeSystemctl(fail="stop"))


def test_hook_main(capsys: pytest.CaptureFixture[str]) -> None:
    assert lv.hook_main(["vm1"], b"") == 2
    assert lv.hook_main(["vm1", "started", "begin", "-"], b"<not xml") == 0
    bad = with_metadata(net(attrs="mtu='9'")).encode()
    assert lv.hook_main(["vm1", "prepare", "begin", "-"], bad) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("passtd: domain vm1: its passtd metadata is refused: mtu: "
                                    "must be 0 or between 68 and 65520, got 9")


def test_may_connect() -> None:
    def st(mode: int, uid: int = 0, gid: int = 995) -> os.stat_result:
        return os.stat_result((stat.S_IFSOCK | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))

    assert lv.may_connect(st(0o660), 64055, [108, 995])
    assert not lv.may_connect(st(0o660), 64055, [108])
    assert lv.may_connect(st(0o666), 64055, [108])
    assert not lv.may_connect(st(0o060, uid=64055), 64055, [995])  # the owner's bits count
    assert lv.may_connect(st(0o000), 0, [])


def test_qemu_user(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('#user = "libvirt-qemu"\nuser = "+64055"\n# group = "kvm"\n')
    assert lv.qemu_user(str(conf)) == "+64055"
    conf.write_text('#user = "libvirt-qemu"\n')
    assert lv.qemu_user(str(conf)) in (None, *lv.QEMU_DEFAULT_USERS)


# -- libvirt-python stood in: attach/detach refusals and --persist -----------------------------


class FakeLibvirtError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"error {code}")
        self.code = code

    def get_error_code(self) -> int:
        return self.code


class FakeDomain:
    """The few virDomain methods used, with libvirt-python's names."""

    def __init__(self, xml: str, *, active: bool = False, persistent: bool = True) -> None:
        self.xml = xml
        self.active = active
        self.persistent = persistent
        self.metadata_calls: list[tuple[Any, ...]] = []

    def isActive(self) -> int:
        return int(self.active)

    def isPersistent(self) -> int:
        return int(self.persistent)

    def XMLDesc(self, flags: int) -> str:
        return self.xml

    def setMetadata(self, *args: Any) -> int:
        self.metadata_calls.append(args)
        return 0


class FakeLibvirt:
    libvirtError = FakeLibvirtError
    VIR_ERR_NO_DOMAIN = 42
    VIR_DOMAIN_XML_INACTIVE = 2
    VIR_DOMAIN_XML_SECURE = 1
    VIR_DOMAIN_METADATA_ELEMENT = 2
    VIR_DOMAIN_AFFECT_LIVE = 1
    VIR_DOMAIN_AFFECT_CONFIG = 2

    def __init__(self, domains: dict[str, FakeDomain]) -> None:
        self.domains = domains
        self.defined: list[str] = []
        self.closed = 0

    def open(self, uri: str) -> FakeLibvirt:
        return self

    def lookupByName(self, name: str) -> FakeDomain:
        if name not in self.domains:
            raise FakeLibvirtError(self.VIR_ERR_NO_DOMAIN)
        return self.domains[name]

    def defineXML(self, xml: str) -> None:
        self.defined.append(xml)

    def close(self) -> int:
        self.closed += 1
        return 0


@pytest.fixture
def fake_libvirt(monkeypatch: pytest.MonkeyPatch) -> FakeLibvirt:
    fake = FakeLibvirt({})
    monkeypatch.setattr(lv, "_libvirt", lambda: fake)
    return fake


def test_attach_and_detach_through_libvirt(fake_libvirt: FakeLibvirt) -> None:
    fake_libvirt.domains["vm1"] = FakeDomain(PLAIN)
    edit = lv.attach("vm1", SettingsChange(forwards=(lv.parse_forward("tcp:2222:22"),)))
    assert fake_libvirt.defined == [edit.xml]
    fake_libvirt.domains["vm1"].xml = edit.xml
    assert not lv.attach("vm1").changed and len(fake_libvirt.defined) == 1  # no redefine
    assert lv.detach("vm1").changed and len(fake_libvirt.defined) == 2
    assert fake_libvirt.closed == 3


@pytest.mark.parametrize(("domain", "kind", "message"), [
    (None, DomainError.NOT_FOUND, "no libvirt domain 'vm1' at qemu:///system"),
    (FakeDomain(PLAIN, active=True), DomainError.REFUSED,
     "domain vm1 is running: attach edits its definition"),
    (FakeDomain(PLAIN, persistent=False), DomainError.REFUSED, "domain vm1 is transient"),
])
def test_attach_refusals(fake_libvirt: FakeLibvirt, domain: FakeDomain | None, kind: str,
                         message: str) -> None:
    if domain is not None:
        fake_libvirt.domains["vm1"] = domain
    with pytest.raises(DomainError, match=re.escape(message)) as info:
        lv.attach("vm1")
    assert info.value.kind == kind and fake_libvirt.defined == []


def _written_forwards(xml: str) -> list[str]:
    bare = ET.fromstring(xml)
    assert bare.tag == "network"  # libvirt adds the namespace itself
    for node in bare.iter():
        node.tag = f"{{{NS}}}{node.tag}"
    return [f.spec for f in lv.parse_metadata(bare).forwards]


def test_a_runtime_forward_is_recorded_in_the_live_definition(fake_libvirt: FakeLibvirt) -> None:
    """What `virsh migrate` carries is the live definition: a forward added at runtime is
    recorded there (and, asked to persist, in the persistent one too)."""
    wired = lv.attach_xml(PLAIN, SettingsChange(forwards=(lv.parse_forward("tcp:2222:22"),)))
    domain = fake_libvirt.domains["vm1"] = FakeDomain(wired.xml, active=True)
    recorder = lv.ForwardRecorder("vm1", Forward("tcp", "2223", "22"))
    assert recorder.changed == ("live",) and domain.metadata_calls == []  # nothing yet
    recorder.write()
    recorder.close()
    ((kind, xml, key, uri, flags),) = domain.metadata_calls
    assert (kind, key, uri, flags) == (2, "passtd", NS, 1)  # ELEMENT, AFFECT_LIVE
    assert _written_forwards(xml) == ["2222:22", "2223:22"]
    both = lv.ForwardRecorder("vm1", Forward("tcp", "2223", "22"), persist=True)
    assert both.changed == ("live", "persistent")
    both.write()
    both.close()
    assert [call[4] for call in domain.metadata_calls[1:]] == [1, 2]  # LIVE, then CONFIG
    # already there: nothing written
    again = lv.ForwardRecorder("vm1", Forward("tcp", "2222", "22"), persist=True)
    again.write()
    again.close()
    assert again.changed == () and len(domain.metadata_calls) == 3
    # not running: only the persistent definition is there to record in
    domain.active = False
    assert lv.ForwardRecorder("vm1", Forward("tcp", "2224"), persist=True).changed \
        == ("persistent",)


def test_a_removed_forward_leaves_the_definitions_however_it_was_spelt(
        fake_libvirt: FakeLibvirt) -> None:
    domain = fake_libvirt.domains["vm1"] = FakeDomain(with_metadata(net(
        "<passtd:forward proto='tcp' host='2222' guest='2222'/>"
        "<passtd:forward proto='udp' host='2222'/>")), active=True)
    recorder = lv.ForwardRecorder("vm1", Forward("tcp", "2222"), remove=True, persist=True)
    assert recorder.changed == ("live", "persistent")
    recorder.write()
    recorder.close()
    assert [_written_forwards(call[1]) for call in domain.metadata_calls] == [["2222"]] * 2
    absent = lv.ForwardRecorder("vm1", Forward("tcp", "9999"), remove=True)
    assert absent.changed == ()


@pytest.mark.parametrize(("xml", "forward", "message"), [
    (PLAIN, Forward("tcp", "2223", "22"), "domain vm1 is not a passtd domain"),
    (with_metadata(net("<passtd:forward proto='tcp' host='2222'/>")),
     Forward("tcp", "2222", "23"), "cannot record the forward in its live definition: "
                                   "forward tcp 2222:23 overlaps"),
])
def test_record_refusals(fake_libvirt: FakeLibvirt, xml: str, forward: Forward,
                         message: str) -> None:
    fake_libvirt.domains["vm1"] = FakeDomain(xml, active=True)
    with pytest.raises(DomainError, match=re.escape(message)):
        lv.ForwardRecorder("vm1", forward, persist=True)
    assert fake_libvirt.closed == 1


def test_readme_example_is_valid() -> None:
    """The metadata example in libvirt-hook/README.md parses and passes passtd.config."""
    readme = (REPO / "libvirt-hook" / "README.md").read_text()
    example = re.search(r"```xml\n(<passtd:network.*?</passtd:network>)\n```", readme, re.S)
    assert example, "no <passtd:network> example in the README"
    settings = parse(textwrap.dedent(example[1]))
    lv.check_settings("vm1", settings)
    assert settings.forwards


def test_started_drops_a_scope_libvirt_did_not_make_and_reloads(runtime_dir: Path,
                                                                 tmp_path: Path) -> None:
    """libvirt without machined scopes (libvirt 11 in a container, or cgroup_controllers =
    [ ]) runs qemu in its own cgroup: the instance must not wait for a scope for ever."""
    fs = tmp_path / "cgroupfs"
    (fs / "machine.slice" / "machine-qemu\\x2d1\\x2dvm1.scope").mkdir(parents=True)
    scope = "/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope"
    runtime_dir.mkdir(parents=True, exist_ok=True)
    (runtime_dir / "vm1.yaml").write_text(f"mtu: 1500\nqemu_cgroup: '{scope}'\n")
    systemctl = FakeSystemctl()
    assert not lv.started("vm1", systemctl=systemctl, cgroup_roots=[str(fs)])  # it is there
    assert systemctl.calls == [] and "qemu_cgroup" in (runtime_dir / "vm1.yaml").read_text()
    assert lv.started("vm1", systemctl=systemctl, cgroup_roots=[str(tmp_path / "nothing")])
    assert systemctl.calls == [("reload", "passtd@vm1.service")]
    assert yaml.safe_load((runtime_dir / "vm1.yaml").read_text()) == {"mtu": 1500}
    assert not lv.started("vm2", systemctl=systemctl)  # no runtime file: not ours
