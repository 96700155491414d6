"""`passtd demo`: the program end to end, in a throwaway isolated lab.

Builds its own lab (prefix "pddemo", see passtd.tools.lab), starts the program under test in the
lab's host namespace (by default `passtd run demo -t 8080:80`), a small web server on that
namespace's 127.0.0.1, and a guest behind qemu's hub (a namespace whose kernel is the
guest's stack). Then it shows, step by step with timings: the DHCP lease the guest got,
ping to the gateway, an HTTP fetch from the guest of the page on the host's loopback
through the gateway address, and an inbound HTTP fetch from the host's loopback port 8080
to a web server in the guest on port 80. Everything is removed at the end, also on Ctrl-C
and on failure; the exit status is 0 only if every step worked.

`--keep-going` keeps the lab up until Ctrl-C and prints how to enter its namespaces.

Not done: no names are resolved anywhere (the guest is offered no DNS server, since the
lab has none it could reach; every fetch goes to an address; the lab's namespaces have a
resolv.conf of their own that answers nothing), and nothing is sent outside the lab's
namespaces. HTTP is
spoken by socat with a hand-written request: busybox wget crashes in this setting.
"""

from __future__ import annotations

import argparse
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .lab import (
    HostNamespace,
    LabError,
    Netns,
    Program,
    TapGuest,
    missing_requirements,
    passtd_env,
)

PREFIX = "pddemo"
HOST_HTTP_PORT = 8000  # on the host namespace's 127.0.0.1
GUEST_HTTP_PORT = 80
FORWARDED_PORT = 8080  # host loopback port the program forwards to GUEST_HTTP_PORT
HOST_PAGE = "Hello from the host's loopback (passtd demo)\n"
GUEST_PAGE = "Hello from inside the guest (passtd demo)\n"
TITLE_WIDTH = 20
STEP_ERRORS = (LabError, TimeoutError, OSError, subprocess.SubprocessError, ValueError)


def default_prog() -> list[str]:
    # -D none -S none: the lab has no name server the guest could reach; offer none
    return [sys.executable, "-m", "passtd", "run", "demo", "--socket", "{SOCK}",
            "-D", "none", "-S", "none", "-t", f"{FORWARDED_PORT}:{GUEST_HTTP_PORT}"]


class StepFailed(Exception):
    """A step ran but did not get the expected result."""


class Steps:
    """Runs the demo's steps and prints one line for each, with timings."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.passed = 0
        self.failed: list[str] = []

    def run(self, title: str, action: Callable[[], str]) -> bool:
        began = time.monotonic()
        try:
            detail, ok = action(), True
        except (StepFailed, *STEP_ERRORS) as e:
            detail, ok = str(e) or type(e).__name__, False
        end = time.monotonic()
        status = "ok" if ok else "FAIL"
        first, *rest = detail.splitlines() or [""]
        head = f"[{end - self.start:6.2f}s] {status:4}  {title:<{TITLE_WIDTH}} "
        print(f"{head}{first}  ({end - began:.2f} s)", flush=True)
        for line in rest:
            print(" " * len(head) + line, flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed.append(title)
        return ok


CLOSE_WAIT = 3.0  # seconds socat waits for the server to close once the request is sent


def http_get(ns: Netns, address: str, port: int) -> tuple[str, str, bool]:
    """GET / from address:port with socat inside `ns`.

    Returns (status line, body, whether the server's close arrived within CLOSE_WAIT).
    The request is not followed by a half-close (`shut-none`), as with any HTTP client.
    """
    target = f"TCP6:[{address}]:{port}" if ":" in address else f"TCP4:{address}:{port}"
    request = f"GET / HTTP/1.0\r\nHost: {address}\r\nUser-Agent: passtd-demo\r\n\r\n"
    began = time.monotonic()
    # bytes, not text: universal newlines would turn the header's CRLFs into LFs
    res = ns.run(["socat", "-t", str(CLOSE_WAIT), "-T", "10", "-", f"{target},shut-none"],
                 input=request.encode(), text=False, timeout=20)
    closed = time.monotonic() - began < CLOSE_WAIT
    if res.returncode != 0 or not res.stdout:
        raise StepFailed(f"socat {target}: status {res.returncode}, "
                         f"{res.stderr.decode(errors='replace').strip() or 'no answer'}")
    head, _, body = res.stdout.decode(errors="replace").partition("\r\n\r\n")
    return head.splitlines()[0], body, closed


def fetch_step(ns: Netns, address: str, port: int, want: str) -> Callable[[], str]:
    def fetch() -> str:
        status, body, closed = http_get(ns, address, port)
        if " 200 " not in status or body != want:
            raise StepFailed(f"got {status!r}, body {body[:80]!r}")
        url = f"http://{address}:{port}/"
        late = "" if closed else f"\n(the server's close did not arrive within {CLOSE_WAIT:g} s)"
        return f"GET {url} -> {status}, {body.strip()!r}{late}"

    return fetch


def ping_step(guest: TapGuest, address: str) -> Callable[[], str]:
    def ping() -> str:
        res = guest.run(["busybox", "ping", "-c", "3", "-i", "0.2", "-W", "2", address],
                        timeout=20)
        counts = re.search(r"(\d+) packets transmitted, (\d+) packets received", res.stdout)
        rtt = re.search(r"min/avg/max = (\S+) ms", res.stdout)
        summary = f"{counts[2]}/{counts[1]} replies" if counts else "no summary"
        if res.returncode != 0:
            raise StepFailed(f"{address}: {summary} {res.stderr.strip()}")
        return f"{address}: {summary}, round trip min/avg/max {rtt[1] if rtt else '?'} ms"

    return ping


def describe_lease(guest: TapGuest) -> str:
    lease = guest.lease
    if lease is None or not guest.ip4:
        raise StepFailed("the guest got no lease")
    seconds = "infinite" if lease.lease_time == 0xFFFFFFFF else f"{lease.lease_time} s"
    ip6 = f"{guest.ip6}/{guest.prefix6} via {guest.gw6}" if guest.ip6 else "none"
    return (f"address {guest.ip4}/{guest.prefix4}, router {lease.router}, MTU {lease.mtu}, "
            f"DNS {', '.join(lease.dns) or 'none'}, lease {seconds}\n"
            f"server {lease.server_id}; IPv6 by SLAAC: {ip6}")


def write_page(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "index.html").write_text(text)
    return directory


def web_server(ns: Netns, bind: str, port: int, directory: Path) -> None:
    ns.spawn([sys.executable, "-m", "passtd.tools.lab_http", "--bind", bind, "--port",
              str(port), "--directory", str(directory)], log=ns.workdir / f"http-{port}.log")
    ns.wait_listening(port)


def show_logs(prog: Program | None, guest: TapGuest | None) -> None:
    logs = {} if prog is None else {f"program ({prog.name})": prog.log}
    if guest is not None:
        logs.update(guest.logs)
    for title, path in logs.items():
        try:
            lines = path.read_text(errors="replace").splitlines()[-20:]
        except OSError:
            continue
        print(f"--- {title}: {path} (last {len(lines)} lines)")
        for line in lines:
            print(f"    {line}")


class Demo:
    """The demo's lab, program, servers and guest, and the steps that use them."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.steps = Steps()
        self.host = HostNamespace(PREFIX)
        self.program: Program | None = None
        self.guest: TapGuest | None = None

    def run(self, keep_going: bool) -> bool:
        """Run every step; with `keep_going`, then wait for Ctrl-C. True if all worked."""
        run = self.steps.run
        if (run("lab", self.lab_up)
                and run("program under test", self.start_program)
                and run("web server on host", self.start_host_server)
                and run("guest up (qemu hub)", self.start_guest)):
            self.guest_steps()
        failed = self.steps.failed
        print(f"\n{self.steps.passed} steps ok, {len(failed)} failed"
              + (f": {', '.join(failed)}" if failed else ""), flush=True)
        if failed:
            show_logs(self.program, self.guest)
        if keep_going and self.program is not None and self.guest is not None:
            self.wait_for_interrupt(self.program, self.guest)
        return not failed

    def lab_up(self) -> str:
        h = self.host.up()
        return (f"{h.name}: eth0 {h.ip4}/{h.prefix4} {h.ip6}/{h.prefix6}, "
                f"uplink {h.up_name} (dead end)")

    def start_program(self) -> str:
        self.program = self.host.start_program(self.argv, name="demo", env=passtd_env())
        return f"pid {self.program.pid}, listening on {self.program.socket}"

    def start_host_server(self) -> str:
        web_server(self.host, "127.0.0.1", HOST_HTTP_PORT,
                   write_page(self.host.workdir / "www", HOST_PAGE))
        return f"http://127.0.0.1:{HOST_HTTP_PORT}/ in {self.host.name}"

    def start_guest(self) -> str:
        self.guest = TapGuest(self.host, self.host.socket_path("demo"), wire="qemu").up()
        return f"{self.guest.name}: {self.guest.iface} <-> qemu hub <-> {self.guest.socket}"

    def guest_steps(self) -> None:
        guest, run = self.guest, self.steps.run
        assert guest is not None
        run("DHCP lease", lambda: describe_lease(guest))
        for gateway in (guest.gw4, guest.gw6_scoped):
            if gateway:
                run("ping gateway", ping_step(guest, gateway))
        gateway = guest.gw4 or guest.gw6_scoped
        if gateway:  # without one, the lease step failed already
            run("HTTP guest -> host", fetch_step(guest, gateway, HOST_HTTP_PORT, HOST_PAGE))

        def start_guest_server() -> str:
            web_server(guest, "::", GUEST_HTTP_PORT,
                       write_page(guest.workdir / "www", GUEST_PAGE))
            return f"http://[::]:{GUEST_HTTP_PORT}/ in {guest.name}"

        if run("web server in guest", start_guest_server):
            run("HTTP host -> guest",
                fetch_step(self.host, "127.0.0.1", FORWARDED_PORT, GUEST_PAGE))

    def wait_for_interrupt(self, program: Program, guest: TapGuest) -> None:
        host = self.host
        print(f"""
The lab stays up until Ctrl-C. To look around:
  ip netns exec {guest.name} ip addr                  # the guest's view
  ip netns exec {guest.name} busybox ping {guest.gw4}
  ip netns exec {guest.name} socat - TCP4:{guest.gw4}:{HOST_HTTP_PORT}
  ip netns exec {host.name} socat - TCP4:127.0.0.1:{FORWARDED_PORT}
  ip netns exec {host.name} ss -tanp                  # the program's sockets
program log: {program.log}
wire log:    {guest.wire_log}""", flush=True)
        while True:
            time.sleep(3600)


def run_demo(prog: list[str] | None = None, *, keep_going: bool = False) -> int:
    """Run the demo; return 0 if every step worked, else 1 (130 if interrupted early).

    With `keep_going`, Ctrl-C is how the demo ends: the status is that of the steps."""
    argv = prog or default_prog()
    missing = missing_requirements(["socat", "qemu-system-x86_64"])
    if missing:
        print("passtd demo cannot run here: " + "; ".join(missing), file=sys.stderr)
        return 1
    print(f"passtd demo: {shlex.join(argv)}\n"
          f"in an isolated lab: namespaces {PREFIX}-host, {PREFIX}-up (dead end), "
          f"{PREFIX}-guest\n", flush=True)
    demo = Demo(argv)
    try:
        ok = demo.run(keep_going)
    except KeyboardInterrupt:
        print("\ninterrupted")
        if not keep_going:
            return 130
        ok = not demo.steps.failed
    finally:
        demo.host.down()
        print("lab removed", flush=True)
    return 0 if ok else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="passtd demo", description=__doc__.splitlines()[0])
    ap.add_argument("--keep-going", action="store_true",
                    help="keep the lab up until Ctrl-C and show how to enter it")
    # hidden: run another program (e.g. the reference passt); {SOCK} is its socket path
    ap.add_argument("--prog", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on SIGTERM as on Ctrl-C
    return run_demo(shlex.split(args.prog) if args.prog else None, keep_going=args.keep_going)


if __name__ == "__main__":
    sys.exit(main())
