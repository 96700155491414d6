"""Private D-Bus daemons for the tests: nothing touches the host's bus.

`PrivateBus.system_like(dir)` runs dbus-daemon with Debian's own system.conf, edited only
where it must be (no fork, no syslog, no setuid helper, no user switch, its socket and pid
file in `dir`, only `dir/system.d` included) and the project's REAL policy file copied
into that system.d: the policy is enforced as on a real host, `<deny own="*"/>` included.

`PrivateBus.open_bus(dir)` is a session-like bus any user may connect to and own names on,
for an instance that runs as nobody (the real policy rightly refuses it a name).

`dir` must be traversable by nobody (clients run as uid 65534 too): the caller makes it.
Processes are ended by their pid; the daemons never fork.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POLICY_FILE = REPO / "dbus" / "org.passtd.Passtd1.conf"
SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")

OPEN_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def system_like_config(system_conf: str, directory: Path) -> str:
    """Debian's system.conf made private: run as the caller, in the foreground, listening
    in `directory` with its pid file and service directory there, and without the host's
    policy directories (the tests add the project's policy)."""
    socket = directory / "system_bus_socket"
    edits = [
        ("<user>messagebus</user>", ""),
        ("<fork/>", ""),
        ("<syslog/>", ""),
        ("<pidfile>/run/dbus/pid</pidfile>", f"<pidfile>{directory}/pid</pidfile>"),
        ("unix:path=/run/dbus/system_bus_socket", f"unix:path={socket}"),
        ("<standard_system_servicedirs/>", f"<servicedir>{directory}/services</servicedir>"),
        ("<includedir>/etc/dbus-1/system.d</includedir>", ""),
        ('<include ignore_missing="yes">/etc/dbus-1/system.conf</include>', ""),
        ('<include ignore_missing="yes">/etc/dbus-1/system-local.conf</include>', ""),
    ]
    text = system_conf
    for old, new in edits:
        if old not in text:
            raise ValueError(f"system.conf changed: {old!r} not found")
        text = text.replace(old, new)
    lines = [line for line in text.splitlines() if "<servicehelper>" not in line]
    return "\n".join(lines) + "\n"


class PrivateBus:
    """One dbus-daemon of ours; `address` is what DBUS_*_BUS_ADDRESS should say."""

    def __init__(self, directory: Path, config: Path) -> None:
        self.directory = directory
        self.config = config
        self.log = directory / "dbus-daemon.log"
        self.socket = directory / f"{config.stem}_socket"
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    @classmethod
    def system_like(cls, directory: Path) -> PrivateBus:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "services").mkdir(exist_ok=True)
        (directory / "system.d").mkdir(exist_ok=True)
        shutil.copy(POLICY_FILE, directory / "system.d" / POLICY_FILE.name)
        config = directory / "system.conf"  # <includedir>system.d</includedir> is relative
        config.write_text(system_like_config(SYSTEM_CONF.read_text(), directory))
        bus = cls(directory, config)
        bus.socket = directory / "system_bus_socket"
        return bus

    @classmethod
    def open_bus(cls, directory: Path) -> PrivateBus:
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "open.conf"
        bus = cls(directory, config)
        config.write_text(OPEN_CONF.format(socket=bus.socket))
        return bus

    def start(self) -> PrivateBus:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["dbus-daemon", f"--config-file={self.config}", "--nofork", "--print-address=1"],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()  # printed once the socket listens
        if not line:
            self.stop()
            raise RuntimeError(f"dbus-daemon did not start: {self.log.read_text()}")
        self.address = line
        return self

    def reload(self) -> None:
        """Make the daemon read its configuration again (what `ReloadConfig` does)."""
        assert self.proc is not None
        subprocess.run(["busctl", f"--address={self.address}", "call", "org.freedesktop.DBus",
                        "/org/freedesktop/DBus", "org.freedesktop.DBus", "ReloadConfig"],
                       check=True, capture_output=True, timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
