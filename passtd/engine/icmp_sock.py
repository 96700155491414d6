"""The ICMP socket half: guest echo requests through unprivileged ping sockets.

Design (passt's icmp.c): each (guest address, identifier, destination) is a flow with its
own SOCK_DGRAM/IPPROTO_ICMP(V6) socket (allowed by net.ipv4.ping_group_range, no
privilege). The socket is bound to the guest's identifier where it is free; where it is
taken the kernel picks another, and icmp.py rewrites replies back to the guest's.

Not done here: other ICMP messages from the guest (dropped), ICMP errors from the host
(the UDP half turns ECONNREFUSED into port unreachable; the rest stays with the kernel).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Final

from . import icmp, nat, packet
from .context import EngineContext
from .flow import FlowKey

UDP_BATCH: Final = 64  # replies read from one socket per wakeup


class IcmpSockets:
    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    def guest_echo(self, pkt: packet.Packet, now: float) -> None:
        ctx = self.ctx
        echo = icmp.parse_echo_request(pkt)
        if echo is None:
            ctx.drop_log(logging.DEBUG, "icmp-type", "dropped ICMP type %d", pkt.l4[0])
            return
        ident, _seq = echo
        key = (pkt.proto, pkt.src, ident, pkt.dst, 0)
        flow = ctx.flows.get(key)
        if not isinstance(flow, icmp.PingFlow):  # (the key's protocol makes any flow one)
            flow = self._open(pkt, key, ident, now)
            if flow is None:
                return
        try:
            flow.sock.sendto(pkt.l4, flow.sockaddr)
        except OSError as e:
            ctx.drop_log(logging.DEBUG, "ping-send", "%r: %s", flow, e)
            return
        flow.touch(len(pkt.l4), False, now)
        ctx.schedule(flow)

    def _open(self, pkt: packet.Packet, key: FlowKey, ident: int,
              now: float) -> icmp.PingFlow | None:
        ctx = self.ctx
        if ctx.flow_limit_reached("new ping flows"):
            return None
        target = nat.nat_from_tap(ctx.settings, pkt.family, pkt.dst, 0, nat.interface_index)
        if target is None:
            return None
        af = socket.AF_INET if len(target) == 2 else socket.AF_INET6
        try:
            sock = ctx.sockets.ping(af)
        except OSError as e:
            ctx.drop_log(logging.WARNING, "ping-socket",
                         "cannot open a ping socket (%s): is net.ipv4.ping_group_range "
                         "covering our group?", e)
            return None
        # where the identifier is taken, the kernel picks one; replies are rewritten back
        with contextlib.suppress(OSError):
            sock.bind(("0.0.0.0", ident) if af == socket.AF_INET else ("::", ident))
        flow = icmp.PingFlow(key, now, ctx.settings.icmp_timeout)
        flow.sock = sock
        flow.sockaddr = target
        ctx.flows.add(flow)
        ctx.schedule(flow)  # it expires even if its first request cannot be sent
        ctx.readiness.read(flow, self._readable)
        return flow

    def timer(self, flow: icmp.PingFlow, now: float) -> None:
        self.ctx.expire_or_reschedule(flow, now)

    def release(self, flow: icmp.PingFlow) -> bool:
        return True

    def adopt(self, flow: icmp.PingFlow, now: float) -> None:
        """A flow the previous process handed over (handover.py), with its socket."""
        self.ctx.readiness.read(flow, self._readable)
        self.ctx.schedule(flow)

    def reset(self, flow: icmp.PingFlow, now: float) -> None:
        """A flow a restart cannot carry just ends."""
        if flow.sock is not None:
            self.ctx.close_flow(flow, rst_peer=False)

    def _readable(self, flow: icmp.PingFlow) -> None:
        ctx = self.ctx
        now = ctx.loop.time()
        for _ in range(UDP_BATCH):
            try:
                data = flow.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                ctx.drop_log(logging.DEBUG, "ping-recv", "%r: %s", flow, e)
                break
            frame = icmp.echo_reply_frame(flow, data, ctx.net.mac, ctx.guest_mac)
            if frame:
                ctx.link.send(frame, now)
                flow.touch(len(data), True, now)
        ctx.schedule(flow)
        ctx.settle(now)
