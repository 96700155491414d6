"""An instance's life around its qemu client: reconnects, intruders, bad input, stopping.

Each test starts its own instance in the lab's host namespace; guests use the lab wire
(frames whole) unless the test says otherwise.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NS, IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap

from passtd.tools import lab
from tests.support.mounts import with_private_mounts
from tests.support.qemu_stub import QemuStub, dhcp_option

NETPROG = str(Path(__file__).resolve().parents[1] / "support" / "netprog.py")
BASE_ARGS = ["--bus", "none", "-D", "none", "-S", "none"]
GUEST_MAC = "52:54:00:12:34:56"

pytestmark = pytest.mark.netns


def framed(frame: bytes) -> bytes:
    return struct.pack("!I", len(frame)) + frame


def connect_raw(prog: lab.Program) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(prog.socket))
    return sock


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def tcp_exchange(ns: lab.Netns, host: str, port: int, size: int = 50_000) -> None:
    res = ns.run([sys.executable, NETPROG, "tcp-client", "--host", host, "--port", str(port),
                  "--send", str(size), "--reply", str(size), "--timeout", "20"],
                 capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def serve_in_guest(guest: lab.TapGuest, port: int) -> None:
    guest.spawn([sys.executable, NETPROG, "tcp-server", "--bind", "::", "--port", str(port)],
                log=guest.workdir / f"srv{port}.log")
    guest.wait_listening(port)


def healthy(prog: lab.Program) -> None:
    assert prog.alive(), prog.log_text()
    log = prog.log_text()
    assert "Traceback" not in log and "internal error" not in log, log[-4000:]


def test_guest_reconnects_and_keeps_its_forwards(program_factory, guest_factory, host_server,
                                                 lab_host: lab.HostNamespace) -> None:
    prog = program_factory([*BASE_ARGS, "-t", "10022:22"])
    guest = guest_factory(prog, wire="whole")
    serve_in_guest(guest, 22)
    host_server([sys.executable, NETPROG, "tcp-server", "--bind", "127.0.0.1", "--port", "18080"],
                port=18080)
    tcp_exchange(lab_host, "127.0.0.1", 10022)
    for attempt in range(2):
        guest.disconnect()
        lab.wait_for(lambda n=attempt: prog.log_text().count("waiting for the next qemu") > n,
                     5, "the instance to notice qemu left")
        guest.connect()
        tcp_exchange(lab_host, "127.0.0.1", 10022)  # the forward survived
        tcp_exchange(guest, guest.gw4 or "", 18080)  # and the way out works again
    healthy(prog)


def test_second_client_is_refused_and_the_guest_keeps_working(program_factory, guest_factory,
                                                             lab_host: lab.HostNamespace,
                                                             host_server) -> None:
    prog = program_factory(BASE_ARGS)
    guest = guest_factory(prog, wire="whole")
    host_server([sys.executable, NETPROG, "tcp-server", "--bind", "127.0.0.1", "--port", "18080"],
                port=18080)
    intruder = connect_raw(prog)
    assert closed_by_peer(intruder), "a second qemu client was not closed"
    intruder.close()
    tcp_exchange(guest, guest.gw4 or "", 18080)
    assert "refusing a second qemu client" in prog.log_text()
    healthy(prog)


@pytest.mark.parametrize("length", [5, 13, 65536, 0x7FFFFFFF])
def test_bad_frame_length_drops_the_client_not_the_instance(program_factory, guest_factory,
                                                            length: int) -> None:
    prog = program_factory(BASE_ARGS)
    client = connect_raw(prog)
    client.sendall(struct.pack("!I", length) + bytes(64))
    assert closed_by_peer(client)
    client.close()
    guest = guest_factory(prog, wire="whole")  # the next qemu is served as usual
    assert guest.ip4
    assert "dropping qemu client" in prog.log_text()
    healthy(prog)


def garbage_frames(count: int, rng: random.Random) -> list[bytes]:
    """Random bytes, and valid guest frames with random bytes flipped or cut."""
    valid = [
        bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="198.51.100.2",
                                                                   pdst="198.51.100.1")),
        bytes(Ether(src=GUEST_MAC) / IP(src="0.0.0.0", dst="255.255.255.255")
              / UDP(sport=68, dport=67) / BOOTP(chaddr=bytes.fromhex("525400123456"))
              / DHCP(options=[("message-type", "discover"), "end"])),
        bytes(Ether(src=GUEST_MAC) / IP(src="198.51.100.2", dst="198.51.100.1")
              / TCP(sport=40000, dport=18080, flags="S", options=[("MSS", 1460), ("WScale", 7)])),
        bytes(Ether(src=GUEST_MAC) / IP(src="198.51.100.2", dst="198.51.100.1")
              / TCP(sport=40001, dport=18080, flags="PA", seq=5, ack=9) / (b"x" * 100)),
        bytes(Ether(src=GUEST_MAC) / IP(src="198.51.100.2", dst="198.51.100.1")
              / UDP(sport=5000, dport=18081) / b"payload"),
        bytes(Ether(src=GUEST_MAC) / IP(src="198.51.100.2", dst="198.51.100.1") / ICMP(id=7)),
        bytes(Ether(src=GUEST_MAC) / IPv6(src="fe80::2", dst="ff02::1:ff00:1", hlim=255)
              / ICMPv6ND_NS(tgt="fe80::1")),
        bytes(Ether(src=GUEST_MAC) / IPv6(src="2001:db8::5", dst="fe80::1")
              / ICMPv6EchoRequest(id=3)),
    ]
    frames = []
    for i in range(count):
        if i % 4 == 0:
            frames.append(rng.randbytes(rng.randint(14, 300)))
            continue
        frame = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 6)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        if rng.random() < 0.3:
            del frame[rng.randint(14, len(frame)) :]
        frames.append(bytes(frame))
    return frames


def test_garbage_from_the_guest_costs_nothing(program_factory, guest_factory) -> None:
    """Thousands of malformed frames: dropped; then a real guest is served normally."""
    prog = program_factory([*BASE_ARGS, "--log-level", "debug"])
    rng = random.Random(42)
    client = connect_raw(prog)
    for frame in garbage_frames(3000, rng):
        client.sendall(framed(frame))
    client.close()
    lab.wait_for(lambda: "guest disconnected" in prog.log_text(), 10, "the garbage client's end")
    guest = guest_factory(prog, wire="whole")
    res = guest.run(["busybox", "ping", "-c", "1", "-W", "3", guest.gw4 or ""],
                    capture_output=True, text=True, timeout=15)
    assert res.returncode == 0, res.stdout
    log = prog.log_text()
    assert "dropped malformed" in log
    healthy(prog)


def test_sigterm_ends_the_instance_cleanly(program_factory, guest_factory) -> None:
    prog = program_factory(BASE_ARGS)
    guest_factory(prog, wire="whole")
    assert prog.stop() == 0
    assert not prog.socket.exists(), "the instance left its socket behind"
    assert "stopping" in prog.log_text()


def test_bad_forward_spec_is_refused_at_start(lab_host: lab.HostNamespace) -> None:
    res = lab_host.run([sys.executable, "-m", "passtd", "run", "bad", "--socket",
                        str(lab_host.socket_path("bad")), *BASE_ARGS, "-t", "22,4000-x"],
                       capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PYTHONPATH": str(Path(lab.__file__).parents[1])})
    assert res.returncode == 2
    assert "4000-x" in res.stderr and "Traceback" not in res.stderr


def test_port_taken_at_start_is_a_clear_error(lab_host: lab.HostNamespace) -> None:
    # another process holds the port inside the lab's host namespace
    holder = lab_host.spawn([sys.executable, "-c",
                             "import socket,time;s=socket.socket(socket.AF_INET6);"
                             "s.bind(('::',10099));s.listen();time.sleep(60)"],
                            log=lab_host.workdir / "holder.log")
    try:
        lab_host.wait_listening(10099)
        res = lab_host.run([sys.executable, "-m", "passtd", "run", "taken", "--socket",
                            str(lab_host.socket_path("taken")), *BASE_ARGS, "-t", "10099"],
                           capture_output=True, text=True, timeout=30,
                           env={**os.environ, "PYTHONPATH": str(Path(lab.__file__).parents[1])})
    finally:
        lab.terminate(holder)
    assert res.returncode == 1
    assert "10099" in res.stderr and "in use" in res.stderr.lower(), res.stderr
    assert "Traceback" not in res.stderr


def test_pcap_holds_every_tap_frame(program_factory, guest_factory,
                                    lab_host: lab.HostNamespace) -> None:
    capture = lab_host.workdir / "capture.pcap"
    prog = program_factory([*BASE_ARGS, "--pcap", str(capture)])
    guest = guest_factory(prog, wire="whole")
    guest.run(["busybox", "ping", "-c", "2", "-W", "3", guest.gw4 or ""], timeout=15)
    assert prog.stop() == 0
    packets = rdpcap(str(capture))
    assert any(p.haslayer(BOOTP) for p in packets)  # DHCP both ways
    kinds = {(p[ICMP].type) for p in packets if p.haslayer(ICMP)}
    assert {0, 8} <= kinds  # echo request from the guest, reply to it
    if shutil.which("tshark"):
        res = subprocess.run(["tshark", "-r", str(capture), "-Y", "icmp"], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0 and "Echo (ping) reply" in res.stdout, res.stderr


def test_many_guests_one_after_another_leave_nothing_behind(program_factory,
                                                            guest_factory) -> None:
    """Guest after guest (as VM reboots are for qemu): flows of the old ones expire."""
    prog = program_factory(BASE_ARGS)
    for _ in range(3):
        guest = guest_factory(prog, wire="whole")
        guest.down()
    time.sleep(0.2)
    healthy(prog)


def test_bad_nameserver_line_is_skipped_at_start(program_factory, program_argv,
                                                 lab_host: lab.HostNamespace) -> None:
    """A resolv.conf with garbage in a nameserver line: the instance starts, says which
    line it skipped, and offers the servers that are addresses."""
    resolv = lab_host.workdir / "resolv.conf"
    resolv.write_text("nameserver dns.example.\nnameserver 192.0.2.53\nsearch example.com\n")
    argv = with_private_mounts(f"mount --bind {resolv} /etc/resolv.conf",
                               program_argv("resolv", ["--bus", "none"]))
    prog = program_factory(argv=argv, name="resolv")
    with QemuStub(prog.socket) as stub:
        offer = stub.dhcp_offer()
    assert dhcp_option(offer, "name_server") == "192.0.2.53"
    log = prog.log_text()
    assert "'nameserver dns.example.' is not a nameserver address: skipped" in log, log
    healthy(prog)
