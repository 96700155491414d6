"""A static web server for lab namespaces (the demo's pages), that never resolves a name.

    python -m passtd.tools.lab_http --bind ADDR --port PORT --directory DIR

Why not `python -m http.server`: its server_bind() calls socket.getfqdn() on the bind
address before it listens, which asks the DNS server of resolv.conf; behind the lab's dead
end that took 10 s and failed the demo on machines whose /etc/hosts did not answer. This
one binds and listens, and names the server by its address. Requests are logged with the
client's address as it is (no reverse lookup).

Not done here: anything but GET/HEAD of files (SimpleHTTPRequestHandler's), TLS.
"""

from __future__ import annotations

import argparse
import functools
import socket
import socketserver
from collections.abc import Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class AddressOnlyServer(ThreadingHTTPServer):
    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: it calls getfqdn()
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


def serve(bind: str, port: int, directory: str) -> None:
    AddressOnlyServer.address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    handler = functools.partial(SimpleHTTPRequestHandler, directory=directory)
    with AddressOnlyServer((bind, port), handler) as server:
        server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m passtd.tools.lab_http",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--bind", required=True, help="an address (no names)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--directory", required=True)
    args = ap.parse_args(argv)
    serve(args.bind, args.port, args.directory)


if __name__ == "__main__":
    main()
