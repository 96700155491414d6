"""Faults under real systemd with a real guest: restarts under load, reloads of broken configs.

One container per module (tests/support/libvirt_env.py: systemd, the system bus, libvirtd, this
checkout's units, policy and hook) and one TCG guest under libvirt for the whole module,
its NIC on a passtd@NAME instance started by the hook. The guest (tests/guestvm, serve
mode) keeps the instance busy the whole time:

- a request loop: `req N` to a server on the container's loopback through the gateway,
  answered `pong N gen=G` (one connection each, about one a second under TCG);
- a download that lasts until its connection dies (as fast as the guest takes it), then
  the next one;
- a DHCP renewal (SIGUSR1 to its udhcpc: a unicast REQUEST) each time the generation G in
  the replies changes: the test bumps it after a restart, so the renewal is asked of the
  new process;
- a server on port 22 that greets and holds each connection (60 s), for host->guest
  connections through the forwards;
- a watch on eth0's carrier.

Everything the guest says goes to its console, which a thread here reads and stamps with
the host's clock; the loopback servers log their events with the same clock
(CLOCK_MONOTONIC: the container shares the host's kernel). Nothing leaves the container's
private network namespace (its dead-end veth, see tests/support/container.py).

What the tests show, with timings printed (pytest -s):
- `systemctl restart`, twice, under that load: qemu is never disconnected (the socket in
  systemd's FD store is the one the new process serves; qemu's netdev still shows its
  peer, its log stays silent), connections in flight carry on (the new process takes
  them over: the download and a held host->guest connection keep going, no request
  fails), new ones succeed at once, the DHCP renewal is answered, and a runtime forward
  (D-Bus AddForward) carries a new host->guest connection;
- `systemctl reload` with a broken /etc/passtd.yaml (a bad port, a YAML syntax error) and a
  broken /run/passtd/NAME.yaml: refused with file, key and reason in the journal, the old
  configuration keeps serving and the guest never sees a failure; then a fixed config
  with one more forward is applied and that forward works;
- a restart between the two parts of a frame qemu wrote in pieces, with a stand-in for
  qemu: the old process hands the first part to the new one through the FD store, and the
  frame, and the next one, are answered.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import re
import struct
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from passtd import libvirt as passtd_libvirt
from passtd.tools.lab import wait_for
from tests.support.libvirt_env import Lab, libvirt_lab

pytestmark = [pytest.mark.libvirt, pytest.mark.vm]

NAME = "lvf-vm"  # its units are passtd@lvf\x2dvm.*, its bus name org.passtd.Passtd1.lvf_2dvm
UNIT = passtd_libvirt.service_unit(NAME)
SOCKET = passtd_libvirt.socket_path(NAME)
RUNTIME_FILE = f"/run/passtd/{NAME}.yaml"
ETC_FILE = "/etc/passtd.yaml"
REQUEST_PORT, STREAM_PORT = 18080, 18081  # the container's loopback, via the gateway
CONFIG_PORT, RUNTIME_PORT, ADDED_PORT = 2222, 2224, 2225  # host ports, all to guest port 22
GREETING = "hello-from-guest"
QEMU_LOG = f"/var/log/libvirt/qemu/{NAME}.log"
LABEL = "[faults-sd]"

# How long after a restart the download and the held connection in flight at it must
# still be alive (they keep going: the new process took them over).
CARRY_ON_S = 3.0
# A new guest connection must succeed this soon after `systemctl restart` returned (the
# request loop's pace under TCG is about one a second, plus a SYN retransmission when the
# first SYN went to the old process).
NEW_CONNECTION_MAX_S = 2.0
# The longest pause between two requests answered during the reloads: the loop's pace is
# about a second; a lost connection would cost a 2 s timeout plus the next request.
RELOAD_REQUEST_GAP_MAX_S = 3.0


def etc_config(*forwards: str) -> str:
    specs = ", ".join(f"'{spec}'" for spec in forwards)
    return f"# written by {Path(__file__).name}\ninstances:\n  {NAME}:\n" \
           f"    tcp_forwards: [{specs}]\n"


# The loopback servers, run inside the container with its python3: one JSON line per event
# (CLOCK_MONOTONIC `t`) to argv[1]; the generation in the replies is read from argv[2].
SERVERS = f"""\
import asyncio, json, sys, time

log = open(sys.argv[1], "a", buffering=1)
generation_file = sys.argv[2]
CHUNK = b"x" * 65536


def event(**fields):
    fields["t"] = time.monotonic()
    log.write(json.dumps(fields) + "\\n")


async def request(reader, writer):
    try:
        words = (await asyncio.wait_for(reader.readline(), 10)).split()
        n = int(words[1]) if len(words) == 2 and words[1].isdigit() else 0
        with open(generation_file) as f:
            generation = f.read().strip()
        event(ev="req", n=n)  # n 0: the client left before its request arrived
        writer.write(f"pong {{n}} gen={{generation}}\\n".encode())
        await writer.drain()
    except (OSError, asyncio.TimeoutError) as e:
        event(ev="req-error", error=repr(e))
    finally:
        writer.close()


streams = 0


async def stream(reader, writer):
    global streams
    streams += 1
    k, sent, how = streams, 0, "?"
    event(ev="stream-open", id=k)
    try:
        while True:
            writer.write(CHUNK)
            await writer.drain()
            sent += len(CHUNK)
    except OSError as e:
        how = type(e).__name__
    finally:
        event(ev="stream-end", id=k, bytes=sent, how=how)
        writer.close()


async def main():
    servers = [await asyncio.start_server(request, "127.0.0.1", {REQUEST_PORT}),
               await asyncio.start_server(stream, "127.0.0.1", {STREAM_PORT})]
    event(ev="up")
    await asyncio.gather(*(s.serve_forever() for s in servers))


asyncio.run(main())
"""

# The guest's load (see the module docstring). socat: connect-timeout bounds the connect,
# -T the silence once connected; a request that does not get its pong says so.
GUEST_SCRIPT = f"""\
socat TCP-LISTEN:22,reuseaddr,fork SYSTEM:'echo {GREETING}; sleep 60' &
if ! passtd-net-wait 90; then
    echo "FSD no network"
    sleep 3600
fi
. /run/passtd/net.env
GW=$PASSTD_GW4
echo "FSD net up"
# the DHCP client's own account, line by line, for a failure's timeline (busybox tail -f
# looks once a second: these lines are late by up to that)
tail -n 0 -f /run/passtd/udhcpc.log | while read -r l; do echo "FSD udhcpc $l"; done &
(
    last=1
    while :; do
        c=$(cat /sys/class/net/eth0/carrier 2>/dev/null || echo gone)
        [ "$c" = "$last" ] || echo "FSD carrier $c"
        last=$c
        sleep 0.2
    done
) &
(
    k=0
    while :; do
        k=$((k + 1))
        b=$(socat -u -T 3 TCP4:$GW:{STREAM_PORT},connect-timeout=3 STDOUT | wc -c)
        echo "FSD stream $k bytes=$b"
        sleep 0.5
    done
) &
leases() {{ grep -c obtained /run/passtd/udhcpc.log; }}
renew() {{
    before=$(leases)
    kill -USR1 "$(cat /run/passtd/udhcpc.pid)"
    i=0
    while [ $i -lt 50 ]; do
        if [ "$(leases)" -gt "$before" ]; then
            echo "FSD renew gen=$1 ok"
            return
        fi
        i=$((i + 1))
        sleep 0.1
    done
    echo "FSD renew gen=$1 fail: $(tail -n 2 /run/passtd/udhcpc.log | tr '\\n' '|')"
}}
n=0
seen=
g=
while :; do
    n=$((n + 1))
    r=$(echo "req $n" | socat -T 2 - TCP4:$GW:{REQUEST_PORT},connect-timeout=2 2>&1)
    # the answer and nothing else: a complaint of socat's after it is a failure too, and
    # the generation is digits only (a garbled one would set off a second renewal, and
    # udhcpc deconfigures on a second SIGUSR1 while a renewal is pending)
    gen=${{r#"pong $n gen="}}
    case $gen in
    "$r" | "" | *[!0-9]*) echo "FSD req $n fail: $(echo $r)" ;;
    *) echo "FSD req $n ok"; g=$gen ;;
    esac
    if [ -n "$g" ] && [ "$g" != "$seen" ]; then
        seen=$g
        renew "$g" &
    fi
    sleep 0.2
done
"""

# A host->guest connection inside the container (argv: port [log]): without a log, it
# prints the seconds until the guest's greeting and leaves; with one, it logs when it was
# greeted and when and how the connection ended (CLOCK_MONOTONIC `t`, JSON lines).
CLIENT = f"""\
import json, socket, sys, time

started = time.monotonic()
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as s:
    data = b""
    while b"{GREETING}" not in data:
        chunk = s.recv(100)
        if not chunk:
            sys.exit(f"closed after {{data!r}}")
        data += chunk
    if len(sys.argv) == 2:
        print(time.monotonic() - started)
        sys.exit()
    with open(sys.argv[2], "a", buffering=1) as log:
        log.write(json.dumps({{"ev": "greeted", "t": time.monotonic()}}) + "\\n")
        s.settimeout(None)
        try:
            while s.recv(100):
                pass
            how = "closed"
        except OSError as e:
            how = type(e).__name__
        log.write(json.dumps({{"ev": "ended", "how": how, "t": time.monotonic()}}) + "\\n")
"""

WAIT_S = 20.0  # for what should happen within a few seconds


class ConsoleWatch:
    """The guest's console lines, each stamped with the host's time.monotonic() when it
    was first read (a thread polls the file every 50 ms)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        offset, partial = 0, b""
        while not self._stop.wait(0.05):
            try:
                with self.path.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            offset += len(data)
            *complete, partial = (partial + data).split(b"\n")
            now = time.monotonic()
            with self._lock:
                self.lines += [(now, line.decode(errors="replace").rstrip("\r"))
                               for line in complete]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def matching(self, prefix: str, since: float = 0.0) -> list[tuple[float, str]]:
        with self._lock:
            return [(t, line) for t, line in self.lines if t >= since and line.startswith(prefix)]

    def wait(self, prefix: str, since: float, timeout: float = 20.0) -> tuple[float, str]:
        """The first line starting with `prefix` read at or after `since`."""
        return wait_for(lambda: next(iter(self.matching(prefix, since)), None), timeout,
                        f"console line {prefix!r}")


class ServerEvents:
    """An event log of the loopback servers (see SERVERS) or of a client (see CLIENT)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self, kind: str | None = None) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        events = [json.loads(line) for line in text.splitlines() if line.endswith("}")]
        return [e for e in events if kind is None or e["ev"] == kind]

    def answered(self, since: float) -> list[float]:
        """When requests (with their number) arrived, since `since`."""
        return [e["t"] for e in self.all("req") if e["n"] > 0 and e["t"] >= since]

    def wait_answered(self, since: float, count: int = 1, timeout: float = 30.0) -> float:
        """When the `count`th request since `since` arrived."""
        def nth() -> float | None:
            answered = self.answered(since)
            return answered[count - 1] if len(answered) >= count else None

        return wait_for(nth, timeout, f"{count} guest requests answered")

    def stream_end(self, stream_id: int) -> dict[str, Any] | None:
        return next((e for e in self.all("stream-end") if e["id"] == stream_id), None)

    def streaming(self, at_least_s: float = 1.0) -> int | None:
        """The id of the download running for at least `at_least_s`, if any."""
        ended = {e["id"] for e in self.all("stream-end")}
        now = time.monotonic()
        running = [e["id"] for e in self.all("stream-open")
                   if e["id"] not in ended and now - e["t"] >= at_least_s]
        return running[-1] if running else None

    def stream_opened(self, since: float) -> float | None:
        return next((e["t"] for e in self.all("stream-open") if e["t"] >= since), None)


@dataclass(frozen=True)
class QemuConnection:
    """qemu's stream netdev connection as `ss -xp` shows it inside the container."""

    passtd_inode: int  # the accepted socket: what passtd serves and the FD store keeps
    qemu_inode: int
    passtd_side: str  # its holders: ("passtd",pid=N,fd=N),("systemd",pid=1,fd=N)


_SS_LINE = re.compile(r"u_str\s+ESTAB\s+\d+\s+\d+\s+(\S+)\s+(\d+)\s+\*\s+(\d+)\s+users:\((.*)\)")


class Guest:
    """The running domain, its load, and what the tests ask of the container."""

    def __init__(self, lab: Lab, console: ConsoleWatch, events: ServerEvents,
                 generation_file: Path) -> None:
        self.lab = lab
        self.ct = lab.ct
        self.console = console
        self.events = events
        self.generation_file = generation_file

    def set_generation(self, generation: int) -> None:
        # by rename: the server reading it mid-write would answer an empty generation
        staged = self.generation_file.with_suffix(".new")
        staged.write_text(f"{generation}\n")
        staged.replace(self.generation_file)

    def dhcp_timeline(self, since: float) -> str:
        """The guest's renewals and its DHCP client's log since `since`, timed: what a
        failed request is read against (udhcpc deconfigures on a second SIGUSR1 while a
        renewal is pending, and after four seconds of unanswered renewals)."""
        lines = self.console.matching("FSD renew", since) + \
            self.console.matching("FSD udhcpc", since)
        return "; ".join(f"+{t - since:.2f} s {line}" for t, line in sorted(lines))

    def main_pid(self) -> str:
        return self.ct.unit_properties(UNIT, "MainPID")["MainPID"]

    def qemu_connection(self) -> QemuConnection:
        lines = self.ct.run(["ss", "-xpn"]).stdout.splitlines()
        parsed = [m.groups() for m in map(_SS_LINE.search, lines) if m]
        served = [p for p in parsed if p[0] == SOCKET]
        assert len(served) == 1, f"connections on {SOCKET}: {served}"
        _, inode, peer, holders = served[0]
        qemu = [p for p in parsed if p[1] == peer]
        assert len(qemu) == 1 and '"qemu-system-x86"' in qemu[0][3], qemu
        return QemuConnection(int(inode), int(peer), holders)

    def netdev_info(self) -> str:
        """qemu's view of its stream netdev (`info network`): "unix:PATH" while
        connected, empty once the peer went away (qemu 7.2 never reconnects)."""
        out = self.lab.virsh("qemu-monitor-command", NAME, "--hmp", "info network").stdout
        return next(line.split("type=stream,", 1)[1].strip() for line in out.splitlines()
                    if "type=stream," in line)

    def qemu_log(self) -> str:
        return self.ct.host_path(QEMU_LOG).read_text(errors="replace")

    def forwards(self) -> list[tuple[str, str]]:
        listed = json.loads(self.lab.passtctl(NAME, "forwards", "--json").stdout)
        return sorted((f["spec"], f["origin"]) for f in listed)

    def listening(self, port: int) -> bool:
        return bool(self.ct.run(["ss", "-Hltn", f"sport = :{port}"]).stdout.strip())

    def add_runtime_forward(self, host_port: int, guest_port: int = 22) -> int:
        # here, not at the top: dbus-fast is in the installed venv, maybe not in others
        from passtd.dbus_api import INTERFACE, OBJECT_PATH, bus_name

        res = self.ct.busctl("--json=short", "call", bus_name(NAME), OBJECT_PATH, INTERFACE,
                             "AddForward", "ssqq", "tcp", "", str(host_port), str(guest_port))
        (forward_id,) = json.loads(res.stdout)["data"]
        return int(forward_id)

    def hold(self, port: int, tag: str) -> ServerEvents:
        """A host->guest connection through host port `port`, greeted and held (for as
        long as the guest holds it: 60 s); its events (see CLIENT)."""
        events = ServerEvents(self.lab.shared / f"client-{tag}.log")
        self.ct.spawn(["python3", "-c", CLIENT, str(port), str(events.path)])
        wait_for(lambda: events.all("greeted"), WAIT_S, f"the greeting through {port}")
        return events

    def greeted(self, port: int) -> float:
        """Seconds a new host->guest connection through `port` takes to be greeted."""
        return float(self.ct.run(["python3", "-c", CLIENT, str(port)]).stdout)

    def wait_loaded(self) -> int:
        """Wait until a download runs (its id) and requests are being answered."""
        stream = wait_for(lambda: self.events.streaming(at_least_s=1.0), 30,
                          "a running download")
        self.events.wait_answered(time.monotonic(), count=2)
        return stream

    def status(self) -> str:
        return self.ct.unit_properties(UNIT, "StatusText")["StatusText"]

    def journal_has(self, text: str) -> bool:
        return text in self.ct.journal("-u", UNIT, lines=60)


@pytest.fixture(scope="module")
def lab(lab_logs: Any) -> Iterator[Lab]:
    with libvirt_lab("passtd-lvf", LABEL.strip("[]"), lab_logs) as made:
        yield made


@pytest.fixture(scope="module")
def guest(lab: Lab, lab_logs: Any) -> Iterator[Guest]:
    ct = lab.ct
    ct.write_file(ETC_FILE, etc_config(f"{CONFIG_PORT}:22"))
    generation = lab.shared / "generation"
    generation.write_text("0\n")
    servers_py = lab.shared / "servers.py"
    servers_py.write_text(SERVERS)
    events = ServerEvents(lab.shared / "events.log")
    servers = ct.spawn(["python3", str(servers_py), str(events.path), str(generation)])
    wait_for(lambda: events.all("up"), WAIT_S, "the loopback servers")
    lab.define(NAME, script=GUEST_SCRIPT)
    lab.passtctl("libvirt", "attach", NAME)
    console = ConsoleWatch(lab.console_path(NAME))
    made = Guest(lab, console, events, generation)
    logs = {"guest console": lab.console_path(NAME), "loopback server events": events.path}
    try:
        with lab_logs.watch(logs):
            started = time.monotonic()
            lab.virsh("start", NAME)
            up, _ = console.wait("FSD net up", started, timeout=120)
            stream = made.wait_loaded()
            # the renewal the first answer set off (generation 0) is over before any test
            # runs: a test's own renewal must not find one pending (see dhcp_timeline)
            _, renewal = console.wait("FSD renew gen=0 ", started)
            assert renewal.endswith(" ok"), (renewal, made.dhcp_timeline(started))
            assert made.netdev_info() == f"unix:{SOCKET}"  # (logs the domain's taint)
            print(f"{LABEL} guest booted: network up at {up - started:.1f} s, loaded (download "
                  f"{stream} running, requests answered) at {time.monotonic() - started:.1f} s")
            yield made
    finally:
        lab.virsh("destroy", NAME, check=False)
        console.close()
        servers.terminate()


def _timeline(t0: float, **moments: float | None) -> str:
    return ", ".join(f"{what.replace('_', ' ')} {'never' if t is None else f'+{t - t0:.2f} s'}"
                     for what, t in moments.items())


# -- restart ----------------------------------------------------------------------------------


def _restart_under_load(guest: Guest, generation: int, pid: str,
                        connection: QemuConnection) -> str:
    """`systemctl restart` with a download and a host->guest connection in flight; checks
    and prints what followed. Returns the new pid."""
    ct = guest.ct
    stream = guest.wait_loaded()
    held = guest.hold(RUNTIME_PORT, f"held-{generation}")

    issued = time.monotonic()
    ct.systemctl("restart", UNIT)
    ready = time.monotonic()
    guest.set_generation(generation)

    after = ct.unit_properties(UNIT, "MainPID", "ActiveState", "NFileDescriptorStore",
                               "StatusText")
    assert after["ActiveState"] == "active" and after["MainPID"] not in ("0", pid), after
    assert after["NFileDescriptorStore"] == "1", after  # qemu's connection, kept
    assert after["StatusText"].startswith("guest connected"), after
    pid = after["MainPID"]
    served = guest.qemu_connection()
    assert (served.passtd_inode, served.qemu_inode) == \
        (connection.passtd_inode, connection.qemu_inode), (connection, served)
    assert f'("passtd",pid={pid},' in served.passtd_side, served

    # the new process took the flows over: what arrives now came through it
    first_answer = guest.events.wait_answered(ready)
    renewed, renewal = guest.console.wait(f"FSD renew gen={generation} ", issued)
    assert renewal.endswith(" ok"), renewal
    runtime_greeted = guest.greeted(RUNTIME_PORT)
    config_greeted = guest.greeted(CONFIG_PORT)
    # the download and the host->guest connection in flight at the restart carry on
    time.sleep(max(0.0, ready + CARRY_ON_S - time.monotonic()))
    assert guest.events.stream_end(stream) is None, guest.events.stream_end(stream)
    assert not held.all("ended"), held.all("ended")
    assert guest.events.streaming() == stream
    print(f"{LABEL} restart {generation}: systemctl restart {ready - issued:.2f} s (pid "
          f"{pid}, NFileDescriptorStore=1, same qemu connection); from the restart: "
          + _timeline(issued, returned=ready, first_request_answered=first_answer,
                      dhcp_renewal_answered=renewed)
          + f"; the download in flight and the held host->guest connection still live "
          f"{CARRY_ON_S:.0f} s after it; new host->guest connections greeted in "
          f"{runtime_greeted:.2f} s (runtime forward {RUNTIME_PORT}) and "
          f"{config_greeted:.2f} s (config forward {CONFIG_PORT})")
    assert first_answer - ready <= NEW_CONNECTION_MAX_S, \
        f"first new request answered {first_answer - ready:.2f} s after the restart"
    return pid


def test_restart_under_load_keeps_the_guest_connected(guest: Guest) -> None:
    forward_id = guest.add_runtime_forward(RUNTIME_PORT)
    assert (f"{RUNTIME_PORT}:22", "runtime") in guest.forwards()
    guest.greeted(RUNTIME_PORT)
    netdev = guest.netdev_info()
    assert netdev == f"unix:{SOCKET}", netdev
    connection = guest.qemu_connection()
    qemu_log = guest.qemu_log()
    pid = guest.main_pid()
    started = time.monotonic()
    print(f"{LABEL} runtime forward {forward_id} tcp {RUNTIME_PORT}:22 added over D-Bus; "
          f"passtd pid {pid} serves qemu's connection (socket inodes "
          f"{connection.passtd_inode} <-> {connection.qemu_inode})")

    for generation in (1, 2):
        pid = _restart_under_load(guest, generation, pid, connection)

    # the guest's side: the NIC never went, no connection failed, no download ended
    assert not guest.console.matching("FSD carrier", started)
    assert not guest.console.matching("PASSTD_NET_DOWN", started)
    assert len(guest.console.matching("PASSTD_NET ")) == 1
    failures = [line for _, line in guest.console.matching("FSD req", started)
                if " fail" in line]
    assert not failures, (failures, guest.dhcp_timeline(started))
    assert not guest.console.matching("FSD stream ", started)
    answered = len(guest.events.answered(started))
    print(f"{LABEL} during the restarts: {answered} guest requests answered, none failed, "
          f"the download in flight since before them still running")
    # qemu's side: still connected to the same peer, nothing logged since
    assert guest.netdev_info() == netdev
    assert guest.qemu_log() == qemu_log
    assert (f"{RUNTIME_PORT}:22", "runtime") in guest.forwards()


def test_restart_between_the_two_parts_of_a_frame(lab: Lab) -> None:
    """qemu writes a frame in pieces when its socket is full (tap.py's docstring); a
    restart may come between two pieces. A stand-in for qemu (tests/support/qemu_stub.py) on an
    instance of its own writes the first 20 bytes of an ARP request, waits until the
    running process read them, has the service restarted, then writes the rest and a
    DHCPDISCOVER: the new process must still answer it."""
    from scapy.layers.l2 import ARP, Ether  # scapy: an independent packet oracle

    from tests.support.qemu_stub import QemuStub

    ct = lab.ct
    name = "lvf-split"
    units = (passtd_libvirt.socket_unit(name), passtd_libvirt.service_unit(name))
    path = passtd_libvirt.socket_path(name)
    ct.systemctl("start", units[0])
    try:
        with QemuStub(ct.host_path(path)) as qemu:
            qemu.dhcp_offer()  # the service runs
            arp = bytes(Ether(src=qemu.mac, dst="ff:ff:ff:ff:ff:ff")
                        / ARP(op=1, hwsrc=qemu.mac, psrc="198.51.100.2", pdst="198.51.100.1"))
            framed = struct.pack("!I", len(arp)) + arp
            qemu.sock.sendall(framed[:20])

            # SIOCOUTQ of a UNIX stream socket: what the peer has not read yet
            wait_for(lambda: struct.unpack("i", fcntl.ioctl(qemu.sock, termios.TIOCOUTQ,
                                                             bytes(4)))[0] == 0,
                     WAIT_S, "the running process to read the first part")
            ct.systemctl("restart", units[1])
            qemu.sock.sendall(framed[20:])
            qemu.dhcp_offer(timeout=10)  # (BrokenPipeError: the new process dropped qemu)
        assert "bad framing" not in ct.journal("-u", units[1], lines=50)
    finally:
        ct.systemctl("stop", *units, check=False)


# -- reload -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Broken:
    what: str
    path: str
    text: str
    reason: str  # what the journal's "reload refused" line must say


BROKEN = (
    Broken("a port out of range in /etc/passtd.yaml", ETC_FILE,
           etc_config(f"{CONFIG_PORT}:22", f"{ADDED_PORT}:99999"),
           f"{ETC_FILE}: instances.{NAME}.tcp_forwards[1]: '-t {ADDED_PORT}:99999': "
           "port '99999' out of range 1-65535"),
    Broken("a YAML syntax error in /etc/passtd.yaml", ETC_FILE,
           etc_config(f"{CONFIG_PORT}:22", f"{ADDED_PORT}:22").replace("]", ""),
           f"{ETC_FILE}: line 5, column 1: expected ',' or ']', but got '<stream end>'"),
    Broken("an MTU out of range in the hook's runtime file", RUNTIME_FILE,
           "# broken by the test\nmtu: 9\n",
           f"{RUNTIME_FILE}: mtu: must be 0 or between 68 and 65520, got 9"),
)


def _refused_reload(guest: Guest, broken: Broken, pid: str, forwards: list[tuple[str, str]],
                    good: bytes) -> None:
    """Reload with `broken` in place: refused, logged, the old config serving on."""
    ct = guest.ct
    ct.write_file(broken.path, broken.text)
    issued = time.monotonic()
    ct.systemctl("reload", UNIT)
    line = f"reload refused, keeping the running configuration: {broken.reason}"
    wait_for(lambda: guest.journal_has(line), 10, f"{line!r} in the journal")
    logged = time.monotonic()
    ct.write_file(broken.path, good)
    status = f"reload failed: {broken.reason}"
    wait_for(lambda: guest.status() == status, 5, f"StatusText {status!r}")
    info = ct.unit_properties(UNIT, "MainPID", "ActiveState")
    assert (info["MainPID"], info["ActiveState"]) == (pid, "active"), info
    assert guest.forwards() == forwards
    assert not guest.listening(ADDED_PORT)
    greeted = guest.greeted(CONFIG_PORT)
    answered = guest.events.wait_answered(issued, count=2)
    print(f"{LABEL} reload with {broken.what}: refused (logged +{logged - issued:.2f} s "
          f"after systemctl reload); pid {pid} serves on: forward {CONFIG_PORT} greeted in "
          f"{greeted:.2f} s, guest requests answered up to +{answered - issued:.2f} s\n"
          f"    journal: ...{line}")


def test_reload_with_a_broken_config_under_load(guest: Guest) -> None:
    ct = guest.ct
    pid = guest.main_pid()
    forwards = guest.forwards()
    assert (f"{CONFIG_PORT}:22", "config") in forwards
    good = {path: ct.host_path(path).read_bytes() for path in (ETC_FILE, RUNTIME_FILE)}
    stream = guest.wait_loaded()
    started = time.monotonic()

    for broken in BROKEN:
        _refused_reload(guest, broken, pid, forwards, good[broken.path])

    # DHCP, after the refusals: a renewal is answered
    guest.set_generation(10)
    renewed, renewal = guest.console.wait("FSD renew gen=10 ", started)
    assert renewal.endswith(" ok"), renewal

    # a fixed config, with one forward more
    ct.write_file(ETC_FILE, etc_config(f"{CONFIG_PORT}:22", f"{ADDED_PORT}:22"))
    issued = time.monotonic()
    ct.systemctl("reload", UNIT)
    wait_for(lambda: guest.listening(ADDED_PORT), 10, f"the new forward {ADDED_PORT} listening")
    listening = time.monotonic()
    wait_for(lambda: guest.journal_has("configuration reloaded"), 5, "the reload in the journal")
    assert guest.forwards() == sorted([*forwards, (f"{ADDED_PORT}:22", "config")])
    added_in = guest.greeted(ADDED_PORT)
    kept_in = guest.greeted(CONFIG_PORT)
    info = ct.unit_properties(UNIT, "MainPID", "StatusText")
    assert info["MainPID"] == pid and info["StatusText"].startswith("guest connected"), info
    guest.events.wait_answered(time.monotonic(), count=2)
    print(f"{LABEL} reload with a fixed config adding {ADDED_PORT}:22: listening "
          f"+{listening - issued:.2f} s after systemctl reload, greeted through it in "
          f"{added_in:.2f} s (and through {CONFIG_PORT} in {kept_in:.2f} s)")

    # the guest never noticed: no failed request, the same download all along
    requests = guest.console.matching("FSD req", started)
    assert not [line for _, line in requests if " fail" in line], \
        (requests, guest.dhcp_timeline(started))
    assert not guest.console.matching("FSD stream ", started)
    assert guest.events.stream_end(stream) is None
    answered_at = guest.events.answered(started)
    gap = max(b - a for a, b in itertools.pairwise(answered_at))
    print(f"{LABEL} during the reloads ({time.monotonic() - started:.1f} s): "
          f"{len(answered_at)} guest requests answered, none failed, longest pause between "
          f"two {gap:.2f} s, download {stream} uninterrupted, DHCP renewal answered "
          f"+{renewed - started:.1f} s")
    assert gap <= RELOAD_REQUEST_GAP_MAX_S
