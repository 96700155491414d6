"""Instance configuration: layers and their precedence, errors, the CLI, the shipped file."""

from __future__ import annotations

import argparse
import ipaddress
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from passtd import config
from passtd.config import ConfigError, InstanceConfig, load, to_yaml_dict
from passtd.engine.fwd import ForwardRule

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "etc" / "passtd.yaml"


class Env:
    """A config file, its drop-in directory and a runtime directory, all under tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.main = tmp_path / "etc" / "passtd.yaml"
        self.dropins = tmp_path / "etc" / "passtd.d"
        self.runtime = tmp_path / "run"
        self.dropins.mkdir(parents=True)
        self.runtime.mkdir()

    def write(self, path: Path, text: str) -> str:
        path.write_text(textwrap.dedent(text))
        return str(path)

    def main_file(self, text: str) -> str:
        return self.write(self.main, text)

    def dropin(self, name: str, text: str) -> str:
        return self.write(self.dropins / name, text)

    def runtime_file(self, instance: str, text: str) -> str:
        return self.write(self.runtime / f"{instance}.yaml", text)

    def load(self, name: str = "vm1", *argv: str) -> InstanceConfig:
        args = parse_cli(name, *argv) if argv else None
        return load(name, args, config_file=str(self.main))


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    e = Env(tmp_path)
    monkeypatch.setenv(config.RUNTIME_DIR_ENV, str(e.runtime))
    e.main_file("")
    return e


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="passtd run")
    config.add_run_arguments(p)
    return p


def parse_cli(*argv: str) -> argparse.Namespace:
    return parser().parse_args(list(argv))


def error_of(env: Env, *argv: str, name: str = "vm1") -> str:
    with pytest.raises(ConfigError) as caught:
        env.load(name, *argv)
    return str(caught.value)


# --- defaults and precedence ----------------------------------------------------------


def test_defaults(env: Env) -> None:
    cfg = env.load()
    assert cfg == InstanceConfig(name="vm1", socket=f"{env.runtime}/vm1.sock")
    assert cfg.mtu == 65520 and cfg.mac == bytes.fromhex("9a559a559a55")
    assert cfg.dns == "host" and cfg.search == "host" and cfg.bus == "system"
    assert (cfg.timeouts.udp, cfg.timeouts.udp_stream, cfg.timeouts.icmp) == (30, 120, 60)
    assert cfg.timeouts.tcp_idle == 7200
    assert (cfg.limits.max_flows, cfg.limits.max_listeners) == (65536, 65536)
    assert cfg.limits.tcp_sndbuf == 4194304
    assert cfg.sources == ()


def test_runtime_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(config.RUNTIME_DIR_ENV, raising=False)
    empty = tmp_path / "passtd.yaml"
    empty.write_text("")
    assert load("vm1", config_file=str(empty)).socket == "/run/passtd/vm1.sock"


def test_every_layer_in_order(env: Env) -> None:
    """Each layer overrides the one before it: the mtu shows who spoke last."""
    env.main_file("""
        defaults: {mtu: 1000, log_level: debug, ipv4: {gateway: 198.51.100.1}}
        instances:
          vm1: {mtu: 1001, hostname: from-main}
          vm2: {mtu: 2000}
    """)
    env.dropin("10-a.yaml", """
        defaults: {mtu: 1002, pcap: "/tmp/{name}.pcap"}
        instances: {vm1: {mtu: 1003, ipv4: {address: 198.51.100.7}}}
    """)
    env.dropin("20-b.yaml", "defaults: {mtu: 1004, tcp_forwards: ['22', '80']}\n")
    env.dropin("30-other.yaml", "instances: {vm2: {mtu: 2001}}\n")
    env.runtime_file("vm1", "mtu: 1005\nudp_forwards: ['53']\n")

    cfg = env.load()
    assert cfg.mtu == 1005
    assert (cfg.log_level, cfg.hostname, cfg.pcap) == ("debug", "from-main", "/tmp/vm1.pcap")
    assert cfg.ipv4.address == ipaddress.IPv4Address("198.51.100.7")
    assert cfg.ipv4.gateway == ipaddress.IPv4Address("198.51.100.1")  # nested keys merge
    assert cfg.tcp_forward_specs == ("22", "80") and cfg.udp_forward_specs == ("53",)
    assert cfg.sources == (
        str(env.main), str(env.dropins / "10-a.yaml"), str(env.dropins / "20-b.yaml"),
        str(env.runtime / "vm1.yaml"),
    )  # fmt: skip

    cli = env.load("vm1", "--mtu", "1006", "-t", "443", "--log-level", "error")
    assert (cli.mtu, cli.tcp_forward_specs, cli.log_level) == (1006, ("443",), "error")
    assert cli.udp_forward_specs == ("53",)

    other = env.load("vm2")
    assert other.mtu == 2001 and other.hostname is None
    assert str(env.runtime / "vm1.yaml") not in other.sources


def test_dropin_defaults_override_main_instances(env: Env) -> None:
    env.main_file("instances: {vm1: {mtu: 1500}}\n")
    env.dropin("50-site.yaml", "defaults: {mtu: 9000}\n")
    assert env.load().mtu == 9000


def test_within_a_file_the_instance_beats_defaults(env: Env) -> None:
    env.main_file("instances: {vm1: {mtu: 1500}}\ndefaults: {mtu: 9000}\n")
    assert env.load().mtu == 1500


def test_dropins_lexical_order_and_filtering(env: Env) -> None:
    env.dropin("b.yaml", "defaults: {mtu: 1002}\n")
    env.dropin("a.yaml", "defaults: {mtu: 1001}\n")
    env.dropin(".c.yaml", "defaults: {mtu: 1003}\n")  # an editor's file
    env.dropin("d.yaml.orig", "defaults: {mtu: 1004}\n")
    env.dropin("c.yml", "defaults: {mtu: 1005}\n")
    assert env.load().mtu == 1002


def test_lists_replace_mappings_merge(env: Env) -> None:
    env.main_file("""
        defaults:
          dns: [198.51.100.53, 2001:db8::53]
          timeouts: {udp: 10, icmp: 20}
    """)
    env.runtime_file("vm1", "dns: [198.51.100.54]\ntimeouts: {icmp: 21}\n")
    cfg = env.load()
    assert cfg.dns == (ipaddress.ip_address("198.51.100.54"),)
    assert (cfg.timeouts.udp, cfg.timeouts.icmp, cfg.timeouts.udp_stream) == (10, 21, 120)


def test_null_is_a_value(env: Env) -> None:
    env.main_file("defaults: {pcap: /tmp/x.pcap, hostname: h}\n")
    env.runtime_file("vm1", "pcap: null\n")
    cfg = env.load()
    assert cfg.pcap is None and cfg.hostname == "h"
    assert env.load("vm1", "--pcap", "none").pcap is None


def test_config_option_and_its_dropins(env: Env, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    (other / "passtd.d").mkdir(parents=True)
    (other / "main.yaml").write_text("defaults: {mtu: 1400}\n")
    (other / "passtd.d" / "x.yaml").write_text("defaults: {hostname: dropped-in}\n")
    env.dropin("x.yaml", "defaults: {hostname: not-this-one}\n")
    cfg = load("vm1", parse_cli("vm1", "--config", str(other / "main.yaml")))
    assert (cfg.mtu, cfg.hostname) == (1400, "dropped-in")
    # the keyword wins over args.config
    cfg = load("vm1", parse_cli("vm1", "--config", str(other / "main.yaml")),
               config_file=str(env.main))  # fmt: skip
    assert cfg.hostname == "not-this-one"


def test_missing_files(env: Env, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=rf"^{re.escape(missing)}: no such file$"):
        load("vm1", config_file=missing)
    env.dropins.rmdir()
    assert env.load().sources == ()  # no drop-in directory, no runtime file: fine


# --- values and their derived defaults ------------------------------------------------


def test_addresses_and_prefixes(env: Env) -> None:
    env.runtime_file("vm1", """
        ipv4: {address: 198.51.100.5, gateway: 198.51.100.1}
        ipv6: {address: 2001:db8::5, gateway: fe80::1}
        map_guest_addr: 169.254.1.2
    """)
    cfg = env.load()
    assert cfg.ipv4.prefix_len == 24  # class C, as passt
    assert cfg.ipv6.prefix_len == 64
    assert cfg.ipv6.gateway == ipaddress.IPv6Address("fe80::1")
    assert cfg.map_guest_addr == ipaddress.IPv4Address("169.254.1.2")
    assert env.load("vm1", "-a", "10.1.2.3").ipv4.prefix_len == 8
    assert env.load("vm1", "-a", "172.16.1.2").ipv4.prefix_len == 16
    assert env.load("vm1", "-a", "10.1.2.3", "-n", "255.255.255.240").ipv4.prefix_len == 28
    assert env.load("vm1", "-a", "2001:db8::9/56").ipv6.prefix_len == 56
    host_address = env.load("vm1", "-n", "20").ipv4
    assert (host_address.address, host_address.prefix_len) == (
        ipaddress.IPv4Address("198.51.100.5"), 20
    )  # fmt: skip


def test_netmask_persists_across_layers(env: Env) -> None:
    env.main_file("defaults: {ipv4: {netmask: 255.255.0.0}}\n")
    env.runtime_file("vm1", "ipv4: {address: 198.51.100.5}\n")
    assert env.load().ipv4.prefix_len == 16
    env.runtime_file("vm1", "ipv4: {address: 198.51.100.5/26}\n")
    assert env.load().ipv4.prefix_len == 26  # the later layer's /LEN wins


def test_forwards_are_parsed(env: Env) -> None:
    env.runtime_file("vm1", """
        tcp_forwards: [22:2222, 8080, "127.0.0.1/8000-8001:80-81", "all,~22"]
        udp_forwards: [none]
    """)
    with pytest.raises(ConfigError, match=r"tcp_forwards\[3\]: 'all,~22' and '8080' both forward"):
        env.load()
    env.runtime_file("vm1", """
        tcp_forwards: [22:2222, 8080, "127.0.0.1/8000-8001:80-81"]
        udp_forwards: [none]
    """)
    cfg = env.load()
    assert cfg.tcp_forward_specs == ("22:2222", "8080", "127.0.0.1/8000-8001:80-81")
    assert cfg.tcp_forwards == (
        ForwardRule("tcp", None, None, 22, 22, 2222),
        ForwardRule("tcp", None, None, 8080, 8080, 8080),
        ForwardRule("tcp", "127.0.0.1", None, 8000, 8001, 80),
    )
    assert cfg.udp_forwards == () and cfg.udp_forward_specs == ("none",)
    assert all(r.weak for r in env.load("vm1", "-u", "all").udp_forwards)


def test_yaml_traps_are_defused(env: Env) -> None:
    # YAML 1.1 reads 22:23 and 12:34:56:12:34:56 as base-60 integers, 010 as octal
    env.runtime_file("vm1", """
        tcp_forwards:
          - 22:23
          - 010
        mac: 12:34:56:12:34:56
    """)
    cfg = env.load()
    assert cfg.tcp_forward_specs == ("22:23", "010")
    assert cfg.tcp_forwards[0].to_first == 23 and cfg.tcp_forwards[1].first == 10
    assert cfg.mac == bytes.fromhex("123456123456")


def test_dns_and_search(env: Env) -> None:
    env.runtime_file("vm1", "dns: none\nsearch: [example.com, lab.example.org.]\n")
    cfg = env.load()
    assert cfg.dns == () and cfg.search == ("example.com", "lab.example.org.")
    cfg = env.load("vm1", "-D", "198.51.100.53", "-D", "2001:db8::53", "-S", "a.test b.test")
    assert cfg.dns == (ipaddress.ip_address("198.51.100.53"), ipaddress.ip_address("2001:db8::53"))
    assert cfg.search == ("a.test", "b.test")
    assert env.load("vm1", "-D", "host", "-S", "none").dns == "host"
    assert env.load("vm1", "-S", "none").search == ()


def test_cli_switches(env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = env.load("vm1", "-4", "--no-dhcpv6", "--no-ra", "--no-map-gw", "--bus", "none")
    assert (cfg.ipv4.enabled, cfg.ipv6.enabled, cfg.dhcp, cfg.dhcpv6, cfg.ra) == (
        True, False, True, False, False
    )  # fmt: skip
    assert (cfg.map_host_loopback, cfg.bus) == (False, "none")
    assert env.load("vm1").qemu_cgroup is None  # nobody is asked who qemu is, unless told
    env.main_file("defaults: {qemu_cgroup: /machine.slice/x.scope}\n")
    assert env.load("vm1").qemu_cgroup == "/machine.slice/x.scope"
    assert env.load("vm1", "--qemu-cgroup", "none").qemu_cgroup is None
    assert env.load("vm1", "--qemu-cgroup", "/").qemu_cgroup == "/"
    env.main_file("")
    cfg = env.load("vm1", "-6", "--no-dhcp", "--no-ndp", "-H", "guest.test", "-i", "eth0")
    assert (cfg.ipv4.enabled, cfg.ipv6.enabled, cfg.dhcp, cfg.ndp) == (False, True, False, False)
    assert (cfg.hostname, cfg.interface) == ("guest.test", "eth0")
    cfg = env.load("vm1", "--timeout", "udp=2.5", "--timeout", "tcp_idle=60",
                   "--limit", "max_flows=100", "-M", "02:00:00:00:00:01", "-m", "0")  # fmt: skip
    assert (cfg.timeouts.udp, cfg.timeouts.tcp_idle, cfg.limits.max_flows) == (2.5, 60, 100)
    assert (cfg.mac, cfg.mtu) == (bytes.fromhex("020000000001"), 0)
    env.main_file("defaults: {tcp_forwards: ['22']}\n")
    assert env.load("vm1", "-t", "none").tcp_forwards == ()
    monkeypatch.chdir(tmp_path)
    cfg = env.load("vm1", "--socket", "{name}.sock", "-p", "cap.pcap")
    assert (cfg.socket, cfg.pcap) == (f"{tmp_path}/vm1.sock", f"{tmp_path}/cap.pcap")


def test_round_trip_through_to_yaml_dict(env: Env) -> None:
    cfg = env.load(
        "vm1", "-t", "2222:22", "-t", "127.0.0.1/all,~2222", "-u", "5353", "-a", "198.51.100.5/25",
        "-a", "2001:db8::5", "-g", "fe80::1", "-D", "198.51.100.53", "-S", "example.com",
        "--map-guest-addr", "169.254.1.2", "-H", "guest", "--no-ra", "--timeout", "icmp=5",
        "--pcap", "/tmp/{name}.pcap", "--mtu", "1500",
        "--qemu-cgroup", "/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope",
    )  # fmt: skip
    shown = to_yaml_dict(cfg)
    assert shown["qemu_cgroup"] == "/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope"
    assert shown["ipv4"]["address"] == "198.51.100.5/25"
    assert shown["tcp_forwards"] == ["2222:22", "127.0.0.1/all,~2222"]
    assert shown["mac"] == "9a:55:9a:55:9a:55"
    env.runtime_file("vm2", yaml.safe_dump(shown))
    again = env.load("vm2")
    assert again == cfg._replace(name="vm2", sources=(str(env.runtime / "vm2.yaml"),))
    host_prefix = env.load("vm1", "-n", "22")
    env.runtime_file("vm3", yaml.safe_dump(to_yaml_dict(host_prefix)))
    assert env.load("vm3").ipv4 == host_prefix.ipv4


def test_socket_templates(env: Env) -> None:
    env.main_file("defaults: {socket: '/srv/vms/{name}/net.sock'}\n")
    assert env.load("vm-7").socket == "/srv/vms/vm-7/net.sock"
    env.main_file(f"defaults: {{socket: '/{'x' * 100}/{{name}}.sock'}}\n")
    message = error_of(env)
    assert message.startswith(f"{env.main}: defaults.socket: ")
    assert "longer than 107 bytes" in message


# --- instance names -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vm1", "vm-1", "web_01.prod", "1vm", "a..b", "vm.",
                                  "x" * 60])
def test_good_names(env: Env, name: str) -> None:
    env.main_file("defaults: {socket: /tmp/passtd-test.sock}\n")
    assert env.load(name).name == name


@pytest.mark.parametrize("name", ["", ".", "..", "-x", "--config", "_x", ".x", "x" * 61,
                                  "a/b", "../x", "vm 1", "vm\n", "é", "a:b", "a@b"])
def test_bad_names(env: Env, name: str) -> None:
    with pytest.raises(ConfigError, match=r"instance name .*: must be 1 to 60 characters"):
        load(name, config_file=str(env.main))


@pytest.mark.parametrize("key", ["-x", "..", "'.'", "'my vm'", "'a:b'"])
def test_instance_keys_must_be_instance_names(env: Env, key: str) -> None:
    """A section no instance can have is a mistake to report, not one to skip quietly."""
    for main, dropin in ((f"instances: {{{key}: {{mtu: 1400}}}}\n", ""),
                         ("", f"instances: {{{key}: {{mtu: 1400}}}}\n")):
        env.main_file(main)
        path = env.dropin("10-x.yaml", dropin)
        got = error_of(env)
        where = path if dropin else str(env.main)
        assert got.startswith(f"{where}: instances: instance name "), got
        assert "must be 1 to 60 characters of A-Z a-z 0-9 _ . -" in got, got


# --- errors: file, key path and reason ------------------------------------------------


def file_error(env: Env, text: str, name: str = "vm1") -> str:
    env.main_file(text)
    return error_of(env, name=name)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("instances: {vm1: {mtu: 70000}}",
         "instances.vm1.mtu: must be 0 or between 68 and 65520, got 70000"),
        ("defaults: {mut: 1500}", "defaults.mut: unknown key 'mut' (did you mean 'mtu'?)"),
        ("defaults: {ipv4: {gatway: 198.51.100.1}}",
         "defaults.ipv4.gatway: unknown key 'gatway' (did you mean 'gateway'?)"),
        ("defaults: {mtu: '1500'}", "defaults.mtu: must be an integer, got '1500'"),
        ("defaults: {mtu: true}", "defaults.mtu: must be an integer, got true"),
        ("defaults: {dhcp: 'no'}", "defaults.dhcp: must be true or false, got 'no'"),
        ("defaults: {log_level: loud}",
         "defaults.log_level: must be one of debug, info, warning, error; got 'loud'"),
        ("defaults: {tcp_forwards: ['22', '22-x']}",
         "defaults.tcp_forwards[1]: '-t 22-x': bad port 'x'"),
        ("defaults: {udp_forwards: ['53', auto]}",
         "defaults.udp_forwards[1]: '-u auto': 'auto' is pasta-only"),
        ("defaults: {tcp_forwards: ['none', '22']}",
         "defaults.tcp_forwards[0]: 'none' cannot be combined with other specs"),
        ("defaults: {tcp_forwards: ['20-30', '25']}",
         "defaults.tcp_forwards[1]: '25' and '20-30' both forward port 25"),
        ("defaults: {tcp_forwards: '22'}",
         "defaults.tcp_forwards: must be a list of port specs, got '22'"),
        ("defaults: {tcp_forwards: [{a: 1}]}",
         "defaults.tcp_forwards[0]: must be a port spec string, got a mapping"),
        ("defaults: {ipv4: {gateway: 127.0.0.1}}",
         "defaults.ipv4.gateway: '127.0.0.1' is not a unicast address"),
        ("defaults: {ipv4: {address: 2001:db8::1}}",
         "defaults.ipv4.address: must be an IPv4 address, got '2001:db8::1'"),
        ("defaults: {ipv4: {address: 198.51.100.5/33}}",
         "defaults.ipv4.address: bad prefix length in '198.51.100.5/33' (1 to 32)"),
        ("defaults: {ipv4: {address: 198.51.100.5/24, netmask: 16}}",
         "defaults.ipv4.netmask: /16 contradicts the /24 of the address"),
        ("defaults: {ipv4: {netmask: 255.0.255.0}}",
         "defaults.ipv4.netmask: bad netmask '255.0.255.0'"),
        ("defaults: {ipv4: []}", "defaults.ipv4: must be a mapping, got a list"),
        ("defaults: {ipv6: {gateway: ff02::1}}",
         "defaults.ipv6.gateway: 'ff02::1' is not a unicast address"),
        ("defaults: {dns: [198.51.100.53, none]}",
         "defaults.dns[1]: 'none' stands alone, not in a list"),
        ("defaults: {dns: [dns.example]}", "defaults.dns[0]: bad address 'dns.example'"),
        ("defaults: {dns: 198.51.100.53}",
         "defaults.dns: must be 'host', 'none' or a list of addresses, got '198.51.100.53'"),
        ("defaults: {search: [-bad-.test]}", "defaults.search[0]: bad domain name '-bad-.test'"),
        ("defaults: {hostname: 'a b'}", "defaults.hostname: bad domain name 'a b'"),
        ("defaults: {mac: 9a:55:9a:55:9a}",
         "defaults.mac: must be a MAC address like 9a:55:9a:55:9a:55, got '9a:55:9a:55:9a'"),
        ("defaults: {mac: '01:00:5e:00:00:01'}",
         "defaults.mac: must be a unicast MAC address, got '01:00:5e:00:00:01'"),
        ("defaults: {interface: eth0/1}", "defaults.interface: bad interface name 'eth0/1'"),
        ("defaults: {socket: run/x.sock}",
         "defaults.socket: must be an absolute path, got 'run/x.sock'"),
        ("defaults: {timeouts: {udp: 0}}",
         "defaults.timeouts.udp: must be a positive number of seconds, got 0"),
        ("defaults: {timeouts: {udp: .nan}}",
         "defaults.timeouts.udp: must be a positive number of seconds, got nan"),
        ("defaults: {limits: {max_flows: 1.5}}",
         "defaults.limits.max_flows: must be an integer, got 1.5"),
        ("defaults: {limits: {tcp_sndbuf: 2147483648}}",
         "defaults.limits.tcp_sndbuf: must be between 4096 and 1073741823, got 2147483648"),
        ("defaults: {limits: {tcp_sndbuf: 4095}}",
         "defaults.limits.tcp_sndbuf: must be between 4096 and 1073741823, got 4095"),
        ("defaults: {bus: user}", "defaults.bus: must be one of system, session, none; got 'user'"),
        ("defaults: {qemu_cgroup: /machine.slice/../x.scope}",
         "defaults.qemu_cgroup: must be a cgroup path like /machine.slice/NAME.scope, got "
         "'/machine.slice/../x.scope'"),
        ("defaults: {qemu_cgroup: '/a//b'}", "defaults.qemu_cgroup: must be a cgroup path"),
        ("defaults: {qemu_cgroup: '/a/'}", "defaults.qemu_cgroup: must be a cgroup path"),
        ("defaults: [1]", "defaults: must be a mapping, got a list"),
        ("mtu: 1500", "mtu: unknown key (this file has 'defaults:' and 'instances:'"),
        ("instances: [vm1]", "instances: must be a mapping of instance names"),
        ("- a", "must be a mapping with 'defaults:' and/or 'instances:'"),
    ],
)  # fmt: skip
def test_file_errors_name_file_and_key(env: Env, text: str, message: str) -> None:
    got = file_error(env, text + "\n")
    assert got.startswith(f"{env.main}: "), got
    assert message in got, got


def test_the_example_message_exactly(env: Env) -> None:
    got = file_error(env, "instances:\n  vm1:\n    mtu: 70000\n")
    assert got == f"{env.main}: instances.vm1.mtu: must be 0 or between 68 and 65520, got 70000"


def test_other_instances_sections_are_not_checked(env: Env) -> None:
    env.main_file("instances: {vm2: {mtu: 70000}}\n")
    assert env.load("vm1").mtu == 65520


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("defaults:\n  mtu: [1\n", "line 3, column 1"),
        ("defaults:\n  mtu: 1500\n   log_level: info\n", "line 3, column 13"),
        ("defaults:\n  mtu: 1500\n  mtu: 1400\n", "line 3, column 3: duplicate key 'mtu'"),
        ("defaults:\n\tmtu: 1\n", "line 2, column 1"),
    ],
)
def test_yaml_syntax_errors_name_file_and_line(env: Env, text: str, where: str) -> None:
    got = file_error(env, text)
    assert got.startswith(f"{env.main}: {where}"), got


def test_errors_in_dropins_and_runtime_file(env: Env) -> None:
    path = env.dropin("10-x.yaml", "instances: {vm1: {ipv6: {enabled: maybe}}}\n")
    assert error_of(env) == (
        f"{path}: instances.vm1.ipv6.enabled: must be true or false, got 'maybe'"
    )
    (env.dropins / "10-x.yaml").unlink()
    path = env.runtime_file("vm1", "ipv4: {enabled: true}\ndefaults: {}\n")
    assert error_of(env) == f"{path}: defaults: unknown key 'defaults'"
    path = env.runtime_file("vm1", "[1, 2]\n")
    assert error_of(env) == f"{path}: (top level): must be a mapping, got a list"
    env.runtime.joinpath("vm1.yaml").write_bytes(b"mtu: 1500\n\xff\n")
    assert error_of(env).startswith(f"{env.runtime / 'vm1.yaml'}: cannot read")


def test_cross_checks_name_the_later_layer(env: Env) -> None:
    env.main_file("defaults: {ipv6: {enabled: false}}\n")
    path = env.runtime_file("vm1", "ipv4: {enabled: false}\n")
    assert error_of(env) == f"{path}: ipv4.enabled: IPv4 and IPv6 cannot both be disabled"
    env.runtime_file("vm1", "tcp_forwards: ['::1/22']\n")
    assert error_of(env) == (
        f"{env.runtime / 'vm1.yaml'}: tcp_forwards: '::1/22' listens on IPv6, disabled"
    )
    assert error_of(env, "-4", "-t", "[::1]/22") == (
        "command line: -t: '[::1]/22' listens on IPv6, disabled"
    )
    assert env.load("vm1", "-6", "-t", "::1/22").ipv4.enabled is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mtu", "70000"], "command line: --mtu: must be 0 or between 68 and 65520, got 70000"),
        (["--mtu", "15x0"], "command line: --mtu: must be an integer, got '15x0'"),
        (["-t", "22-x"], "command line: -t: '-t 22-x': bad port 'x'"),
        (["-t", "22", "-t", "20-30"], "command line: -t: '20-30' and '22' both forward port 22"),
        (["-u", "auto"], "command line: -u: '-u auto': 'auto' is pasta-only (it follows the"
         " namespace's listening sockets); give the ports, or 'all'"),
        (["-a", "198.51.100.5", "-a", "198.51.100.6"],
         "command line: --address: given twice for IPv4"),
        (["-a", "vm.example"], "command line: --address: bad address 'vm.example'"),
        (["-a", "127.0.0.1"], "command line: --address: '127.0.0.1' is not a unicast address"),
        (["-a", "198.51.100.5/24", "-n", "16"],
         "command line: --netmask: /16 contradicts the /24 of the address"),
        (["-n", "40"], "command line: --netmask: prefix length must be between 1 and 32, got 40"),
        (["-g", "fe80::1", "-g", "fe80::2"], "command line: --gateway: given twice for IPv6"),
        (["-4", "-6"], "command line: -4/--ipv4-only: conflicts with -6/--ipv6-only"),
        (["-D", "none", "-D", "198.51.100.53"],
         "command line: --dns: 'host' and 'none' cannot be combined with other values"),
        (["-D", "resolver"], "command line: --dns: bad address 'resolver'"),
        (["-S", "a..b"], "command line: --search: bad domain name 'a..b'"),
        (["-M", "nonsense"],
         "command line: --mac-addr: must be a MAC address like 9a:55:9a:55:9a:55, got 'nonsense'"),
        (["-i", "x" * 16], f"command line: --interface: bad interface name '{'x' * 16}'"),
        (["--map-guest-addr", "0.0.0.0"],
         "command line: --map-guest-addr: '0.0.0.0' is not a unicast address"),
        (["--timeout", "udp"], "command line: --timeout: expected KIND=SECONDS, got 'udp'"),
        (["--timeout", "udpp=3"],
         "command line: --timeout: unknown key 'udpp' (did you mean 'udp'?)"),
        (["--timeout", "udp=-1"],
         "command line: --timeout: must be a positive number of seconds, got -1"),
        (["--limit", "max_flows=many"], "command line: --limit: must be an integer, got 'many'"),
        (["--limit", "tcp_sndbuf=1073741824"],
         "command line: --limit: must be between 4096 and 1073741823, got 1073741824"),
        (["-H", "bad host"], "command line: --hostname: bad domain name 'bad host'"),
        (["--qemu-cgroup", "machine.slice"], "command line: --qemu-cgroup: must be a cgroup "
         "path like /machine.slice/NAME.scope, got 'machine.slice'"),
    ],
)  # fmt: skip
def test_command_line_errors(env: Env, argv: list[str], message: str) -> None:
    assert error_of(env, *argv) == message


# --- the command line and the shipped file --------------------------------------------


def test_help_is_grouped_and_complete() -> None:
    p = parser()
    text = p.format_help()
    for group in ("Instance:", "Addresses:", "Port forwarding:", "Services:", "Logging:"):
        assert group in text
    for action in p._actions:
        assert action.help and "\n" not in action.help, action.option_strings


def test_every_setting_has_an_option() -> None:
    settings = {(key,) for key in config._INSTANCE_SCHEMA}
    settings |= {("ipv4", k) for k in ("enabled", "address", "netmask", "gateway")}
    settings |= {("ipv6", k) for k in ("enabled", "address", "gateway")}
    settings -= {("ipv4",), ("ipv6",)}
    assert settings == set(config._OPTION_FOR)
    option_strings = {s for a in parser()._actions for s in a.option_strings}
    for option in config._OPTION_FOR.values():
        assert set(option.split("/")) <= option_strings, option


def test_no_options_means_no_overrides(env: Env) -> None:
    env.main_file("defaults: {mtu: 1400, dhcp: false, tcp_forwards: ['22']}\n")
    cfg = load("vm1", parse_cli("vm1"), config_file=str(env.main))
    assert (cfg.mtu, cfg.dhcp, cfg.tcp_forward_specs) == (1400, False, ("22",))


def test_shipped_config_loads_as_the_defaults(env: Env) -> None:
    cfg = load("vm1", config_file=str(SHIPPED))
    assert cfg == InstanceConfig(name="vm1", socket=f"{env.runtime}/vm1.sock")


def test_shipped_config_documents_every_key() -> None:
    text = SHIPPED.read_text()
    for key in config._INSTANCE_SCHEMA:
        assert re.search(rf"^  # {key}:", text, re.M), key
    for section, keys in (("ipv4", ["enabled", "address", "netmask", "gateway"]),
                          ("ipv6", ["enabled", "address", "gateway"]),
                          ("timeouts", ["udp", "udp_stream", "icmp", "tcp_idle"]),
                          ("limits", list(config.Limits._fields))):  # fmt: skip
        for key in keys:
            assert re.search(rf"^  #   {key}:", text, re.M), f"{section}.{key}"


def test_shipped_commented_defaults_and_example_load(env: Env) -> None:
    """Uncommented, the shipped defaults are the built-in ones and the example is valid."""
    lines = SHIPPED.read_text().splitlines()
    uncommented = [
        re.sub(r"^(\s*)# ", r"\1", line)
        for line in lines
        if re.match(r"\s*#\s+[a-z_][a-z0-9_-]*:(\s|$)", line) or not line.lstrip().startswith("#")
    ]
    env.main_file("\n".join(uncommented) + "\n")
    # the example's instances use the shipped defaults for everything else
    assert env.load("vm1").tcp_forward_specs == ("2222:22", "127.0.0.1/8080:80")
    assert env.load("build-box").pcap == "/var/log/passtd/build-box/capture.pcap"
    assert env.load("vm9") == InstanceConfig(
        name="vm9", socket="/run/passtd/vm9.sock", sources=(str(env.main),)
    )
