"""Who the guest is: the MAC and addresses it uses, and which of its packets may enter.

Design: passt learns the guest's MAC and addresses from its frames rather than trusting
configuration (a guest may use a static address, SLAAC, or change its MAC); forwarded
connections go to what it was seen using. `GuestIdentity` keeps that (addrs.GuestSeen),
with one rate-limited log line per change: a guest settles on its MAC and addresses within
a few frames of booting, and one that keeps changing them must not get a line per frame.

Admission, two rules: `admit` lets a packet in at all (its family is enabled, it is no
martian: nat.is_martian); `may_open` is the stricter rule for packets that use or open
flows: the source must not be unspecified or one of our tap-side addresses, since flows
are keyed by the guest's source and a guest posing as the gateway would collide with the
host peers seen as the gateway. A packet that passes is where the guest's address is
learnt.

A guest may arrive holding a lease from another host (a live migration moves a running
guest, its addresses and gateway with it): its address is learnt as any other, so forwards
reach it and its traffic to other hosts passes, but its old gateway is an address this
host knows nothing of, so its requests to "the host" there cannot be answered. That is
said when the guest starts using such an address (events.FOREIGN_ADDRESS), with the way
out: pinned addresses, which mean the same on every host. An IPv6 one is also taken out of
the guest's choice: its /64 goes into `foreign_prefixes` (the last FOREIGN_PREFIXES_MAX: a
guest spoofing sources cannot grow it) and RouterAdvertiser sends an RA at once that
deprecates it (ndp.py), so that the guest's new connections use this host's prefix.

`RouterAdvertiser` sends the unsolicited router advertisements of RFC 4861 6.2.4 while a
guest is connected (the first a second after it connects, then at random intervals
ndp.py chooses), so that a guest that missed the answer to its solicitation still
configures IPv6.

Not done here: the responders (DHCP, NDP) that tell the guest its addresses.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final

from . import events, nat, ndp, packet
from .addrs import GuestSeen, NetConfig
from .context import RateLimitedLog
from .flow import addr_text
from .link import GuestLink
from .mainloop import MainLoop, Timer

FOREIGN_PREFIXES_MAX: Final = 4


class GuestIdentity:
    def __init__(self, net: NetConfig, seen: GuestSeen, drop_log: RateLimitedLog,
                 changed: Callable[..., None]) -> None:
        self.net = net
        self.seen = seen
        self.drop_log = drop_log
        self.learn_log = RateLimitedLog(burst=5, period=60.0)
        self.changed = changed  # D-Bus property names
        self.tap_side = nat.tap_side_addresses(net)
        self.foreign_prefixes: deque[bytes] = deque(maxlen=FOREIGN_PREFIXES_MAX)
        self.on_foreign_prefix: Callable[[], None] | None = None  # RouterAdvertiser.soon

    def learn_mac(self, mac: bytes) -> None:
        if mac != self.seen.mac and not mac[0] & 1:  # never learn a multicast source
            self.seen.mac = mac
            self.learn_log(logging.INFO, "guest MAC", "guest MAC %s", mac.hex(":"))
            self.changed("GuestMac")

    def learn_addr(self, family: int, addr: bytes) -> None:
        seen = self.seen
        if family == 4:
            if addr == packet.IP4_ANY or addr == seen.addr4:
                return
            seen.addr4 = addr
        elif packet.is_ipv6_link_local(addr):
            if addr == seen.addr6_ll:
                return
            seen.addr6_ll = addr
        else:
            if addr == packet.IP6_ANY or addr == seen.addr6:
                return
            seen.addr6 = addr
        self.learn_log(logging.INFO, "guest address", "guest uses address %s", addr_text(addr))
        self.changed("GuestAddresses")
        if self._foreign(family, addr):  # each change, rate-limited as the others
            self.learn_log(
                logging.WARNING, "foreign address",
                "guest uses %s, outside the network this instance gives it: a lease from "
                "another host (a live migration?). Forwards reach it and its traffic to other "
                "hosts passes, but its old gateway does not reach this host; pin the domain's "
                "addresses (passtctl libvirt attach --pin) or have the guest renew its lease",
                addr_text(addr), extra=events.fields(events.FOREIGN_ADDRESS, guest=addr))
            if family == 6 and (prefix := addr[:8] + bytes(8)) not in self.foreign_prefixes:
                self.foreign_prefixes.append(prefix)
                if self.on_foreign_prefix is not None:
                    self.on_foreign_prefix()

    def _foreign(self, family: int, addr: bytes) -> bool:
        """Outside the network we give the guest (an IPv6 guest without a global address
        of ours, or a link-local address, is never foreign)."""
        if family == 4:
            return self.net.ip4 is not None and not self.net.ip4.on_link(addr)
        ip6 = self.net.ip6
        return (ip6 is not None and ip6.address is not None
                and not packet.is_ipv6_link_local(addr) and not ip6.on_link(addr))

    def admit(self, pkt: packet.Packet) -> bool:
        if (self.net.ip4 if pkt.family == 4 else self.net.ip6) is None:
            return False
        if nat.is_martian(pkt.family, pkt.src, pkt.dst):
            self.drop_log(logging.DEBUG, "martian", "dropped IPv%d %s -> %s", pkt.family,
                          addr_text(pkt.src), addr_text(pkt.dst))
            return False
        return True

    def may_open(self, pkt: packet.Packet) -> bool:
        if pkt.src in self.tap_side:
            self.drop_log(logging.DEBUG, "spoofed", "dropped IPv%d from %s: not the guest's",
                          pkt.family, addr_text(pkt.src))
            return False
        self.learn_addr(pkt.family, pkt.src)
        return True

    def addresses(self) -> list[str]:
        seen = self.seen
        return [addr_text(a) for a in (seen.addr4, seen.addr6, seen.addr6_ll) if a]

    @property
    def mac_text(self) -> str:
        """The MAC the guest was seen using, as text ("" before its first frame)."""
        return self.seen.mac.hex(":") if self.seen.mac else ""


class RouterAdvertiser:
    """Unsolicited router advertisements while a guest is connected (the module docstring)."""

    def __init__(self, loop: MainLoop, net: NetConfig, link: GuestLink,
                 deprecated: Sequence[bytes] = ()) -> None:
        self.loop = loop
        self.net = net
        self.link = link
        self.deprecated = deprecated  # prefixes to deprecate (GuestIdentity's, live)
        self._rng = random.Random()
        self._handle: Timer | None = None

    def start(self) -> None:
        self._schedule(1.0)

    def soon(self) -> None:
        """An RA now (on the loop's next turn): what it says has changed."""
        self._schedule(0.0)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, delay: float) -> None:
        self.stop()
        self._handle = self.loop.call_later(delay, self._send)

    def _send(self) -> None:
        self._handle = None
        if not self.link.connected or self.net.ip6 is None:
            return
        self.link.send(ndp.router_advertisement(self.net, deprecated=self.deprecated),
                       self.loop.time())
        self.link.flush()
        self._schedule(ndp.next_unsolicited_ra_delay(self._rng))
