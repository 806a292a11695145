"""The forward kind: ``/qns-forward/`` steps to the maps and chains of ``qubes``.

A :class:`~agent_worker.directory.ChainDirectory` around
:mod:`agent_worker.forward_steps` (parsing, elements, rule text) and
:mod:`agent_worker.nft_chains` (chains and jumps). The outbound worker
(:class:`agent_worker.firewall.Worker`) owns the ``qubes-firewall``
tables; this kind owns table ``qubes-network-server`` (``ip``/``ip6``),
holding the steps as map elements and chain ``qns-dnat`` (nat prerouting)
looking them up, and chain ``qns-forward`` in table ``qubes``, jumped to
from the ``forward`` chain right after ``custom-forward``, so ahead of the
``oifgroup 2`` drop.

Each change is its own nft transaction, separate from the outbound one: a
forward nft refuses then never holds back an outbound update, and the
reverse. Within it, both families change together or not at all. A target
whose entries do not all parse gets no rules at all. A step is an element
added or deleted; the table's chains are listed only to create, rewrite
or remove our chains and jumps.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping

from agent_worker import conntrack, hop_ports, nft_chains
from agent_worker.directory import (
    FAMILIES,
    ChainDirectory,
    InForce,
    QubesDBConnection,
    Target,
    address_order,
    by_address,
)
from agent_worker.entries import MAX_VALUE, EntryError, Family, IPAddress, Refused
from agent_worker.forward_steps import (
    DNAT_CHAIN,
    FORWARD_CHAIN,
    NAT_TABLE,
    OBJECTS,
    REPLY_CHAIN,
    Elements,
    Step,
    TakenPorts,
    accept_rules,
    declarations,
    dnat_rules,
    element_key,
    family_elements,
    parse_target,
    reply_rules,
    step_admits,
)
from agent_worker.nft_chains import BaseChainHook, Runner
from agent_worker.reply_route import GATEWAYS, ReplyRoute

log = logging.getLogger("qubes.firewall")

FORWARD_DIR = "/qns-forward/"
HANDLED_DIR = "/qns-forward_handled/"
#: Written by the worker: per target, the steps it refused because they
#: would take a port this hop serves itself, one ``PROTO FIRST-LAST: why`` a line.
REFUSED_DIR = "/qns-forward_refused/"
#: our chains in Qubes' table ``qubes``
CHAINS = (FORWARD_CHAIN,)
HOOKS = {FORWARD_CHAIN: BaseChainHook(parent="forward")}
#: our table's chains: the DNAT lookups, and the marking of replies to route
DNAT_DECLARATION = "type nat hook prerouting priority dstnat; policy accept;"
REPLY_DECLARATION = "type filter hook prerouting priority mangle; policy accept;"


#: (family, iif, protocol, first port, last port) a step holds in a DNAT map
Claim = tuple[str, str, str, int, int]


def _taking(steps: Target, served: list[hop_ports.Served]) -> dict[Step, str]:
    """The steps that would take a port the hop serves, each with why."""
    taking = {}
    for step in steps if served and not isinstance(steps, Refused) else ():
        hit = next((s for s in served if s.overlaps(step.proto, step.ports)), None)
        if hit is not None:
            taking[step] = f"{step.proto} {step.ports[0]}-{step.ports[1]}: {hit.why}"
    return taking


def _any_element(elements: Elements) -> bool:
    return any(elements.values())


def element_commands(family: Family, held: Elements, wanted: Elements) -> str:
    """Elements to delete then to add, per map, from ``held`` to ``wanted``."""
    lines = []
    for name in OBJECTS:
        gone = held.get(name, frozenset()) - wanted[name]
        new = wanted[name] - held.get(name, frozenset())
        where = f"{family} {NAT_TABLE} {name}"
        if gone:
            keys = ", ".join(sorted(element_key(element) for element in gone))
            lines.append(f"delete element {where} {{ {keys} }}")
        if new:
            lines.append(f"add element {where} {{ {', '.join(sorted(new))} }}")
    return "".join(line + "\n" for line in lines)


def nat_table_commands(family: Family, wanted: Elements) -> str:
    """Our table written whole: the maps with ``wanted``, the chain looking them up,
    the chain marking replies to route back by the uplink.

    ``add`` then ``flush``: the same text whether the table, a map or the
    chain exists already or not.
    """
    lines = [f"add table {family} {NAT_TABLE}"]
    for name, declared in declarations(family).items():
        lines += [f"add {declared}", f"flush map {family} {NAT_TABLE} {name}"]
    for name, declaration, rules in ((DNAT_CHAIN, DNAT_DECLARATION, dnat_rules(family)),
                                     (REPLY_CHAIN, REPLY_DECLARATION, reply_rules())):
        chain = f"{family} {NAT_TABLE} {name}"
        lines += [f"add chain {chain} {{ {declaration} }}", f"flush chain {chain}"]
        lines += [f"add rule {chain} {rule}" for rule in rules]
    empty = {name: frozenset[str]() for name in OBJECTS}
    return "".join(line + "\n" for line in lines) + element_commands(family, empty, wanted)


class Forwarder(ChainDirectory):
    """The forward kind: ``/qns-forward/`` steps to the maps and sets ``qns-*`` chains look up.

    A step on a port this hop serves itself (:mod:`agent_worker.hop_ports`)
    is left out, logged, and reported under ``/qns-forward_refused/TARGET``
    in this hop's QubesDB, checked again at every update and SIGHUP. A
    target with a step on a port another target's step already holds (in
    address order) gets no step at all, and is logged.
    """

    DIRECTORY = FORWARD_DIR
    HANDLED = HANDLED_DIR
    CHAINS = CHAINS
    HOOKS = HOOKS
    LABEL = "forwards"
    KIND = "forward"
    ITEMS = "steps"
    #: the gateway, for the route of replies to forwards (:mod:`agent_worker.reply_route`)
    WATCHED = tuple(GATEWAYS.values())

    def __init__(
        self,
        db: QubesDBConnection,
        runner: Runner,
        tool: conntrack.Tool = conntrack.NETLINK,
        own_sockets: Callable[[], list[hop_ports.Served]] = hop_ports.sockets,
    ) -> None:
        super().__init__(db, runner, tool)
        #: the rule and route sending replies to forwards back by the uplink, kept for the
        #: worker's life (not with the table: a fail-closed removal must not drop them)
        self.reply_route = ReplyRoute(db)
        #: what this hop's own sockets serve (:func:`agent_worker.hop_ports.sockets`)
        self.own_sockets = own_sockets
        #: per target, the steps left out as taking a port this hop serves, and why
        self.taken: dict[IPAddress, dict[Step, str]] = {}
        #: targets left out for a step meeting another target's, and why (logged once)
        self.overlapping: dict[IPAddress, str] = {}
        #: per target, computed from its steps alone and kept while they are the same
        #: object: the steps taking a port served (as :attr:`served` was), its port
        #: claims, its map elements
        self.served: list[hop_ports.Served] = []
        self._on_served: dict[int, tuple[Target, dict[Step, str]]] = {}
        self._claims: dict[int, tuple[Target, list[Claim]]] = {}
        self._elements: dict[int, tuple[Target, tuple[tuple[Family, str, str], ...]]] = {}

    def commit(self) -> bool:
        self._leave_out_own_ports()
        done = super().commit()
        if self.reply_route.failed:  # ``ip`` failed before: try again
            self.reply_route.refresh()
        return done

    def reload(self, *, force: bool = False) -> None:
        super().reload(force=force)
        # at start; at SIGHUP (force), written again even if believed in place
        self.reply_route.refresh(force=force)

    def watched_changed(self) -> None:
        # A new gateway, or the uplink attached again: the kernel dropped our route with it.
        self.reply_route.refresh(force=True)

    def stop(self) -> None:
        super().stop()
        self.reply_route.remove()

    def _leave_out_own_ports(self) -> None:
        """Find the steps that would take a port this hop serves; report what changed."""
        steps = [t for t in self.targets.values() if not isinstance(t, Refused) and t]
        served = hop_ports.served(self.runner, self.own_sockets) if steps else []
        if served != self.served:
            self._on_served, self.served = {}, served
        taken: dict[IPAddress, dict[Step, str]] = {}
        memo = {}
        for address, target in self.targets.items():
            if isinstance(target, Refused):
                continue
            known = self._on_served.get(id(target))
            if known is None or known[0] is not target:
                known = (target, _taking(target, served))
            memo[id(target)] = known
            if known[1]:
                taken[address] = known[1]
        self._on_served = memo
        for address in sorted(taken.keys() | self.taken.keys(), key=address_order):
            reasons = taken.get(address, {})
            if reasons == self.taken.get(address, {}):
                continue
            path = f"{REFUSED_DIR}{address}"
            if reasons:
                for reason in reasons.values():
                    log.error("forwards to %s: refusing the step on %s", address, reason)
                self.db.write(path, "\n".join(reasons.values())[:MAX_VALUE])
            else:
                self.db.rm(path)
        self.taken = taken

    def _effective(self) -> dict[IPAddress, Target]:
        targets = super()._effective()
        for address, steps in self.taken.items():
            target = targets.get(address)
            if target is not None and not isinstance(target, Refused):
                targets[address] = tuple(s for s in target if s not in steps)
        return self._without_overlaps(targets)

    def _without_overlaps(self, targets: dict[IPAddress, Target]) -> dict[IPAddress, Target]:
        """Targets with a step on another's ports left out (fail closed), in address order.

        The claims of all steps are sorted once: when no two meet (the usual
        case: dom0 plans none), nothing more is needed.
        """
        claims, memo = [], {}
        for target in targets.values():
            if isinstance(target, Refused):
                continue
            known = self._claims.get(id(target))
            if known is None or known[0] is not target:
                known = (target, [(s.family, s.iif, s.proto, *s.ports) for s in target])
            memo[id(target)] = known
            claims += known[1]
        self._claims = memo
        claims.sort()
        if all(a[:3] != b[:3] or a[4] < b[3] for a, b in itertools.pairwise(claims)):
            self.overlapping = {}
            return targets
        held = TakenPorts()
        overlapping = {}
        for address, target in by_address(targets):
            if isinstance(target, Refused):
                continue
            meeting = held.meets(target)
            if meeting is not None:
                step, other = meeting
                reason = (
                    f"{step.proto} ports {step.ports[0]}-{step.ports[1]} meet those of the"
                    f" step to {other.to} ({other.ports[0]}-{other.ports[1]})"
                )
                overlapping[address] = reason
                targets[address] = Refused(reason)
                if self.overlapping.get(address) != reason:
                    log.error("no %s to %s: %s", self.LABEL, address, reason)
        self.overlapping = overlapping
        return targets

    def parse(self, address: IPAddress, untrusted_entries: dict[str, bytes]) -> tuple[Step, ...]:
        steps = parse_target(untrusted_entries)
        for number, step in enumerate(steps):
            if step.to.version != address.version:
                key = sorted(untrusted_entries)[number]
                raise EntryError(f"entry {key}: to of another family than the target")
        return tuple(steps)

    def destination(self, address: IPAddress, item: Step) -> IPAddress:
        # the next hop (a ProxyVM, client of this hop) or, at the last hop, the target
        return item.to

    def desired(self, targets: Mapping[IPAddress, Target]) -> dict[Family, Elements]:
        """:func:`agent_worker.forward_steps.family_elements` of the targets, each rendered once."""
        found: dict[Family, dict[str, set[str]]] = {
            family: {name: set() for name in OBJECTS} for family in FAMILIES
        }
        memo = {}
        for target in targets.values():
            if isinstance(target, Refused):
                continue
            known = self._elements.get(id(target))
            if known is None or known[0] is not target:
                known = (target, tuple(
                    (family, name, element)
                    for family, maps in family_elements(target).items()
                    for name, elements in maps.items() for element in elements
                ))
            memo[id(target)] = known
            for family, name, element in known[1]:
                found[family][name].add(element)
        self._elements = memo
        return {
            family: {name: frozenset(elements) for name, elements in maps.items()}
            for family, maps in found.items()
        }


    def family_commands(
        self, family: Family, wanted: Elements, held: Elements | None
    ) -> str | None:
        """Element differences while the family holds our objects; else write or remove them.

        Written whole: ``qns-forward`` in table ``qubes`` (or nothing, if
        that table cannot take it) and our table. Removed: both.
        """
        if held is not None and held == wanted:
            return ""
        if held is not None and _any_element(held) and _any_element(wanted):
            return element_commands(family, held, wanted)
        if _any_element(wanted):
            chains = nft_chains.chain_commands(family, {FORWARD_CHAIN: accept_rules()},
                                               self.runner, self.CHAINS, self.HOOKS)
            return None if chains is None else chains + nat_table_commands(family, wanted)
        chains = nft_chains.chain_commands(family, {FORWARD_CHAIN: []}, self.runner,
                                           self.CHAINS, self.HOOKS)
        if nft_chains.table_exists(family, NAT_TABLE, self.runner):
            # the jump and chain first: nothing may point into the table
            return (chains or "") + f"delete table {family} {NAT_TABLE}\n"
        return chains

    def flows_to_end(self, before: InForce, after: InForce) -> list[conntrack.Flow]:
        """Flows a step that went (removed, narrowed, its target gone) had translated.

        Listed per protocol and translated address of the steps that went;
        a flow another step in force still translates the same way stays.
        """
        changed = [(old, after.get(a, ())) for a, old in before.items() if after.get(a) is not old]
        gone = {s for old, _ in changed for s in old} - {s for _, new in changed for s in new}
        if not gone:
            return []
        places = {(s.proto, s.to) for s in gone}
        kept = [s for steps in after.values() for s in steps if (s.proto, s.to) in places]
        ended = []
        for version, proto, to in sorted({(s.to.version, s.proto, s.to) for s in gone}):
            for flow in conntrack.list_flows(version, ["-p", proto, "--reply-src", str(to)],
                                             self.tool):
                if any(step_admits(s, flow) for s in gone) and not any(
                    step_admits(s, flow) for s in kept
                ):
                    ended.append(flow)
        return ended
