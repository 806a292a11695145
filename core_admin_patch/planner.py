"""The planner: from a topology snapshot, what every qube's QubesDB must hold.

Pure on purpose: it takes a frozen picture of the qubes (netvm links,
addresses, running state, features, firewall rules) and returns entries.
Nothing here talks to qubesd, QubesDB or nft, so every topology change
can be tested and explained without a running system; the applier and the
qubesd glue are the only shells around it.

A forward rule of qube T becomes one DNAT step per hop on T's path:

- external: every hop from T's netvm up to the edge NetVM (the hop with no
  netvm). The edge matches the rule's ``srcports`` on any of its own
  addresses (``daddr=local``, so a DHCP change of the uplink needs no
  re-plan) for traffic from its uplink; each hop DNATs to the next hop's
  address keeping the port, and the last hop (T's netvm) DNATs to T's
  address and ``dstports``. Keeping the external port through the
  intermediate hops means a hop never needs more ports than its edge has.
- internal: only T's netvm, for traffic from its downstream qubes sent to
  the netvm's own address.

T itself gets an input entry opening ``dstports`` (for ``srchost`` when
given). Entries live under ``/qns-forward/<target ip>/`` in each hop and
``/qns-input/`` in the target, never under ``/qubes-firewall/``.

An inbound rule of T (``action=accept|drop srchost=..``) decides which of
the qubes sharing T's netvm may open connections to T. It goes, in list
order, to T's netvm under ``/qns-inbound/<target ip>/NNNN`` (``NNNN`` the
rule's position in T's inbound list, as upstream numbers ``/qubes-firewall/``) and
to T's own ``/qns-input/``, after the forward openings: forwards are
decided first, then the inbound rules, first match wins, default deny.

A rule's ``srcqube=NAME`` (inbound, internal forwards) is resolved here, at
every plan, to that qube's current addresses (``/32``, and ``/128`` where
it has IPv6), so the entries hold plain ``srchost=`` networks and follow
the qube when its IP changes. A name that resolves to nothing leaves the
rule out (reported in ``skipped``): it admits nothing rather than anyone.
"""

from __future__ import annotations

import bisect
import dataclasses
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from firewall_rules import Rule, RuleLists

#: Feature a qube's agent advertises (as Qubes templates do with
#: qvm-features-request) when it runs our worker or input hook.
SUPPORT_FEATURE = "supported-feature.qubes-network-server"

FORWARD_DIR = "/qns-forward"
INBOUND_DIR = "/qns-inbound"
INPUT_DIR = "/qns-input"
#: Written back by a hop's worker, per target address: the steps it leaves
#: out because they would take a port the hop serves itself (doc/qubesdb.md).
REFUSED_DIR = "/qns-forward_refused"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpVersion = Literal[4, 6]

#: ``read(hop, path)``: one value of a running hop's QubesDB, which the hop
#: writes (so untrusted); None when absent. How dom0 reads every hop report.
HopReader = Callable[[str, str], bytes | None]


class PlanError(Exception):
    """A rule set that cannot be realised on the current topology."""


class NoNetVMError(PlanError):
    """The qube has no network path for a forward to take."""


class UnsupportedHopError(PlanError):
    """A qube on the path does not run our agent."""


class PortConflictError(PlanError):
    """Two forward rules need the same port on the same hop."""


class UnresolvedSourceError(PlanError):
    """A rule's ``srcqube`` names no qube, or one without an address."""


class SourceProvidesNetworkError(UnresolvedSourceError):
    """A rule's ``srcqube`` names a qube that provides network.

    The qubes behind it reach the target masqueraded as its address, so
    that address stands for all of them, not for the qube named.
    """


def provides_network_reason(source: QubeState) -> str:
    """Why a qube providing network is no ``srcqube``, and what to give instead."""
    instead = f"srchost={source.ip}" if source.ip is not None else "srchost= its address"
    return (
        f"'{source.name}' provides network, so every qube behind it sends from its address"
        f" too: name a qube that does not provide network, or give {instead} to admit"
        " them all"
    )


class NotRunningError(PlanError):
    """An ``expire=shutdown`` rule for a qube that is not running."""


@dataclass(frozen=True)
class QubeState:
    """What the planner needs to know of one qube."""

    name: str
    netvm: str | None
    ip: ipaddress.IPv4Address | None
    provides_network: bool = False
    running: bool = False
    features: Mapping[str, str] = field(default_factory=dict)
    #: Rule numbers in plans and messages are positions in a kind's list.
    rules: RuleLists = field(default_factory=RuleLists)
    #: Its IPv6 address when IPv6 is on for it (the ``ipv6`` feature), else None.
    ip6: ipaddress.IPv6Address | None = None

    @property
    def supports_forwarding(self) -> bool:
        return self.features.get(SUPPORT_FEATURE, "") not in ("", "0")


@dataclass(frozen=True)
class Snapshot:
    """A consistent picture of all qubes at one moment."""

    qubes: Mapping[str, QubeState]
    now: float

    def with_rules(self, name: str, rules: RuleLists) -> Snapshot:
        """The same picture with ``name``'s rules replaced (to check a Set)."""
        qubes = dict(self.qubes)
        qubes[name] = dataclasses.replace(qubes[name], rules=rules)
        return Snapshot(qubes, self.now)


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"

    def describe(self) -> str:
        return str(self.first) if self.first == self.last else str(self)


@dataclass(frozen=True)
class DnatStep:
    """One hop's share of a forward: match, translate, accept."""

    hop: str
    to_qube: str
    iif: Literal["upstream", "downstream"]
    daddr: Literal["local"] | IPAddress
    proto: str
    ports: PortRange
    to: IPAddress
    toports: PortRange
    srchost: IPNetwork | None

    def entry(self) -> str:
        """The QubesDB value the hop's worker parses (doc/qubesdb.md)."""
        words = [
            f"proto={self.proto}",
            f"ports={self.ports}",
            f"iif={self.iif}",
            f"daddr={self.daddr}",
            f"to={self.to}",
            f"toports={self.toports}",
        ]
        if self.srchost is not None:
            words.append(f"srchost={self.srchost}")
        return " ".join(words)


@dataclass(frozen=True)
class ForwardPath:
    """Where one forward rule of ``target`` is reachable and how it gets there."""

    target: str
    rule_number: int
    rule: Rule
    steps: tuple[DnatStep, ...]

    @property
    def hops(self) -> list[str]:
        return [step.hop for step in self.steps]

    def describe(self) -> str:
        """One line for users: entry point, then each hop, then the target."""
        first = self.steps[-1]
        if first.daddr == "local":
            entry = f"{first.hop} uplink addresses"
        elif self.rule.srcqube is not None and first.srchost is not None:
            entry = (
                f"{first.hop} ({first.daddr}) from {self.rule.srcqube}"
                f" ({first.srchost.network_address})"
            )
        else:
            entry = f"{first.hop} ({first.daddr}) from its qubes"
        parts = [f"{entry} {first.proto}/{first.ports.describe()}"]
        parts += [
            f"{step.to_qube} ({step.to}) {step.proto}/{step.toports.describe()}"
            for step in reversed(self.steps)
        ]
        return " -> ".join(parts)


@dataclass(frozen=True)
class Plan:
    """Entries per qube: ``{qube: {directory: {key: value}}}``, plus notes.

    Each directory is written with the upstream completion convention
    (remove it, write its keys, then an empty write on the directory path),
    so a worker never acts on half of it.
    """

    entries: Mapping[str, Mapping[str, Mapping[str, str]]]
    skipped: tuple[str, ...] = ()


def _ports(option: object) -> PortRange:
    return PortRange(option.first, option.last)  # type: ignore[attr-defined]


def rule_sources(snapshot: Snapshot, rule: Rule) -> dict[IpVersion, IPNetwork | None]:
    """The rule's source network in each address family it applies to.

    ``srchost``: its own family. ``srcqube``: the named qube's current
    addresses as single-host networks, from the snapshot (dom0's own state,
    never DNS); UnresolvedSourceError when it names no qube, one without
    any address or one that provides network (SourceProvidesNetworkError),
    so the caller leaves the rule out instead of widening it.
    Neither: both families, any source (None).
    """
    if rule.srchost is not None:
        network = rule.srchost.network
        return {4: network} if network.version == 4 else {6: network}
    if rule.srcqube is None:
        return {4: None, 6: None}
    source = snapshot.qubes.get(str(rule.srcqube))
    if source is None:
        raise UnresolvedSourceError(f"srcqube '{rule.srcqube}' names no qube")
    if source.provides_network:
        # checked at every plan: a qube can start providing network after Set
        raise SourceProvidesNetworkError(
            f"srcqube {provides_network_reason(source)}"
        )
    sources: dict[IpVersion, IPNetwork | None] = {}
    for family in (4, 6):
        source_ip = address(source, family)
        if source_ip is not None:
            sources[family] = ipaddress.ip_network(source_ip)
    if not sources:
        raise UnresolvedSourceError(f"srcqube '{rule.srcqube}' has no IP address")
    return sources


def netvm_chain(snapshot: Snapshot, target: QubeState) -> list[QubeState]:
    """The hops from ``target``'s netvm up to the edge, refusing broken links."""
    chain: list[QubeState] = []
    seen = {target.name}
    current = target
    while current.netvm is not None:
        hop = snapshot.qubes.get(current.netvm)
        if hop is None:
            raise NoNetVMError(
                f"'{current.name}' has netvm '{current.netvm}', which does not exist"
            )
        if hop.name in seen:
            raise NoNetVMError(f"netvm loop through '{hop.name}'")
        seen.add(hop.name)
        chain.append(hop)
        current = hop
    return chain


def address(qube: QubeState, family: IpVersion) -> IPAddress | None:
    """The qube's address in ``family`` (IPv6 only while it is on for the qube)."""
    return qube.ip if family == 4 else qube.ip6


def forward_path(
    snapshot: Snapshot,
    target: QubeState,
    number: int,
    rule: Rule,
    family: IpVersion = 4,
    *,
    source: IPNetwork | None,
) -> ForwardPath:
    """The DNAT steps of one forward rule in one family, from the target's netvm outwards.

    ``source`` is the rule's source network in ``family`` as
    :func:`rule_sources` resolved it (None: any source); it is a required
    argument so no caller can drop a rule's source by forgetting it.
    """
    chain = netvm_chain(snapshot, target)
    if not chain:
        raise NoNetVMError(f"'{target.name}' has no netvm: nothing can forward to it")
    what = "IP address" if family == 4 else "IPv6 address"
    target_ip = address(target, family)
    if target_ip is None:
        raise NoNetVMError(f"'{target.name}' has no {what}")
    hop_ips = {}
    for hop in chain:
        hop_ip = address(hop, family)
        if hop_ip is None:
            raise NoNetVMError(f"'{hop.name}' on the path of '{target.name}' has no {what}")
        hop_ips[hop.name] = hop_ip
    proto = str(rule.proto)
    srcports = _ports(rule.srcports)
    dstports = _ports(rule.dstports)
    if str(rule.forwardtype) == "internal":
        netvm = chain[0]
        step = DnatStep(
            netvm.name,
            target.name,
            "downstream",
            hop_ips[netvm.name],
            proto,
            srcports,
            target_ip,
            dstports,
            source,
        )
        return ForwardPath(target.name, number, rule, (step,))
    steps = []
    receiver, receiver_ip, receiver_ports = target.name, target_ip, dstports
    for position, hop in enumerate(chain):
        is_edge = position == len(chain) - 1
        daddr: Literal["local"] | IPAddress = "local" if is_edge else hop_ips[hop.name]
        steps.append(
            DnatStep(
                hop.name,
                receiver,
                "upstream",
                daddr,
                proto,
                srcports,
                receiver_ip,
                receiver_ports,
                source,
            )
        )
        receiver, receiver_ip, receiver_ports = hop.name, hop_ips[hop.name], srcports
    return ForwardPath(target.name, number, rule, tuple(steps))


def _in_force(rules: Iterable[Rule], now: float) -> list[tuple[int, Rule]]:
    """(position in the list, rule) of each rule not expired at ``now``."""
    return [(number, rule) for number, rule in enumerate(rules) if not rule.is_expired(now)]


def _forward_rules(qube: QubeState, now: float) -> list[tuple[int, Rule]]:
    return _in_force(qube.rules.forward, now)


def _inbound_rules(qube: QubeState, now: float) -> list[tuple[int, Rule]]:
    return _in_force(qube.rules.inbound, now)


def inbound_entry(rule: Rule, source: IPNetwork) -> str:
    """The QubesDB value of one inbound rule, the same in the netvm and the target.

    The rule's own words in a fixed order, its source (``srchost``, or the
    address ``srcqube`` resolved to in this family) as a network; no
    ``expire`` or ``comment`` (doc/qubesdb.md).
    """
    words = [f"action={rule.action}", f"srchost={source}"]
    if rule.proto is not None:
        words.append(f"proto={rule.proto}")
    if rule.dstports is not None:
        words.append(f"dstports={_ports(rule.dstports)}")
    if rule.icmptype is not None:
        words.append(f"icmptype={rule.icmptype}")
    return " ".join(words)


def _inbound_netvm(snapshot: Snapshot, target: QubeState) -> QubeState | None:
    """The running netvm that applies ``target``'s inbound rules, if they can apply now."""
    if not target.running or target.ip is None or target.netvm is None:
        return None
    netvm = snapshot.qubes.get(target.netvm)
    return netvm if netvm is not None and netvm.running else None


def _claims(path: ForwardPath) -> list[tuple[str, str, PortRange]]:
    return [(step.hop, step.proto, step.ports) for step in path.steps]


class PortClaims:
    """The port ranges forwards hold, per hop and protocol, found by bisection.

    Each hop keeps its ranges sorted by first port, with the longest range's
    length: only ranges starting at most that far below a query can overlap
    it, so checking thousands of forwards through one hop stays n log n
    rather than quadratic. Ranges may overlap (rules stored before the
    topology changed under them); a query then names the one added first.
    """

    def __init__(self) -> None:
        #: (hop, proto) -> sorted (first, last, order added, owner, rule number)
        self._held: dict[tuple[str, str], list[tuple[int, int, int, str, int]]] = {}
        self._longest: dict[tuple[str, str], int] = {}
        self._added = 0

    def add(self, path: ForwardPath) -> None:
        """Every hop's ports of one forward, held by its target and rule number."""
        for hop, proto, ports in _claims(path):
            key = (hop, proto)
            entry = (ports.first, ports.last, self._added, path.target, path.rule_number)
            bisect.insort(self._held.setdefault(key, []), entry)
            self._longest[key] = max(self._longest.get(key, 0), ports.last - ports.first)
            self._added += 1

    def holder(self, hop: str, proto: str, ports: PortRange) -> tuple[str, int] | None:
        """(qube, forward rule number) holding a port of ``ports`` on ``hop``, if any."""
        held = self._held.get((hop, proto))
        if not held:
            return None
        low = bisect.bisect_left(held, (ports.first - self._longest[(hop, proto)],))
        high = bisect.bisect_left(held, (ports.last + 1,))
        overlapping = [entry for entry in held[low:high] if entry[1] >= ports.first]
        if not overlapping:
            return None
        _, _, _, owner, number = min(overlapping, key=lambda entry: entry[2])
        return owner, number


def check_rules(snapshot: Snapshot, name: str, rules: RuleLists) -> None:
    """Refuse a rule list for ``name`` that cannot work on this topology.

    Checked against the static topology (running or not), so a rule that
    is accepted now does not become a conflict when some qube starts.
    """
    proposed = snapshot.with_rules(name, rules)
    target = proposed.qubes[name]
    if not target.running and any(rule.expires_at_shutdown for rule in target.rules.all()):
        # dom0 deletes such rules when the qube stops; one set while it is
        # stopped would wait for a stop that already happened.
        raise NotRunningError(
            f"expire=shutdown: '{name}' is not running (such a rule lasts until the"
            " qube stops; start it first)"
        )
    for rule in target.rules.all():
        # A stopped qube or one without netvm is fine (resolved when it has
        # an address); a name that matches nothing is a typo.
        if rule.srcqube is None or rule.is_expired(snapshot.now):
            continue
        source = proposed.qubes.get(str(rule.srcqube))
        if source is None:
            raise UnresolvedSourceError(
                f"srcqube '{rule.srcqube}' in the rules of '{name}': no such qube"
            )
        if source.provides_network:
            raise SourceProvidesNetworkError(
                f"srcqube '{rule.srcqube}' in the rules of '{name}':"
                f" {provides_network_reason(source)}"
            )
    forwards = _forward_rules(target, snapshot.now)
    # Claims only: the hops and ports taken do not depend on the source.
    paths = [
        forward_path(proposed, target, number, rule, source=None) for number, rule in forwards
    ]
    involved = {hop for path in paths for hop in path.hops}
    if _inbound_rules(target, snapshot.now):
        # Applied by the netvm's worker and the target's hook. Without a
        # netvm nothing can reach the qube, and there is nothing to check.
        involved.update(hop.name for hop in netvm_chain(proposed, target)[:1])
    if not involved:
        return
    involved.add(target.name)
    missing = [
        proposed.qubes[n] for n in sorted(involved) if not proposed.qubes[n].supports_forwarding
    ]
    if missing:
        names = ", ".join(f"'{hop.name}'" for hop in missing)
        raise UnsupportedHopError(
            f"{names} on the path of '{name}' does not advertise {SUPPORT_FEATURE}: "
            "install qubes-network-server-agent in its template and restart it"
        )
    claims = PortClaims()
    for other in sorted(proposed.qubes.values(), key=lambda q: q.name):
        if other.name == name:
            continue
        for number, rule in _forward_rules(other, snapshot.now):
            try:
                other_path = forward_path(proposed, other, number, rule, source=None)
            except NoNetVMError:
                continue
            claims.add(other_path)
    for path in paths:
        for hop, proto, ports in _claims(path):
            holder = claims.holder(hop, proto, ports)
            if holder is not None:
                raise PortConflictError(
                    f"{proto} port {ports.describe()} on '{hop}' is wanted by both "
                    f"'{holder[0]}' (forward rule {holder[1]}) and"
                    f" '{name}' (forward rule {path.rule_number})"
                )
        claims.add(path)


def _active(snapshot: Snapshot, target: QubeState) -> bool:
    """A forward is live only while the target and every hop run."""
    if not target.running:
        return False
    try:
        chain = netvm_chain(snapshot, target)
    except NoNetVMError:
        return False
    return bool(chain) and all(hop.running for hop in chain)


#: Stand-in address for a qube that gets one only with its new netvm:
#: the ports a forward claims on its hops do not depend on it.
_UNASSIGNED_IP = ipaddress.IPv4Address("0.0.0.0")


def netvm_conflict(
    snapshot: Snapshot, name: str, new_netvm: str | None
) -> str | None:
    """The port conflict that moving ``name`` under ``new_netvm`` would create, if any.

    Checked for the moved qube and every qube behind it (a hop's move moves
    their forwards too), against the static topology as Set is. A path that
    breaks is no conflict (the plan skips and reports it), and a conflict
    among qubes the move does not touch is not this change's to refuse.
    """
    moved = snapshot.qubes.get(name)
    if moved is None or new_netvm is None:
        return None
    qubes = dict(snapshot.qubes)
    qubes[name] = dataclasses.replace(moved, netvm=new_netvm, ip=moved.ip or _UNASSIGNED_IP)
    proposed = Snapshot(qubes, snapshot.now)
    for target in sorted(qubes):
        if target != name:
            try:
                chain = netvm_chain(proposed, qubes[target])
            except NoNetVMError:
                continue
            if name not in {hop.name for hop in chain}:
                continue
        try:
            check_rules(proposed, target, qubes[target].rules)
        except PortConflictError as err:
            return str(err)
        except PlanError:
            continue
    return None


def plan(snapshot: Snapshot) -> Plan:
    """Entries for every qube, deterministic for a given snapshot.

    A rule that cannot be realised (broken path, a conflict created by a
    later topology change) is left out and reported in ``skipped``; of two
    conflicting rules the one of the qube whose name sorts first wins.
    """
    entries: dict[str, dict[str, dict[str, str]]] = {}
    skipped: list[str] = []
    taken = PortClaims()
    for target in sorted(snapshot.qubes.values(), key=lambda q: q.name):
        input_entries = _plan_forwards(snapshot, target, entries, skipped, taken)
        input_entries += _plan_inbound(snapshot, target, entries, skipped)
        if input_entries:
            entries.setdefault(target.name, {})[INPUT_DIR] = {
                f"{n:04}": value for n, value in enumerate(input_entries)
            }
    return Plan(entries, tuple(skipped))


def _plan_inbound(
    snapshot: Snapshot,
    target: QubeState,
    entries: dict[str, dict[str, dict[str, str]]],
    skipped: list[str],
) -> list[str]:
    """Put ``target``'s inbound rules into its netvm; returns its input entries.

    Each family's rules go under the target's address in that family (IPv6
    ones only while IPv6 is on for it); the netvm's entries keep the rule's
    position in the list as their key, and the target gets them in list order. A netvm
    without our agent (moved there after ``Set``) gets nothing: the target
    stays closed, as Qubes' default.
    """
    inbound = _inbound_rules(target, snapshot.now)
    netvm = _inbound_netvm(snapshot, target) if inbound else None
    if netvm is None:
        return []
    if not netvm.supports_forwarding:
        skipped.append(
            f"{target.name} inbound rules: '{netvm.name}' does not advertise {SUPPORT_FEATURE}"
        )
        return []
    input_entries: list[tuple[int, str]] = []
    for family, mine in inbound_entries(snapshot, target, skipped).items():
        target_ip = address(target, family)
        if target_ip is None or not mine:
            continue
        entries.setdefault(netvm.name, {})[f"{INBOUND_DIR}/{target_ip}"] = {
            f"{number:04}": value for number, value in mine
        }
        input_entries += mine
    return [value for _, value in sorted(input_entries)]


def inbound_entries(
    snapshot: Snapshot, target: QubeState, skipped: list[str]
) -> dict[IpVersion, list[tuple[int, str]]]:
    """``target``'s inbound rules in force, per family: ``(rule number, entry value)``.

    A rule applies in the families its source was resolved in; one whose
    ``srcqube`` resolves to nothing is left out and reported in ``skipped``.
    The same values serve its netvm, its own INPUT and, when it is routed,
    every hop of its path (:mod:`core_admin_patch.routing`).
    """
    resolved: list[tuple[int, Rule, dict[IpVersion, IPNetwork | None]]] = []
    for number, rule in _inbound_rules(target, snapshot.now):
        try:
            resolved.append((number, rule, rule_sources(snapshot, rule)))
        except UnresolvedSourceError as err:
            skipped.append(f"{target.name} inbound rule {number}: {err}")
    return {
        family: [
            (number, inbound_entry(rule, source))
            for number, rule, sources in resolved
            if (source := sources.get(family)) is not None
        ]
        for family in (4, 6)
    }


def _family_paths(
    snapshot: Snapshot, target: QubeState, number: int, rule: Rule
) -> tuple[list[ForwardPath], str]:
    """The rule's paths in each family it can take, or none and why.

    A rule limited by ``srchost`` lives in that address's family only, one
    limited by ``srcqube`` in the families that qube has an address in; one
    without takes IPv4 and, where IPv6 is on for the target and every hop,
    IPv6 too. IPv6 being off is no reason to skip a rule open to both.
    """
    try:
        sources = rule_sources(snapshot, rule)
    except UnresolvedSourceError as err:
        return [], str(err)
    paths, reasons = [], []
    for family, source in sources.items():
        try:
            paths.append(forward_path(snapshot, target, number, rule, family, source=source))
        except NoNetVMError as err:
            reasons.append(str(err))
    return paths, reasons[0] if reasons else ""


def _plan_forwards(
    snapshot: Snapshot,
    target: QubeState,
    entries: dict[str, dict[str, dict[str, str]]],
    skipped: list[str],
    taken: PortClaims,
) -> list[str]:
    """Put ``target``'s forward steps into its hops; returns its input entries."""
    forwards = _forward_rules(target, snapshot.now)
    input_entries: list[str] = []
    if not forwards or not _active(snapshot, target):
        return input_entries
    for number, rule in forwards:
        paths, reason = _family_paths(snapshot, target, number, rule)
        if not paths:
            skipped.append(f"{target.name} forward rule {number}: {reason}")
            continue
        path = paths[0]  # hops and ports are the same in both families
        unsupported = [
            name for name in (target.name, *path.hops)
            if not snapshot.qubes[name].supports_forwarding
        ]
        if unsupported:
            # Accepted at Set, then a netvm changed under it: never write into
            # a qube whose agent would not understand (or enforce) the entries.
            skipped.append(
                f"{target.name} forward rule {number}: '{unsupported[0]}' does not advertise"
                f" {SUPPORT_FEATURE}"
            )
            continue
        clash = next(
            (
                holder
                for hop, proto, ports in _claims(path)
                if (holder := taken.holder(hop, proto, ports)) is not None
            ),
            None,
        )
        if clash is not None:
            skipped.append(f"{target.name} forward rule {number}: port conflict with '{clash[0]}'")
            continue
        taken.add(path)
        for family_path in paths:
            target_ip = family_path.steps[0].to
            for step in family_path.steps:
                directory = entries.setdefault(step.hop, {}).setdefault(
                    f"{FORWARD_DIR}/{target_ip}", {}
                )
                directory[f"{len(directory):04}"] = step.entry()
        words = ["action=accept", f"proto={rule.proto}", f"dstports={_ports(rule.dstports)}"]
        # One opening for both families when any source may connect, else
        # one per family the source was resolved in.
        for source in dict.fromkeys(family_path.steps[0].srchost for family_path in paths):
            extra = [] if source is None else [f"srchost={source}"]
            input_entries.append(" ".join([*words, *extra]))
    return input_entries


def next_expiry(snapshot: Snapshot) -> float | None:
    """When the next rule expires, so dom0 can re-plan right then."""
    times = [
        rule.expire.timestamp
        for qube in snapshot.qubes.values()
        for rule in qube.rules.all()
        if rule.expire is not None
        and rule.expire.timestamp is not None
        and not rule.is_expired(snapshot.now)
    ]
    return min(times, default=None)


#: A hop's reasons for leaving a step out (agent_worker.hop_ports), in dom0's words.
_REFUSAL_REASONS = {
    "this qube listens on it": "it listens on it",
    "its user opened it in custom-input": "its user opened it in custom-input",
}
_REFUSAL_LINE_RE = re.compile(r"(tcp|udp) ([1-9][0-9]{0,4})-([1-9][0-9]{0,4}): ([a-z -]{1,40})")


def refused_steps(untrusted_value: bytes) -> dict[tuple[str, PortRange], str] | None:
    """The steps a hop's report says it left out, each with dom0's words for why.

    The hop writes the report (``PROTO FIRST-LAST: why`` a line) in its own
    QubesDB: a line counts only in exactly that form with a known reason,
    and one that does not makes the whole report unreadable (None), so no
    text of the hop's own ever reaches the user.
    """
    refused = {}
    for untrusted_line in untrusted_value.decode("ascii", "replace").split("\n"):
        match = _REFUSAL_LINE_RE.fullmatch(untrusted_line)
        why = None if match is None else _REFUSAL_REASONS.get(match.group(4))
        if match is None or why is None:
            return None
        ports = PortRange(int(match.group(2)), int(match.group(3)))
        refused[(match.group(1), ports)] = why
    return refused


def _refusals(snapshot: Snapshot, path: ForwardPath, read_report: HopReader) -> list[str]:
    """Each running hop (edge first) that reports refusing its step of ``path``, and why."""
    marks = []
    for step in reversed(path.steps):
        if not snapshot.qubes[step.hop].running:
            continue  # no QubesDB, no report
        untrusted_value = read_report(step.hop, f"{REFUSED_DIR}/{path.steps[0].to}")
        if not untrusted_value:
            continue
        refused = refused_steps(untrusted_value)
        if refused is None:
            marks.append(f"{step.hop} may have refused it: its report is unreadable")
            continue
        why = refused.get((step.proto, step.ports))
        if why is not None:
            marks.append(
                f"REFUSED by {step.hop}: {step.proto}/{step.ports.describe()} is its own ({why})"
            )
    return marks


def describe_forwards(snapshot: Snapshot, name: str, read_report: HopReader) -> dict[int, str]:
    """For each forward rule number of ``name``, the path it takes (for qvm-firewall).

    A path whose step a hop refused (it would take a port the hop serves,
    reported under :data:`REFUSED_DIR`) says so, naming the hop and why:
    the forward then does not work, and only the hop knows it.
    """
    target = snapshot.qubes[name]
    described = {}
    for number, rule in _forward_rules(target, snapshot.now):
        paths, reason = _family_paths(snapshot, target, number, rule)
        if not paths:
            described[number] = f"not reachable: {reason}"
            continue
        text = paths[0].describe()
        if len(paths) == 2:
            text += f" (IPv6: {paths[1].steps[0].to} too)"
        marks: list[str] = []
        for index, family_path in enumerate(paths):
            for mark in _refusals(snapshot, family_path, read_report):
                if mark not in marks:
                    marks.append(mark if index == 0 else f"{mark} (IPv6)")
        described[number] = "; ".join([text, *marks])
    return described
