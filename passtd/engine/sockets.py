"""Where the engine's host sockets come from: one seam, so tests choose what they get.

Design: every host socket the engine opens (a TCP socket to connect, a UDP socket per
flow, a ping socket, a forward's listener) comes from a `HostSockets`; `KernelSockets`
asks the kernel. A test passes its own (sockets that refuse to send, that fail to open,
that record what they were asked) instead of replacing `socket.socket` for the whole
process. The callers still set options, bind and connect: those are protocol decisions.

Not done here: sockets the engine is given (qemu's connection, the listener systemd
passes), and socket options.
"""

from __future__ import annotations

import socket
from typing import Protocol


def family_of(version: int) -> socket.AddressFamily:
    return socket.AF_INET if version == 4 else socket.AF_INET6


class HostSockets(Protocol):
    def stream(self, af: socket.AddressFamily) -> socket.socket:
        """A non-blocking TCP socket."""

    def datagram(self, af: socket.AddressFamily) -> socket.socket:
        """A non-blocking UDP socket."""

    def ping(self, af: socket.AddressFamily) -> socket.socket:
        """A non-blocking ICMP echo ("ping") socket (net.ipv4.ping_group_range)."""


class KernelSockets:
    def stream(self, af: socket.AddressFamily) -> socket.socket:
        return socket.socket(af, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)

    def datagram(self, af: socket.AddressFamily) -> socket.socket:
        return socket.socket(af, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)

    def ping(self, af: socket.AddressFamily) -> socket.socket:
        proto = socket.IPPROTO_ICMP if af == socket.AF_INET else socket.IPPROTO_ICMPV6
        return socket.socket(af, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK, proto)
