"""Routing exposure (``qvm-features QUBE routing-method forward``): the plan, pure.

A routed qube keeps its own address (``qvm-prefs QUBE ip 192.168.16.25``,
an address of the LAN) and is reached at it from the LAN with no NAT in
either direction, through any number of ProxyVMs. Every hop on its path
gets one directory per routed address under ``/qns-routing/<address>``
(doc/qubesdb.md):

- ``route``: ``role=edge`` at the edge NetVM (it answers ARP/NDP for the
  address on its uplink), ``role=inner`` elsewhere; ``via=<next hop>`` on
  every hop but the qube's own netvm: the address of the hop's client the
  address lies behind (a host route, the antispoof pair, the outbound
  rules below);
- ``in/NNNN``: the qube's inbound rules of that family, as in
  ``/qns-inbound/`` (they decide what the LAN may open, in every hop);
- ``out/...``: with ``via`` only, the qube's outbound rules exactly as
  ``/qubes-firewall/<address>/`` holds them in its netvm, so the qube's own
  connections pass (and stay limited) where it is no direct client.

The qube's netvm filters its outbound traffic and its INPUT is opened by
its inbound rules as for any qube (``/qns-inbound/``, ``/qns-input``).

The agents report back in their own QubesDB, ``/qns-routing_status/<address>``
(``state=... [iface=...] [mac=...]``), which dom0 reads, untrusted, to show
each hop's state (:func:`describe_routing`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core_admin_patch import planner
from core_admin_patch.planner import (
    SUPPORT_FEATURE,
    HopReader,
    IPAddress,
    IpVersion,
    NoNetVMError,
    Plan,
    QubeState,
    Snapshot,
    address,
    inbound_entries,
    netvm_chain,
)
from firewall_rules import outbound_qdb_entries

#: Rudd-O's feature name and value, so his users keep their settings.
ROUTING_FEATURE = "routing-method"
ROUTING_FORWARD = "forward"

ROUTING_DIR = "/qns-routing"
STATUS_DIR = "/qns-routing_status"


def is_routed(qube: QubeState) -> bool:
    """Whether the qube asks to be exposed at its own address (feature, template included)."""
    return qube.features.get(ROUTING_FEATURE) == ROUTING_FORWARD


@dataclass(frozen=True)
class Exposure:
    """One address of a routed qube and the hops that carry it."""

    target: str
    family: IpVersion
    address: IPAddress
    #: the qube's netvm first, the edge NetVM last
    hops: tuple[QubeState, ...]

    def via(self, index: int) -> IPAddress | None:
        """The client of hop ``index`` the address lies behind (None: the qube itself)."""
        if index == 0:
            return None
        return address(self.hops[index - 1], self.family)

    def route_entry(self, index: int) -> str:
        """The ``route`` value of hop ``index``."""
        role = "edge" if index == len(self.hops) - 1 else "inner"
        via = self.via(index)
        return f"role={role}" if via is None else f"role={role} via={via}"

    def describe(self) -> str:
        """``LAN -> sys-net -> sys-firewall -> web``: the way in."""
        return " -> ".join(["LAN", *(hop.name for hop in reversed(self.hops)), self.target])


def exposures(snapshot: Snapshot, target: QubeState) -> tuple[list[Exposure], list[str]]:
    """The addresses of a routed qube that can be exposed now, and why others cannot.

    Needs the qube and every hop running and running our agent; IPv6 only
    while it is on for the qube and every hop has an IPv6 address (each
    hop routes it to the next). A qube that is not routed has neither.
    """
    if not is_routed(target):
        return [], []
    if not target.running:
        return [], [f"'{target.name}' is not running"]
    try:
        chain = netvm_chain(snapshot, target)
    except NoNetVMError as err:
        return [], [str(err)]
    if not chain:
        return [], [f"'{target.name}' has no netvm"]
    stopped = [hop.name for hop in chain if not hop.running]
    if stopped:
        return [], [f"'{stopped[0]}' on its path is not running"]
    unsupported = [q.name for q in (target, *chain) if not q.supports_forwarding]
    if unsupported:
        return [], [f"'{unsupported[0]}' does not advertise {SUPPORT_FEATURE}"]
    found, reasons = [], []
    for family in (4, 6):
        target_ip = address(target, family)
        if target_ip is None:
            continue
        missing = [hop.name for hop in chain if address(hop, family) is None]
        if missing:
            reasons.append(f"{target_ip}: '{missing[0]}' on its path has no IPv6 address")
            continue
        found.append(Exposure(target.name, family, target_ip, tuple(chain)))
    return found, reasons


def plan_routing(snapshot: Snapshot) -> Plan:
    """The ``/qns-routing/`` entries of every routed qube, in every hop of its path."""
    entries: dict[str, dict[str, dict[str, str]]] = {}
    skipped: list[str] = []
    for target in sorted(snapshot.qubes.values(), key=lambda q: q.name):
        found, reasons = exposures(snapshot, target)
        if target.running:
            skipped += [f"{target.name} routing: {reason}" for reason in reasons]
        if not found:
            continue
        inbound = inbound_entries(snapshot, target, [])  # reported by planner.plan
        for exposure in found:
            outbound = outbound_qdb_entries(target.rules.outbound, exposure.family, snapshot.now)
            for index, hop in enumerate(exposure.hops):
                keys = {"route": exposure.route_entry(index)}
                keys.update({f"in/{n:04}": value for n, value in inbound[exposure.family]})
                if exposure.via(index) is not None:
                    keys.update({f"out/{key}": value for key, value in outbound.items()})
                entries.setdefault(hop.name, {})[f"{ROUTING_DIR}/{exposure.address}"] = keys
    return Plan(entries, tuple(skipped))


def plan(snapshot: Snapshot) -> Plan:
    """Everything dom0 writes: forwards and inbound rules (planner.plan), then routing."""
    base, routed = planner.plan(snapshot), plan_routing(snapshot)
    entries = {qube: dict(directories) for qube, directories in base.entries.items()}
    for qube, directories in routed.entries.items():
        entries.setdefault(qube, {}).update(directories)
    return Plan(entries, base.skipped + routed.skipped)


_STATES = {
    "applied": "applied",
    "waiting": "waiting for its client to connect",
    "probing": "checking that no host on {iface} has the address",
    "exposed": "exposed on {iface}, answering for the address",
    "conflict": "NOT exposed: {mac} on {iface} already has the address",
    "squatter": "exposed on {iface}, but {mac} claims the address too",
    "outside": "NOT exposed: the address is in no network of its uplink",
    "failed": "NOT exposed: its agent could not apply it (see its log)",
}
_STATUS_WORD_RE = re.compile(
    r"(state=[a-z]{1,10})|(iface=[A-Za-z0-9_.:-]{1,15})|(mac=(?:[0-9a-f]{2}:){5}[0-9a-f]{2})"
)


def status_text(untrusted_value: bytes | None) -> str:
    """What a hop reported for an address, in words for the user; never its raw text.

    The value comes from the hop's own QubesDB, which the hop writes: only
    the documented words are taken, anything else reads "unreadable report".
    """
    if untrusted_value is None:
        return "no report yet"
    words: dict[str, str] = {}
    for untrusted_word in untrusted_value.decode("ascii", "replace").split(" "):
        if _STATUS_WORD_RE.fullmatch(untrusted_word) is None:
            return "unreadable report"
        key, _, value = untrusted_word.partition("=")
        words[key] = value
    template = _STATES.get(words.get("state", ""))
    if template is None:
        return "unreadable report"
    try:
        return template.format(**words)
    except KeyError:
        return "unreadable report"


def describe_routing(snapshot: Snapshot, name: str, read_status: HopReader) -> list[str]:
    """The exposure of a routed qube, one line each, for qvm-firewall.

    ``read_status(hop, path)`` reads a running hop's QubesDB. Per address:
    its way in, then each hop (edge first) and what it reported. A qube
    that is not routed has no lines.
    """
    target = snapshot.qubes[name]
    found, reasons = exposures(snapshot, target)
    lines = [f"not exposed: {reason}" for reason in reasons]
    for exposure in found:
        lines.append(f"{exposure.address}: {exposure.describe()}")
        for hop in reversed(exposure.hops):
            report = read_status(hop.name, f"{STATUS_DIR}/{exposure.address}")
            lines.append(f"  {hop.name}: {status_text(report)}")
    return lines

