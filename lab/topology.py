"""The lab's topology: LAN hosts and qubes, loaded from TOML and validated.

A topology says what exists (a LAN with hosts, qubes with their netvm,
address and role); dom0 owns the live copy and changes it (netvm, ip) the
way qvm-prefs does. Everything is checked at load, so the wiring code can
trust names (they become namespace and interface names) and addresses.

IPv6 is optional: ``[lan] network6``/``gateway6``, IPv6 addresses and
routes of LAN hosts, ``uplink6`` of the edge netvm. Qubes get IPv6 the Qubes
way, from the ``ipv6`` feature (dom0 derives their addresses from their
qids); ``ip6`` only overrides the derived address.

Every qube has a qid, fixed at load: ``qid`` if given, else the one
qubesd would have given a qube whose default IPv4 address is its ``ip``,
else the lowest unused one (as qubesd numbers a new qube).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: qubesd's rule for qube names; LAN host names follow it too.
_NAME_RE = re.compile(r"\A[a-zA-Z][a-zA-Z0-9_-]{0,30}\Z")
#: Names the lab uses for itself (namespace ``qlab-lan-switch``, dom0).
RESERVED_NAMES = frozenset({"dom0", "lan-switch", "none", "default"})

DEFAULT_TOPOLOGY = Path(__file__).with_name("topologies") / "default.toml"

#: qubesd's highest qid (qubes.config.max_qid); 0 is dom0's.
MAX_QID = 10000
#: Where qubesd puts a qube's default IPv4 address (its ``vmid_to_ipv4`` prefix).
QUBES_IPV4_NETWORK = ipaddress.IPv4Network("10.137.0.0/16")


class TopologyError(Exception):
    """A topology file that cannot describe a working lab; the message says why."""


@dataclass(frozen=True)
class Route:
    """A static route of a LAN host: ``to`` via ``via``."""

    to: ipaddress.IPv4Network | ipaddress.IPv6Network
    via: ipaddress.IPv4Address | ipaddress.IPv6Address

    def __str__(self) -> str:
        return f"{self.to} via {self.via}"


@dataclass
class LanHost:
    """A machine on the LAN (a namespace with one interface on the LAN switch)."""

    name: str
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]
    routes: list[Route] = field(default_factory=list)


@dataclass
class Lan:
    """The physical network sys-net's uplink is plugged into."""

    network: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None
    hosts: list[LanHost]
    network6: ipaddress.IPv6Network | None = None
    gateway6: ipaddress.IPv6Address | None = None


@dataclass
class Qube:
    """One qube; ``netvm`` and ``ip`` change at run time like qvm-prefs does, ``qid`` never."""

    name: str
    netvm: str | None
    ip: ipaddress.IPv4Address
    qid: int
    provides_network: bool = False
    autostart: bool = True
    features: dict[str, str] = field(default_factory=dict)
    uplink: ipaddress.IPv4Interface | None = None
    ip6: ipaddress.IPv6Address | None = None
    uplink6: ipaddress.IPv6Interface | None = None

    @property
    def vm_type(self) -> str:
        """``/qubes-vm-type`` as qubesd writes it."""
        return "NetVM" if self.provides_network else "AppVM"


@dataclass
class Topology:
    lan: Lan | None
    qubes: dict[str, Qube]

    def clients(self, netvm: str) -> list[Qube]:
        """Qubes whose netvm is ``netvm``, in definition order."""
        return [q for q in self.qubes.values() if q.netvm == netvm]

    def netvm_chain(self, name: str) -> list[Qube]:
        """The qube, its netvm, that one's netvm... up to the edge (no loops: validated)."""
        chain = [self.qubes[name]]
        while chain[-1].netvm is not None:
            chain.append(self.qubes[chain[-1].netvm])
        return chain

    def below(self, name: str) -> list[Qube]:
        """Every qube whose network goes through ``name``, parents before their clients."""
        result: list[Qube] = []
        for client in self.clients(name):
            result += [client, *self.below(client.name)]
        return result

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the TOML shape), for topology.json."""
        result: dict[str, Any] = {"qubes": [_qube_dict(q) for q in self.qubes.values()]}
        if self.lan is not None:
            lan: dict[str, Any] = {
                "network": str(self.lan.network),
                "hosts": [
                    {
                        "name": h.name,
                        "addresses": [str(a.ip) for a in h.addresses],
                        "routes": [str(r) for r in h.routes],
                    }
                    for h in self.lan.hosts
                ],
            }
            if self.lan.gateway is not None:
                lan["gateway"] = str(self.lan.gateway)
            if self.lan.network6 is not None:
                lan["network6"] = str(self.lan.network6)
            if self.lan.gateway6 is not None:
                lan["gateway6"] = str(self.lan.gateway6)
            result["lan"] = lan
        return result


def _qube_dict(qube: Qube) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": qube.name,
        "netvm": qube.netvm or "none",
        "ip": str(qube.ip),
        "qid": qube.qid,
        "provides_network": qube.provides_network,
        "autostart": qube.autostart,
        "features": dict(qube.features),
    }
    for key in ("uplink", "ip6", "uplink6"):
        value = getattr(qube, key)
        if value is not None:
            data[key] = str(value)
    return data


def load_topology(path: Path) -> Topology:
    """Read and validate a topology file; TopologyError names the file and the problem."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as err:
        raise TopologyError(f"{path}: cannot read: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise TopologyError(f"{path}: not valid TOML: {err}") from None
    try:
        return parse_topology(data)
    except TopologyError as err:
        raise TopologyError(f"{path}: {err}") from None


def parse_topology(data: dict[str, Any]) -> Topology:
    """Build and check a topology from TOML-shaped data."""
    _keys("top level", data, required=("qubes",), optional=("lan",))
    lan = _parse_lan(data["lan"]) if "lan" in data else None
    if not isinstance(data["qubes"], list) or not data["qubes"]:
        raise TopologyError("'qubes' must be a non-empty array of tables ([[qubes]])")
    qubes: dict[str, Qube] = {}
    for untrusted_qube in data["qubes"]:
        qube = _parse_qube(untrusted_qube)
        if qube.name in qubes:
            raise TopologyError(f"qube {qube.name!r} is defined twice")
        qubes[qube.name] = qube
    _number(list(qubes.values()))
    topology = Topology(lan, qubes)
    validate(topology)
    return topology


def validate(topology: Topology) -> None:
    """Cross-checks: references, roles, loops, qid and address clashes.

    Also run by dom0 before a live change (netvm, ip) is accepted.
    """
    names = list(topology.qubes)
    if topology.lan is not None:
        names += [h.name for h in topology.lan.hosts]
    for name in names:
        if names.count(name) > 1:
            raise TopologyError(f"name {name!r} is used by more than one qube or LAN host")
    qids: dict[int, str] = {}
    for qube in topology.qubes.values():
        if qube.qid in qids:
            raise TopologyError(
                f"qid {qube.qid} is given to both {qids[qube.qid]!r} and {qube.name!r}"
            )
        qids[qube.qid] = qube.name
    for qube in topology.qubes.values():
        _check_qube_links(topology, qube)
    seen: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    for qube in topology.qubes.values():
        for address in (qube.ip, qube.ip6):
            if address is None:
                continue
            if address in seen:
                raise TopologyError(
                    f"address {address} is given to both {seen[address]!r} and {qube.name!r}"
                )
            seen[address] = qube.name
    _check_lan(topology)


def _check_qube_links(topology: Topology, qube: Qube) -> None:
    if qube.netvm is not None:
        netvm = topology.qubes.get(qube.netvm)
        if netvm is None:
            raise TopologyError(f"qube {qube.name!r}: netvm {qube.netvm!r} does not exist")
        if not netvm.provides_network:
            raise TopologyError(
                f"qube {qube.name!r}: netvm {qube.netvm!r} does not provide network "
                "(set provides_network = true on it)"
            )
        path = [qube.name]
        current: Qube | None = netvm
        while current is not None:
            if current.name in path:
                raise TopologyError(f"netvm loop: {' -> '.join([*path, current.name])}")
            path.append(current.name)
            current = topology.qubes.get(current.netvm) if current.netvm else None
    if (qube.uplink or qube.uplink6) and (qube.netvm is not None or not qube.provides_network):
        raise TopologyError(
            f"qube {qube.name!r}: only a qube with netvm 'none' and provides_network = true "
            "can have an uplink"
        )


def _check_lan(topology: Topology) -> None:
    """LAN hosts and uplinks on the LAN, each address once.

    A qube may hold an address of the LAN (as on Qubes, where dom0 knows
    nothing of the LAN): that is how a routed qube is exposed, and one that
    another LAN host holds is a conflict its edge must detect.
    """
    lan = topology.lan
    uplinks = [q for q in topology.qubes.values() if q.uplink or q.uplink6]
    if lan is None:
        if uplinks:
            raise TopologyError(f"qube {uplinks[0].name!r} has an uplink but there is no [lan]")
        return
    taken: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    owners = [(q.name, u) for q in uplinks for u in (q.uplink, q.uplink6) if u is not None]
    owners += [(h.name, a) for h in lan.hosts for a in h.addresses]
    for owner, interface in owners:
        network = lan.network if interface.version == 4 else lan.network6
        if network is None:
            raise TopologyError(f"{owner!r}: IPv6 address {interface} but [lan] has no network6")
        if interface.network != network:
            raise TopologyError(
                f"{owner!r}: LAN address {interface} is not in the LAN network {network}"
            )
        if interface.ip in (network.network_address, network.broadcast_address):
            raise TopologyError(f"{owner!r}: {interface.ip} cannot be a host address")
        if interface.ip in taken:
            raise TopologyError(
                f"LAN address {interface.ip} is given to both {taken[interface.ip]!r} "
                f"and {owner!r}"
            )
        taken[interface.ip] = owner
    if lan.gateway is not None and lan.gateway not in lan.network:
        raise TopologyError(f"LAN gateway {lan.gateway} is not in the LAN network {lan.network}")
    if lan.gateway6 is not None and (lan.network6 is None or lan.gateway6 not in lan.network6):
        raise TopologyError(f"LAN gateway6 {lan.gateway6} is not in the LAN network6")
    for host in lan.hosts:
        for route in host.routes:
            if route.to.version != route.via.version:
                raise TopologyError(f"LAN host {host.name!r}: route {route} mixes IPv4 and IPv6")
            on_lan = lan.network if route.via.version == 4 else lan.network6
            if on_lan is None or route.via not in on_lan:
                raise TopologyError(
                    f"LAN host {host.name!r}: route {route}: {route.via} is not on the LAN"
                )


def _keys(
    where: str, data: object, required: tuple[str, ...], optional: tuple[str, ...]
) -> None:
    if not isinstance(data, dict):
        raise TopologyError(f"{where}: expected a table")
    for key in data:
        if key not in required and key not in optional:
            known = ", ".join(sorted(required + optional))
            raise TopologyError(f"{where}: unknown key {key!r} (known: {known})")
    for key in required:
        if key not in data:
            raise TopologyError(f"{where}: missing key {key!r}")


def _name(where: str, untrusted_name: object) -> str:
    if not isinstance(untrusted_name, str) or not _NAME_RE.match(untrusted_name):
        raise TopologyError(
            f"{where}: name {untrusted_name!r} must start with a letter and hold at most "
            "31 letters, digits, '_' or '-'"
        )
    if untrusted_name in RESERVED_NAMES or untrusted_name.endswith("-dm"):
        raise TopologyError(f"{where}: name {untrusted_name!r} is reserved")
    return untrusted_name


def _parse(where: str, kind: Callable[[str], Any], untrusted_value: object) -> Any:
    """An ipaddress object of ``kind`` from a string, or a clear error."""
    if not isinstance(untrusted_value, str):
        raise TopologyError(f"{where}: expected a string, got {untrusted_value!r}")
    try:
        return kind(untrusted_value)
    except ValueError as err:
        raise TopologyError(f"{where}: {err}") from None


def _bool(where: str, untrusted_value: object) -> bool:
    if not isinstance(untrusted_value, bool):
        raise TopologyError(f"{where}: expected true or false, got {untrusted_value!r}")
    return untrusted_value


def _parse_lan(data: object) -> Lan:
    _keys("[lan]", data, required=("network",),
          optional=("gateway", "hosts", "network6", "gateway6"))
    assert isinstance(data, dict)
    network = _parse("[lan] network", ipaddress.IPv4Network, data["network"])
    gateway = (
        _parse("[lan] gateway", ipaddress.IPv4Address, data["gateway"])
        if "gateway" in data
        else None
    )
    network6 = (
        _parse("[lan] network6", ipaddress.IPv6Network, data["network6"])
        if "network6" in data
        else None
    )
    gateway6 = (
        _parse("[lan] gateway6", ipaddress.IPv6Address, data["gateway6"])
        if "gateway6" in data
        else None
    )
    untrusted_hosts = data.get("hosts", [])
    if not isinstance(untrusted_hosts, list):
        raise TopologyError("[lan] hosts must be an array of tables ([[lan.hosts]])")
    hosts = [_parse_host(network, network6, h) for h in untrusted_hosts]
    return Lan(network, gateway, hosts, network6, gateway6)


def _parse_host(
    network: ipaddress.IPv4Network, network6: ipaddress.IPv6Network | None, data: object
) -> LanHost:
    _keys("[[lan.hosts]]", data, required=("name", "addresses"), optional=("routes",))
    assert isinstance(data, dict)
    name = _name("[[lan.hosts]]", data["name"])
    where = f"LAN host {name!r}"
    untrusted_addresses = data["addresses"]
    if not isinstance(untrusted_addresses, list) or not untrusted_addresses:
        raise TopologyError(f"{where}: addresses must be a non-empty array")
    addresses = []
    for untrusted_address in untrusted_addresses:
        address = _parse(f"{where} address", ipaddress.ip_address, untrusted_address)
        if address.version == 4:
            addresses.append(ipaddress.IPv4Interface((address, network.prefixlen)))
        else:
            prefixlen = 64 if network6 is None else network6.prefixlen
            addresses.append(ipaddress.IPv6Interface((address, prefixlen)))
    routes = []
    untrusted_routes = data.get("routes", [])
    if not isinstance(untrusted_routes, list):
        raise TopologyError(f"{where}: routes must be an array of 'NETWORK via ADDRESS'")
    for untrusted_route in untrusted_routes:
        words = untrusted_route.split() if isinstance(untrusted_route, str) else []
        if len(words) != 3 or words[1] != "via":
            raise TopologyError(
                f"{where}: route {untrusted_route!r} is not 'NETWORK via ADDRESS'"
            )
        routes.append(
            Route(
                _parse(f"{where} route", ipaddress.ip_network, words[0]),
                _parse(f"{where} route", ipaddress.ip_address, words[2]),
            )
        )
    return LanHost(name, addresses, routes)


_QUBE_KEYS = (
    "netvm", "provides_network", "autostart", "features", "uplink", "ip6", "uplink6", "qid",
)


def default_qid(ip: ipaddress.IPv4Address) -> int | None:
    """The qid whose qubesd default IPv4 address is ``ip``; None if no qid has it.

    qubesd gives qid N ``10.137.0.N`` below 255, and from 255 on skips the
    .0 and .255 host bytes (qid 255 is ``10.137.1.1``); this is that rule
    backwards.
    """
    if ip not in QUBES_IPV4_NETWORK:
        return None
    high, low = divmod(int(ip) & 0xFFFF, 256)
    qid = high * 254 + low
    return qid if 1 <= low <= 254 and qid <= MAX_QID else None


def _number(qubes: list[Qube]) -> None:
    """Qubes without a qid get the lowest unused ones, in order, as qubesd's new qubes do."""
    taken = {qube.qid for qube in qubes}
    free = (qid for qid in range(1, MAX_QID + 1) if qid not in taken)
    for qube in qubes:
        if qube.qid == 0:
            qube.qid = next(free)


def _qid(where: str, untrusted_qid: object) -> int:
    """A qid given in the file: an integer a qube can have in qubesd (not dom0's 0)."""
    if (
        not isinstance(untrusted_qid, int)
        or isinstance(untrusted_qid, bool)
        or not 1 <= untrusted_qid <= MAX_QID
    ):
        raise TopologyError(f"{where}: qid must be an integer from 1 to {MAX_QID}")
    return untrusted_qid


def _parse_qube(data: object) -> Qube:
    _keys("[[qubes]]", data, required=("name", "ip"), optional=_QUBE_KEYS)
    assert isinstance(data, dict)
    name = _name("[[qubes]]", data["name"])
    where = f"qube {name!r}"
    untrusted_netvm = data.get("netvm", "none")
    netvm = None if untrusted_netvm == "none" else _name(f"{where} netvm", untrusted_netvm)
    untrusted_features = data.get("features", {})
    if not isinstance(untrusted_features, dict) or not all(
        isinstance(v, str) for v in untrusted_features.values()
    ):
        raise TopologyError(f"{where}: features must be a table of strings")
    ip = _parse(f"{where} ip", ipaddress.IPv4Address, data["ip"])
    qube = Qube(
        name=name,
        netvm=netvm,
        ip=ip,
        # 0 (dom0's, never a qube's): none yet, _number gives one
        qid=_qid(where, data["qid"]) if "qid" in data else default_qid(ip) or 0,
        provides_network=_bool(f"{where} provides_network", data.get("provides_network", False)),
        autostart=_bool(f"{where} autostart", data.get("autostart", True)),
        features=dict(untrusted_features),
    )
    if "uplink" in data:
        qube.uplink = _parse(f"{where} uplink", ipaddress.IPv4Interface, data["uplink"])
    if "ip6" in data:
        qube.ip6 = _parse(f"{where} ip6", ipaddress.IPv6Address, data["ip6"])
    if "uplink6" in data:
        qube.uplink6 = _parse(f"{where} uplink6", ipaddress.IPv6Interface, data["uplink6"])
    return qube
