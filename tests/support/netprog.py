"""Traffic endpoints for the integration tests, run inside lab namespaces (stdlib only).

TCP exchange protocol, verifiable byte for byte in both directions over one connection:
the client sends a header line "<reply size> <seed>\\n", then its payload, then shuts
down its write side; the server hashes everything up to EOF, answers "<sha256> <bytes>\\n"
and then <reply size> bytes generated from <seed>, and closes. The client checks both the
digest of what it sent and the reply it regenerates from the seed.

    netprog.py tcp-server --bind ADDR --port P [--slow-start SEC]
    netprog.py tcp-client --host ADDR --port P --send N --reply N [--connections C]
                          [--read-delay SEC] [--read-chunk N --read-pause SEC]
                          [--pause-file PATH] [--send-pause SEC]
    netprog.py udp-burst --host ADDR --port P --count N --size N [--burst N]
    netprog.py tcp-probe --host ADDR --port P --count N --interval SEC
                          (N small exchanges one after the other: does every one succeed?)
    netprog.py whoami-server --bind ADDR --port P   (answers "<peer address> <peer port>")
    netprog.py udp-echo --bind ADDR --port P

Clients print one JSON line with what they measured; exit status 0 means verified.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import sys
import threading
import time

CHUNK = 1 << 16


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError(f"EOF inside a header line ({line!r})")
        line += byte
    return line


def serve_exchange(conn: socket.socket) -> None:
    with conn:
        reply_size, seed = (int(x) for x in read_line(conn).split())
        digest = hashlib.sha256()
        total = 0
        while data := conn.recv(CHUNK):
            digest.update(data)
            total += len(data)
        conn.sendall(f"{digest.hexdigest()} {total}\n".encode())
        conn.sendall(pattern(seed, reply_size))


def tcp_server(args: argparse.Namespace) -> int:
    srv = socket.socket(family_of(args.bind), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if srv.family == socket.AF_INET6:
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind((args.bind, args.port))
    srv.listen(256)
    handler = whoami if args.command == "whoami-server" else serve_exchange
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def whoami(conn: socket.socket) -> None:
    with conn:
        host, port = conn.getpeername()[:2]
        conn.sendall(f"{host} {port}\n".encode())


def udp_echo(args: argparse.Namespace) -> int:
    sock = socket.socket(family_of(args.bind), socket.SOCK_DGRAM)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((args.bind, args.port))
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


def one_exchange(args: argparse.Namespace, index: int, results: list) -> None:
    seed = args.seed + index
    payload = pattern(seed ^ 0x5A5A, args.send)
    started = time.monotonic()
    with socket.create_connection((args.host, args.port), timeout=args.timeout) as sock:
        sock.sendall(f"{args.reply} {seed}\n".encode())
        view = memoryview(payload)
        half = len(view) // 2 if args.pause_file else 0 if args.send_pause else len(view)
        sock.sendall(view[:half])
        if args.pause_file:
            print("PAUSED", flush=True)  # the connection is up, half the data is through
            while not os.path.exists(args.pause_file):
                time.sleep(0.05)
        for i in range(half, len(view), CHUNK):
            sock.sendall(view[i : i + CHUNK])
            if args.send_pause:
                time.sleep(args.send_pause)  # a transfer that lasts
        sock.shutdown(socket.SHUT_WR)
        if args.read_delay:
            time.sleep(args.read_delay)  # our receive window fills up and closes
        header = read_line(sock).split()
        received = bytearray()
        while True:
            data = sock.recv(args.read_chunk or CHUNK)
            if not data:
                break
            received += data
            if args.read_pause:
                time.sleep(args.read_pause)
    results[index] = {
        "sent_ok": header == [hashlib.sha256(payload).hexdigest().encode(),
                              str(len(payload)).encode()],
        "reply_ok": received == pattern(seed, args.reply),
        "received": len(received),
        "seconds": round(time.monotonic() - started, 3),
    }


def tcp_client(args: argparse.Namespace) -> int:
    results: list = [None] * args.connections
    errors: list[str] = []

    def run(i: int) -> None:
        try:
            one_exchange(args, i, results)
        except OSError as e:
            errors.append(f"connection {i}: {e!r}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = not errors and all(r and r["sent_ok"] and r["reply_ok"] for r in results)
    print(json.dumps({"ok": ok, "errors": errors[:5], "results": results[:5],
                      "connections": args.connections}))
    return 0 if ok else 1


def tcp_probe(args: argparse.Namespace) -> int:
    """Small exchanges, one after the other (each a fresh connection): across a restart of
    the instance behind the port, none may be refused or reset."""
    failures: list[str] = []
    args.send = args.reply = 100
    for i in range(args.count):
        results: list = [None]
        args.seed = i
        try:
            one_exchange(args, 0, results)
            if not (results[0]["sent_ok"] and results[0]["reply_ok"]):
                failures.append(f"exchange {i}: corrupt")
        except OSError as e:
            failures.append(f"exchange {i}: {e!r}")
        time.sleep(args.interval)
    print(json.dumps({"ok": not failures, "attempts": args.count, "failures": failures[:5]}))
    return 0 if not failures else 1


def udp_burst(args: argparse.Namespace) -> int:
    # numeric only: a lab never looks names up (a lookup behind its dead end waits)
    family, kind, proto, _, addr = socket.getaddrinfo(args.host, args.port,
                                                      type=socket.SOCK_DGRAM,
                                                      flags=socket.AI_NUMERICHOST)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect(addr)  # getaddrinfo resolves a "%iface" scope for link-local peers
    sock.settimeout(2.0)
    echoed: set[int] = set()
    corrupt = 0
    for start in range(0, args.count, args.burst):
        batch = range(start, min(start + args.burst, args.count))
        for seq in batch:
            sock.send(seq.to_bytes(4, "big") + pattern(seq, args.size - 4))
        deadline = time.monotonic() + 2.0
        while not all(s in echoed for s in batch) and time.monotonic() < deadline:
            try:
                data = sock.recv(65535)
            except TimeoutError:
                break
            seq = int.from_bytes(data[:4], "big")
            if data[4:] != pattern(seq, args.size - 4):
                corrupt += 1
            echoed.add(seq)
    print(json.dumps({"sent": args.count, "echoed": len(echoed), "corrupt": corrupt}))
    return 0 if corrupt == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("tcp-server", "whoami-server", "udp-echo"):
        p = sub.add_parser(name)
        p.add_argument("--bind", required=True)
        p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("tcp-client")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--send", type=int, default=0)
    p.add_argument("--reply", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--read-delay", type=float, default=0.0)
    p.add_argument("--read-chunk", type=int, default=0)
    p.add_argument("--read-pause", type=float, default=0.0)
    p.add_argument("--send-pause", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--pause-file", help="after half the payload, wait until this file exists")
    p = sub.add_parser("tcp-probe")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--pause-file", default=None)
    p.add_argument("--send-pause", type=float, default=0.0)
    p.add_argument("--read-delay", type=float, default=0.0)
    p.add_argument("--read-chunk", type=int, default=0)
    p.add_argument("--read-pause", type=float, default=0.0)
    p = sub.add_parser("udp-burst")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--burst", type=int, default=50)
    args = parser.parse_args(argv)
    if args.command in ("tcp-server", "whoami-server"):
        return tcp_server(args)
    if args.command == "udp-echo":
        return udp_echo(args)
    if args.command == "tcp-client":
        return tcp_client(args)
    if args.command == "tcp-probe":
        return tcp_probe(args)
    return udp_burst(args)


if __name__ == "__main__":
    sys.exit(main())
