"""`passtctl NAME stats` and `passtctl metrics`: what instances have done, as counters.

Design: GetStatistics (the qemu stream both ways, flows, drops by reason) and
ListForwards (connections, refusals and bytes per forward) of the instance, or of every
instance for `metrics`, which prints them in the Prometheus text exposition format
(version 0.0.4): what node_exporter's textfile collector reads, e.g. every minute from
a timer,

    passtctl metrics > /var/lib/prometheus/node-exporter/passtd.prom.$$ &&
        mv /var/lib/prometheus/node-exporter/passtd.prom.$$ \\
           /var/lib/prometheus/node-exporter/passtd.prom

and what a scrape of a file server takes as well. Counters count from the instance
process's start: a restart starts them again from zero, which Prometheus's rate()
treats as a counter reset.

Not done here: an HTTP endpoint of our own (a scrape target per host is the exporter's
job), histograms.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping
from typing import Any

from .dbus_api import bus_name, instance_name
from .passtctl import (
    EXIT_INSTANCE_ERROR,
    EXIT_OK,
    Client,
    _bytes,
    _plain,
    _print_table,
    each_instance,
    print_error,
    print_json,
)

DROP_HELP = "what the instance dropped or refused, by reason"


async def statistics(client: Client, destination: str) -> dict[str, Any]:
    (stats,) = await client.call(destination, "GetStatistics")
    out = _plain(stats)
    out["drops"] = dict(out.get("drops", {}))
    return out


async def stats(client: Client, args: argparse.Namespace) -> int:
    name = bus_name(args.name)
    counters, forwards = await asyncio.gather(statistics(client, name),
                                              client.listing(name, "ListForwards"))
    if args.json:
        print_json({"instance": args.name, **counters, "forwards": forwards})
        return EXIT_OK
    print(f"from the guest: {counters['frames_from_guest']} frames, "
          f"{_bytes(counters['bytes_from_guest'])}")
    print(f"to the guest:   {counters['frames_to_guest']} frames, "
          f"{_bytes(counters['bytes_to_guest'])}, {counters['frames_dropped_to_guest']} "
          "dropped (qemu not reading)")
    print(f"flows:          {counters['flows']} now, {counters['flows_opened']} opened")
    drops = counters["drops"]
    print("drops:          " + (", ".join(f"{reason} {count}" for reason, count
                                          in sorted(drops.items())) or "none"))
    if forwards:
        print()
        _print_table(["ID", "PROTO", "SPEC", "CONNECTIONS", "REFUSED", "FROM GUEST",
                      "TO GUEST"],
                     [[str(f["id"]), f["protocol"], f["spec"], str(f["connections"]),
                       str(f.get("refused", 0)), _bytes(f.get("bytes_from_guest", 0)),
                       _bytes(f.get("bytes_to_guest", 0))] for f in forwards],
                     right={0, 3, 4, 5, 6})
    return EXIT_OK


def _label(value: object) -> str:
    text = str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Exposition:
    """Metric families in the Prometheus text format, samples grouped under their TYPE."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_text: str, labels: Mapping[str, object],
            value: float) -> None:
        family = self._families.setdefault(name, (kind, help_text, []))
        text = ",".join(f'{key}="{_label(val)}"' for key, val in labels.items())
        family[2].append(f"{name}{{{text}}} {value}")

    def text(self) -> str:
        out = []
        for name, (kind, help_text, samples) in self._families.items():
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(out) + "\n"


def _instance_metrics(out: Exposition, instance: str, props: dict[str, Any],
                      counters: dict[str, Any], forwards: list[dict[str, Any]]) -> None:
    base = {"instance": instance}
    out.add("passtd_up", "gauge", "1: the instance answers", base, 1)
    out.add("passtd_guest_connected", "gauge", "1: qemu is connected", base,
            int(bool(props.get("GuestConnected"))))
    for direction in ("from_guest", "to_guest"):
        labels = {**base, "direction": direction}
        out.add("passtd_guest_frames_total", "counter",
                "Ethernet frames between the guest and the instance", labels,
                counters[f"frames_{direction}"])
        out.add("passtd_guest_bytes_total", "counter",
                "bytes on the qemu stream (frames and their length prefixes)", labels,
                counters[f"bytes_{direction}"])
    out.add("passtd_guest_frames_dropped_total", "counter",
            "frames for the guest dropped while qemu did not read", base,
            counters["frames_dropped_to_guest"])
    out.add("passtd_flows", "gauge", "live flows (TCP connections, UDP flows, pings)", base,
            counters["flows"])
    out.add("passtd_flows_opened_total", "counter", "flows opened", base,
            counters["flows_opened"])
    for reason, count in sorted(counters["drops"].items()):
        out.add("passtd_drops_total", "counter", DROP_HELP, {**base, "reason": reason}, count)
    for fwd in forwards:
        labels = {**base, "forward": fwd["id"], "protocol": fwd["protocol"],
                  "spec": fwd["spec"]}
        out.add("passtd_forward_connections_total", "counter",
                "connections (UDP: peers) a forward took to the guest", labels,
                fwd["connections"])
        out.add("passtd_forward_refused_total", "counter",
                "connections (UDP: datagrams) a forward could not take to the guest", labels,
                fwd.get("refused", 0))
        for direction in ("from_guest", "to_guest"):
            out.add("passtd_forward_bytes_total", "counter",
                    "bytes of a forward's flows", {**labels, "direction": direction},
                    fwd.get(f"bytes_{direction}", 0))


async def metrics(client: Client, args: argparse.Namespace) -> int:
    names = await client.instance_names()

    async def gather(name: str) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        props, counters, forwards = await asyncio.gather(
            client.properties(name), statistics(client, name),
            client.listing(name, "ListForwards"))
        return props, counters, forwards

    gathered, failed = await each_instance(names, gather)
    out = Exposition()
    for name in names:
        instance = instance_name(name) or name
        if name in failed:
            print_error(str(failed[name]))
            out.add("passtd_up", "gauge", "1: the instance answers", {"instance": instance}, 0)
        elif name in gathered:
            _instance_metrics(out, instance, *gathered[name])
    print(out.text(), end="")
    return EXIT_INSTANCE_ERROR if failed else EXIT_OK
