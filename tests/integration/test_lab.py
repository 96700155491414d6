"""The lab itself (passtd.tools.lab, passtd.lab_wire): it isolates, it wires guests correctly, and a
known-good program gives its guests working IPv4 and IPv6.

Run against the reference passt to prove the lab:

    PASSTD_TEST_PROG='passt -f -q -s {SOCK} --no-dhcp-dns --no-dhcp-search
                      -t 10022:22 -u 10023:23' python -m pytest tests/integration/test_lab.py

The protocol checks (lease, ping, TCP/UDP to host loopback, inbound forwards) run the
program under test (see tests/conftest.py) behind the `whole` and `qemu` wires. Checks the
reference passt (Debian 12's) is known to fail are xfail when the program is the
reference, and only then. The lab-mechanics tests (reconnect, several guests) use the
reference passt directly, without port forwards, and skip if it is not installed; the wire
tests and the isolation tests need no program at all. The first tests (FrameReader,
padding, lease parsing) are pure and run anywhere.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passtd.tools import lab, lab_wire

TCP_ECHO_PORT = 18080  # host-side socat echo servers, on 127.0.0.1 and ::1
UDP_ECHO_PORT = 18081
INBOUND_TCP = (10022, 22)  # host port -> guest port, as $PASSTD_TEST_PROG must forward
INBOUND_UDP = (10023, 23)
EXPECTED_MTU = 65520
REFERENCE_ARGV = ["passt", "-f", "-q", "-s", "{SOCK}", "--no-dhcp-dns", "--no-dhcp-search"]

PADDING_BUG = ("reference passt drops IPv4 frames zero-padded to 60 bytes, which qemu sends "
               "(seen with Debian 12's passt and qemu 7.2)")

# A one-shot client run inside a namespace: sends a line (TCP) or a datagram (UDP), prints
# the answer. Addresses are numeric only (AI_NUMERICHOST): nothing is ever resolved.
CLIENT = r"""
import socket, sys
proto, host, port, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
family, _, _, _, addr = socket.getaddrinfo(host, port, type=kind,
                                           flags=socket.AI_NUMERICHOST)[0]
s = socket.socket(family, kind)
s.settimeout(5)
s.connect(addr)
if proto == "tcp":
    s.sendall(payload.encode() + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        data = s.recv(4096)
        if not data:
            break
        buf += data
else:
    for attempt in range(3):
        s.send(payload.encode())
        try:
            buf = s.recv(4096)
            break
        except TimeoutError:
            buf = b""
print(buf.decode().strip())
"""


def request_response(ns: lab.Netns, proto: str, host: str, port: int, payload: str) -> str:
    res = ns.run([sys.executable, "-c", CLIENT, proto, host, str(port), payload], timeout=30)
    return res.stdout.strip() if res.returncode == 0 else f"error: {res.stderr.strip()}"


def ping(ns: lab.Netns, address: str, count: int = 2) -> subprocess.CompletedProcess[str]:
    return ns.run(["busybox", "ping", "-c", str(count), "-i", "0.2", "-W", "3", address],
                  timeout=30)


# --- pure parts: run anywhere ----------------------------------------------------------


frames_strategy = st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=8)


@given(frames=frames_strategy, cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_frame_reader_reassembles_any_split(frames: list[bytes], cuts: list[int]) -> None:
    stream = lab_wire.encode(frames)
    reader = lab_wire.FrameReader()
    got: list[bytes] = []
    start = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        got += reader.feed(stream[start:cut])
        start = cut
    assert got == frames
    assert reader.pending == 0


def test_frame_reader_one_byte_at_a_time() -> None:
    frames = [bytes(range(60)), b"\x01" * 1514, b"\x02" * 65534]
    reader = lab_wire.FrameReader()
    got = [f for b in lab_wire.encode(frames) for f in reader.feed(bytes([b]))]
    assert got == frames


def test_frame_reader_rejects_impossible_length() -> None:
    with pytest.raises(lab_wire.StreamCorrupt):
        lab_wire.FrameReader().feed(struct.pack("!I", lab_wire.MAX_FRAME + 1) + b"x")


def test_pad_frame() -> None:
    assert lab_wire.pad_frame(b"\xaa" * 42) == b"\xaa" * 42 + bytes(18)
    assert lab_wire.pad_frame(b"\xaa" * 60) == b"\xaa" * 60
    assert lab_wire.pad_frame(b"\xaa" * 61) == b"\xaa" * 61


def test_dhcp_lease_parse() -> None:
    lease = lab.DhcpLease.parse("ip=198.51.100.2\nmask=24\nrouter=198.51.100.1 198.51.100.9\n"
                                "dns=\nmtu=65520\nlease=4294967295\nserverid=198.51.100.1\n")
    assert (lease.address, lease.prefix_len, lease.router) == ("198.51.100.2", 24,
                                                              "198.51.100.1")
    assert (lease.dns, lease.mtu, lease.lease_time) == ((), 65520, 4294967295)


def test_wait_for_names_what_it_waited_for() -> None:
    assert lab.wait_for(lambda: 42, 1, "the answer") == 42
    with pytest.raises(TimeoutError, match="waiting for the impossible"):
        lab.wait_for(lambda: False, 0.1, "the impossible")


def test_wait_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with pytest.raises(TimeoutError, match=str(path)):
        lab.wait_socket(path, 0.1)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    lab.wait_socket(path, 1)  # bound is enough without listener_pid
    with pytest.raises(TimeoutError):
        lab.wait_socket(path, 0.1, listener_pid=os.getpid())  # not listening yet
    server.listen(1)
    lab.wait_socket(path, 1, listener_pid=os.getpid())
    server.close()


# --- the lab's own namespaces ----------------------------------------------------------


@pytest.mark.netns
def test_host_namespace_layout(lab_host: lab.HostNamespace) -> None:
    links = {link["ifname"]: link for link in lab_host.ip_json("-d", "link", "show")}
    assert sorted(links) == ["eth0", "lo"]
    assert links["eth0"]["linkinfo"]["info_kind"] == "veth"
    up = lab.Netns(lab_host.up_name, lab_host.workdir)
    assert sorted(link["ifname"] for link in up.ip_json("link", "show")) == ["lo", "up0"]
    forwarding = up.run(["sysctl", "-n", "net.ipv4.ip_forward",
                         "net.ipv6.conf.all.forwarding"]).stdout.split()
    assert forwarding == ["0", "0"]
    addrs = {(a["local"], a["prefixlen"]) for link in lab_host.ip_json("addr", "show", "eth0")
             for a in link["addr_info"] if a.get("scope") == "global"}
    assert addrs == {(lab_host.ip4, 24), (lab_host.ip6, 64)}
    routes = lab_host.ip_json("route", "show", "default") + \
        lab_host.ip_json("-6", "route", "show", "default")
    assert sorted(r["gateway"] for r in routes) == sorted([lab_host.gw4, lab_host.gw6])
    assert ping(lab_host, lab_host.gw4).returncode == 0  # the dead end answers pings
    assert ping(lab_host, f"{lab_host.gw6}%eth0").returncode == 0
    assert lab_host.run(["sysctl", "-n", "net.ipv4.ping_group_range"]).stdout.split() == \
        ["0", "2147483647"]
    assert stat_mode(lab_host.sockdir) == 0o1777


def stat_mode(path: os.PathLike[str]) -> int:
    return os.stat(path).st_mode & 0o7777


class Sniffer:
    """Watches every interface of the test's own namespace for TCP to a port: `seen` lists
    such frames outside loopback, `loopback_hits` counts those on lo (a positive control)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[str] = []
        self.loopback_hits = 0
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                frame, (ifname, *_) = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            if not self._to_port(frame):
                continue
            if ifname == "lo":
                self.loopback_hits += 1
            else:
                self.seen.append(f"{ifname}: {frame[:64].hex()}")

    def _to_port(self, frame: bytes) -> bool:
        ethertype = int.from_bytes(frame[12:14], "big")
        if ethertype == 0x0800 and len(frame) >= 38 and frame[23] == 6:
            l4 = 14 + (frame[14] & 0xF) * 4
        elif ethertype == 0x86DD and len(frame) >= 58 and frame[20] == 6:
            l4 = 54
        else:
            return False
        return int.from_bytes(frame[l4 + 2:l4 + 4], "big") == self.port

    def finish(self) -> list[str]:
        self.stop.set()
        self.thread.join()
        drops = struct.unpack("II", self.sock.getsockopt(263, 6, 8))[1]  # PACKET_STATISTICS
        self.sock.close()
        assert drops == 0, f"the sniffer dropped {drops} frames: the check is not conclusive"
        return self.seen


@pytest.mark.netns
def test_isolation_nothing_leaves(lab_host: lab.HostNamespace) -> None:
    """From the host namespace, TEST-NET-1 (this machine's real gateway) and a documentation
    IPv6 address are unreachable, and nothing is seen on this machine's own interfaces."""
    routes = lab_host.ip_json("route", "show", "table", "all") + \
        lab_host.ip_json("-6", "route", "show", "table", "all")
    assert {r.get("dev") for r in routes} <= {"eth0", "lo", None}
    port = random.randint(20000, 60000)
    sniffer = Sniffer(port)
    try:
        with pytest.raises(ConnectionRefusedError):  # the control: seen on our lo
            socket.create_connection(("127.0.0.1", port), timeout=2)
        for target in (f"TCP4:192.0.2.1:{port}", f"TCP6:[2001:db8:ffff::1]:{port}"):
            res = lab_host.run(["socat", "-u", "/dev/null", f"{target},connect-timeout=2"],
                               timeout=20)
            assert res.returncode != 0, f"{target} was reachable from {lab_host.name}"
            assert any(why in res.stderr for why in ("timed out", "unreachable", "No route")), \
                res.stderr
        assert ping(lab_host, "192.0.2.1", count=1).returncode != 0
        time.sleep(0.3)
    finally:
        seen = sniffer.finish()
    assert sniffer.loopback_hits > 0, "the sniffer saw not even the control connection"
    assert seen == [], "lab traffic reached this machine's interfaces"


@pytest.mark.netns
def test_down_removes_a_crashed_lab(lab_host: lab.HostNamespace) -> None:
    """A new lab with the prefix of a crashed one ends its processes and replaces it."""
    prefix = lab_host.prefix + "s"
    crashed = lab.HostNamespace(prefix).up()
    try:
        orphan = crashed.spawn(["sleep", "300"])
        subprocess.run(["ip", "netns", "add", f"{prefix}-guest-left"], check=True)
        left = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-guest-left", "sleep", "300"])
        marker = "198.51.100.99"  # state only the crashed lab's namespace has
        subprocess.run(["ip", "-n", crashed.name, "addr", "add", f"{marker}/32", "dev", "lo"],
                       check=True)
        (crashed.workdir / "stale-file").touch()
        with lab.HostNamespace(prefix) as fresh:  # knows nothing of `crashed`
            assert orphan.wait(5) is not None and left.wait(5) is not None
            assert not lab.netns_exists(f"{prefix}-guest-left")
            assert marker not in json.dumps(fresh.ip_json("addr", "show"))
            assert not (fresh.workdir / "stale-file").exists()
            assert ping(fresh, fresh.gw4, count=1).returncode == 0
        assert not [n for n in os.listdir(lab.NETNS_DIR) if n.startswith(prefix + "-")]
        assert not fresh.workdir.exists()
        fresh.down()  # idempotent
    finally:
        crashed.down()


# --- the wires, against a fake program in this test -------------------------------------


GUEST_IP = "198.51.100.77"
FAKE_MAC = bytes.fromhex("020000000001")


def arp_request(sender_ip: str, target_ip: str) -> bytes:
    return (b"\xff" * 6 + FAKE_MAC + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + FAKE_MAC + ipaddress.IPv4Address(sender_ip).packed + bytes(6)
            + ipaddress.IPv4Address(target_ip).packed)


def is_arp_reply_to(frame: bytes, target_ip: str) -> bool:
    return (frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02"
            and frame[38:42] == ipaddress.IPv4Address(target_ip).packed)


def is_udp_to_port_9(frame: bytes) -> bool:
    return frame[12:14] == b"\x08\x00" and frame[23] == 17 and frame[36:38] == b"\x00\x09"


class FakeProgram:
    """A UNIX socket server standing in for the program: sees the wire's frames raw."""

    def __init__(self, path: os.PathLike[str]) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.fspath(path))
        self.listener.listen(1)
        self.conn: socket.socket | None = None
        self.reader = lab_wire.FrameReader()
        self.received: list[bytes] = []

    def accept(self) -> None:
        self.listener.settimeout(5)
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(0.2)

    def send_pieces(self, data: bytes, cuts: Sequence[int]) -> None:
        assert self.conn is not None
        start = 0
        for cut in [*cuts, len(data)]:
            self.conn.sendall(data[start:cut])
            start = cut
            time.sleep(0.01)  # let the wire read each piece on its own

    def wait_frames(self, want: Callable[[bytes], bool], count: int = 1,
                    timeout: float = 5.0) -> list[bytes]:
        """Received frames that `want` accepts (waiting for `count` of them); the others
        stay for later calls."""
        assert self.conn is not None
        deadline = time.monotonic() + timeout
        while sum(map(want, self.received)) < count and time.monotonic() < deadline:
            try:
                data = self.conn.recv(1 << 16)
            except TimeoutError:
                continue
            assert data, "the wire closed the connection"
            self.received += self.reader.feed(data)
        found = [f for f in self.received if want(f)]
        self.received = [f for f in self.received if not want(f)]
        return found

    def close(self) -> None:
        for s in (self.conn, self.listener):
            if s is not None:
                s.close()


@pytest.fixture
def fake_program(lab_host: lab.HostNamespace) -> Iterator[FakeProgram]:
    path = lab_host.socket_path(f"fake-{random.getrandbits(32):08x}")
    fake = FakeProgram(path)
    yield fake
    fake.close()
    path.unlink(missing_ok=True)


@pytest.mark.netns
@pytest.mark.parametrize("wire", lab.WIRES)
def test_wire_framing(wire: str, fake_program: FakeProgram, guest_factory) -> None:
    """Short frames are padded by qemu and the pad wires only; frames reach the program
    intact (the stream wires send 7 bytes at a time); frames cut anywhere on the socket, or
    several in one read, reach the guest whole."""
    chunk = 7 if wire.startswith("stream") else None
    guest = guest_factory(fake_program.listener.getsockname(), wire=wire, dhcp=False,
                          v6wait=0, chunk=chunk)
    fake_program.accept()
    # a deep queue stands for a VM's flow-controlled NIC (lab.TAP_TXQUEUELEN)
    (link,) = guest.ip_json("link", "show", "dev", guest.iface)
    assert link["txqlen"] == lab.TAP_TXQUEUELEN
    guest.run(["ip", "addr", "add", f"{GUEST_IP}/24", "dev", guest.iface], check=True)
    guest.run(["ip", "neigh", "replace", lab.GW4, "lladdr", FAKE_MAC.hex(":"), "dev",
               guest.iface, "nud", "permanent"], check=True)

    # guest -> socket: a 2-byte UDP datagram makes a 44-byte frame
    send = "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)" \
        f".sendto(b'ab', ('{lab.GW4}', 9))"
    guest.run([sys.executable, "-c", send], check=True)
    (udp,) = fake_program.wait_frames(is_udp_to_port_9)
    padded = wire in ("qemu", "pad", "stream-pad")
    assert len(udp) == (60 if padded else 44)
    assert udp[42:44] == b"ab" and udp[44:] == bytes(len(udp) - 44)

    # socket -> guest: one request cut inside its length word and inside the frame, then
    # two requests in one write; the guest answers each with an ARP reply
    first = lab_wire.encode([arp_request(lab.GW4, GUEST_IP)])
    fake_program.send_pieces(first, [1, 2, 3, 5, 20])
    both = lab_wire.encode([arp_request("198.51.100.3", GUEST_IP),
                            arp_request("198.51.100.4", GUEST_IP)])
    fake_program.send_pieces(both, [])
    for target in (lab.GW4, "198.51.100.3", "198.51.100.4"):
        assert fake_program.wait_frames(lambda f, t=target: is_arp_reply_to(f, t)), target


@pytest.mark.netns
@pytest.mark.parametrize("wire", lab_wire.MODES)
def test_wire_exits_when_the_socket_closes(wire: str, fake_program: FakeProgram,
                                           guest_factory) -> None:
    guest = guest_factory(fake_program.listener.getsockname(), wire=wire, dhcp=False, v6wait=0)
    fake_program.accept()
    fake_program.close()
    assert guest.wire_proc is not None
    assert guest.wire_proc.wait(5) == 0
    assert "socket closed" in guest.wire_log.read_text()


# --- a known-good program behind the whole and qemu wires --------------------------------


@dataclass
class Wired:
    wire: str
    program: lab.Program
    guest: lab.TapGuest
    reference: bool  # the program is the reference passt: its known bugs are xfail

    def known_bug(self, request: pytest.FixtureRequest, when: bool, reason: str) -> None:
        if when and self.reference:
            request.applymarker(pytest.mark.xfail(reason=reason, strict=False))


@pytest.fixture(scope="module")
def host_echo_servers(lab_host: lab.HostNamespace) -> None:
    for bind, family in (("127.0.0.1", "4"), ("[::1]", "6")):
        v6only = ",ipv6only=1" if family == "6" else ""
        lab_host.spawn(["socat", f"TCP{family}-LISTEN:{TCP_ECHO_PORT},bind={bind},"
                        f"reuseaddr,fork{v6only}", "PIPE"])
        lab_host.spawn(["socat", f"UDP{family}-RECVFROM:{UDP_ECHO_PORT},bind={bind},"
                        f"fork{v6only}", "PIPE"])
    lab_host.wait_listening(TCP_ECHO_PORT)
    lab_host.wait_listening(UDP_ECHO_PORT, udp=True)


@pytest.fixture(scope="module", params=["whole", "qemu"])
def wired(request: pytest.FixtureRequest, lab_host: lab.HostNamespace, lab_logs,
          program_argv, start_program, reference_program: bool, host_echo_servers: None,
          ) -> Iterator[Wired]:
    """The program under test with one guest, per wire; the guest serves TCP 22 (answers
    prefixed "guest-") and UDP 23 (echo)."""
    wire = request.param
    if wire == "qemu" and not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 not installed")
    fwd = ["-t", f"{INBOUND_TCP[0]}:{INBOUND_TCP[1]}", "-u", f"{INBOUND_UDP[0]}:{INBOUND_UDP[1]}"]
    program = start_program(lab_host, f"lab-{wire}", program_argv(f"lab-{wire}", fwd))
    guest = lab.TapGuest(lab_host, program.socket, name=wire, wire=wire)
    try:
        with lab_logs.watch({f"program {program.name}": program.log, **guest.logs}):
            guest.up()
            guest.spawn(["socat", f"TCP6-LISTEN:{INBOUND_TCP[1]},ipv6only=0,reuseaddr,fork",
                         "SYSTEM:read l; echo guest-$l"])
            guest.spawn(["socat", f"UDP6-RECVFROM:{INBOUND_UDP[1]},ipv6only=0,fork", "PIPE"])
            guest.wait_listening(INBOUND_TCP[1])
            guest.wait_listening(INBOUND_UDP[1], udp=True)
            yield Wired(wire, program, guest, reference_program)
    finally:
        guest.down()
        program.stop()


def short_ipv4(l4_header: int, payload: int) -> bool:
    """Whether an IPv4 frame with this L4 header and payload is under the 60-byte minimum
    (qemu pads it)."""
    return 14 + 20 + l4_header + payload < lab_wire.ETH_ZLEN


def gateway(guest: lab.TapGuest, family: int) -> str:
    address = guest.gw4 if family == 4 else guest.gw6_scoped
    if address is None:
        pytest.fail(f"the guest has no IPv{family} gateway")
    return address


@pytest.mark.netns
def test_dhcp_lease(wired: Wired) -> None:
    g = wired.guest
    assert g.lease is not None
    assert (g.ip4, g.prefix4, g.gw4) == (lab.HOST_IP4, lab.PREFIX4, lab.GW4)
    assert g.lease.mtu == EXPECTED_MTU
    assert g.mtu == EXPECTED_MTU  # applied by the lab's udhcpc script


@pytest.mark.netns
def test_slaac(wired: Wired) -> None:
    g = wired.guest
    assert g.ip6 is not None and g.prefix6 == 64
    assert ipaddress.IPv6Address(g.ip6) in ipaddress.IPv6Network("2001:db8::/64")
    assert g.gw6 == lab.GW6 and g.gw6_scoped == f"{lab.GW6}%tap0"


@pytest.mark.netns
@pytest.mark.parametrize("family", [4, 6])
def test_ping_gateway(wired: Wired, family: int) -> None:
    res = ping(wired.guest, gateway(wired.guest, family))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.netns
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("payload", ["x", "lab-tcp-echo-0123456789"])
def test_tcp_to_host_loopback(wired: Wired, request: pytest.FixtureRequest, family: int,
                              payload: str) -> None:
    """The gateway address reaches socat echo servers on the host's 127.0.0.1 / ::1."""
    # the reference negotiates no TCP options: "x\n" is a 56-byte frame, padded by qemu
    wired.known_bug(request, wired.wire == "qemu" and family == 4
                    and short_ipv4(20, len(payload) + 1), PADDING_BUG)
    got = request_response(wired.guest, "tcp", gateway(wired.guest, family), TCP_ECHO_PORT,
                           payload)
    assert got == payload


@pytest.mark.netns
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("payload", ["u4", "lab-udp-echo-0123456789"])
def test_udp_to_host_loopback(wired: Wired, request: pytest.FixtureRequest, family: int,
                              payload: str) -> None:
    wired.known_bug(request, wired.wire == "qemu" and family == 4
                    and short_ipv4(8, len(payload)), PADDING_BUG)
    got = request_response(wired.guest, "udp", gateway(wired.guest, family), UDP_ECHO_PORT,
                           payload)
    assert got == payload


@pytest.mark.netns
@pytest.mark.parametrize("host_address", ["127.0.0.1", "::1"])
def test_inbound_tcp(wired: Wired, lab_host: lab.HostNamespace, host_address: str) -> None:
    got = request_response(lab_host, "tcp", host_address, INBOUND_TCP[0], "in-tcp")
    assert got == "guest-in-tcp"


@pytest.mark.netns
@pytest.mark.parametrize("host_address", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("payload", ["in-u", "in-udp-payload-0123456789"])
def test_inbound_udp(wired: Wired, request: pytest.FixtureRequest, lab_host: lab.HostNamespace,
                     host_address: str, payload: str) -> None:
    # the guest's echo of a short datagram over IPv4 is a frame under 60 bytes: padded
    wired.known_bug(request, wired.wire == "qemu" and host_address == "127.0.0.1"
                    and short_ipv4(8, len(payload)), PADDING_BUG)
    got = request_response(lab_host, "udp", host_address, INBOUND_UDP[0], payload)
    assert got == payload


# --- lab mechanics, with the reference passt (no port forwards: no clashes) --------------


@pytest.fixture
def reference_argv() -> list[str]:
    if not shutil.which("passt"):
        pytest.skip("the reference passt is not installed")
    return REFERENCE_ARGV


@pytest.mark.netns
@pytest.mark.parametrize("wire", ["whole", "qemu"])
def test_disconnect_and_connect(wire: str, reference_argv: list[str], program_factory,
                                guest_factory) -> None:
    """disconnect() ends the wire, the program sees its peer go away and takes the next
    connection; the guest keeps its addresses across connect()."""
    program = program_factory(argv=reference_argv)
    guest = guest_factory(program, wire=wire, name="re")
    assert ping(guest, guest.gw4).returncode == 0
    before = (guest.ip4, guest.ip6)
    assert guest.disconnect() is not None
    assert ping(guest, guest.gw4, count=1).returncode != 0
    assert program.alive()
    guest.connect()
    lab.wait_for(lambda: ping(guest, guest.gw4, count=1).returncode == 0, 10,
                 "ping through the new wire")
    addresses = {a["local"] for link in guest.ip_json("addr", "show", "dev", guest.iface)
                 for a in link["addr_info"]}
    assert set(before) <= addresses


@pytest.mark.netns
def test_several_guests(reference_argv: list[str], program_factory, guest_factory,
                        lab_host: lab.HostNamespace) -> None:
    """Guests with different names coexist, each on its own program, and go away alone."""
    programs = [program_factory(argv=reference_argv, name=n) for n in ("pa", "pb")]
    guests = [guest_factory(p, wire="whole", name=p.name, v6wait=0) for p in programs]
    assert len({g.name for g in guests}) == 2
    assert all(ping(g, g.gw4).returncode == 0 for g in guests)
    with pytest.raises(lab.LabError, match="already exists"):
        lab.TapGuest(lab_host, programs[0].socket, name="pa", wire="whole").up()
    guests[0].down()
    assert not lab.netns_exists(guests[0].name)
    assert ping(guests[1], guests[1].gw4).returncode == 0
