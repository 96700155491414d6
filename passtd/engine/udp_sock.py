"""The UDP socket half: one connected host socket per guest flow, and forwarded datagrams.

Design (passt's udp.c): a guest datagram to a new (source, destination) opens a flow with
its own host socket, connected to the translated destination (nat.py), so the kernel
filters replies for us and an ICMP port unreachable comes back as ECONNREFUSED, which we
turn into the same ICMP error for the guest. The socket keeps the guest's source port
where udp.py's SourcePortRule allows it and for at most `udp_preserved_ports` flows; other
flows get an ephemeral port. Datagrams arriving at a forward's listener become flows that
answer through that listener (`sockaddr` is the peer), and end with it.

Not done here: flow expiry (udp.py), DHCP and DHCPv6 (the responders, reached before a
flow is considered), GSO/GRO batching (recvmmsg is not in Python's socket module).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import Final

from . import icmp, nat, packet
from .context import EngineContext
from .flow import GUEST, HOST, FlowKey, addr_text
from .forwards import Forward
from .udp import UdpFlow

log = logging.getLogger("passtd.engine")

UDP_BATCH: Final = 64  # datagrams read from one socket per wakeup
UDP_BUFFER: Final = 4 << 20  # a burst of replies must not overflow a flow's receive queue


class UdpSockets:
    def __init__(self, ctx: EngineContext, forward_takes_port: Callable[[int], bool]) -> None:
        self.ctx = ctx
        self._ports_held = 0  # guest flows whose host socket has the guest's source port
        self._forward_takes_port = forward_takes_port  # a UDP forward listens there

    # -- from the guest -----------------------------------------------------------------------

    def guest_datagram(self, pkt: packet.Packet, sport: int, dport: int, payload: memoryview,
                       now: float) -> None:
        key = (packet.IPPROTO_UDP, pkt.src, sport, pkt.dst, dport)
        flow = self.ctx.flows.get(key)
        if not isinstance(flow, UdpFlow):  # (the key's protocol makes any flow one)
            flow = self._open(pkt, key, sport, dport, now)
            if flow is None:
                return
        try:
            if flow.sockaddr is not None:
                flow.sock.sendto(payload, flow.sockaddr)
            else:
                flow.sock.send(payload)
        except (BlockingIOError, InterruptedError):
            self.ctx.drop_log(logging.DEBUG, "udp-full", "host UDP socket full: datagram dropped")
            return
        except OSError as e:
            self.ctx.drop_log(logging.DEBUG, "udp-send", "%r: send: %s", flow, e)
            if e.errno == errno.ECONNREFUSED:
                self._unreachable(flow, now)
            return
        flow.from_guest(len(payload), now)
        self.ctx.schedule(flow)

    def _open(self, pkt: packet.Packet, key: FlowKey, sport: int, dport: int,
              now: float) -> UdpFlow | None:
        ctx = self.ctx

        def unreachable(code4: int, code6: int) -> None:
            quoted = packet.ip_header(pkt.src, pkt.dst, pkt.proto, len(pkt.l4)) \
                + bytes(pkt.l4[:8])
            ctx.link.send(icmp.unreachable_frame(
                pkt.family, code4 if pkt.family == 4 else code6, nat.gateway(ctx.net, pkt.family),
                quoted, ctx.net.mac, pkt.src_mac, pkt.src), now)

        if ctx.flow_limit_reached("new flows"):
            unreachable(icmp.ICMP_ADMIN_PROHIBITED, icmp.ICMPV6_ADMIN_PROHIBITED)
            return None
        target = nat.nat_from_tap(ctx.settings, pkt.family, pkt.dst, dport, nat.interface_index)
        if target is None:
            ctx.drop_log(logging.DEBUG, "udp-dst", "dropped UDP to %s", addr_text(pkt.dst))
            return None
        af = socket.AF_INET if len(target) == 2 else socket.AF_INET6
        try:
            sock = ctx.sockets.datagram(af)
        except OSError as e:
            ctx.drop_log(logging.WARNING, "socket", "cannot open a UDP socket: %s", e)
            unreachable(icmp.ICMP_HOST_UNREACH, icmp.ICMPV6_ADDR_UNREACH)
            return None
        keep_port = self._may_keep(sport)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_BUFFER)
            wildcard = "0.0.0.0" if af == socket.AF_INET else "::"
            if keep_port:
                try:
                    sock.bind((wildcard, sport))
                except OSError:  # the host has it in use: fine, it is the host's
                    keep_port = False
            if not keep_port:
                sock.bind((wildcard, 0))
            sock.connect(target)
        except OSError as e:
            sock.close()
            ctx.drop_log(logging.DEBUG, "udp-connect", "UDP to %s: %s", target, e)
            unreachable(icmp.ICMP_HOST_UNREACH, icmp.ICMPV6_ADDR_UNREACH)
            return None
        flow = UdpFlow(key, GUEST, now, ctx.settings.udp_timeout, ctx.settings.udp_stream_timeout)
        flow.sock = sock
        if keep_port:
            flow.holds_guest_port = True
            self._ports_held += 1
        ctx.flows.add(flow)
        ctx.schedule(flow)  # it expires even if its first datagram cannot be sent
        ctx.readiness.read(flow, self._host_readable)
        return flow

    def _may_keep(self, port: int) -> bool:
        """Whether a new guest flow may bind its host socket to the guest's source port
        `port` (udp.py's module docstring has the rule and why)."""
        settings = self.ctx.settings
        if not settings.udp_port_rule.allows(port) or self._forward_takes_port(port):
            return False
        if self._ports_held >= settings.udp_preserved_ports:
            self.ctx.drop_log(logging.INFO, "udp-ports",
                              "guest UDP flows hold %d host ports of their own source ports "
                              "(limits.udp_preserved_ports): new flows get ephemeral ones",
                              self._ports_held)
            return False
        return True

    # -- from the host ------------------------------------------------------------------------

    def _host_readable(self, flow: UdpFlow) -> None:
        now = self.ctx.loop.time()
        for _ in range(UDP_BATCH):
            try:
                data = flow.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                self._unreachable(flow, now)
                continue
            except OSError as e:
                self.ctx.drop_log(logging.DEBUG, "udp-recv", "%r: %s", flow, e)
                break
            self._to_guest(flow, data, now)
        self.ctx.settle(now)

    def _to_guest(self, flow: UdpFlow, data: bytes, now: float) -> None:
        ctx = self.ctx
        msg = packet.udp_message(flow.peer_addr, flow.guest_addr, flow.peer_port,
                                 flow.guest_port, data)
        ctx.link.send(packet.ip_frame(ctx.guest_mac, ctx.net.mac, flow.peer_addr,
                                      flow.guest_addr, packet.IPPROTO_UDP, msg), now)
        flow.to_guest(len(data), now)
        ctx.schedule(flow)

    def _unreachable(self, flow: UdpFlow, now: float) -> None:
        """The peer answered with ICMP port unreachable: tell the guest the same."""
        ctx = self.ctx
        quoted = icmp.quote_udp(flow.guest_addr, flow.peer_addr, flow.guest_port, flow.peer_port,
                                flow.last_length)
        code = icmp.ICMP_PORT_UNREACH if flow.family == 4 else icmp.ICMPV6_PORT_UNREACH
        ctx.link.send(icmp.unreachable_frame(flow.family, code, flow.peer_addr, quoted,
                                             ctx.net.mac, ctx.guest_mac, flow.guest_addr), now)

    def listener_readable(self, fwd: Forward, lsock: socket.socket) -> None:
        """Datagrams at a forward's listener: each peer becomes a flow towards the guest."""
        ctx = self.ctx
        now = ctx.loop.time()
        port = lsock.getsockname()[1]
        for _ in range(UDP_BATCH):
            try:
                data, peer = lsock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                ctx.drop_log(logging.DEBUG, "udp-listen", "forward %d: %s", fwd.id, e)
                break
            family, peer_bytes = nat.sockaddr_bytes(peer[0])
            if (ctx.net.ip4 if family == 4 else ctx.net.ip6) is None or not ctx.link.connected:
                fwd.refused += 1
                continue
            seen_peer = nat.nat_from_host(ctx.settings, family, peer_bytes)
            guest = nat.guest_target(ctx.net, ctx.seen, family, seen_peer, fwd.rule)
            if guest is None:
                fwd.refused += 1
                continue
            key = (packet.IPPROTO_UDP, guest, fwd.rule.guest_port(port), seen_peer, peer[1])
            found = ctx.flows.get(key)  # (a UDP key: a UDP flow, if any)
            flow = found if isinstance(found, UdpFlow) else None
            if flow is None:
                if ctx.flow_limit_reached("inbound UDP"):
                    fwd.refused += 1
                    continue
                flow = UdpFlow(key, HOST, now, ctx.settings.udp_timeout,
                               ctx.settings.udp_stream_timeout)
                flow.sock = lsock
                flow.sockaddr = peer
                flow.forward_id = fwd.id
                ctx.flows.add(flow)
                fwd.connections += 1
            self._to_guest(flow, data, now)
        ctx.settle(now)

    # -- flows from the previous process, and flows that end ----------------------------------

    def adopt(self, flow: UdpFlow, now: float) -> None:
        """A flow the previous process handed over (handover.py), with its socket or, for
        an inbound flow, its forward's listener."""
        if flow.holds_guest_port:
            self._ports_held += 1
        if flow.origin != HOST:
            self.ctx.readiness.read(flow, self._host_readable)
        self.ctx.schedule(flow)

    def reset(self, flow: UdpFlow, now: float) -> None:
        """A flow a restart cannot carry just ends (UDP has nothing to tell either side)."""
        if flow.sock is not None:
            self.ctx.close_flow(flow, rst_peer=False)


    def timer(self, flow: UdpFlow, now: float) -> None:
        self.ctx.expire_or_reschedule(flow, now)

    def release(self, flow: UdpFlow) -> bool:
        """A closing flow gives back its hold on a guest port; inbound flows borrow their
        forward's listener, which stays open."""
        if flow.holds_guest_port:
            flow.holds_guest_port = False
            self._ports_held -= 1
        return flow.origin != HOST

    def flows_in_the_way(self, first: int, last: int) -> list[UdpFlow]:
        """Guest flows holding host ports a new UDP forward needs (they give them up)."""
        return [flow for flow in self.ctx.flows if isinstance(flow, UdpFlow)
                and flow.holds_guest_port and first <= flow.guest_port <= last]

    def flows_of_forward(self, forward_id: int) -> list[UdpFlow]:
        """Inbound flows answering through a forward's listener (they end with it)."""
        return [flow for flow in self.ctx.flows if isinstance(flow, UdpFlow)
                and flow.forward_id == forward_id and flow.origin == HOST]
