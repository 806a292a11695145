"""The kernel state of routing exposure beyond nft: routes, proxy entries, uplinks.

A thin shell around ``ip`` (iproute2, in every Qubes template), used by
:mod:`agent_worker.routing`; flows are :mod:`agent_worker.conntrack`'s.
Each call is one command; :class:`NetError` says which one failed and
what it printed.

Routes we add carry protocol :data:`ROUTE_PROTO`, so they are ours to list
and remove after a restart, and never anyone else's. Proxy neighbour
entries cannot be tagged: the worker records the ones it made in its
status keys (:mod:`agent_worker.routing`).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_worker.qdb_parse import IPAddress

#: Routing protocol number of our host routes (``ip route ... proto 145``),
#: free in /etc/iproute2/rt_protos and unused by Qubes.
ROUTE_PROTO = 145
#: Interface group of Qubes' vifs (towards client qubes).
VIF_GROUP = "2"
PROC_NET = Path("/proc/sys/net")


class NetError(RuntimeError):
    """An ``ip``/``conntrack`` command failed; the message has its output."""


def _run(argv: Sequence[str]) -> str:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except OSError as err:
        raise NetError(f"cannot run {argv[0]}: {err}") from None
    if result.returncode != 0:
        detail = " ".join((result.stderr or result.stdout).split())
        raise NetError(f"{' '.join(argv)}: {detail or f'exit {result.returncode}'}")
    return result.stdout


def _ip_json(*args: str) -> list[dict[str, Any]]:
    output = _run(["ip", "-j", *args]).strip()
    data = json.loads(output or "[]")
    return [item for item in data if isinstance(item, dict)]


def _family_flag(address: IPAddress) -> str:
    return "-6" if address.version == 6 else "-4"


def _prefix(address: IPAddress) -> str:
    return f"{address}/{address.max_prefixlen}"


@dataclass(frozen=True)
class Uplink:
    """An interface towards the LAN (not a vif, not loopback) and one of its networks."""

    iface: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    own: IPAddress


def uplinks() -> list[Uplink]:
    """Every global address of every uplink interface, with its network."""
    found = []
    for link in _ip_json("addr", "show"):
        name = str(link.get("ifname", ""))
        if name == "lo" or str(link.get("group")) == VIF_GROUP:
            continue
        for info in link.get("addr_info", []):
            if info.get("scope") != "global" or info.get("family") not in ("inet", "inet6"):
                continue
            interface = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}")
            found.append(Uplink(name, interface.network, interface.ip))
    return found


def link_local(iface: str) -> ipaddress.IPv6Address | None:
    """The interface's IPv6 link-local address (the source of the NDP messages we send)."""
    for link in _ip_json("-6", "addr", "show", "dev", iface, "scope", "link"):
        for info in link.get("addr_info", []):
            try:
                return ipaddress.IPv6Address(str(info.get("local")))
            except ValueError:
                continue
    return None


def uplink_for(address: IPAddress) -> str | None:
    """The uplink whose network holds ``address`` as a host another machine could have.

    None when no uplink network holds it, or when it is that network's own
    address, its broadcast address or this qube's own address there.
    """
    for uplink in uplinks():
        network = uplink.network
        if address.version != network.version or address not in network:
            continue
        reserved = {uplink.own, network.network_address}
        if network.version == 4 and network.prefixlen < 31:
            reserved.add(network.broadcast_address)
        if address not in reserved:
            return uplink.iface
    return None


def vif_of(client: IPAddress) -> str | None:
    """The vif a client qube is reached through (vif-route-qubes' host route), if any."""
    routes = _ip_json(_family_flag(client), "route", "show", "exact", _prefix(client))
    for route in routes:
        dev = route.get("dev")
        if dev is None or "via" in route or route.get("protocol") == ROUTE_PROTO:
            continue
        links = _ip_json("link", "show", "dev", str(dev))
        if links and str(links[0].get("group")) == VIF_GROUP:
            return str(dev)
    return None


def add_route(address: IPAddress, via: IPAddress, vif: str) -> None:
    """Host route to ``address`` through the client ``via`` on ``vif`` (ours: ROUTE_PROTO)."""
    _run(["ip", _family_flag(address), "route", "replace", _prefix(address), "via", str(via),
          "dev", vif, "proto", str(ROUTE_PROTO)])


def del_route(address: IPAddress) -> None:
    """Remove our host route to ``address`` (none there: nothing to do)."""
    if address in our_routes():
        _run(["ip", _family_flag(address), "route", "del", _prefix(address),
              "proto", str(ROUTE_PROTO)])


def our_routes() -> set[IPAddress]:
    """Destinations of our host routes, both families."""
    found: set[IPAddress] = set()
    for flag in ("-4", "-6"):
        for route in _ip_json(flag, "route", "show", "proto", str(ROUTE_PROTO)):
            try:
                found.add(ipaddress.ip_address(str(route.get("dst"))))
            except ValueError:
                continue
    return found


def add_proxy(address: IPAddress, iface: str) -> None:
    """Answer ARP/NDP for ``address`` on ``iface`` (a proxy neighbour entry, nothing wider)."""
    _run(["ip", _family_flag(address), "neigh", "replace", "proxy", str(address), "dev", iface])


def del_proxy(address: IPAddress, iface: str) -> None:
    """Stop answering for ``address`` on ``iface`` (no entry: nothing to do)."""
    if (address, iface) in proxies():
        _run(["ip", _family_flag(address), "neigh", "del", "proxy", str(address), "dev", iface])


def proxies() -> set[tuple[IPAddress, str]]:
    """Every proxy neighbour entry, both families: ``(address, iface)``."""
    found: set[tuple[IPAddress, str]] = set()
    for flag in ("-4", "-6"):
        for entry in _ip_json(flag, "neigh", "show", "proxy"):
            try:
                found.add((ipaddress.ip_address(str(entry.get("dst"))), str(entry.get("dev"))))
            except ValueError:
                continue
    return found


def set_sysctl(path: str, value: str) -> None:
    """Write ``/proc/sys/net/<path>`` in this qube's network namespace."""
    try:
        (PROC_NET / path).write_text(value + "\n")
    except OSError as err:
        raise NetError(f"cannot set net/{path}: {err}") from None


def prepare_uplink(iface: str, version: int) -> None:
    """Answer proxied requests at once (``proxy_delay`` 0); IPv6 needs ``proxy_ndp`` too.

    At the default delay the kernel holds a proxied ARP reply up to 0.8 s.
    """
    if version == 4:
        set_sysctl(f"ipv4/neigh/{iface}/proxy_delay", "0")
    else:
        set_sysctl(f"ipv6/neigh/{iface}/proxy_delay", "0")
        set_sysctl(f"ipv6/conf/{iface}/proxy_ndp", "1")
