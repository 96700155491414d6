"""`passtctl NAME monitor`: an instance's signals, live, one line each (or JSON).

Design: match rules on the bus for the instance's signals (ForwardAdded, ForwardRemoved,
FlowOpened, FlowClosed, PropertiesChanged: dbus_api.py) and for the owner changes of its
bus name, so that a restart shows as "stopped" then "running again" and the monitor goes
on with the new process. Flow signals come batched (at most two a second, see
dbus_api.py): each flow gets its line, and the batch's `omitted` count one more.

Not done here: replaying what happened before it started (ListFlows and ListForwards
are there for that), filtering (grep does it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from dbus_fast import Message, MessageType

from .dbus_api import INTERFACE, OBJECT_PATH, bus_name
from .passtctl import (
    DBUS,
    EXIT_OK,
    Client,
    _bytes,
    _endpoint,
    _plain,
)

SIGNALS = ("ForwardAdded", "ForwardRemoved", "FlowOpened", "FlowClosed")


def _flow_text(flow: dict[str, Any]) -> str:
    return (f"{flow['id']} {flow['protocol']} "
            f"{_endpoint(flow['guest_address'], flow['guest_port'])} -> "
            f"{_endpoint(flow['peer_address'], flow['peer_port'])} ({flow['origin']})")


def _lines(member: str, body: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    """(text, JSON object) for each line a signal makes."""
    if member in ("ForwardAdded", "ForwardRemoved"):
        fwd = _plain(body[0])
        what = "forward added" if member == "ForwardAdded" else "forward removed"
        return [(f"{what}: {fwd['id']} {fwd['protocol']} {fwd['spec']} ({fwd['origin']})",
                 {"event": member, "forward": fwd})]
    if member in ("FlowOpened", "FlowClosed"):
        flows = [_plain(entry) for entry in body[0]]
        omitted = int(body[1])
        out: list[tuple[str, dict[str, Any]]] = []
        for flow in flows:
            text = f"flow {'opened' if member == 'FlowOpened' else 'closed'}: {_flow_text(flow)}"
            if member == "FlowClosed":
                text += (f", {_bytes(flow['bytes_from_guest'])} from the guest, "
                         f"{_bytes(flow['bytes_to_guest'])} to it")
            out.append((text, {"event": member, "flow": flow}))
        if omitted:
            out.append((f"... and {omitted} more flows {member[4:].lower()}",
                        {"event": member, "omitted": omitted}))
        return out
    if member == "PropertiesChanged":
        changed = _plain(body[1])
        return [(f"{name}: {json.dumps(value)}", {"event": "PropertiesChanged",
                                                   "property": name, "value": value})
                for name, value in sorted(changed.items())]
    return []


async def monitor(client: Client, args: argparse.Namespace) -> int:
    name = bus_name(args.name)
    rules = [f"type='signal',sender='{name}',path='{OBJECT_PATH}',interface='{INTERFACE}'",
             f"type='signal',sender='{name}',path='{OBJECT_PATH}',"
             f"interface='{DBUS}.Properties',member='PropertiesChanged'",
             f"type='signal',sender='{DBUS}',interface='{DBUS}',member='NameOwnerChanged',"
             f"arg0='{name}'"]
    for rule in rules:
        await client.call(DBUS, "AddMatch", "s", [rule], interface=DBUS,
                          path="/org/freedesktop/DBus")
    await client.properties(name)  # not running: the usual failure and exit status
    events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def on_message(msg: Message) -> bool:
        if msg.message_type != MessageType.SIGNAL:
            return False
        if msg.member == "NameOwnerChanged" and msg.body and msg.body[0] == name:
            running = bool(msg.body[2])
            events.put_nowait(("instance running again" if running else "instance stopped",
                               {"event": "running" if running else "stopped"}))
        elif msg.member in (*SIGNALS, "PropertiesChanged") and msg.path == OBJECT_PATH:
            for line in _lines(msg.member, list(msg.body)):
                events.put_nowait(line)
        return False

    client.bus.add_message_handler(on_message)
    if not args.json:
        print(f"monitoring instance {args.name} (Ctrl-C to stop)", flush=True)
    seen = 0
    while args.count is None or seen < args.count:
        text, obj = await events.get()
        stamp = time.strftime("%H:%M:%S")
        if args.json:
            print(json.dumps({"time": time.time(), **obj}), flush=True)
        else:
            print(f"{stamp} {text}", flush=True)
        seen += 1
    sys.stdout.flush()
    return EXIT_OK
