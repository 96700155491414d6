"""`passtctl`: the admin CLI of running passtd instances, over their D-Bus API.

Design: a thin client of org.passtd.Passtd1.Instance (dbus_api.py). Each call is one
plain method call (no introspection round trip); an instance is found by its bus name,
`org.passtd.Passtd1.<escaped NAME>`, so `list` is ListNames filtered by that prefix.
Tables are for people; `--json` gives every listing as JSON for scripts, with the API's
own keys. The exit status tells scripts what happened without parsing messages (EXIT_*).

Who may do what: everyone may list (the bus policy, dbus/org.passtd.Passtd1.conf); root
and whom polkit authorizes may add or remove forwards (passtd/dbus_auth.py). Forward
changes allow interactive authorization, so that an agent (pkttyagent, a desktop's) may
ask for a password; passtctl only reports a refusal.

libvirt (passtd/libvirt.py does the work; libvirt-python is imported only for these):
`passtctl libvirt attach|detach DOMAIN` edit a domain's persistent definition (passtd
metadata, qemu netdev and NIC). `forward add|remove` on the instance of a libvirt domain
(the hook's runtime file is there) also records the change in the domain's live
metadata, which `virsh migrate` carries to the destination's hook (so runtime forwards
move with the domain); with --persist in its persistent metadata too (from its next
start on). `libvirt` is therefore not usable as an instance name here (as `list`).

Names: NAME (and attach's DOMAIN) must be an instance name (passtd.names); anything else
is a usage error (exit status 2) before any bus or libvirt is asked. `list` shows only bus
names that decode to one.

Not done here: port ranges (AddForward takes one port, ranges belong in the
configuration or the domain's metadata). A forward changed over D-Bus by another client
(busctl) is not recorded in the domain: it does not migrate.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

from dbus_fast import BusType, Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from .dbus_api import (
    ERROR_PREFIX,
    INTERFACE,
    OBJECT_PATH,
    bus_name,
    instance_name,
)
from .engine.fwd import SpecError, parse_port
from .names import InvalidName, check_name, hook_runtime_file

T = TypeVar("T")

EXIT_OK = 0
EXIT_INSTANCE_ERROR = 1  # the instance (or the bus, for another reason) refused: message shown
EXIT_USAGE = 2  # bad command line (argparse uses 2 as well)
EXIT_NOT_RUNNING = 3  # no such instance on the bus, or no bus at all
EXIT_ACCESS_DENIED = 4  # the bus policy refused the call to this user

CALL_TIMEOUT = 10.0  # seconds for one call to answer
FLOWS_PAGE = 512  # flows per ListFlowsPage call (the most an instance returns)
RETRY_MAX = 30.0  # seconds: the longest wait an instance's "try again in" gets
_RETRY_RE = re.compile(r"try again in ([0-9.]+) s")
DBUS = "org.freedesktop.DBus"
NOT_RUNNING_ERRORS = (f"{DBUS}.Error.ServiceUnknown", f"{DBUS}.Error.NameHasNoOwner")
UNKNOWN_METHOD_ERROR = f"{DBUS}.Error.UnknownMethod"
ACCESS_DENIED_ERROR = f"{DBUS}.Error.AccessDenied"
INTERACTIVE_REQUIRED_ERROR = f"{DBUS}.Error.InteractiveAuthorizationRequired"
CHANGE_TIMEOUT = 300.0  # seconds for a forward change: polkit may ask for a password

DESCRIPTION = """\
Show and change running passtd instances (one per VM) over D-Bus, without restarting them.
Everyone may list; adding and removing forwards needs root or polkit's authorization
(org.passtd.Passtd1.manage-forwards).
"""

EPILOG = """\
commands:
  passtctl list                                    instances on the bus
  passtctl NAME status                             one instance's guest, flows and forwards
  passtctl NAME forwards                           its port forwards
  passtctl NAME flows                              its live flows (connections)
  passtctl NAME monitor                            its events, live (flows, forwards, restarts)
  passtctl NAME stats                              its counters (traffic, drops, per forward)
  passtctl metrics                                 every instance's counters, Prometheus format
  passtctl NAME forward add tcp 8080:80            forward host TCP 8080 to guest port 80
  passtctl NAME forward add udp 5353 --address ::1 one address only (default: all)
  passtctl NAME forward add tcp 2222:22 --persist  ...and record it in libvirt domain NAME
  passtctl NAME forward remove ID                  close a forward (its connections live on)
  passtctl libvirt attach DOMAIN --forward tcp:2222:22   wire a libvirt domain to passtd
  passtctl libvirt detach DOMAIN                   unwire it

exit status:
  0  success
  1  the instance refused or failed (its message is printed), e.g. a port already in use
  2  usage error (bad command line)
  3  instance not found: not running, or no such bus
  4  access denied: changing forwards needs root or polkit's authorization
"""


class Failure(Exception):
    """What to print and the exit status to return."""

    def __init__(self, status: int, message: str, error: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.error = error  # the D-Bus error name, if the instance answered with one


# -- the bus ----------------------------------------------------------------------------------


def _describe_bus(args: argparse.Namespace) -> str:
    if getattr(args, "bus_address", None):
        return f"bus {args.bus_address}"
    return "session bus" if getattr(args, "session", False) else "system bus"


async def _connect(args: argparse.Namespace) -> MessageBus:
    try:  # the constructor already fails on a bad or missing address
        if getattr(args, "bus_address", None):
            bus = MessageBus(bus_address=args.bus_address)
        else:
            bus = MessageBus(bus_type=BusType.SESSION if getattr(args, "session", False)
                             else BusType.SYSTEM)
        return await asyncio.wait_for(bus.connect(), CALL_TIMEOUT)
    except Exception as e:
        raise Failure(EXIT_NOT_RUNNING,
                      f"cannot connect to the {_describe_bus(args)}: "
                      f"{e or type(e).__name__}") from None


class Client:
    """Calls on one bus; errors become Failures with the right exit status."""

    def __init__(self, bus: MessageBus, where: str) -> None:
        self.bus = bus
        self.where = where

    async def call(self, destination: str, member: str, signature: str = "",
                   body: Sequence[Any] = (), *, interface: str = INTERFACE,
                   path: str = OBJECT_PATH, interactive: bool = False) -> list[Any]:
        """One call; `interactive`: polkit may ask the user (an agent, e.g. pkttyagent,
        answers), which may take a while."""
        msg = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=list(body),
                      flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive
                      else MessageFlag.NONE)
        timeout = CHANGE_TIMEOUT if interactive else CALL_TIMEOUT
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), timeout)
        except TimeoutError:
            raise Failure(EXIT_INSTANCE_ERROR, f"{_who(destination)}: no answer to {member} "
                                               f"within {timeout:g} s") from None
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise self._failure(destination, reply.error_name or "", text)
        return list(reply.body)

    def _failure(self, destination: str, error: str, text: str) -> Failure:
        who = _who(destination)
        if error in NOT_RUNNING_ERRORS:
            return Failure(EXIT_NOT_RUNNING,
                           f"{who} is not running (no {destination} on the {self.where})")
        if error in (ACCESS_DENIED_ERROR, INTERACTIVE_REQUIRED_ERROR):
            return Failure(EXIT_ACCESS_DENIED, f"{who}: access denied: {text}")
        kind = error.removeprefix(ERROR_PREFIX)
        return Failure(EXIT_INSTANCE_ERROR, f"{who}: {kind}: {text}" if text else f"{who}: {kind}",
                       error)

    async def flows(self, destination: str) -> list[dict[str, Any]]:
        """Every flow, a page at a time (ListFlowsPage); an instance whose listing budget
        for this user is spent says when to come back, and we do. An instance older than
        ListFlowsPage gets ListFlows."""
        out: list[dict[str, Any]] = []
        after = 0
        while True:
            try:
                entries, after = await self.call(destination, "ListFlowsPage", "uu",
                                                 [after, FLOWS_PAGE])
            except Failure as e:
                if e.error == UNKNOWN_METHOD_ERROR and not out:
                    return await self.listing(destination, "ListFlows")
                wait = _retry_after(e)
                if wait is None:
                    raise
                await asyncio.sleep(wait)
                continue
            out += [_plain(entry) for entry in entries]
            if not after:
                return out

    async def properties(self, destination: str) -> dict[str, Any]:
        (props,) = await self.call(destination, "GetAll", "s", [INTERFACE],
                                   interface=f"{DBUS}.Properties")
        return _plain(props)

    async def listing(self, destination: str, member: str) -> list[dict[str, Any]]:
        (entries,) = await self.call(destination, member)
        return [_plain(entry) for entry in entries]

    async def instance_names(self) -> list[str]:
        """The bus names of instances (a name under our prefix that decodes to no instance
        name is somebody else's, and not listed)."""
        (names,) = await self.call(DBUS, "ListNames", interface=DBUS, path="/org/freedesktop/DBus")
        return sorted(n for n in names if instance_name(n) is not None)


def _retry_after(failure: Failure) -> float | None:
    """Seconds an instance asks us to wait (Error.LimitExceeded), or None."""
    match = _RETRY_RE.search(str(failure))
    if failure.error != ERROR_PREFIX + "LimitExceeded" or match is None:
        return None
    return min(float(match.group(1)), RETRY_MAX)


def _who(destination: str) -> str:
    name = instance_name(destination)
    return f"instance {name}" if name is not None else destination


def _plain(variants: dict[str, Any]) -> dict[str, Any]:
    return {key: getattr(value, "value", value) for key, value in variants.items()}


# -- commands ---------------------------------------------------------------------------------


SYSTEMD = "org.freedesktop.systemd1"
UNIT_PATTERNS = ["passtd@*.socket", "passtd@*.service"]


def unescape_unit(text: str) -> str:
    """systemd-escape's inverse for an instance: \\xNN is the byte NN, "-" a "/" (which no
    instance name has)."""
    raw = bytearray()
    i = 0
    while i < len(text):
        if text.startswith("\\x", i) and len(text) >= i + 4:
            raw.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            raw += b"/" if text[i] == "-" else text[i].encode()
            i += 1
    return raw.decode(errors="replace")


async def _units(client: Client) -> dict[str, dict[str, str]]:
    """Instance name -> {"socket": state, "service": state} from systemd (ActiveState of
    passtd@NAME.socket and .service), asked over the same bus; {} where there is no
    systemd to ask (a session bus, a test bus)."""
    try:
        (units,) = await client.call(SYSTEMD, "ListUnitsByPatterns", "asas",
                                     [[], UNIT_PATTERNS], interface=f"{SYSTEMD}.Manager",
                                     path="/org/freedesktop/systemd1")
    except Failure:
        return {}
    out: dict[str, dict[str, str]] = {}
    for unit in units:
        name, active = unit[0], unit[3]
        prefix, _, rest = name.partition("@")
        instance, _, kind = rest.rpartition(".")
        if prefix == "passtd" and kind in ("socket", "service") and instance:
            out.setdefault(unescape_unit(instance), {})[kind] = active
    return out


def _state(units: dict[str, str] | None, on_bus: bool) -> str:
    """One word for an instance: running, listening (socket-activated, not started yet),
    failed, starting, stopping, or inactive."""
    if units is None:
        return "running" if on_bus else "?"  # not managed by systemd
    service, sock = units.get("service", "inactive"), units.get("socket", "inactive")
    if service in ("activating", "deactivating", "reloading"):
        return {"activating": "starting", "deactivating": "stopping"}.get(service, service)
    if service == "active" or on_bus:
        return "running"
    if service == "failed" or sock == "failed":
        return "failed"
    return "listening" if sock == "active" else "inactive"


async def each_instance(names: Sequence[str], fetch: Callable[[str], Awaitable[T]]
                        ) -> tuple[dict[str, T], dict[str, Failure]]:
    """`fetch` for every instance at once: (results, failures) by bus name. One that
    stopped since it was listed is in neither (not an error); a failure that is no
    Failure is a bug and raised."""
    results = await asyncio.gather(*(fetch(n) for n in names), return_exceptions=True)
    ok: dict[str, T] = {}
    failed: dict[str, Failure] = {}
    for name, result in zip(names, results, strict=True):
        if isinstance(result, Failure):
            if result.status != EXIT_NOT_RUNNING:
                failed[name] = result
        elif isinstance(result, BaseException):
            raise result
        else:
            ok[name] = result
    return ok, failed


async def _list(client: Client, args: argparse.Namespace) -> int:
    async def describe(name: str) -> dict[str, Any]:
        props, forwards = await _properties_and_forwards(client, name)
        return {"name": props["Name"], "bus_name": name,
                "guest_connected": props["GuestConnected"], "flow_count": props["FlowCount"],
                "forward_count": len(forwards)}

    names, units = await asyncio.gather(client.instance_names(), _units(client))
    described, failed = await each_instance(names, describe)
    rows: dict[str, dict[str, Any]] = {}
    status = EXIT_INSTANCE_ERROR if failed else EXIT_OK
    for name in names:
        instance = instance_name(name) or name
        if name in failed:
            print_error(str(failed[name]))
            rows[instance] = {"name": instance, "bus_name": name, "error": str(failed[name])}
        elif name in described:
            rows[instance] = described[name]
    for instance in units:  # instances systemd knows that are not on the bus (yet)
        if instance not in rows and any(v != "inactive" for v in units[instance].values()):
            rows[instance] = {"name": instance}
    for instance, row in rows.items():
        row["state"] = _state(units.get(instance), "bus_name" in row)
        if instance in units:
            row["units"] = units[instance]
    listed = [rows[key] for key in sorted(rows)]
    if args.json:
        print_json(listed)
    elif listed:
        _print_table(["NAME", "STATE", "GUEST", "FLOWS", "FORWARDS"], [
            [row["name"], row["state"],
             _guest_text(row.get("guest_connected")) if "bus_name" in row else "-",
             str(row.get("flow_count", "-")), str(row.get("forward_count", "-"))]
            for row in listed], right={3, 4})
    else:
        print(f"no passtd instance on the {client.where}")
    return status


def _guest_text(connected: bool | None) -> str:
    if connected is None:
        return "?"
    return "connected" if connected else "waiting"


async def _properties_and_forwards(client: Client, name: str
                                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Both calls at once. Both may fail (an instance that is not running): every
    exception is retrieved, and the first one raised, so nothing is left for asyncio to
    complain about at shutdown."""
    props, forwards = await asyncio.gather(client.properties(name),
                                           client.listing(name, "ListForwards"),
                                           return_exceptions=True)
    for result in (props, forwards):
        if isinstance(result, BaseException):
            raise result
    assert isinstance(props, dict) and isinstance(forwards, list)
    return props, forwards


async def _status(client: Client, args: argparse.Namespace) -> int:
    name = bus_name(args.name)
    props, forwards = await _properties_and_forwards(client, name)
    try:
        (counters,) = await client.call(name, "GetStatistics")
        stats: dict[str, Any] | None = _plain(counters)
    except Failure as e:
        if e.error != UNKNOWN_METHOD_ERROR:  # (an instance older than the counters)
            raise
        stats = None
    status = {
        "name": props["Name"],
        "bus_name": name,
        "guest_connected": props["GuestConnected"],
        "guest_mac": props["GuestMac"],
        "guest_addresses": props["GuestAddresses"],
        "mtu": props["Mtu"],
        "flow_count": props["FlowCount"],
        "forward_count": len(forwards),
    }
    if "Hostname" in props:  # (instances older than these say nothing of them)
        status["hostname"] = props["Hostname"]
        status["started_at"] = props["StartedAt"] / 1_000_000
    if stats is not None:
        stats["drops"] = dict(stats.get("drops", {}))
        status["statistics"] = stats
    if args.json:
        print_json(status)
        return EXIT_OK
    guest = "connected" if status["guest_connected"] else "waiting for qemu"
    if status["guest_mac"]:
        guest += f", MAC {status['guest_mac']}"
    lines = [
        ("Name", status["name"]),
        ("Bus name", name),
        ("Guest", guest),
        ("Guest addresses", ", ".join(status["guest_addresses"]) or "none seen yet"),
        ("MTU", str(status["mtu"]) if status["mtu"] else "not advertised"),
        ("Flows", str(status["flow_count"])),
        ("Forwards", str(status["forward_count"])),
    ]
    if "hostname" in status:
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(status["started_at"]))
        lines.insert(2, ("Runs on", f"{status['hostname']}, since {since} "
                                    f"({_age(time.time() - status['started_at'])})"))
    if stats is not None:
        lines += [
            ("Traffic", f"{stats['frames_from_guest']} frames "
                        f"({_bytes(stats['bytes_from_guest'])}) from the guest, "
                        f"{stats['frames_to_guest']} ({_bytes(stats['bytes_to_guest'])}) to it"),
            ("Drops", ", ".join(f"{reason} {count}" for reason, count
                                in sorted(stats["drops"].items())) or "none"),
        ]
    width = max(len(key) for key, _ in lines) + 1
    for key, value in lines:
        print(f"{key + ':':<{width}} {value}")
    return EXIT_OK


async def _forwards(client: Client, args: argparse.Namespace) -> int:
    forwards = await client.listing(bus_name(args.name), "ListForwards")
    if args.json:
        print_json(forwards)
        return EXIT_OK
    rows = []
    for fwd in forwards:
        last = fwd["host_port_last"]
        guest_last = fwd["guest_port"] + last - fwd["host_port"]
        rows.append([str(fwd["id"]), fwd["protocol"], fwd["address"] or "*",
                     _range(fwd["host_port"], last), _range(fwd["guest_port"], guest_last),
                     fwd["origin"], str(fwd["connections"]), _bytes(fwd["bytes"])])
    _print_table(["ID", "PROTO", "ADDRESS", "HOST", "GUEST", "ORIGIN", "CONNS", "BYTES"], rows,
                 right={0, 6, 7}, empty="no forwards")
    return EXIT_OK


async def _flows(client: Client, args: argparse.Namespace) -> int:
    flows = await client.flows(bus_name(args.name))
    if args.json:
        print_json(flows)
        return EXIT_OK
    rows = [[str(f["id"]), f["protocol"], f["state"], f["origin"],
             _endpoint(f["guest_address"], f["guest_port"]),
             _endpoint(f["peer_address"], f["peer_port"]),
             _bytes(f["bytes_from_guest"]), _bytes(f["bytes_to_guest"]), _age(f["age_seconds"])]
            for f in flows]
    _print_table(["ID", "PROTO", "STATE", "ORIGIN", "GUEST", "PEER", "FROM GUEST", "TO GUEST",
                  "AGE"], rows, right={0, 6, 7, 8}, empty="no flows")
    return EXIT_OK


def _records_in_libvirt(args: argparse.Namespace) -> bool:
    """Whether a forward change is recorded in libvirt domain NAME: for an instance the
    libvirt hook started (its runtime file is there), or with --persist."""
    return bool(args.persist) or os.path.exists(hook_runtime_file(args.name))


def _libvirt_recorder(args: argparse.Namespace, rule: dict[str, Any] | None,
                      *, remove: bool) -> Any:
    """The record of this change in libvirt domain NAME (passtctl_libvirt.recorder_for) of
    `rule` (the forward as ListForwards describes it; None: nothing to record). libvirt is
    imported only here: it costs passtctl's start a third."""
    if rule is None:
        return None
    from .passtctl_libvirt import forward_from_listing, recorder_for

    return recorder_for(args, forward_from_listing(rule), remove=remove)


async def _change_forward(args: argparse.Namespace, recorder: Any,
                          change: Callable[[], Awaitable[T]]) -> tuple[T, Any]:
    """`change` on the instance, then the record in the libvirt domain (`recorder`, checked
    beforehand): a change the instance refused is never recorded. Returns the change's
    result and the recorder if it wrote its record (None: none, or it failed and a warning
    said so)."""
    try:
        result = await change()
        if recorder is not None:
            try:
                recorder.write()
            except Exception as e:  # DomainError: libvirt refused the edit
                if args.persist:
                    raise Failure(EXIT_INSTANCE_ERROR, f"done on the instance, but not "
                                  f"recorded in the domain: {e}") from None
                print(f"passtctl: warning: {e}", file=sys.stderr)
                return result, None
        return result, recorder
    finally:
        if recorder is not None:
            recorder.close()


def _recorded(args: argparse.Namespace, recorder: Any, remove: bool) -> dict[str, Any]:
    if recorder is None:
        return {}
    from .passtctl_libvirt import recorded_text

    if args.json:
        return {"recorded": {"domain": args.name, "changed": list(recorder.changed)}}
    print(recorded_text(args.name, recorder, remove=remove))
    return {}


async def _forward_add(client: Client, args: argparse.Namespace) -> int:
    host_port, guest_port = args.ports
    rule = {"protocol": args.protocol, "address": args.address, "host_port": host_port,
            "host_port_last": host_port, "guest_port": guest_port}
    recorder = _libvirt_recorder(args, rule if _records_in_libvirt(args) else None,
                                 remove=False)

    async def add() -> int:
        (forward_id,) = await client.call(bus_name(args.name), "AddForward", "ssqq",
                                          [args.protocol, args.address, host_port,
                                           guest_port], interactive=True)
        return int(forward_id)

    forward_id, recorder = await _change_forward(args, recorder, add)
    if not args.json:
        where = args.address or "*"
        print(f"forward {forward_id} added: {args.protocol} {where} port {host_port} -> "
              f"guest port {guest_port or host_port}")
    recorded = _recorded(args, recorder, remove=False)
    if args.json:
        print_json({"id": forward_id, **recorded})
    return EXIT_OK


async def _forward_remove(client: Client, args: argparse.Namespace) -> int:
    destination = bus_name(args.name)
    rule = None
    if _records_in_libvirt(args):
        rule = next((f for f in await client.listing(destination, "ListForwards")
                     if f["id"] == args.id), None)
    recorder = _libvirt_recorder(args, rule, remove=True)

    async def remove() -> None:
        await client.call(destination, "RemoveForward", "u", [args.id], interactive=True)

    _, recorder = await _change_forward(args, recorder, remove)
    if not args.json:
        print(f"forward {args.id} removed")
    recorded = _recorded(args, recorder, remove=True)
    if args.json:
        print_json({"id": args.id, **recorded})
    return EXIT_OK


# -- output -----------------------------------------------------------------------------------


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _print_table(headers: list[str], rows: list[list[str]], *, right: Collection[int] = (),
                 empty: str = "") -> None:
    if not rows:
        if empty:
            print(empty)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())


def print_error(message: str) -> None:
    print(f"passtctl: {message}", file=sys.stderr)


def _range(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def _endpoint(address: str, port: int) -> str:
    try:
        v6 = ipaddress.ip_address(address).version == 6
    except ValueError:
        v6 = False
    return f"[{address}]:{port}" if v6 else f"{address}:{port}"


def _bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def _age(seconds: float) -> str:
    total = int(seconds)
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


# -- the command line -------------------------------------------------------------------------


def _ports(text: str) -> tuple[int, int]:
    """`HOST[:GUEST]` -> (host port, guest port; 0 = the same), in the spec grammar's
    port syntax (engine/fwd.py)."""
    host, colon, guest = text.partition(":")
    try:
        return parse_port(host), parse_port(guest) if colon else 0
    except SpecError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected HOST_PORT[:GUEST_PORT], ports 1-65535 (one port, no range): "
            f"{e}") from None


def name_arg(text: str) -> str:
    """NAME and DOMAIN: an instance name (passtd.names), refused before anything is asked."""
    try:
        return check_name(text)
    except InvalidName as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _name_or_list_arg(text: str) -> str:
    return text if text in ("list", "metrics") else name_arg(text)


def _common_options() -> argparse.ArgumentParser:
    """Options accepted before and after the command (defaults suppressed, so a later
    parser does not reset what an earlier one set)."""
    common = argparse.ArgumentParser(add_help=False)
    bus = common.add_mutually_exclusive_group()
    bus.add_argument("--system", dest="session", action="store_false",
                     default=argparse.SUPPRESS, help="use the system bus (the default)")
    bus.add_argument("--session", dest="session", action="store_true",
                     default=argparse.SUPPRESS, help="use the session bus")
    bus.add_argument("--bus-address", metavar="ADDR", default=argparse.SUPPRESS,
                     help="use the bus at this D-Bus address, e.g. unix:path=/run/x.sock")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of tables")
    return common


def _build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="passtctl", parents=[common], description=DESCRIPTION, epilog=EPILOG,
        usage="passtctl [options] list|metrics\n       passtctl [options] NAME COMMAND ...\n"
              "       passtctl libvirt {attach,detach} DOMAIN ...",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", metavar="NAME|list|metrics", type=_name_or_list_arg,
                        help="an instance name (the VM's name), `list` for all instances, "
                             "or `metrics` for all their counters in the Prometheus text "
                             "format")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", prog="passtctl NAME")
    for command, help_text in (("status", "show the instance's state"),
                               ("forwards", "list its port forwards"),
                               ("flows", "list its live flows"),
                               ("stats", "show its counters: traffic, flows, drops, forwards")):
        sub.add_parser(command, parents=[common], help=help_text, description=help_text)
    monitor = sub.add_parser(
        "monitor", parents=[common], help="print its events live (forwards, flows, properties)",
        description="Print the instance's signals as they come: forwards added and removed, "
                    "flows opened and closed (batched by the instance: at most two signals "
                    "a second, each describing up to 64 flows), property changes, and its "
                    "restarts. Runs until interrupted (or --count events).")
    monitor.add_argument("--count", type=int, default=None, metavar="N",
                         help="stop after N events")
    forward = sub.add_parser("forward", parents=[common], help="add or remove a port forward")
    forward_sub = forward.add_subparsers(dest="action", metavar="ACTION", required=True,
                                         prog="passtctl NAME forward")
    libvirt_options = argparse.ArgumentParser(add_help=False)
    libvirt_options.add_argument(
        "--persist", action="store_true",
        help="also in the persistent definition of the libvirt domain NAME (from its next "
             "start on); fails if the domain cannot take it")
    libvirt_options.add_argument(
        "-c", "--connect", metavar="URI", default=None,
        help="libvirt URI of the domain (default: the local system libvirtd, as for "
             "`passtctl libvirt`)")
    libvirt_note = (" On the instance of a libvirt domain (started by passtd's hook) the "
                    "change is also made in the domain's live definition, which `virsh "
                    "migrate` takes along: the destination's instance starts with it.")
    add = forward_sub.add_parser(
        "add", parents=[common, libvirt_options], help="forward a host port to the guest",
        description="Forward host port HOST_PORT (on every address, or --address) to the "
                    "guest's GUEST_PORT (default: the same). The listener is open when the "
                    "command returns." + libvirt_note)
    add.add_argument("protocol", choices=("tcp", "udp"), metavar="PROTOCOL", help="tcp or udp")
    add.add_argument("ports", metavar="HOST_PORT[:GUEST_PORT]", type=_ports)
    add.add_argument("--address", default="", metavar="ADDR",
                     help="listen on this host address only (default: all, both families)")
    remove = forward_sub.add_parser(
        "remove", parents=[common, libvirt_options], help="close a port forward",
        description="Close forward ID (see `forwards`); connections made through it live "
                    "on." + libvirt_note)
    remove.add_argument("id", type=int, metavar="ID")
    return parser


COMMANDS = {
    "status": _status,
    "forwards": _forwards,
    "flows": _flows,
}


async def _run(args: argparse.Namespace) -> int:
    client = Client(await _connect(args), _describe_bus(args))
    try:
        if args.command is None and args.name == "metrics":
            from .passtctl_stats import metrics

            return await metrics(client, args)
        if args.command is None:
            return await _list(client, args)
        if args.command == "stats":
            from .passtctl_stats import stats

            return await stats(client, args)
        if args.command == "forward":
            handler = _forward_add if args.action == "add" else _forward_remove
            return await handler(client, args)
        if args.command == "monitor":
            from .passtctl_monitor import monitor

            return await monitor(client, args)
        return await COMMANDS[args.command](client, args)
    finally:
        client.bus.disconnect()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["libvirt"]:
        from .passtctl_libvirt import libvirt_main

        return libvirt_main(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)
    if args.command is None and args.name not in ("list", "metrics"):
        parser.error(f"what about instance {args.name!r}? give a command: "
                     "status, forwards, flows, stats, monitor or forward (or `passtctl "
                     "list`)")
    if args.command == "forward" and args.action == "remove" and not 0 <= args.id < 2**32:
        parser.error(f"forward id {args.id} out of range")
    try:
        return asyncio.run(_run(args))
    except Failure as e:
        print_error(str(e))
        return e.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # run as passtd.passtctl, not as __main__: passtctl_libvirt imports this module by name,
    # and its Failure must be the one main() catches
    from passtd import passtctl

    sys.exit(passtctl.main())
