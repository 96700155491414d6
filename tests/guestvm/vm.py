"""Boot the project's test guest under qemu and talk to it.

The guest is a Debian cloud kernel and a busybox initramfs built by build.sh (cached). Each
GuestVM appends a second, small initramfs (the "overlay", a newc cpio written here, so no cpio
binary is needed) carrying the test's script, environment and files, and boots qemu with TCG
(`-accel tcg,thread=multi -cpu max`): KVM is not used even where /dev/kvm exists, because the
machines this runs on may offer only PVM, which cannot run a stock kernel. On two cores a guest
without network powers off after 5-7 s; with DHCP and SLAAC through passt its network is up after
9-13 s, about 3 s of which is the kernel's IPv6 SLAAC (link-up delay, two rounds of duplicate
address detection).

The NIC is virtio-net-pci on qemu's `-netdev stream` (client) to a UNIX socket, which is what
passt and passtd serve. The guest's /init (see `init`) reports on a second serial port, written
to a file that is polled: a `PASSTD_NET key=value ...` line with the network it got, the
script's output, and `PASSTD_EXIT=<status>` before it powers off.

Deliberately not here: KVM, disks, interactive consoles, a QMP monitor.
"""

from __future__ import annotations

import functools
import gzip
import re
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

GUESTVM_DIR = Path(__file__).resolve().parent
BUILD_SCRIPT = GUESTVM_DIR / "build.sh"
QEMU = "qemu-system-x86_64"

# Common to qemu runs and libvirt domains: serial console, and reboot on panic, which both
# turn into the end of the VM (-no-reboot, <on_reboot>destroy).
BASE_CMDLINE = "console=ttyS0 quiet panic=-1"
NET_PREFIX = "PASSTD_NET "
EXIT_RE = re.compile(r"^PASSTD_EXIT=(\d+)$", re.MULTILINE)
PROTOCOL_LINE_RE = re.compile(r"^PASSTD_(NET|NET_DOWN|EXIT)[ =].*\n?", re.MULTILINE)
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CONSOLE_TAIL_LINES = 40
# After the exit marker the guest only has to power off.
POWEROFF_GRACE_S = 10.0
POLL_S = 0.05


class GuestError(RuntimeError):
    """The guest failed: qemu exited early, the guest did not report, or a build failed."""


class GuestTimeout(GuestError, TimeoutError):
    """The guest did not get there in time."""


@functools.cache
def ensure_image() -> tuple[Path, Path]:
    """Build (or find in the cache) the guest; returns (vmlinuz, initramfs)."""
    proc = subprocess.run(
        [str(BUILD_SCRIPT), "--quiet", "--print"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise GuestError(f"{BUILD_SCRIPT} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    vmlinuz, initramfs = proc.stdout.split()
    return Path(vmlinuz), Path(initramfs)


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc ("070701") cpio archive of (path, st_mode, content) entries, owned by root.

    The kernel does not create missing parent directories: callers list them first.
    """
    archive = bytearray()

    def pad4() -> None:
        archive.extend(b"\0" * (-len(archive) % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        nlink = 2 if mode & 0o040000 else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        archive.extend(b"070701" + "".join(f"{f:08X}" for f in fields).encode())
        archive.extend(encoded)
        pad4()
        archive.extend(data)
        pad4()
    return bytes(archive)


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _overlay_entries(
    script: str, env: Mapping[str, str], files: Mapping[str, bytes]
) -> list[tuple[str, int, bytes]]:
    """The overlay: /passtd/script.sh, /passtd/env and the test's files.

    A file's key is its path in the guest; relative keys land in /passtd, the script's working
    directory. Files that look executable (#! or ELF) get mode 0755.
    """
    for name in env:
        if not ENV_NAME_RE.fullmatch(name):
            raise ValueError(f"bad environment variable name {name!r}")
    env_text = "".join(f"{name}={_shell_quote(value)}\n" for name, value in env.items())
    contents: dict[str, bytes] = {
        "passtd/script.sh": script.encode(),
        "passtd/env": env_text.encode(),
    }
    for path, data in files.items():
        guest_path = path.lstrip("/") if path.startswith("/") else f"passtd/{path}"
        if not guest_path or ".." in guest_path.split("/"):
            raise ValueError(f"bad guest file path {path!r}")
        contents[guest_path] = data
    dirs = sorted({str(parent) for p in contents for parent in Path(p).parents} - {"."})
    entries = [(d, 0o040755, b"") for d in dirs]
    for path, data in contents.items():
        executable = path == "passtd/script.sh" or data.startswith((b"#!", b"\x7fELF"))
        entries.append((path, 0o100755 if executable else 0o100644, data))
    return entries


def write_initramfs(
    dest: Path,
    script: str,
    env: Mapping[str, str] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write the guest's initramfs with an overlay carrying script, env and files to dest.

    The kernel unpacks concatenated archives in turn, later files replacing earlier ones. The
    overlay is gzipped too: an uncompressed archive would have to start 4-byte aligned.
    """
    _, base = ensure_image()
    overlay = gzip.compress(_cpio_newc(_overlay_entries(script, env or {}, files or {})), 1)
    with dest.open("wb") as out, base.open("rb") as src:
        shutil.copyfileobj(src, out)
        out.write(overlay)
    return dest


def _qemu_opt(value: str) -> str:
    """Escape a value for qemu's key=value,... option syntax."""
    return value.replace(",", ",,")


def parse_net_line(line: str) -> dict[str, str]:
    """The fields of a `PASSTD_NET key=value ...` line (values may be empty)."""
    fields = line.strip().removeprefix(NET_PREFIX.strip()).split()
    return dict(field.partition("=")[::2] for field in fields)


class GuestVM:
    """One TCG guest running one script; a context manager (start on enter, stop on exit).

    socket_path: the passt/passtd UNIX socket for `-netdev stream`; None boots without a NIC.
    timeout: the whole guest's budget in seconds, counted from start(); wait() and wait_for()
    never wait beyond it, and stop() ends the guest anyway.
    netns: run qemu inside this network namespace (`ip netns exec`). The stream netdev needs
    only the socket path, so this is for tests that confine qemu with the rest of their setup.
    extra_cmdline: more kernel command line, e.g. "passtd.net=static passtd.ip4=..." (see init).
    """

    def __init__(
        self,
        socket_path: str | None,
        script: str,
        *,
        env: dict[str, str] | None = None,
        files: dict[str, bytes] | None = None,
        mac: str = "52:54:00:12:34:56",
        mem_mb: int = 256,
        smp: int = 1,
        timeout: float = 180,
        netns: str | None = None,
        extra_cmdline: str = "",
    ) -> None:
        self.socket_path = socket_path
        self.script = script
        self.env = dict(env or {})
        self.files = dict(files or {})
        self.mac = mac
        self.mem_mb = mem_mb
        self.smp = smp
        self.timeout = timeout
        self.netns = netns
        self.extra_cmdline = extra_cmdline
        self.started_at: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._deadline = 0.0
        # What the files held when stop() removed them.
        self._final: dict[str, str] = {}

    # ---- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> GuestVM:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def cmdline(self) -> str:
        """The kernel command line: without a NIC at boot there is no NIC to wait for."""
        no_nic = "passtd.nic_timeout=0" if self.socket_path is None else ""
        return " ".join(filter(None, (BASE_CMDLINE, no_nic, self.extra_cmdline)))

    def command(self, vmlinuz: Path, initrd: Path, workdir: Path) -> list[str]:
        """The qemu command line (with the `ip netns exec` prefix when netns is set)."""
        cmd = [
            QEMU,
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "pc", "-accel", "tcg,thread=multi", "-cpu", "max",
            "-m", str(self.mem_mb), "-smp", str(self.smp),
            "-kernel", str(vmlinuz), "-initrd", str(initrd),
            "-append", self.cmdline(),
            "-serial", f"file:{workdir / 'console'}",
            "-serial", f"file:{workdir / 'output'}",
        ]  # fmt: skip
        if self.socket_path is not None:
            cmd += [
                "-netdev",
                "stream,id=net0,server=off,addr.type=unix,"
                f"addr.path={_qemu_opt(self.socket_path)}",
                "-device", f"virtio-net-pci,netdev=net0,mac={self.mac}",
            ]  # fmt: skip
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    def start(self) -> None:
        if self._proc is not None:
            raise GuestError("guest already started")
        if shutil.which(QEMU) is None:
            raise GuestError(f"{QEMU} not found (apt-get install qemu-system-x86)")
        vmlinuz, _ = ensure_image()
        workdir = Path(tempfile.mkdtemp(prefix="passtd-guestvm-"))
        self._workdir = workdir
        try:
            initrd = write_initramfs(
                workdir / "initramfs.cpio.gz", self.script, self.env, self.files
            )
            for name in ("console", "output"):
                (workdir / name).touch()
            with (workdir / "qemu.log").open("wb") as log:
                self._proc = subprocess.Popen(
                    self.command(vmlinuz, initrd, workdir),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        except BaseException:
            self.stop()
            raise
        self.started_at = time.monotonic()
        self._deadline = self.started_at + self.timeout

    def stop(self) -> None:
        """Kill qemu if it still runs and remove the temporary files (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._workdir is not None:
            self._final = {name: self._read(name) for name in ("output", "console", "qemu.log")}
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # ---- what the guest said -------------------------------------------------------------

    def _read(self, name: str) -> str:
        if self._workdir is None:
            return self._final.get(name, "")
        try:
            data = (self._workdir / name).read_bytes()
        except FileNotFoundError:
            return ""
        return data.decode(errors="replace").replace("\r", "")

    @property
    def raw_output(self) -> str:
        """Everything on the output channel, protocol lines included."""
        return self._read("output")

    @property
    def output(self) -> str:
        """The script's output (stdout and stderr) without the PASSTD_* protocol lines."""
        return PROTOCOL_LINE_RE.sub("", self.raw_output)

    @property
    def console(self) -> str:
        """Kernel and /init messages (ttyS0)."""
        return self._read("console")

    @property
    def net(self) -> dict[str, str]:
        """The latest PASSTD_NET line's fields: iface ip4 prefix gw4 ip6 gw6 mtu mac dns.

        Empty before the guest configured its network (or when it has none).
        """
        lines = [line for line in self.raw_output.splitlines() if line.startswith(NET_PREFIX)]
        return parse_net_line(lines[-1]) if lines else {}

    def describe(self) -> str:
        """qemu's messages and the console's tail, for error messages."""
        tail = "\n".join(self.console.splitlines()[-CONSOLE_TAIL_LINES:])
        qemu_log = self._read("qemu.log").strip()
        return f"--- qemu ---\n{qemu_log}\n--- console (tail) ---\n{tail}"

    # ---- waiting ------------------------------------------------------------------------------

    def _until(self, timeout: float | None) -> float:
        if self._proc is None:
            raise GuestError("guest not running (start() it first)")
        if timeout is None:
            return self._deadline
        return min(self._deadline, time.monotonic() + timeout)

    def wait_for(self, marker: str, timeout: float) -> str:
        """Wait until a line of the output channel contains marker; returns that line."""
        until = self._until(timeout)
        assert self._proc is not None
        while True:
            # Read before checking qemu's state, so output written just before it exited counts.
            exited = self._proc.poll() is not None
            for line in self.raw_output.splitlines():
                if marker in line:
                    return line
            if exited:
                raise GuestError(
                    f"guest ended before printing {marker!r}\n--- output ---\n"
                    f"{self.raw_output}\n{self.describe()}"
                )
            if time.monotonic() >= until:
                raise GuestTimeout(
                    f"no {marker!r} from the guest after {timeout:g}s\n--- output ---\n"
                    f"{self.raw_output}\n{self.describe()}"
                )
            time.sleep(POLL_S)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the script to end; returns its exit status once the guest powered off."""
        self.wait_for("PASSTD_EXIT=", timeout if timeout is not None else self.timeout)
        assert self._proc is not None
        try:
            self._proc.wait(POWEROFF_GRACE_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        match = EXIT_RE.findall(self.raw_output)
        if not match:
            raise GuestError(f"malformed exit marker in:\n{self.raw_output}\n{self.describe()}")
        return int(match[-1])

    @property
    def elapsed(self) -> float:
        """Seconds since start()."""
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at


def libvirt_domain_xml(
    name: str,
    *,
    uuid: str | None = None,
    extra_cmdline: str = "",
    console_log: str,
    script: str | None = None,
) -> str:
    """A plain <domain type='qemu'> (libvirt 9.0) that direct-boots the test guest.

    No network device: it is hot-plugged later (passtctl libvirt attach), so the guest runs in
    serve mode, configuring eth0 whenever it appears. Everything, script output and PASSTD_*
    lines included, goes to the serial console, written to console_log. With a script, the
    combined initramfs is written next to console_log as <name>.initramfs.cpio.gz.
    Machine "pc" (i440fx), whose ACPI PCI hot-plug needs no spare root ports.
    """
    vmlinuz, initramfs = ensure_image()
    if script is not None:
        initramfs = write_initramfs(
            Path(console_log).parent / f"{name}.initramfs.cpio.gz", script
        )
    cmdline = f"{BASE_CMDLINE} passtd.mode=serve passtd.out=console {extra_cmdline}".strip()

    domain = ET.Element("domain", type="qemu")
    ET.SubElement(domain, "name").text = name
    if uuid is not None:
        ET.SubElement(domain, "uuid").text = uuid
    ET.SubElement(domain, "memory", unit="MiB").text = "256"
    ET.SubElement(domain, "vcpu").text = "1"
    os_el = ET.SubElement(domain, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "kernel").text = str(vmlinuz)
    ET.SubElement(os_el, "initrd").text = str(initramfs)
    ET.SubElement(os_el, "cmdline").text = cmdline
    ET.SubElement(ET.SubElement(domain, "features"), "acpi")
    ET.SubElement(domain, "cpu", mode="maximum", check="none")
    ET.SubElement(domain, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(domain, event).text = "destroy"
    devices = ET.SubElement(domain, "devices")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=console_log)
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="file")
    ET.SubElement(console, "source", path=console_log)
    ET.SubElement(console, "target", type="serial", port="0")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


__all__ = [
    "GuestError",
    "GuestTimeout",
    "GuestVM",
    "ensure_image",
    "libvirt_domain_xml",
    "parse_net_line",
    "write_initramfs",
]
