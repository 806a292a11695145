"""The ports a hop serves itself, which no forward may take over.

A forward step DNATs what arrives at this hop's own address on its ports,
so a step on a port the hop serves would silently hand that service's
clients to another qube. Before each forward update the worker asks this
module what the hop serves, and leaves out (and reports) the steps that
would take it:

- listening sockets (TCP in ``LISTEN``, unconnected UDP) bound to any
  address but loopback, read from ``/proc/net/{tcp,tcp6,udp,udp6}`` of the
  worker's own network namespace;
- ports the user opened in the hop's ``custom-input`` chains (an
  ``accept`` rule naming a destination port), whether or not a service
  listens there right now.

A port counts in both families and whatever address it is bound to: the
check is about the port a forward would take at this hop.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_worker.nft_chains import NftError, Runner

PROC_NET = Path("/proc/net")
_LISTEN, _UNCONNECTED = "0A", "07"
_PROTOS = ("tcp", "udp")


@dataclass(frozen=True)
class Served:
    """A port range of one protocol the hop serves, and how it is known."""

    proto: str
    first: int
    last: int
    why: str

    def overlaps(self, proto: str, ports: tuple[int, int]) -> bool:
        return proto == self.proto and self.first <= ports[1] and ports[0] <= self.last


def _address(hex_text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net prints it: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def _loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def listening(proto: str, text: str) -> set[int]:
    """Ports of sockets serving others in one ``/proc/net/{tcp,udp}[6]`` listing."""
    ports = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        try:
            local_hex, port_hex = fields[1].split(":")
            remote_hex = fields[2].split(":")[0]
            address, port = _address(local_hex), int(port_hex, 16)
        except ValueError:
            continue
        wanted = _LISTEN if proto == "tcp" else _UNCONNECTED
        if fields[3] != wanted or _loopback(address) or int(remote_hex, 16) != 0:
            continue
        ports.add(port)
    return ports


def sockets(proc_net: Path = PROC_NET) -> list[Served]:
    """What the hop's own sockets serve."""
    served = []
    for proto in _PROTOS:
        ports: set[int] = set()
        for name in (proto, f"{proto}6"):
            try:
                ports |= listening(proto, (proc_net / name).read_text())
            except OSError:
                continue  # no IPv6 in this qube
        served += [Served(proto, port, port, "this qube listens on it") for port in sorted(ports)]
    return served


def _values(right: Any) -> Iterator[tuple[int, int]]:
    """Port ranges of the right-hand side of an nft JSON match."""
    if isinstance(right, int):
        yield right, right
    elif isinstance(right, dict) and isinstance(right.get("range"), list):
        first, last = right["range"]
        if isinstance(first, int) and isinstance(last, int):
            yield first, last
    elif isinstance(right, dict) and isinstance(right.get("set"), list):
        for item in right["set"]:
            yield from _values(item)


def _protos(right: Any) -> set[str]:
    items = right["set"] if isinstance(right, dict) and "set" in right else [right]
    return {item for item in items if item in _PROTOS}


def opened(rules: Iterable[dict[str, Any]]) -> list[Served]:
    """Ports the ``accept`` rules of a ``custom-input`` listing open (nft JSON rules)."""
    served = []
    for rule in rules:
        exprs = [e for e in rule.get("expr", []) if isinstance(e, dict)]
        if not any("accept" in e for e in exprs):
            continue
        matches = [e["match"] for e in exprs if isinstance(e.get("match"), dict)]
        protos: set[str] = set(_PROTOS)
        ranges: list[tuple[str | None, tuple[int, int]]] = []
        for match in matches:
            left = match.get("left", {})
            if match.get("op") not in ("==", "in"):
                continue
            if left == {"meta": {"key": "l4proto"}}:
                protos = _protos(match.get("right"))
            payload = left.get("payload", {}) if isinstance(left, dict) else {}
            if payload.get("field") == "dport" and payload.get("protocol") in (*_PROTOS, "th"):
                proto = payload["protocol"]
                ranges += [(None if proto == "th" else proto, r) for r in _values(match["right"])]
        for proto, (first, last) in ranges:
            for name in [proto] if proto is not None else sorted(protos):
                served.append(Served(name, first, last, "its user opened it in custom-input"))
    return served


def custom_input(runner: Runner) -> list[Served]:
    """What the user opened in ``custom-input`` of both families (a missing chain opens nothing)."""
    served = []
    for family in ("ip", "ip6"):
        try:
            listing = json.loads(runner(f"list chain {family} qubes custom-input") or "{}")
        except (NftError, ValueError):
            continue
        rules = [
            item["rule"] for item in listing.get("nftables", [])
            if isinstance(item, dict) and isinstance(item.get("rule"), dict)
        ]
        served += opened(rules)
    return served


def served(runner: Runner, proc_net: Path = PROC_NET) -> list[Served]:
    """Every port range this hop serves itself."""
    return sockets(proc_net) + custom_input(runner)
