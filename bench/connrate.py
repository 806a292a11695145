"""New TCP connections per second: a server that accepts and closes, a client that counts.

Run inside network namespaces by :mod:`bench.dataplane`:

    python -m bench.connrate serve PORT
    python -m bench.connrate connect HOST PORT SECONDS

``serve`` prints ``ready`` once listening; ``connect`` opens, completes and
closes one connection after the other for SECONDS and prints how many it
made. Each connection is a new conntrack entry at every hop on the way:
what the first packet of a flow costs, rules and lookups included.
"""

from __future__ import annotations

import socket
import sys
import time


def serve(port: int) -> None:
    """Accept and close every connection until killed (the client waits for the close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", port))
        listener.listen(1024)
        print("ready", flush=True)
        while True:
            connection, _peer = listener.accept()
            connection.close()


def connect(host: str, port: int, seconds: float) -> int:
    """Connections completed (connected, then closed by the server) within ``seconds``."""
    count = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        with socket.create_connection((host, port), timeout=2) as connection:
            connection.recv(1)  # the server's close: the whole handshake went through
        count += 1
    return count


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"] and len(argv) == 2:
        serve(int(argv[1]))
        return 0
    if argv[:1] == ["connect"] and len(argv) == 4:
        print(connect(argv[1], int(argv[2]), float(argv[3])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
