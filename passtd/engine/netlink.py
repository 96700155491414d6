"""The host's default route, its interface and address, read from the kernel (rtnetlink).

Design, as passt's netlink.c does it: no `ip` to run (no fork, no iproute2 at run time,
no subprocess module in the instance), one NETLINK_ROUTE socket per question, read once
at start (addrs.py says what the guest is given from it):

- RTM_GETROUTE, a dump of one family. The default route is the first, in dump order, of
  the main table (RT_TABLE_MAIN: rtm_table, or the RTA_TABLE attribute where the kernel
  gives it, as it does past table 255), destination length 0, type RTN_UNICAST, with an
  output interface: RTA_OIF, or RTA_MULTIPATH, whose nexthop of the highest weight
  (rtnh_hops + 1; the first of equal ones) is taken. With an interface asked for, only
  routes and nexthops through it count. The gateway is RTA_GATEWAY, of the route or of
  that nexthop; it may be absent. Unreachable, blackhole, prohibit and local routes, and
  those of other tables, do not count.
- RTM_GETADDR, a dump of one family: the first address, in dump order, on the interface
  with scope universe (global), neither tentative nor deprecated (the flags of IFA_FLAGS
  where given: the header's ifa_flags holds only their low 8 bits); IFA_LOCAL where
  given (the local end of a point-to-point link), else IFA_ADDRESS; the header's prefix.

The request asks the kernel to filter (NETLINK_GET_STRICT_CHK, Linux 4.20: the main
table, unicast routes, the interface) so that a host with a large table sends little;
every filter is applied here again, for kernels that dump everything.

A dump comes as datagrams of messages (NLM_F_MULTI) and ends at NLMSG_DONE. Messages of
another sequence number or port id are skipped; an NLMSG_ERROR, or a DONE that carries an
error, raises OSError with the kernel's errno. Reading stops at the first answer found:
the socket is closed with the rest of the dump unread, which is why each question has a
socket of its own (the kernel refuses a dump while another runs on the socket). Each recv
waits at most TIMEOUT. A message, attribute or nexthop that does not fit in what was
received raises `Malformed` (a ValueError), never IndexError or struct.error.

Not done here: following changes (no multicast groups); policy routing (rules are not
read, only the main table); routes over nexthop objects when the kernel's
nexthop_compat_mode is off (they carry RTA_NH_ID and no interface: skipped); IPv4 routes
via an IPv6 gateway (RTA_VIA: no gateway); retrying a dump the kernel marks interrupted
(NLM_F_DUMP_INTR, its table changed meanwhile: the answer is taken as it is); passt's
fallback, without a default route, to the first interface with any route.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Final, NamedTuple, TypeVar

from .addrs import HostAddresses, IPAddress

# <linux/netlink.h>
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLA_TYPE_MASK: Final = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12
# <linux/rtnetlink.h>
RTM_NEWADDR, RTM_GETADDR, RTM_NEWROUTE, RTM_GETROUTE = 20, 22, 24, 26
RT_TABLE_MAIN, RTN_UNICAST, RT_SCOPE_UNIVERSE = 254, 1, 0
RTA_OIF, RTA_GATEWAY, RTA_MULTIPATH, RTA_TABLE = 4, 5, 9, 15
# <linux/if_addr.h>
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_DEPRECATED, IFA_F_TENTATIVE = 0x20, 0x40

NLMSGHDR: Final = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
RTMSG: Final = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol,
#                                      scope, type, flags
IFADDRMSG: Final = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, ifindex
RTATTR: Final = struct.Struct("=HH")  # length, type
RTNEXTHOP: Final = struct.Struct("=HBBi")  # length, flags, hops, ifindex
U32: Final = struct.Struct("=I")
I32: Final = struct.Struct("=i")

BUFSIZE: Final = 65536  # a dump datagram: at most the page size or 8 KiB, the kernel's docs say
TIMEOUT: Final = 5.0  # seconds one recv may wait for the kernel
SEQ: Final = 1  # a socket asks one question: its sequence number

log = logging.getLogger("passtd.engine")
T = TypeVar("T")


class Malformed(ValueError):
    """A netlink answer that does not parse: cut short, or a length past its end."""


class DefaultRoute(NamedTuple):
    ifindex: int  # the output interface (of the chosen nexthop, for a multipath route)
    gateway: IPAddress | None


def _align(length: int) -> int:
    return (length + 3) & ~3


def _u32(data: bytes, what: str) -> int:
    if len(data) < 4:
        raise Malformed(f"netlink {what}: {len(data)} bytes, not 4")
    value: int = U32.unpack_from(data)[0]
    return value


def _addr_len(family: int) -> int:
    return 4 if family == socket.AF_INET else 16


def _ip(data: bytes, family: int, what: str) -> IPAddress:
    if len(data) != _addr_len(family):
        raise Malformed(f"netlink {what}: {len(data)} bytes for an address of family {family}")
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(data)
    return ipaddress.IPv6Address(data)


# -- parsing: bytes in, values out --------------------------------------------------------


def messages(data: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """The messages of one datagram: (type, flags, sequence, port id, payload)."""
    found: list[tuple[int, int, int, int, bytes]] = []
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < NLMSGHDR.size:
            raise Malformed(f"netlink message header cut short: {end - offset} bytes")
        length, kind, flags, seq, port = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or length > end - offset:
            raise Malformed(f"netlink message of length {length} in {end - offset} bytes")
        found.append((kind, flags, seq, port, data[offset + NLMSGHDR.size:offset + length]))
        offset += _align(length)
    return found


def attributes(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """The attributes (struct rtattr, each 4-aligned) from `offset` to the end: type ->
    payload, the first of each type. Fewer than 4 bytes left over are padding."""
    found: dict[int, bytes] = {}
    end = len(data)
    while end - offset >= RTATTR.size:
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size or length > end - offset:
            raise Malformed(f"netlink attribute {kind} of length {length} "
                            f"in {end - offset} bytes")
        found.setdefault(kind & NLA_TYPE_MASK, data[offset + RTATTR.size:offset + length])
        offset += _align(length)
    return found


def nexthops(data: bytes) -> list[tuple[int, int, bytes | None]]:
    """An RTA_MULTIPATH payload's nexthops: (weight, ifindex, RTA_GATEWAY or None)."""
    found: list[tuple[int, int, bytes | None]] = []
    offset, end = 0, len(data)
    while end - offset >= RTNEXTHOP.size:
        length, _flags, hops, ifindex = RTNEXTHOP.unpack_from(data, offset)
        if length < RTNEXTHOP.size or length > end - offset:
            raise Malformed(f"netlink nexthop of length {length} in {end - offset} bytes")
        attrs = attributes(data[offset + RTNEXTHOP.size:offset + length])
        found.append((hops + 1, ifindex, attrs.get(RTA_GATEWAY)))
        offset += _align(length)
    return found


def parse_route(payload: bytes, family: int, ifindex: int = 0) -> DefaultRoute | None:
    """The default route an RTM_NEWROUTE payload is, or None where it is none that counts
    (the module's rules); `ifindex`: only through that interface (0: any)."""
    if len(payload) < RTMSG.size:
        raise Malformed(f"netlink route message cut short: {len(payload)} bytes")
    rtm_family, dst_len, _src, _tos, table, _proto, _scope, kind, _flags = \
        RTMSG.unpack_from(payload)
    if rtm_family != family or dst_len != 0 or kind != RTN_UNICAST:
        return None
    attrs = attributes(payload, RTMSG.size)
    if RTA_TABLE in attrs:
        table = _u32(attrs[RTA_TABLE], "RTA_TABLE")
    if table != RT_TABLE_MAIN:
        return None
    gateway: bytes | None
    if RTA_MULTIPATH in attrs:
        best: tuple[int, int, bytes | None] | None = None
        for hop in nexthops(attrs[RTA_MULTIPATH]):
            if hop[1] > 0 and (not ifindex or hop[1] == ifindex) and \
                    (best is None or hop[0] > best[0]):
                best = hop
        if best is None:
            return None
        out, gateway = best[1], best[2]
    elif RTA_OIF in attrs:
        out, gateway = _u32(attrs[RTA_OIF], "RTA_OIF"), attrs.get(RTA_GATEWAY)
        if out == 0 or (ifindex and out != ifindex):
            return None
    else:
        return None
    return DefaultRoute(out, None if gateway is None else _ip(gateway, family, "RTA_GATEWAY"))


def parse_address(payload: bytes, family: int, ifindex: int
                  ) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
    """The address an RTM_NEWADDR payload holds, where it counts (global, on `ifindex`,
    neither tentative nor deprecated), else None."""
    if len(payload) < IFADDRMSG.size:
        raise Malformed(f"netlink address message cut short: {len(payload)} bytes")
    ifa_family, prefix, flags, scope, index = IFADDRMSG.unpack_from(payload)
    if ifa_family != family or index != ifindex or scope != RT_SCOPE_UNIVERSE:
        return None
    attrs = attributes(payload, IFADDRMSG.size)
    if IFA_FLAGS in attrs:
        flags = _u32(attrs[IFA_FLAGS], "IFA_FLAGS")
    if flags & (IFA_F_TENTATIVE | IFA_F_DEPRECATED):
        return None
    raw = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
    if raw is None:
        return None
    if prefix > 8 * _addr_len(family):
        raise Malformed(f"netlink address with prefix length {prefix}")
    address = _ip(raw, family, "IFA_LOCAL/IFA_ADDRESS")
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv4Interface(f"{address}/{prefix}")
    return ipaddress.IPv6Interface(f"{address}/{prefix}")


def answers(data: bytes, seq: int, port: int) -> tuple[list[tuple[int, bytes]], bool]:
    """One datagram read for request `seq` on port `port`: the (type, payload) of the
    messages answering it, and whether the answer ended (NLMSG_DONE). Raises OSError for
    an error the kernel answered."""
    found: list[tuple[int, bytes]] = []
    for kind, _flags, msg_seq, msg_port, payload in messages(data):
        if msg_seq != seq or msg_port != port:
            continue  # not ours: a leftover of another request
        if kind in (NLMSG_ERROR, NLMSG_DONE):
            if len(payload) < 4:
                if kind == NLMSG_DONE:
                    return found, True  # kernels before 2.6.36 send an empty DONE
                raise Malformed(f"netlink error message cut short: {len(payload)} bytes")
            error: int = I32.unpack_from(payload)[0]
            if error < 0:
                raise OSError(-error, f"netlink: the kernel answered {os.strerror(-error)}")
            return found, True  # an error 0 is an acknowledgement: the end too
        found.append((kind, payload))
    return found, False


# -- asking the kernel ----------------------------------------------------------------------


def query(kind: int, body: bytes, pick: Callable[[int, bytes], T | None]) -> T | None:
    """Send one dump request (`kind`, its header and attributes `body`) and read the
    answer until `pick` (called with each message's type and payload) returns a value,
    or the dump ends (None)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(TIMEOUT)
        with contextlib.suppress(OSError):  # before Linux 4.20: all comes, filtered here
            sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        sock.bind((0, 0))
        port = int(sock.getsockname()[0])
        header = NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP,
                               SEQ, 0)
        sock.sendto(header + body, (0, 0))
        buf = bytearray(BUFSIZE)
        while True:
            size = sock.recv_into(buf, BUFSIZE, socket.MSG_TRUNC)
            if size > BUFSIZE:
                raise Malformed(f"netlink datagram of {size} bytes, more than {BUFSIZE}")
            found, done = answers(bytes(buf[:size]), SEQ, port)
            for msg_kind, payload in found:
                value = pick(msg_kind, payload)
                if value is not None:
                    return value
            if done:
                return None


def default_route(family: int, ifindex: int = 0) -> DefaultRoute | None:
    """The host's default route for `family` (socket.AF_INET or AF_INET6), through
    interface `ifindex` only unless 0; None without one."""
    body = RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, 0, 0, RTN_UNICAST, 0)
    if ifindex:
        body += RTATTR.pack(RTATTR.size + 4, RTA_OIF) + U32.pack(ifindex)

    def pick(kind: int, payload: bytes) -> DefaultRoute | None:
        return parse_route(payload, family, ifindex) if kind == RTM_NEWROUTE else None

    return query(RTM_GETROUTE, body, pick)


def first_address(ifindex: int, family: int
                  ) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
    """The first address of `family` that counts on interface `ifindex`, or None."""
    body = IFADDRMSG.pack(family, 0, 0, 0, ifindex)

    def pick(kind: int, payload: bytes
             ) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
        return parse_address(payload, family, ifindex) if kind == RTM_NEWADDR else None

    found = query(RTM_GETADDR, body, pick)  # (mypy joins the union: narrowed again)
    return found if isinstance(found, ipaddress.IPv4Interface | ipaddress.IPv6Interface) \
        else None


def discover_host(ifname: str | None = None) -> HostAddresses:
    """The host's default-route interface, address and gateway, for both families; only
    through `ifname` when given (an interface that does not exist has none)."""
    index = 0
    if ifname:
        try:
            index = socket.if_nametoindex(ifname)
        except OSError:
            log.warning("there is no interface %s: no host address is read from it", ifname)
            return HostAddresses(ifname=ifname)
    name = ifname
    addr4: ipaddress.IPv4Interface | None = None
    addr6: ipaddress.IPv6Interface | None = None
    gateway4: ipaddress.IPv4Address | None = None
    gateway6: ipaddress.IPv6Address | None = None
    for family in (socket.AF_INET, socket.AF_INET6):
        route = default_route(family, index)
        if route is None:
            continue
        name = name or socket.if_indextoname(route.ifindex)
        address = first_address(route.ifindex, family)
        if isinstance(address, ipaddress.IPv4Interface):
            addr4 = address
        elif isinstance(address, ipaddress.IPv6Interface):
            addr6 = address
        if isinstance(route.gateway, ipaddress.IPv4Address):
            gateway4 = route.gateway
        elif isinstance(route.gateway, ipaddress.IPv6Address):
            gateway6 = route.gateway
    return HostAddresses(ifname=name, addr4=addr4, gateway4=gateway4, addr6=addr6,
                         gateway6=gateway6)
