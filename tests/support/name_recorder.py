"""A name server that answers nothing and writes down every question it gets.

    python tests/support/name_recorder.py LOGFILE

Run inside a lab namespace, whose resolv.conf names the namespace's own loopback
(passtd.tools.lab): every DNS query a program there makes, over UDP or TCP, IPv4 or
IPv6, becomes one line in LOGFILE (the raw query in hex) and gets no answer (UDP) or a
closed connection (TCP), so the asker fails at once. Tests use it to show that the lab's
tools resolve no names.
"""

from __future__ import annotations

import selectors
import socket
import sys


def main() -> None:
    log = open(sys.argv[1], "a", buffering=1)  # noqa: SIM115 (open for the process's life)
    sel = selectors.DefaultSelector()
    for af, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        udp = socket.socket(af, socket.SOCK_DGRAM)
        udp.bind((host, 53))
        tcp = socket.socket(af, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((host, 53))
        tcp.listen(16)
        sel.register(udp, selectors.EVENT_READ, "udp")
        sel.register(tcp, selectors.EVENT_READ, "tcp")
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "udp":
                query, _peer = sock.recvfrom(4096)
            else:
                conn, _peer = sock.accept()
                conn.settimeout(1)
                try:
                    query = conn.recv(4096)
                except OSError:
                    query = b""
                conn.close()
            log.write(query.hex() + "\n")


if __name__ == "__main__":
    main()
