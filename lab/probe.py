"""Tiny traffic tool for lab namespaces (stdlib, and the agent's ARP/NDP frames for ``neigh``).

    python -m lab.probe serve tcp|udp PORT [--reply TEXT] [--bind ADDR]
    python -m lab.probe connect tcp|udp HOST PORT [--timeout S] [--source ADDR]
    python -m lab.probe scan tcp HOST PORTS [--timeout S]
    python -m lab.probe echo tcp|udp PORT [--bind ADDR]
    python -m lab.probe talk tcp|udp HOST PORT [--interval S]
    python -m lab.probe neigh IFACE ADDRESS --source ADDR [--timeout S]

``serve`` prints ``listening PROTO PORT`` once ready, then ``peer ADDR PORT``
for each connection or datagram, and answers each with the reply text.
``connect`` prints the reply and exits 0, or exits 1 on refusal or timeout.
``scan`` prints each open port on its own line (e.g. ``22``); PORTS is a
list like ``22,80,8000-8100``. ``echo`` keeps each TCP connection open and
sends back whatever it gets (each datagram, for UDP); ``talk`` keeps one
flow to such a server going, sending a line every interval and printing
``echo TIME`` (wall clock) for each answer, so a test sees when a live flow
stops passing.
``neigh`` asks on IFACE who has ADDRESS (an ARP request, or a neighbour
solicitation, from ADDR) and prints the MAC of each machine that answers.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import select
import selectors
import socket
import sys
import time

from agent_worker import neighbours

#: Lets ``connect --source`` bind and route from an address the namespace
#: does not hold, which is how the tests send spoofed packets (Linux
#: IP_TRANSPARENT; needs CAP_NET_ADMIN, as any spoofing does).
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SCAN_BATCH = 512
#: How long ``talk`` keeps trying to open its flow.
CONNECT_PATIENCE = 10.0


def _family(address: str) -> socket.AddressFamily:
    """IPv6 for an address with a colon, else IPv4 (addresses only, no names)."""
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def serve(proto: str, port: int, reply: bytes, bind: str) -> None:
    """Answer every client with ``reply`` until killed (IPv6 only when ``bind`` is IPv6)."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(_family(bind), kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if _family(bind) == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((bind, port))
        if proto == "tcp":
            sock.listen(64)
        print(f"listening {proto} {port}", flush=True)
        while True:
            if proto == "tcp":
                conn, peer = sock.accept()
                print(f"peer {peer[0]} {peer[1]}", flush=True)
                with conn, contextlib.suppress(OSError):
                    conn.sendall(reply)
            else:
                _, peer = sock.recvfrom(65535)
                print(f"peer {peer[0]} {peer[1]}", flush=True)
                sock.sendto(reply, peer)


def connect(proto: str, host: str, port: int, timeout: float, source: str | None) -> bytes:
    """The server's reply; OSError (refused, unreachable, timeout) otherwise."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    deadline = time.monotonic() + timeout
    with socket.socket(_family(host), kind) as sock:
        if source is not None:
            if _family(host) == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((host, port))
        if proto == "udp":
            sock.send(b"probe\n")
            return sock.recv(65535)
        reply = bytearray()
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65535)
            if not chunk:
                return bytes(reply)
            reply += chunk


def echo(proto: str, port: int, bind: str) -> None:
    """Send back what each client sends, keeping TCP connections open, until killed."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(_family(bind), kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if _family(bind) == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((bind, port))
        if proto == "tcp":
            sock.listen(64)
        print(f"listening {proto} {port}", flush=True)
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                current = key.fileobj
                assert isinstance(current, socket.socket)
                if current is sock and proto == "tcp":
                    conn, peer = sock.accept()
                    print(f"peer {peer[0]} {peer[1]}", flush=True)
                    selector.register(conn, selectors.EVENT_READ)
                elif proto == "udp":
                    data, peer = sock.recvfrom(65535)
                    sock.sendto(data, peer)
                else:
                    try:
                        data = current.recv(65535)
                        if data:
                            current.sendall(data)
                            continue
                    except OSError:
                        pass
                    selector.unregister(current)
                    current.close()


def talk(proto: str, host: str, port: int, interval: float) -> None:
    """Keep one flow to an ``echo`` server going; ``echo TIME`` per answer, until killed.

    Exits when a TCP connection is closed or reset; a flow that stops
    passing just stops printing.
    """
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    deadline = time.monotonic() + CONNECT_PATIENCE
    while True:  # the rules that let the flow through may still be on their way
        sock = socket.socket(_family(host), kind)
        try:
            sock.settimeout(interval * 4)
            sock.connect((host, port))
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)
    with sock:
        while True:
            try:
                sock.send(b"x\n")
            except OSError as err:
                if proto == "tcp":
                    print(f"closed {err}", flush=True)
                    return
                # an ICMP error on a UDP flow: keep sending
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data = sock.recv(65535)
                except TimeoutError:
                    break
                except OSError as err:
                    if proto == "tcp":
                        print(f"closed {err}", flush=True)
                        return
                    continue  # ICMP errors on a UDP flow: keep trying
                if proto == "tcp" and not data:
                    print("closed by the server", flush=True)
                    return
                print(f"echo {time.time():.3f}", flush=True)
            time.sleep(max(0.0, deadline - time.monotonic()))


def parse_ports(untrusted_text: str) -> list[int]:
    """``22,80,8000-8100`` as a sorted list; ValueError on anything else."""
    ports: set[int] = set()
    for part in untrusted_text.split(","):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port range {part!r}")
        ports.update(range(low, high + 1))
    return sorted(ports)


def scan(host: str, ports: list[int], timeout: float) -> list[int]:
    """TCP ports of ``host`` that accept a connection, probed in parallel batches."""
    open_ports = []
    for start in range(0, len(ports), SCAN_BATCH):
        selector = selectors.DefaultSelector()
        pending: dict[socket.socket, int] = {}
        for port in ports[start : start + SCAN_BATCH]:
            sock = socket.socket(_family(host), socket.SOCK_STREAM)
            sock.setblocking(False)
            status = sock.connect_ex((host, port))
            if status not in (0, errno.EINPROGRESS):
                sock.close()
                continue
            pending[sock] = port
            selector.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + timeout
        while pending and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(remaining):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    open_ports.append(pending[sock])
                selector.unregister(sock)
                sock.close()
                del pending[sock]
        for sock in pending:
            sock.close()
        selector.close()
    return sorted(open_ports)


def neigh(iface: str, address: str, source: str, timeout: float) -> list[str]:
    """MACs that answer "who has ``address``" on ``iface``, asked from ``source``."""
    target, sender = ipaddress.ip_address(address), ipaddress.ip_address(source)
    link = neighbours.Link(iface)
    try:
        if target.version != sender.version:
            raise ValueError("ADDRESS and --source must be of the same family")
        if isinstance(target, ipaddress.IPv4Address):
            frame = neighbours.arp_frame(1, link.mac, ipaddress.IPv4Address(sender), b"\x00" * 6,
                                         target)
        else:
            frame = neighbours.solicitation(link.mac, target, ipaddress.IPv6Address(sender))
        link.send(frame)
        answered: list[str] = []
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            select.select(list(link.fds()), [], [], remaining)
            for claim in link.receive():
                if claim.address == target and not claim.probe and claim.mac not in answered:
                    answered.append(claim.mac)
        return answered
    finally:
        link.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probe", description="lab traffic tool")
    commands = parser.add_subparsers(dest="command", required=True)
    p_serve = commands.add_parser("serve", help="answer connections")
    p_serve.add_argument("proto", choices=("tcp", "udp"))
    p_serve.add_argument("port", type=int)
    p_serve.add_argument("--reply", default="ok", help="text sent to each client")
    p_serve.add_argument("--bind", default="0.0.0.0",
                         help="local address to listen on ('::' for any IPv6 address)")
    p_connect = commands.add_parser("connect", help="connect once, print the reply")
    p_connect.add_argument("proto", choices=("tcp", "udp"))
    p_connect.add_argument("host")
    p_connect.add_argument("port", type=int)
    p_connect.add_argument("--timeout", type=float, default=2.0)
    p_connect.add_argument("--source", help="source address (need not be local)")
    p_echo = commands.add_parser("echo", help="send back what clients send, keeping flows")
    p_echo.add_argument("proto", choices=("tcp", "udp"))
    p_echo.add_argument("port", type=int)
    p_echo.add_argument("--bind", default="0.0.0.0",
                        help="local address to listen on ('::' for any IPv6 address)")
    p_talk = commands.add_parser("talk", help="keep a flow to an echo server going")
    p_talk.add_argument("proto", choices=("tcp", "udp"))
    p_talk.add_argument("host")
    p_talk.add_argument("port", type=int)
    p_talk.add_argument("--interval", type=float, default=0.05)
    p_scan = commands.add_parser("scan", help="list open TCP ports")
    p_scan.add_argument("proto", choices=("tcp",))
    p_scan.add_argument("host")
    p_scan.add_argument("ports")
    p_scan.add_argument("--timeout", type=float, default=1.0)
    p_neigh = commands.add_parser("neigh", help="who answers ARP/NDP for an address")
    p_neigh.add_argument("iface")
    p_neigh.add_argument("address")
    p_neigh.add_argument("--source", required=True, help="the asker's own address")
    p_neigh.add_argument("--timeout", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.command == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            serve(args.proto, args.port, args.reply.encode(), args.bind)
        return 0
    if args.command == "echo":
        with contextlib.suppress(KeyboardInterrupt):
            echo(args.proto, args.port, args.bind)
        return 0
    if args.command == "talk":
        try:
            with contextlib.suppress(KeyboardInterrupt):
                talk(args.proto, args.host, args.port, args.interval)
        except OSError as err:
            print(f"no flow: {err}", file=sys.stderr)
            return 1
        return 0
    if args.command == "connect":
        try:
            reply = connect(args.proto, args.host, args.port, args.timeout, args.source)
        except OSError as err:
            print(f"no reply: {err}", file=sys.stderr)
            return 1
        print(reply.decode(errors="replace"))
        return 0
    if args.command == "neigh":
        try:
            answered = neigh(args.iface, args.address, args.source, args.timeout)
        except (ValueError, OSError) as err:
            parser.error(str(err))
        for mac in answered:
            print(mac)
        return 0
    try:
        ports = parse_ports(args.ports)
    except ValueError as err:
        parser.error(str(err))
    for port in scan(args.host, ports, args.timeout):
        print(port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
