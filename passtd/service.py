"""One passtd process per VM: configuration to engine, sockets, systemd, signals.

Design: `run` turns an InstanceConfig into EngineSettings (reading the host's addresses
and resolvers once, as passt does), finds its sockets, starts the engine on a MainLoop
(engine/mainloop.py), exports the D-Bus API when a bus is configured and reachable (then
asyncio's loop runs the MainLoop: dbus-fast needs asyncio, and only then is it imported),
tells systemd it is ready, and waits for a signal:

- Sockets: systemd's socket activation (LISTEN_FDS, the `passtd@.socket` unit) gives the
  listening socket; without it we bind `socket` ourselves (refusing to steal a path another
  instance serves). A qemu connection kept in systemd's file-descriptor store (FDNAME
  `qemu`) is adopted on start: qemu 7.2 never reconnects its stream netdev, so a restart
  of the service must not drop the guest's NIC.
- sd_notify (READY=1, STATUS=, RELOADING=1, FDSTORE=1) is a few lines of pure Python; no
  libsystemd binding is needed and none is used.
- SIGTERM/SIGINT end the instance cleanly; SIGHUP reloads the configuration: forwards
  added or removed in the files are applied, a config that does not load is refused with
  a log line and the running one stays.
- Live flows survive a restart: under systemd, an instance that stops hands its flows'
  sockets, its forwards' listeners and their state to the FD store (fd_handover.py,
  engine/handover.py) and the next process takes them over; systemd cannot tell us
  whether a stop is a restart, so every stop under systemd hands over, and on a real
  stop systemd closes what it kept. Without systemd, SIGUSR2 does the same by
  re-executing the `passtd` executable in place (an upgrade of a foreground instance).
- Runtime forwards (added over D-Bus) are kept in STATE_DIR/NAME.forwards.json so they
  survive a restart of the service (not a reboot: /run is volatile, on purpose). STATE_DIR
  is $PASSTD_STATE_DIR, else the runtime directory ($PASSTD_RUNTIME_DIR, /run/passtd);
  the unit sets it apart because its unprivileged user may not write /run/passtd.

Not done here: dropping privileges and sandboxing (the systemd unit does it; passt's own
namespace tricks are not reproduced), daemonising (systemd supervises us).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import resource
import signal
import socket
import stat
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from . import config as config_mod
from . import engine as engine_package
from . import fd_handover, journal
from .config import ConfigError, InstanceConfig
from .engine import addrs, checksum, events, netlink, tcp_buf, tcp_run
from .engine.addrs import Ip4Config, Ip6Config, NetConfig
from .engine.flow import addr_text
from .engine.forwards import ForwardError
from .engine.fwd import (
    ForwardRule,
    SpecError,
    format_rule,
    parse_spec,
    read_ephemeral_range,
    read_reserved_ports,
)
from .engine.handover import close_all as close_sockets
from .engine.loop import Engine
from .engine.mainloop import MainLoop
from .engine.settings import EngineSettings
from .engine.udp import SourcePortRule
from .names import runtime_dir
from .qemu_peer import CgroupPeerCheck

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("passtd")

SD_LISTEN_FDS_START = 3
FD_NAME_LISTEN = "listen"
FD_NAME_LISTEN_OWN = "listen-own"  # a re-exec's: the socket it bound itself (unlinked at exit)
FD_NAME_QEMU = "qemu"
FD_NAME_PARTIAL = "qemu-partial"  # the start of a frame qemu was writing when we stopped
# The FD store keeps (passtd@.service's FileDescriptorStoreMax): qemu, qemu-partial, state,
# and the bundles of flow sockets and listeners: at most MAX_BUNDLES of them, enough for
# limits.max_flows + limits.max_listeners at their largest defaults (65536 + 65536 =
# 131072 descriptors = 9 bundles of 16192, fd_handover.BUNDLE_FDS).
MAX_BUNDLES = 9


class StartError(Exception):
    """The instance cannot start; the message says why, for the admin."""


class Runner(Protocol):
    """The loop that runs the instance: its MainLoop, or with the bus asyncio's on it."""

    def run_forever(self) -> None: ...

    def stop(self) -> None: ...


# -- systemd protocol, pure Python -----------------------------------------------------------


def sd_notify(message: str, fds: list[int] | None = None) -> bool:
    """Send a notification to systemd (no-op without NOTIFY_SOCKET)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            if fds:
                socket.send_fds(sock, [message.encode()], fds)
            else:
                sock.sendall(message.encode())
    except OSError as e:
        log.warning("sd_notify(%s) failed: %s", message.split("\n")[0], e)
        return False
    return True


def listen_fds() -> dict[str, list[int]]:
    """File descriptors passed by systemd, by name (LISTEN_FDS, LISTEN_FDNAMES)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    found: dict[str, list[int]] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) and names[i] else "unknown"
        os.set_inheritable(fd, False)
        found.setdefault(name, []).append(fd)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return found


# -- configuration to engine settings --------------------------------------------------------


def _packed(addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bytes | None:
    return addr.packed if addr is not None else None


def engine_settings(cfg: InstanceConfig, host: addrs.HostAddresses | None = None,
                    resolv_conf: str = "/etc/resolv.conf") -> EngineSettings:
    """Resolve "the host's" defaults and build what the engine runs with."""
    if host is None:
        try:
            host = netlink.discover_host(cfg.interface)
        except (OSError, ValueError) as e:
            raise StartError(f"cannot read the host's addresses over netlink: {e}") from e
    if cfg.dns == "host" or cfg.search == "host":
        servers, host_search = addrs.read_resolv_conf(resolv_conf)
    else:
        servers, host_search = [], []
    dns = servers if cfg.dns == "host" else list(cfg.dns)
    search = tuple(host_search) if cfg.search == "host" else tuple(cfg.search)
    dns_redirect: dict[bytes, str] = {}

    ip4 = None
    if cfg.ipv4.enabled:
        address = cfg.ipv4.address or (host.addr4.ip if host.addr4 else None)
        prefix = cfg.ipv4.prefix_len or (host.addr4.network.prefixlen if host.addr4 else None)
        gateway = cfg.ipv4.gateway or host.gateway4
        if address is None or gateway is None or prefix is None:
            log.warning("IPv4 disabled: the host has no IPv4 default route and address "
                        "(set ipv4.address and ipv4.gateway to use IPv4 anyway)")
        else:
            dns4 = _guest_dns(dns, 4, gateway, cfg.map_host_loopback, dns_redirect)
            ip4 = Ip4Config(
                address=address.packed,
                prefix_len=prefix,
                gateway=gateway.packed,
                dns=dns4,
                map_host_loopback=gateway.packed if cfg.map_host_loopback else None,
                map_guest_addr=_packed(cfg.map_guest_addr)
                if cfg.map_guest_addr and cfg.map_guest_addr.version == 4 else None,
            )
    ip6 = None
    if cfg.ipv6.enabled:
        address6 = cfg.ipv6.address or (host.addr6.ip if host.addr6 else None)
        prefix6 = cfg.ipv6.prefix_len or (host.addr6.network.prefixlen if host.addr6 else 64)
        gateway6 = cfg.ipv6.gateway or host.gateway6
        if address6 is None and gateway6 is None:
            log.warning("IPv6 disabled: the host has no IPv6 default route and address "
                        "(set ipv6.address and ipv6.gateway to use IPv6 anyway)")
        else:
            # NDP and DHCPv6 must speak from a link-local address (RFC 4861 6.1.2)
            if gateway6 is None or not gateway6.is_link_local:
                our_ll = addrs.IP6_GATEWAY_LL_DEFAULT
            else:
                our_ll = gateway6
            dns6 = _guest_dns(dns, 6, our_ll, cfg.map_host_loopback, dns_redirect)
            ip6 = Ip6Config(
                address=_packed(address6),
                prefix_len=prefix6 if address6 is not None else 64,
                gateway=our_ll.packed,
                dns=dns6,
                map_host_loopback=our_ll.packed if cfg.map_host_loopback else None,
                map_guest_addr=_packed(cfg.map_guest_addr)
                if cfg.map_guest_addr and cfg.map_guest_addr.version == 6 else None,
            )
    if ip4 is None and ip6 is None:
        raise StartError("neither IPv4 nor IPv6 is usable: configure ipv4/ipv6 addresses "
                         "and gateways, or give the host a default route")
    net = NetConfig(mac=cfg.mac, mtu=cfg.mtu, ip4=ip4, ip6=ip6, search=search,
                    hostname=cfg.hostname, host_ifname=host.ifname)
    return EngineSettings(
        net=net,
        tcp_forwards=cfg.tcp_forwards,
        udp_forwards=cfg.udp_forwards,
        pcap=cfg.pcap,
        pcap_size=cfg.limits.pcap_size,
        dhcp=cfg.dhcp and ip4 is not None,
        ndp=cfg.ndp,
        dhcpv6=cfg.dhcpv6,
        ra=cfg.ra,
        udp_timeout=cfg.timeouts.udp,
        udp_stream_timeout=cfg.timeouts.udp_stream,
        icmp_timeout=cfg.timeouts.icmp,
        tcp_idle_timeout=cfg.timeouts.tcp_idle,
        max_flows=cfg.limits.max_flows,
        max_listeners=cfg.limits.max_listeners,
        tcp_sndbuf=cfg.limits.tcp_sndbuf,
        udp_port_rule=SourcePortRule(read_ephemeral_range(), read_reserved_ports()),
        udp_preserved_ports=cfg.limits.udp_preserved_ports,
        host_addr4=host.addr4.ip.packed if host.addr4 else None,
        host_addr6=host.addr6.ip.packed if host.addr6 else None,
        dns_redirect=dns_redirect,
    )


def _guest_dns(nameservers: list[addrs.IPAddress], version: int, gateway: addrs.IPAddress,
               map_host_loopback: bool, redirect: dict[bytes, str]) -> tuple[bytes, ...]:
    """The nameservers told to the guest for one family (addrs.guest_dns); adds the DNS
    redirections they need to `redirect`."""
    found = addrs.guest_dns(nameservers, version, gateway, map_host_loopback)
    for server in found.unreachable:
        log.warning("nameserver %s is on the host's loopback, which the guest cannot reach "
                    "with map_host_loopback off (--no-map-gw): not offered to the guest",
                    server)
    redirect.update(found.redirect)
    return found.servers


def describe_network(net: NetConfig) -> str:
    parts = []
    if net.ip4:
        parts.append(f"IPv4 {addr_text(net.ip4.address)}/{net.ip4.prefix_len} "
                     f"gw {addr_text(net.ip4.gateway)}")
    if net.ip6:
        a6 = addr_text(net.ip6.address) if net.ip6.address else "SLAAC only"
        parts.append(f"IPv6 {a6} gw {addr_text(net.ip6.gateway)}")
    parts.append(f"MTU {net.mtu or 'not advertised'}")
    return ", ".join(parts)


# -- sockets ---------------------------------------------------------------------------------


def bind_listener(path: str) -> socket.socket:
    """Our own listening socket at `path` (no socket activation)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise StartError(f"{path} exists and is not a socket: refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens there any more
        else:
            raise StartError(f"{path} is in use by another process (another instance?)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o660)
        sock.listen(4)
    except OSError as e:
        sock.close()
        raise StartError(f"cannot listen on {path}: {e.strerror}") from e
    return sock


# -- the instance ----------------------------------------------------------------------------


class Instance:
    """A running instance: its config, engine, bus export, and what systemd must know."""

    def __init__(self, cfg: InstanceConfig, reload_config: Callable[[], InstanceConfig]) -> None:
        self.cfg = cfg
        self.reload_config = reload_config
        self.engine: Engine | None = None
        self.bus: Any = None
        self.listener: socket.socket | None = None
        self.own_socket_path: str | None = None
        self.stored_client: socket.socket | None = None  # the qemu socket in the FD store
        self.reexec = False  # SIGUSR2: the instance goes on in a new executable
        self.stopping = False
        self._stop_runner: Callable[[], None] = lambda: None  # run() sets it
        self.runtime_dir = runtime_dir()
        self.state_dir = os.environ.get(config_mod.STATE_DIR_ENV) or self.runtime_dir

    @property
    def forwards_file(self) -> str:
        return os.path.join(self.state_dir, f"{self.cfg.name}.forwards.json")

    def run(self, main: MainLoop, bus_api: Any = None,
            aloop: asyncio.AbstractEventLoop | None = None) -> int:
        """Start the engine on `main`, serve until a stop signal, close. With the D-Bus API
        (`bus_api`, load_bus_api's), asyncio's loop `aloop` runs `main` (aioloop.py)."""
        runner: Runner = aloop if aloop is not None else main
        self._stop_runner = runner.stop
        settings = engine_settings(self.cfg)
        log.info("instance %s: %s", self.cfg.name, describe_network(settings.net))
        fds = listen_fds()
        handed = [name for name in fds if name == fd_handover.FD_NAME_STATE
                  or name.startswith(fd_handover.FD_NAME_BUNDLE)]
        state, inherited = fd_handover.take(fds)
        for name in handed:  # taken: the store must not hand them over a second time
            sd_notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
        kept = fds.pop(FD_NAME_QEMU, [])
        partial = _read_and_forget(fds.pop(FD_NAME_PARTIAL, []))
        own = fds.pop(FD_NAME_LISTEN_OWN, [])
        listening = own + [fd for group in fds.values() for fd in group]
        if listening:
            self.listener = socket.socket(fileno=listening[0])
            if own:
                self.own_socket_path = self.cfg.socket
            log.info("using the socket passed by %s (%s)", "the previous process" if own
                     else "systemd", _sock_name(self.listener))
            for extra in listening[1:]:
                os.close(extra)
        else:
            self.listener = bind_listener(self.cfg.socket)
            self.own_socket_path = self.cfg.socket
            log.info("listening for qemu on %s", self.cfg.socket)
        engine = Engine(settings, main)
        self.engine = engine
        if state is not None:
            engine.inherit(state, inherited)
        else:
            close_sockets(inherited, reset=True)
        engine.on_client = self._client_changed
        if self.cfg.qemu_cgroup is not None:
            engine.accept_peer = CgroupPeerCheck(self.cfg.qemu_cgroup)
            log.info("adopting qemu only from cgroup %s", self.cfg.qemu_cgroup)
        try:
            engine.start(self.listener)
        except ForwardError as e:
            engine.close()
            raise StartError(f"forward: {e}") from e
        self._restore_runtime_forwards()
        for fd in kept[:1]:
            client = socket.socket(fileno=fd)
            if _is_connected(client):
                log.info("resuming the qemu connection kept by systemd across the restart")
                self.stored_client = client  # systemd holds it already: don't store it twice
                engine.adopt_client(client, partial)
            else:
                client.close()
                sd_notify(f"FDSTOREREMOVE=1\nFDNAME={FD_NAME_QEMU}")
        for fd in kept[1:]:
            os.close(fd)
        engine.resume_inherited()

        if bus_api is not None and aloop is not None:
            aloop.run_until_complete(self._export_bus(bus_api))
        for sig in (signal.SIGTERM, signal.SIGINT):
            main.add_signal_handler(sig, self.stop)
        main.add_signal_handler(signal.SIGHUP, self._reload)
        main.add_signal_handler(signal.SIGUSR2, self._reexec_requested)
        sd_notify(f"READY=1\nSTATUS={engine.summary()}")
        log.info("instance %s ready", self.cfg.name)
        missing = [what for engine, what in (
            (checksum.ENGINE, "_csum.c: checksums, slower and ~15 MiB larger"),
            (tcp_run.ENGINE, "_tcp_run.c: guest->host runs, more CPU"),
            (tcp_buf.ENGINE, "_tcp_buf.c: host->guest frames, more CPU and latency"),
            ("native" if engine_package.COMPILED else "python",
             f"the compiled engine (mypyc), {engine_package.INTERPRETED_WHY}: more CPU and "
             "latency per packet")) if engine != "native"]
        if engine_package.NATIVE_WANTED and missing:
            log.warning("native parts not built here, their pure-Python paths run instead "
                        "(./setup.sh builds them; they need gcc and python3-dev): %s",
                        "; ".join(missing))
        runner.run_forever()
        log.info("instance %s stopping", self.cfg.name)
        sd_notify("STOPPING=1")
        if self.bus is not None and aloop is not None:
            with contextlib.suppress(Exception):
                aloop.run_until_complete(self.bus.close())
        self._close()
        return 0

    def stop(self) -> None:
        """End run() (SIGTERM, SIGINT, SIGUSR2): once; a second signal while the instance
        closes (its bus connection, asyncio's tasks) must not cut that short."""
        if not self.stopping:
            self.stopping = True
            self._stop_runner()

    def load_bus_api(self) -> Any:
        """The D-Bus module, imported before the flows are taken over: its import takes
        tens of milliseconds that a restart would otherwise add to the guest's pause."""
        if self.cfg.bus == "none":
            return None
        try:
            from . import dbus_api
        except Exception as e:  # pragma: no cover - a broken dbus-fast must not stop the guest
            log.warning("D-Bus API unavailable (%s); running without it", e)
            return None
        return dbus_api

    async def _export_bus(self, dbus_api: Any) -> None:
        try:  # a bus that is not there yet is retried in the background
            self.bus = await dbus_api.export(self)
            if self.engine is not None:  # straight to the API: no call through here
                self.engine.news.on_change = self.bus.properties_changed
                self.engine.news.on_events = self.bus.engine_events
        except Exception as e:  # the data path must not depend on the bus
            log.error("D-Bus API not available on the %s bus: %s; running without it",
                      self.cfg.bus, e)

    def _close(self) -> None:
        if self.reexec:
            self._reexec()  # returns only if the new executable could not be run
        if self.engine is not None and not self.engine.closed:
            if os.environ.get("NOTIFY_SOCKET"):
                self._hand_over_to_systemd(self.engine)
            if self.stored_client is not None:
                self._store_partial_frame(self.engine.partial_input())
            self.engine.close()
        if self.listener is not None:
            self.listener.close()
        if self.own_socket_path:
            with contextlib.suppress(OSError):
                os.unlink(self.own_socket_path)

    # -- handing live flows to the next process ------------------------------------------------

    def _hand_over_to_systemd(self, engine: Engine) -> None:
        """Flows, listeners and their state into the FD store, for the next process
        (the module docstring says why every stop does it)."""
        def carry(socks: list[socket.socket]) -> int:
            bundles, sent = fd_handover.pack(socks, MAX_BUNDLES)
            for i, (name, bundle) in enumerate(zip(fd_handover.bundle_names(len(bundles)),
                                                  bundles, strict=True)):
                if not sd_notify(f"FDSTORE=1\nFDNAME={name}", [bundle.fileno()]):
                    sent = min(sent, i * fd_handover.BUNDLE_FDS)
                    break
            for bundle in bundles:
                bundle.close()
            return sent

        flows = engine.flow_count
        try:
            fd = fd_handover.write_memfd("passtd-state", engine.hand_over(carry))
        except OSError as e:
            log.error("cannot hand the flows over to the next process: %s", e)
            return
        try:
            if sd_notify(f"FDSTORE=1\nFDNAME={fd_handover.FD_NAME_STATE}", [fd]):
                log.info("handing %d flows and %d forwards over to the next process",
                         flows, len(engine.forwards),
                         extra=events.fields(events.FLOWS_HANDED_OVER))
        finally:
            os.close(fd)

    def _reexec_requested(self) -> None:
        log.info("SIGUSR2: handing the instance over to a new passtd process")
        self.reexec = True
        self.stop()

    def _reexec(self) -> None:
        """Run the `passtd` executable as it is on disk now in this process, handing it
        the qemu socket, the listening socket, the flows and their state (fd_handover.py)."""
        engine = self.engine
        assert engine is not None and self.listener is not None
        bundles: list[socket.socket] = []

        def carry(socks: list[socket.socket]) -> int:
            made, sent = fd_handover.pack(socks, MAX_BUNDLES)
            bundles.extend(made)
            return sent

        named = [(FD_NAME_LISTEN_OWN if self.own_socket_path else FD_NAME_LISTEN,
                  self.listener.fileno())]
        try:
            if self.stored_client is not None:
                named.append((FD_NAME_QEMU, self.stored_client.fileno()))
                partial = engine.partial_input()
                if partial:
                    named.append((FD_NAME_PARTIAL,
                                  fd_handover.write_memfd("passtd-partial-frame", partial)))
            named.append((fd_handover.FD_NAME_STATE,
                          fd_handover.write_memfd("passtd-state", engine.hand_over(carry))))
            named += zip(fd_handover.bundle_names(len(bundles)),
                         [bundle.fileno() for bundle in bundles], strict=True)
            engine.close()
            log.info("re-executing %s", " ".join(sys.orig_argv))
            fd_handover.reexec(named, sys.orig_argv)
        except OSError as e:
            log.error("cannot re-execute passtd (%s): the instance stops", e)

    # -- engine callbacks ----------------------------------------------------------------------

    def _client_changed(self, sock: socket.socket | None) -> None:
        """Keep qemu's connection in systemd's FD store while it lasts (see the docstring)."""
        if sock is None:
            self.stored_client = None
            sd_notify(f"FDSTOREREMOVE=1\nFDNAME={FD_NAME_QEMU}")
        elif sock is not self.stored_client:
            self.stored_client = sock
            sd_notify(f"FDSTORE=1\nFDNAME={FD_NAME_QEMU}", [sock.fileno()])
        self._status()

    def _status(self) -> None:
        if self.engine is not None:
            sd_notify(f"STATUS={self.engine.summary()}")

    def _store_partial_frame(self, data: bytes) -> None:
        """qemu writes frames in pieces when its socket is full, and a stop may fall between
        two pieces: the next process, which gets the connection from the FD store, must
        also get the first piece, or it would read the second one as a length and drop
        qemu (whose 7.2 stream netdev never reconnects). A memfd carries it over."""
        if not data:
            return
        fd = os.memfd_create("passtd-partial-frame", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            if sd_notify(f"FDSTORE=1\nFDNAME={FD_NAME_PARTIAL}", [fd]):
                log.info("handing %d bytes of a frame qemu is writing to the next process",
                         len(data))
        finally:
            os.close(fd)

    # -- runtime forwards ----------------------------------------------------------------------

    def add_runtime_forward(self, rule: ForwardRule) -> int:
        assert self.engine is not None
        fwd = self.engine.add_forward(rule, "runtime")
        self._save_runtime_forwards()
        return fwd.id

    def remove_forward(self, forward_id: int) -> None:
        assert self.engine is not None
        fwd = self.engine.remove_forward(forward_id)
        if fwd.origin == "runtime":
            self._save_runtime_forwards()

    def _save_runtime_forwards(self) -> None:
        assert self.engine is not None
        entries = [{"proto": f.rule.proto, "spec": format_rule(f.rule)}
                   for f in self.engine.forwards_from("runtime")]
        tmp = self.forwards_file + ".tmp"
        try:
            os.makedirs(self.state_dir, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(entries, f)
            os.replace(tmp, self.forwards_file)
        except OSError as e:
            log.warning("cannot record runtime forwards in %s: %s (they will not survive a "
                        "restart)", self.forwards_file, e)

    def _restore_runtime_forwards(self) -> None:
        assert self.engine is not None
        try:
            with open(self.forwards_file, encoding="utf-8") as f:
                entries = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("ignoring %s: %s", self.forwards_file, e)
            return
        for entry in entries if isinstance(entries, list) else []:
            try:
                for rule in parse_spec(str(entry["spec"]), str(entry["proto"])):
                    fwd = self.engine.add_forward(rule, "runtime")
                    log.info("restored runtime forward %d (%s)", fwd.id, entry["spec"])
            except (KeyError, TypeError, SpecError, ForwardError) as e:
                log.warning("cannot restore runtime forward %r: %s", entry, e)

    # -- reload --------------------------------------------------------------------------------

    def _reload(self) -> None:
        sd_notify("RELOADING=1")
        try:
            new = self.reload_config()
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            sd_notify(f"READY=1\nSTATUS=reload failed: {e}")
            return
        self._apply_forwards(new)
        if new.log_level != self.cfg.log_level:
            logging.getLogger("passtd").setLevel(new.log_level.upper())
        if new.qemu_cgroup != self.cfg.qemu_cgroup and self.engine is not None:
            # the libvirt hook drops it where libvirt runs qemu in no scope of its own
            log.info("reload: qemu_cgroup is now %s", new.qemu_cgroup or "none (anyone "
                     "who may open the socket is the guest's qemu)")
            self.engine.accept_peer = CgroupPeerCheck(new.qemu_cgroup) \
                if new.qemu_cgroup else None
        changed = [name for name in _fields_differing(self.cfg, new)
                   if name not in ("tcp_forwards", "udp_forwards", "tcp_forward_specs",
                                   "udp_forward_specs", "log_level", "sources",
                                   "qemu_cgroup")]
        if changed:
            log.warning("reload: %s changed; these take effect on the next restart",
                        ", ".join(changed))
        self.cfg = new
        log.info("configuration reloaded")
        sd_notify(f"READY=1\nSTATUS={self.engine.summary() if self.engine else ''}")

    def _apply_forwards(self, new: InstanceConfig) -> None:
        engine = self.engine
        assert engine is not None
        wanted = set(new.tcp_forwards) | set(new.udp_forwards)
        current = {f.rule: f for f in engine.forwards_from("config")}
        for rule, fwd in current.items():
            if rule not in wanted:
                engine.remove_forward(fwd.id)
        for rule in wanted - set(current):
            try:
                engine.add_forward(rule, "config")
            except ForwardError as e:
                log.error("reload: cannot open forward: %s", e)


def _fields_differing(a: InstanceConfig, b: InstanceConfig) -> list[str]:
    return [name for name in a._fields if getattr(a, name) != getattr(b, name)]


def _read_and_forget(fds: list[int]) -> bytes:
    """The content of the memfds the previous process stored (then out of the store)."""
    data = b""
    for fd in fds:
        try:
            data += os.pread(fd, 65536 + 4, 0)
        except OSError as e:
            log.warning("cannot read the frame handed over by the previous process: %s", e)
        finally:
            os.close(fd)
    if fds:
        sd_notify(f"FDSTOREREMOVE=1\nFDNAME={FD_NAME_PARTIAL}")
    return data


def _sock_name(sock: socket.socket) -> str:
    try:
        return str(sock.getsockname()) or "unnamed"
    except OSError:
        return "?"


def _is_connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False  # ENOTCONN: qemu went away while we were down
    return True


def setup_logging(level: str, instance: str) -> None:
    """stderr, or the journal with fields (journal.py) where stderr is the journal."""
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        fmt = "%(levelname)s: %(message)s"  # journald adds time and unit
    else:
        fmt = "%(asctime)s passtd[%(process)d] %(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    if journal.stderr_is_journal():
        handler = journal.JournalHandler(instance, fallback=handler)
        handler.setFormatter(logging.Formatter("%(message)s"))  # PRIORITY says the level
    root = logging.getLogger("passtd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def raise_nofile_limit() -> None:
    """Take the hard RLIMIT_NOFILE as the soft one: every flow and every listener is a
    descriptor, and the soft default of 1024 only exists for select(), which passtd does
    not use (systemd's advice for programs on epoll)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("descriptor limit raised from %d to %d", soft, hard)


def run(cfg: InstanceConfig, reload_config: Callable[[], InstanceConfig]) -> int:
    setup_logging(cfg.log_level, cfg.name)
    raise_nofile_limit()
    instance = Instance(cfg, reload_config)
    bus_api = instance.load_bus_api()
    main = MainLoop()
    try:
        if bus_api is None:
            return instance.run(main)
        import asyncio  # only with the bus: dbus-fast needs it (engine/mainloop.py says why)

        from .engine.aioloop import EngineLoop
        with asyncio.Runner(loop_factory=lambda: EngineLoop(main)) as runner:
            return instance.run(main, bus_api, runner.get_loop())
    except StartError as e:
        log.error("%s", e)
        sd_notify(f"STATUS=failed: {e}")
        return 1
    finally:
        main.close()
