"""What one engine is told to do: addressing, forwards, responders, timeouts and limits.

Design: plain data, built by the service (service.py) from an instance's configuration
and read by every part of the engine; nothing here changes while the engine runs (runtime
forwards go through `Engine.add_forward`, not through these settings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

from .addrs import NetConfig
from .fwd import ForwardRule
from .udp import SourcePortRule


class EngineSettings(NamedTuple):
    net: NetConfig
    tcp_forwards: Sequence[ForwardRule] = ()
    udp_forwards: Sequence[ForwardRule] = ()
    pcap: str | None = None
    pcap_size: int = 256 << 20  # bytes; the capture stops there
    dhcp: bool = True
    ndp: bool = True
    dhcpv6: bool = True
    ra: bool = True
    udp_timeout: float = 30.0
    udp_stream_timeout: float = 120.0
    icmp_timeout: float = 60.0
    tcp_idle_timeout: float = 7200.0
    max_flows: int = 65536
    max_listeners: int = 65536
    tcp_sndbuf: int = 0  # 0: leave the kernel's autotuning alone
    # guest UDP source ports kept on the host: which ones, and for how many flows at once
    udp_port_rule: SourcePortRule = SourcePortRule()
    udp_preserved_ports: int = 64
    # the host's own addresses (targets for map_guest_addr), and DNS redirections: guest
    # DNS (nat.DNS_PORTS) to a key goes to the resolver named by its value (addrs.guest_dns)
    host_addr4: bytes | None = None
    host_addr6: bytes | None = None
    dns_redirect: Mapping[bytes, str] = MappingProxyType({})
