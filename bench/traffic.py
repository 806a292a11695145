"""TCP load for the routing benchmark, run inside lab namespaces (stdlib only).

    python -m bench.traffic serve PORT             sink: read every connection to its end
    python -m bench.traffic send HOST PORT S       bulk: bytes per second over S seconds
    python -m bench.traffic connect HOST PORT S    connections opened and closed per second

``serve`` prints ``listening`` once ready. The others print one number.
Sender and receiver are the same small Python loops on every path, so
the ratio between paths measured in one run is what the hops cost.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

CHUNK = 256 * 1024


def serve(port: int) -> None:
    """Accept connections one after another and drain each (a sink for both loads)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", port))
        server.listen(512)
        print("listening", flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                while conn.recv(CHUNK):
                    pass


def send(host: str, port: int, seconds: float) -> float:
    """Bytes per second pushed through one connection for ``seconds``."""
    payload = b"\0" * CHUNK
    sent = 0
    with socket.create_connection((host, port), timeout=10) as sock:
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            sent += sock.send(payload)
    return sent / elapsed


def connect(host: str, port: int, seconds: float) -> float:
    """TCP connections opened (handshake done) and closed per second, one at a time."""
    count = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        with socket.create_connection((host, port), timeout=10):
            count += 1
    return count / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.traffic", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve").add_argument("port", type=int)
    for name in ("send", "connect"):
        command = commands.add_parser(name)
        command.add_argument("host")
        command.add_argument("port", type=int)
        command.add_argument("seconds", type=float)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port)
        return 0
    work = send if args.command == "send" else connect
    print(f"{work(args.host, args.port, args.seconds):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
