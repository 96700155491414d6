"""Guest isolation and bounded resources: spoofed sources, the gateway mapping switched off,
the flow cap, running out of file descriptors, and a connection soak.

PASSTD_SOAK_CONNECTIONS sets the soak's size: connections per round, two rounds (default
5000; by hand, 100000).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from passtd.tools import bench, lab
from tests.support.qemu_stub import QemuStub

NETPROG = str(Path(__file__).resolve().parents[1] / "support" / "netprog.py")
BASE_ARGS = ["--bus", "none", "-D", "none", "-S", "none"]
GUEST_MAC = "52:54:00:12:34:56"
OUR_MAC = "9a:55:9a:55:9a:55"

pytestmark = pytest.mark.netns


def syn_answer(stub: QemuStub, src: str, sport: int, dst: str = "198.51.100.1",
               dport: int = 18080, timeout: float = 1.5) -> str | None:
    """Send a SYN from `src`: the flags of what TCP comes back for that port pair, if any."""
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    stub.send(bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / ip
                    / TCP(sport=sport, dport=dport, flags="S", seq=1000)))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for raw in stub.receive(deadline):
            pkt = Ether(raw)
            if pkt.haslayer(TCP) and pkt[TCP].dport == sport:
                return str(pkt[TCP].flags)
    return None


def test_spoofed_sources_get_nothing(program_factory, host_server) -> None:
    host_server([sys.executable, NETPROG, "tcp-server", "--bind", "127.0.0.1", "--port", "18080"],
                port=18080)
    prog = program_factory(BASE_ARGS)
    with QemuStub(prog.socket) as stub:
        for src in ("127.0.0.1", "198.51.100.1", "224.0.0.5", "255.255.255.255", "0.0.0.0"):
            assert syn_answer(stub, src, 40001) is None, f"a SYN from {src} was answered"
        assert syn_answer(stub, "198.51.100.2", 40002) == "SA"  # the guest itself
        # IPv4 loopback dressed as IPv6 (dropped), or in the deprecated IPv4-compatible
        # form and 0/8 (this host, refused): never a connection to the loopback server
        assert syn_answer(stub, "2001:db8::5", 40003, dst="::ffff:127.0.0.1") is None
        for src, dst in (("2001:db8::5", "::127.0.0.1"), ("198.51.100.2", "0.0.0.1")):
            assert syn_answer(stub, src, 40004, dst=dst) in (None, "RA"), dst
    assert prog.alive()


# Binds UDP PORT... on the wildcard of both families; prints, as JSON, {port: errno name or
# "ok"} (each socket closed again at once)
HOST_BIND = """
import errno, json, socket, sys
result = {}
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s.bind(("::", port))
        result[port] = "ok"
    except OSError as e:
        result[port] = errno.errorcode[e.errno]
    finally:
        s.close()
print(json.dumps(result))
"""


def host_binds(lab_host: lab.HostNamespace, *ports: int) -> dict[int, str]:
    res = lab_host.run([sys.executable, "-c", HOST_BIND, *map(str, ports)],
                       capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return {int(k): v for k, v in json.loads(res.stdout).items()}


def ephemeral_range(lab_host: lab.HostNamespace) -> tuple[int, int]:
    first, last = lab_host.run(["cat", "/proc/sys/net/ipv4/ip_local_port_range"],
                               capture_output=True, text=True).stdout.split()
    return int(first), int(last)


def test_guest_udp_source_ports_never_take_what_the_host_may_need(
        program_factory, guest_factory, host_server, lab_host: lab.HostNamespace) -> None:
    """A guest writing from ports the host may need (privileged, ephemeral, reserved, a
    forward's) gets its datagrams out from another host port and its replies back on its
    own, and the host can still bind those ports meanwhile; from any other port above
    1024 it keeps its port, as in passt. (The instance runs as root here: before, it took
    500 for the guest as readily as 20001.)"""
    first, last = ephemeral_range(lab_host)
    assert first > 1034 and last < 65535, (first, last)
    host_server([sys.executable, "-c", UDP_WHOAMI, "127.0.0.1", "18081"], port=18081, udp=True)
    lab_host.run(["sysctl", "-qw", "net.ipv4.ip_local_reserved_ports=20005"])
    try:
        prog = program_factory([*BASE_ARGS, "-u", "20006"])  # the sysctls are read at start
    finally:
        lab_host.run(["sysctl", "-qw", "net.ipv4.ip_local_reserved_ports="])
    guest = guest_factory(prog, wire="whole")
    needed = [500, 1023, first, first + 5, last, 20005, 20006]
    free = [1024, 20001, first - 1, last + 1, 65535]
    seen = udp_probe(guest, guest.gw4 or "", 18081, *needed, *free)
    assert all(seen[port] is not None for port in seen), seen  # every reply reached the guest
    assert {port for port in seen if seen[port] == str(port)} == set(free), seen
    # the flows are alive (30 s): the host has the ports it may need, not the others
    binds = host_binds(lab_host, *needed, *free)
    assert {port for port, result in binds.items() if result == "ok"} \
        == set(needed) - {20006}, binds  # 20006 is the forward's


def test_guest_udp_source_ports_kept_are_capped(program_factory, guest_factory, host_server,
                                                lab_host: lab.HostNamespace) -> None:
    """limits.udp_preserved_ports: beyond it a flow gets a port of the kernel's choosing
    instead of failing; once flows expire, their ports count no more."""
    host_server([sys.executable, "-c", UDP_WHOAMI, "127.0.0.1", "18081"], port=18081, udp=True)
    prog = program_factory([*BASE_ARGS, "--limit", "udp_preserved_ports=3",
                            "--timeout", "udp=1"])
    guest = guest_factory(prog, wire="whole")
    ports = list(range(20011, 20017))
    seen = udp_probe(guest, guest.gw4 or "", 18081, *ports)
    assert all(seen[port] is not None for port in ports), seen
    kept = [port for port in ports if seen[port] == str(port)]
    assert kept == ports[:3], seen
    assert "limits.udp_preserved_ports" in prog.log_text()
    time.sleep(2.5)  # the flows expire (1 s without traffic)
    seen = udp_probe(guest, guest.gw4 or "", 18081, *ports[3:])
    assert all(seen[port] == str(port) for port in ports[3:]), seen


def test_a_udp_forward_takes_its_port_back_from_a_guest_flow(
        program_factory, program_argv, guest_factory, host_server,
        lab_host: lab.HostNamespace) -> None:
    """A guest flow keeps port 20021; a forward of that port, added by a reload, opens all
    the same (the flow gives the port up: it was "in use")."""
    host_server([sys.executable, "-c", UDP_WHOAMI, "127.0.0.1", "18081"], port=18081, udp=True)
    config = lab_host.workdir / "forwards.yaml"
    config.write_text("defaults: {}\n")
    prog = program_factory(argv=program_argv("fwd", [*BASE_ARGS, "--config", str(config)]),
                           name="fwd")
    guest = guest_factory(prog, wire="whole")
    assert udp_probe(guest, guest.gw4 or "", 18081, 20021)[20021] == "20021"
    config.write_text("defaults: {udp_forwards: ['20021']}\n")
    prog.proc.send_signal(signal.SIGHUP)
    lab.wait_for(lambda: "configuration reloaded" in prog.log_text(), 10, "the reload")
    assert "forward 1: udp 20021" in prog.log_text(), prog.log_text()[-3000:]
    assert lab_host.listening(20021, udp=True)


def test_the_guests_own_address_is_one_rule_for_both_families(program_factory,
                                                              host_server) -> None:
    """The guest is given the host's address. A guest that uses another one (SLAAC alone,
    a static address) reaches the host at "its" address in both families, as passt lets
    it (IPv4 refused it, IPv6 did not)."""
    host_server([sys.executable, NETPROG, "tcp-server", "--bind", "::", "--port", "18080"],
                port=18080)
    prog = program_factory(BASE_ARGS)
    with QemuStub(prog.socket) as stub:
        assert syn_answer(stub, "198.51.100.5", 40011, dst="198.51.100.2") == "SA"
        assert syn_answer(stub, "2001:db8::5", 40012, dst="2001:db8::2") == "SA"


def test_a_guest_changing_addresses_all_the_time_cannot_flood_the_log(program_factory) -> None:
    """Every frame from another MAC and source address: the instance follows them, but
    says so a bounded number of times (it logged a line per frame)."""
    prog = program_factory(BASE_ARGS, name="flood")  # a log file of its own
    frames = 400
    with QemuStub(prog.socket) as stub:
        for i in range(frames):
            ip = IP(src=f"198.51.100.{10 + i % 200}", dst="198.51.100.1") if i % 2 else \
                IPv6(src=f"2001:db8::{10 + i:x}", dst="fe80::1")
            mac = f"52:54:00:00:{i >> 8:02x}:{i & 0xFF:02x}"
            stub.send(bytes(Ether(src=mac, dst=OUR_MAC) / ip / UDP(sport=40000, dport=9)))
        assert stub.ping("198.51.100.2", "198.51.100.1") is not None  # all taken in
    log = prog.log_text()
    macs = [x for x in log.splitlines() if "guest MAC" in x]
    addresses = [x for x in log.splitlines() if "guest uses address" in x]
    assert 0 < len(macs) <= 6 and 0 < len(addresses) <= 6, log[-4000:]
    assert prog.alive()


def test_no_map_gw_keeps_the_host_loopback_out_of_reach(program_factory, guest_factory,
                                                        host_server) -> None:
    host_server([sys.executable, NETPROG, "tcp-server", "--bind", "127.0.0.1", "--port", "18080"],
                port=18080)
    prog = program_factory([*BASE_ARGS, "--no-map-gw"])
    guest = guest_factory(prog, wire="whole")
    res = guest.run([sys.executable, NETPROG, "tcp-client", "--host", guest.gw4 or "",
                     "--port", "18080", "--send", "10", "--reply", "10", "--timeout", "5"],
                    capture_output=True, text=True, timeout=30)
    assert res.returncode != 0  # the real gateway (the lab's dead end) refuses it
    assert "Connection refused" in res.stdout + res.stderr or "ConnectionRefused" in res.stdout
    ping = guest.run(["busybox", "ping", "-c", "1", "-W", "3", guest.gw4 or ""],
                     capture_output=True, timeout=15)
    assert ping.returncode == 0  # the dead end itself still answers pings


# UDP server on ADDR PORT answering every datagram with the source port it came from
UDP_WHOAMI = """
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, port))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(str(peer[1]).encode(), peer)
"""

# From each source port SPORT (0: any), one datagram to HOST:PORT; prints, as JSON, the
# answer each got ({sport: text, or null without an answer within a second})
UDP_PROBE = """
import json, socket, sys
host, port, sports = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3:]]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
answers, socks = {}, []
for sport in sports:
    s = socket.socket(family, socket.SOCK_DGRAM)
    socks.append(s)  # kept open: their flows must all be alive at once
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", sport))
    s.settimeout(1)
    s.sendto(b"?", (host, port))
    try:
        answers[sport] = s.recv(2048).decode()
    except OSError:
        answers[sport] = None
print(json.dumps(answers))
"""


def udp_probe(guest: lab.TapGuest, host: str, port: int, *sports: int) -> dict[int, str | None]:
    res = guest.run([sys.executable, "-c", UDP_PROBE, host, str(port), *map(str, sports)],
                    capture_output=True, text=True, timeout=30 + 2 * len(sports))
    assert res.returncode == 0, res.stderr
    return {int(k): v for k, v in json.loads(res.stdout).items()}


@pytest.mark.parametrize("map_gw", [True, False])
def test_dns_to_a_loopback_resolver_follows_the_gateway_mapping(
        program_factory, guest_factory, host_server, map_gw: bool) -> None:
    """A resolver on host loopback is offered as the gateway and reached through it only
    while the gateway maps to host loopback; with --no-map-gw it is neither offered nor
    reached (the guest's DNS to the gateway goes to the gateway itself)."""
    host_server([sys.executable, "-c", UDP_WHOAMI, "127.0.0.1", "53"], port=53, udp=True)
    prog = program_factory(["--bus", "none", "-S", "none", "-D", "127.0.0.1",
                            *([] if map_gw else ["--no-map-gw"])])
    guest = guest_factory(prog, wire="whole")
    answer = udp_probe(guest, guest.gw4 or "", 53, 0)[0]
    if map_gw:
        assert guest.dns == (guest.gw4,)
        assert answer is not None
    else:
        assert guest.dns == ()
        assert answer is None
        assert "nameserver 127.0.0.1 is on the host's loopback" in prog.log_text()


# An Engine with SO_SNDBUF SNDBUF for its TCP sockets, fed COUNT guest SYNs over a
# socketpair: prints its descriptors before and after, and the TCP flags it answered with
SNDBUF_ENGINE = """
import json, os, socket, struct, sys
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from passtd.engine.addrs import Ip4Config, NetConfig
from passtd.engine.loop import Engine
from passtd.engine.mainloop import MainLoop
from passtd.engine.settings import EngineSettings
sndbuf, count = int(sys.argv[1]), int(sys.argv[2])
guest, gateway = socket.inet_aton("198.51.100.2"), socket.inet_aton("198.51.100.1")
net = NetConfig(ip4=Ip4Config(guest, 24, gateway, map_host_loopback=gateway))
loop = MainLoop()
engine = Engine(EngineSettings(net=net, tcp_sndbuf=sndbuf), loop)
engine.start(None)
ours, theirs = socket.socketpair()
engine.adopt_client(theirs)
before = len(os.listdir("/proc/self/fd"))
for i in range(count):
    frame = bytes(Ether(src="52:54:00:12:34:56", dst="9a:55:9a:55:9a:55")
                  / IP(src="198.51.100.2", dst="198.51.100.1")
                  / TCP(sport=40000 + i, dport=18099, flags="S", seq=1))
    ours.send(struct.pack("!I", len(frame)) + frame)
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
after = len(os.listdir("/proc/self/fd"))
ours.setblocking(False)
try:
    data = ours.recv(1 << 20)
except BlockingIOError:
    data = b""
flags = []
while data:
    length = int.from_bytes(data[:4], "big")
    flags.append(str(Ether(data[4:4 + length])[TCP].flags))
    data = data[4 + length:]
print(json.dumps({"before": before, "after": after, "answers": flags}))
"""


def test_a_socket_that_cannot_be_set_up_is_closed(lab_host: lab.HostNamespace) -> None:
    """A TCP socket the engine cannot set up (here: a send buffer beyond what setsockopt
    takes, which the configuration now refuses) costs the guest that connection, with a
    RST, and is closed: it leaked a descriptor per connection."""
    res = lab_host.run([sys.executable, "-c", SNDBUF_ENGINE, str(1 << 31), "20"],
                       capture_output=True, text=True, timeout=60, env=lab.passtd_env())
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["after"] <= out["before"], out
    assert out["answers"] == ["RA"] * 20, out
    assert "internal error" not in res.stderr, res.stderr


# Opens COUNT connections to HOST:PORT and holds them LINGER seconds; prints how many held
HOLD_CLIENT = """
import json, socket, sys, time
host, port, count, linger = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
held, refused = [], 0
for _ in range(count):
    try:
        held.append(socket.create_connection((host, port), timeout=5))
    except ConnectionRefusedError:
        refused += 1
print(json.dumps({"held": len(held), "refused": refused}), flush=True)
time.sleep(linger)
"""


def test_flow_cap_refuses_cleanly_and_recovers(program_factory, guest_factory,
                                               host_server) -> None:
    host_server([sys.executable, NETPROG, "tcp-server", "--bind", "127.0.0.1", "--port", "18080"],
                port=18080)
    prog = program_factory([*BASE_ARGS, "--limit", "max_flows=8"])
    guest = guest_factory(prog, wire="whole")
    res = guest.run([sys.executable, "-c", HOLD_CLIENT, guest.gw4 or "", "18080", "20", "0"],
                    capture_output=True, text=True, timeout=60)
    out = json.loads(res.stdout)
    assert out["held"] <= 8 and out["refused"] >= 12, out
    assert "flow limit (8) reached" in prog.log_text()
    # the held connections closed with the client: flows free up, new ones work
    lab.wait_for(lambda: guest.run([sys.executable, NETPROG, "tcp-client", "--host",
                                    guest.gw4 or "", "--port", "18080", "--send", "100",
                                    "--reply", "100", "--timeout", "5"],
                                   capture_output=True, timeout=30).returncode == 0,
                 20, "a new connection after the cap emptied")


def test_forward_all_takes_the_hard_descriptor_limit_and_refuses_clearly(
        program_factory, lab_host: lab.HostNamespace) -> None:
    """A weak `all` rule under a shell's soft descriptor limit of 1024: passtd raises it to
    the hard limit and listens on every port of the rule. Out of descriptors, or over the
    listener cap, the start is refused with a message that says why."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    # ports 20001 to the ephemeral range: ~12,800 listeners, well over 1024
    rule = "all,~1-20000"
    argv = ["prlimit", f"--nofile=1024:{hard}", sys.executable, "-m", "passtd", "run", "all",
            "--socket", "{SOCK}", *BASE_ARGS, "-t", rule]
    prog = program_factory(argv=argv, name="all", timeout=60)
    lab.wait_for(lambda: "ready" in prog.log_text(), 60, "the instance to be ready")
    (line,) = [x for x in prog.log_text().splitlines() if "forward 1: tcp" in x]
    count = int(line.split("(config, ")[1].split()[0])
    low = int(lab_host.run(["cat", "/proc/sys/net/ipv4/ip_local_port_range"]).stdout.split()[0])
    assert count > low - 20001 - 100, line  # one dual-stack socket a port, but for any in use
    assert lab_host.listening(20001) and lab_host.listening(low - 1)
    assert not lab_host.listening(20000)
    prog.stop()  # its ports free again for the refusals

    def refused(nofile: str, *args: str) -> str:
        """stderr of an instance with `rule` that must refuse to start."""
        res = lab_host.run(["prlimit", f"--nofile={nofile}", sys.executable, "-m", "passtd",
                            "run", "refused", "--socket", str(lab_host.workdir / "refused.sock"),
                            *BASE_ARGS, "-t", rule, *args], timeout=60, env=lab.passtd_env())
        assert res.returncode == 1, res.stderr
        return res.stderr

    assert "Too many open files" in refused("1024:1024")
    assert "listener limit reached (limits.max_listeners = 100)" in \
        refused(f"1024:{hard}", "--limit", "max_listeners=100")


def test_out_of_file_descriptors(program_factory, guest_factory, host_server,
                                 lab_host: lab.HostNamespace) -> None:
    """RLIMIT_NOFILE low: guest connections beyond it are refused with a RST and a log line;
    a forward's listener pauses instead of spinning; all recovers when descriptors free up."""
    host_server([sys.executable, NETPROG, "tcp-server", "--bind", "127.0.0.1", "--port", "18080"],
                port=18080)
    argv = ["prlimit", "--nofile=48:48", sys.executable, "-m", "passtd", "run", "nofile",
            "--socket", "{SOCK}", *BASE_ARGS, "-t", "10022:22"]
    prog = program_factory(argv=argv, name="nofile")
    guest = guest_factory(prog, wire="whole")
    guest.spawn([sys.executable, NETPROG, "tcp-server", "--bind", "::", "--port", "22"],
                log=guest.workdir / "srv.log")
    guest.wait_listening(22)
    holder = guest.spawn([sys.executable, "-c", HOLD_CLIENT, guest.gw4 or "", "18080", "80", "3"],
                         log=guest.workdir / "hold.log")
    lab.wait_for(lambda: "held" in (guest.workdir / "hold.log").read_text(), 30, "the holder")
    out = json.loads((guest.workdir / "hold.log").read_text())
    assert out["refused"] > 0 and out["held"] > 0, out
    assert "cannot open a TCP socket" in prog.log_text()
    # meanwhile a forwarded connection cannot be accepted: the listener rests, no spin
    cpu_before = _cpu_seconds(prog.pid)
    res = lab_host.run([sys.executable, "-c", "import socket; s = socket.create_connection("
                        "('127.0.0.1', 10022), 2); s.settimeout(2); s.recv(1)"],
                       capture_output=True, text=True, timeout=30)
    del res  # queued or reset: either way the instance must not burn a core meanwhile
    assert _cpu_seconds(prog.pid) - cpu_before < 1.0
    lab.terminate(holder)
    lab.wait_for(lambda: guest.run([sys.executable, NETPROG, "tcp-client", "--host",
                                    guest.gw4 or "", "--port", "18080", "--send", "100",
                                    "--reply", "100", "--timeout", "5"],
                                   capture_output=True, timeout=30).returncode == 0,
                 30, "connections to work again")
    assert prog.alive()


def _cpu_seconds(pid: int) -> float:
    ticks = bench.cpu_ticks(pid)
    assert ticks is not None, f"process {pid} is gone"
    return ticks / os.sysconf("SC_CLK_TCK")


def _fds_and_rss(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))  # (raises if the process is gone)
    return fds, bench.memory_kib(pid)[0]


SOAK_CLIENT = """
import socket, sys, time, json
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
failures, started = 0, time.monotonic()
for _ in range(count):
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            while s.recv(64):
                pass
    except OSError:
        failures += 1
print(json.dumps({"count": count, "failures": failures,
                  "rate": round(count / (time.monotonic() - started))}))
"""

# the host side closes first, so no TIME_WAIT piles up on the guest's ephemeral ports
SOAK_SERVER = """
import socket
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 18095))
srv.listen(1024)
while True:
    conn, _ = srv.accept()
    conn.sendall(b"x")
    conn.close()
"""


def test_soak_connections_leave_no_growth(program_factory, guest_factory, host_server,
                                          record_property) -> None:
    count = int(os.environ.get("PASSTD_SOAK_CONNECTIONS", "5000"))
    host_server([sys.executable, "-c", SOAK_SERVER], port=18095)
    prog = program_factory(BASE_ARGS)
    guest = guest_factory(prog, wire="whole")
    idle = _fds_and_rss(prog.pid)

    def soak() -> tuple[dict, tuple[int, int]]:
        res = guest.run([sys.executable, "-c", SOAK_CLIENT, guest.gw4 or "", "18095",
                         str(count)], capture_output=True, text=True,
                        timeout=max(600, count // 50))
        lab.wait_for(lambda: _fds_and_rss(prog.pid)[0] <= idle[0], 30, "flows to close")
        return json.loads(res.stdout), _fds_and_rss(prog.pid)

    # the first round brings the process to its steady state (allocator arenas, buffers,
    # caches); a second one as long must not grow it any further
    _, before = soak()
    out, after = soak()
    record_property("soak", {**out, "fds_idle": idle[0], "fds_before": before[0],
                             "fds_after": after[0], "rss_kib_idle": idle[1],
                             "rss_kib_before": before[1], "rss_kib_after": after[1]})
    print(f"soak: {out}; fds {idle[0]}, then {before[0]} -> {after[0]}; RSS {idle[1]}, "
          f"then {before[1]} -> {after[1]} KiB")
    assert out["failures"] == 0, out
    assert after[0] <= idle[0]
    assert after[1] - before[1] < 1024, (before, after)  # no growth beyond allocator noise
    assert prog.alive()
