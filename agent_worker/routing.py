"""The routing kind of the firewall worker: a qube exposed on the LAN at its own address.

dom0 writes ``/qns-routing/<A>/`` into every hop of a routed qube's path
(doc/qubesdb.md): ``route`` (``role=edge|inner``, ``via=V`` where ``A``
lies behind this hop's client ``V``), the qube's inbound rules ``in/NNNN``
and, with ``via``, its outbound rules ``out/...``. This kind makes the hop
carry ``A`` with no NAT either way:

- chain ``qns-routing`` (forward, after ``qns-forward`` and ``qns-inbound``,
  ahead of Qubes' ``oifgroup 2`` drop): new connections to ``A`` as the
  inbound rules say, first match wins, none matching meets Qubes' drop;
- chain ``qns-routing-nonat`` (postrouting, ahead of ``masquerade``):
  traffic from ``A`` leaves with ``A`` as its source;
- with ``via``: the pair (``V``'s vif, ``A``) in the antispoof set
  ``allowed`` (only that vif may send from ``A``), ``A``'s outbound rules
  in the outbound worker's table (it counts ``A`` as a client here),
  link-local neighbour discovery from that vif (chain ``qns-routing-nd``,
  IPv6) and a host route to ``A`` via ``V``;
- at the edge: a proxy neighbour entry for ``A`` on the uplink whose
  network holds ``A`` (ARP or NDP for exactly that address; ``proxy_arp``
  stays off), answered at once (``proxy_delay`` 0).

Order, fail closed: firewall first (outbound rules, then chains and
antispoof pair in one nft transaction), then the route, the proxy entry
last; removal in reverse, then the flows of a removed address are ended
(conntrack). Each hop reports in its own QubesDB,
``/qns-routing_status/<A>`` (:data:`STATES`), which also tells a restarted
worker what it left in the kernel.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from agent_worker import conntrack, net_state, nft_chains
from agent_worker.directory import ChainDirectory, Changes, InForce, Target, by_address
from agent_worker.entries import (
    EntryError,
    Family,
    IPAddress,
    Refused,
    family_of,
    parse_address,
    parse_words,
)
from agent_worker.inbound import parse_target as parse_rules
from agent_worker.input_rules import ONLY_NEW_WALK, ONLY_SYN_OPENS, Opening, admits, input_rule
from agent_worker.neighbours import Guard, Link, frame_for, mac_text
from agent_worker.nft_chains import BaseChainHook, NftError, Runner

log = logging.getLogger("qubes.firewall")

ROUTING_DIR = "/qns-routing/"
HANDLED_DIR = "/qns-routing_handled/"
STATUS_DIR = "/qns-routing_status/"
ACCEPT_CHAIN = "qns-routing"
NONAT_CHAIN = "qns-routing-nonat"
ND_CHAIN = "qns-routing-nd"
HOOKS = {
    ACCEPT_CHAIN: BaseChainHook(parent="forward", after=("qns-forward", "qns-inbound")),
    NONAT_CHAIN: BaseChainHook(parent="postrouting"),
    ND_CHAIN: BaseChainHook(parent="prerouting"),
}
#: What a hop reports for an address (doc/qubesdb.md); dom0 reads nothing else.
STATES = frozenset({
    "applied", "waiting", "probing", "exposed", "squatter", "conflict", "outside", "failed",
})

_RULE_KEY_RE = re.compile(r"in/([0-9]{4})")
_OUT_KEY_RE = re.compile(r"out/(policy|[0-9]{4})")

#: Gives a routed address's outbound rules (``out/`` entries) to the outbound worker.
PublishOutbound = Callable[[Mapping[IPAddress, Mapping[str, bytes]]], None]


@dataclass(frozen=True)
class Entry:
    """One validated ``/qns-routing/<A>/`` directory."""

    edge: bool
    #: the client ``A`` lies behind; None: ``A`` is this hop's own client
    via: IPAddress | None
    rules: tuple[Opening, ...]
    #: ``out/`` entries, key without ``out/``; parsed by the outbound worker
    outbound: tuple[tuple[str, bytes], ...]


def parse_entry(address: IPAddress, untrusted_entries: Mapping[str, bytes]) -> Entry:
    """Validate a target's directory (keys relative to it); EntryError names the bad part."""
    if "route" not in untrusted_entries:
        raise EntryError("missing route")
    try:
        untrusted_route = untrusted_entries["route"].decode("ascii")
    except UnicodeDecodeError:
        raise EntryError("route: not ASCII") from None
    words = parse_words(untrusted_route, {"role", "via"})
    if words.get("role") not in ("edge", "inner"):
        raise EntryError("route: role must be edge or inner")
    via = None
    if "via" in words:
        via = parse_address(words["via"])
        if via.version != address.version or via == address:
            raise EntryError("route: via must be another address of the same family")
    untrusted_rules, outbound = {}, []
    for untrusted_key in sorted(untrusted_entries):
        if untrusted_key == "route":
            continue
        if match := _RULE_KEY_RE.fullmatch(untrusted_key):
            untrusted_rules[match.group(1)] = untrusted_entries[untrusted_key]
        elif (match := _OUT_KEY_RE.fullmatch(untrusted_key)) and via is not None:
            outbound.append((match.group(1), untrusted_entries[untrusted_key]))
        else:
            raise EntryError(f"unexpected key {untrusted_key[:20]!r}")
    if via is not None and not outbound:
        raise EntryError("out/ rules missing: the qube's traffic would pass unfiltered")
    return Entry(words["role"] == "edge", via, tuple(parse_rules(address, untrusted_rules)),
                 tuple(outbound))


@dataclass(frozen=True)
class Wanted:
    """An address this hop carries now: its entry and what the kernel resolved for it."""

    entry: Entry
    #: the vif of ``entry.via`` (None without via)
    vif: str | None
    #: the uplink answering for the address (edge only)
    uplink: str | None

    @property
    def kernel(self) -> tuple[IPAddress | None, str | None, str | None]:
        """What its route and proxy entry depend on (a rule change needs neither redone)."""
        return self.entry.via, self.vif, self.uplink


def chain_rules(wanted: Mapping[IPAddress, Wanted]) -> dict[Family, dict[str, list[str]]]:
    """The three chains in both families, addresses in address order."""
    result: dict[Family, dict[str, list[str]]] = {
        family: {ACCEPT_CHAIN: [], NONAT_CHAIN: [], ND_CHAIN: []} for family in ("ip", "ip6")
    }
    for address, item in sorted(wanted.items(), key=lambda i: (i[0].version, i[0])):
        family = family_of(address)
        chains = result[family]
        if item.entry.rules and not chains[ACCEPT_CHAIN]:
            # established packets leave at once; a flow cut by conntrack is
            # never taken up again mid-stream
            chains[ACCEPT_CHAIN] += [ONLY_NEW_WALK, ONLY_SYN_OPENS]
        chains[ACCEPT_CHAIN] += [
            f"{family} daddr {address} {input_rule(rule, family)}" for rule in item.entry.rules
        ]
        chains[NONAT_CHAIN].append(f"{family} saddr {address} accept")
        if item.vif is not None and family == "ip6":
            chains[ND_CHAIN].append(
                f'iifname "{item.vif}" ip6 saddr fe80::/64'
                " icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept"
            )
    return result


def antispoof_elements(wanted: Mapping[IPAddress, Wanted]) -> set[tuple[Family, str, str]]:
    """``(family, set, element)`` of Qubes' antispoof set ``allowed`` for addresses behind a client.

    Only the pair (vif, address): it lets that vif, and no other, send from
    the address. Set ``downstream`` is left to vif-route-qubes: an address
    in it may also be a client's own (after a netvm change) and is not ours
    to delete; the outbound worker's prerouting chain, which counts a
    routed address as a client, already drops it arriving from the uplink.
    """
    return {
        (family_of(address), "allowed", f'"{item.vif}" . {address}')
        for address, item in wanted.items() if item.vif is not None
    }


def present_elements(family: Family, items: list[dict[str, Any]]) -> set[tuple[Family, str, str]]:
    """The elements of the antispoof set ``allowed`` in a ``list table`` listing."""
    found = set()
    for item in items:
        nft_set = item.get("set")
        if not isinstance(nft_set, dict) or nft_set.get("name") != "allowed":
            continue
        for element in nft_set.get("elem", []):
            if isinstance(element, dict) and len(element.get("concat", [])) == 2:
                vif, address = element["concat"]
                found.add((family, "allowed", f'"{vif}" . {address}'))
    return found


def element_commands(
    wanted: set[tuple[Family, str, str]],
    mine: set[tuple[Family, str, str]],
    present: set[tuple[Family, str, str]],
) -> list[str]:
    """Add what is wanted and missing; delete what was ours, is present and no longer wanted."""
    lines = [
        f"delete element {family} {nft_chains.TABLE} {name} {{ {text} }}"
        for family, name, text in sorted((mine - wanted) & present)
    ]
    lines += [
        f"add element {family} {nft_chains.TABLE} {name} {{ {text} }}"
        for family, name, text in sorted(wanted - present)
    ]
    return lines


def status_value(state: str, iface: str | None = None, mac: str | None = None) -> str:
    """A report for ``/qns-routing_status/<A>`` (grammar in doc/qubesdb.md)."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}")
    words = [f"state={state}"]
    words += [] if iface is None else [f"iface={iface}"]
    words += [] if mac is None else [f"mac={mac}"]
    return " ".join(words)


class Router(ChainDirectory):
    """The routing kind: ``/qns-routing/`` to chains, antispoof pairs, routes, proxy entries."""

    DIRECTORY = ROUTING_DIR
    HANDLED = HANDLED_DIR
    CHAINS = (ACCEPT_CHAIN, NONAT_CHAIN, ND_CHAIN)
    HOOKS = HOOKS
    LABEL = "routing"
    KIND = "routing"
    ITEMS = "addresses"

    def __init__(self, db: Any, runner: Runner, publish_outbound: PublishOutbound) -> None:
        super().__init__(db, runner)
        self.publish_outbound = publish_outbound
        #: what the kernel holds for each address: its route and proxy entry included
        self.installed: dict[IPAddress, Wanted] = {}
        #: antispoof elements this kind added (and may delete)
        self.elements: set[tuple[Family, str, str]] = set()
        #: last report written per address
        self.reported: dict[IPAddress, str] = {}
        self.started = False
        #: duplicate address detection and conflict watch at the edge
        self.guard = Guard()
        self.links: dict[str, Link] = {}

    # -- ChainDirectory ---------------------------------------------------

    def parse(self, address: IPAddress, untrusted_entries: dict[str, bytes]) -> tuple[Entry]:
        return (parse_entry(address, untrusted_entries),)

    def destination(self, address: IPAddress, item: Entry) -> IPAddress:
        # the client the address lies behind, or the address itself as a client
        return item.via if item.via is not None else address

    def desired(self, targets: Mapping[IPAddress, Target]) -> dict[Family, dict[str, list[str]]]:
        return chain_rules(self._decide(targets)[0])

    def _effective(self) -> dict[IPAddress, Target]:
        """The targets carried now: those :meth:`_decide` wants (or refused, to say so).

        So what ChainDirectory puts in force, renders and checks is what this hop
        really carries, not an address still probed, waiting or refused.
        """
        targets = super()._effective()
        wanted, _ = self._decide(targets)
        return {a: t for a, t in targets.items() if isinstance(t, Refused) or a in wanted}

    def flows_to_end(self, before: InForce, after: InForce) -> list[conntrack.Flow]:
        """Flows of an address no longer carried, and those its changed rules stop admitting.

        Only flows with peers beyond this hop's own clients: those are
        decided by the inbound kind (or are the qube's own, to its siblings).
        """
        ended = []
        for address, (old,) in before.items():
            new = after.get(address)
            if new is not None and new[0].rules == old.rules:
                continue
            for flow in self._lan_flows(address, both_ways=new is None):
                if new is None or (admits(old.rules, flow) and not admits(new[0].rules, flow)):
                    ended.append(flow)
        return ended

    def _lan_flows(self, address: IPAddress, both_ways: bool) -> list[conntrack.Flow]:
        """Tracked flows to (``both_ways``: and from) the address, peers not this hop's clients."""
        filters = [["--orig-dst", str(address)]]
        if both_ways:
            filters.append(["--orig-src", str(address)])
        flows = [
            flow for flt in filters
            for flow in conntrack.list_flows(address.version, flt, self.tool)
        ]
        return [
            flow for flow in flows
            if (flow.dst if flow.src == address else flow.src) not in self.connected
        ]

    def _commands(
        self, targets: Mapping[IPAddress, Target], held: Mapping[Family, Any]
    ) -> tuple[str, dict[Family, Any]]:
        """ChainDirectory's chains, then the antispoof pairs to add or delete (listed each time)."""
        wanted = antispoof_elements(self._decide(targets)[0])
        text, holds = super()._commands(targets, held)
        lines = []
        for family in ("ip", "ip6"):
            items = nft_chains.list_table(family, self.runner)
            if items is not None:
                lines += element_commands(
                    {e for e in wanted if e[0] == family}, self.elements,
                    present_elements(family, items),
                )
        return text + "".join(line + "\n" for line in lines), holds

    # -- deciding ---------------------------------------------------------

    def _decide(
        self, targets: Mapping[IPAddress, Target]
    ) -> tuple[dict[IPAddress, Wanted], dict[IPAddress, str]]:
        """What to carry now, and the report for every target (from the kernel's view)."""
        wanted: dict[IPAddress, Wanted] = {}
        reports: dict[IPAddress, str] = {}
        for address, target in by_address(targets):
            if isinstance(target, Refused):
                reports[address] = status_value("failed")
                continue
            if not target:  # its client is not connected here
                reports[address] = status_value("waiting")
                continue
            entry = target[0]
            try:
                vif = None if entry.via is None else net_state.vif_of(entry.via)
                uplink = net_state.uplink_for(address) if entry.edge else None
            except net_state.NetError as err:
                log.error("routing to %s: %s", address, err)
                reports[address] = status_value("failed")
                continue
            if entry.via is not None and vif is None:
                reports[address] = status_value("waiting")
            elif entry.edge and uplink is None:
                reports[address] = status_value("outside")
            elif uplink is None:
                wanted[address] = Wanted(entry, vif, None)
                reports[address] = status_value("applied")
            else:
                # the edge answers only once no other machine on the uplink has the address
                state, mac = self.guard.state(address) or ("probing", None)
                reports[address] = status_value(state, iface=uplink, mac=mac)
                if state in ("exposed", "squatter"):
                    wanted[address] = Wanted(entry, vif, uplink)
        return wanted, reports

    def _edge_candidates(self, targets: Mapping[IPAddress, Target]) -> dict[IPAddress, str]:
        """Addresses this edge may answer for once probed, with their uplink."""
        candidates = {}
        for address, target in targets.items():
            if isinstance(target, Refused) or not target or not target[0].edge:
                continue
            entry = target[0]
            try:
                if entry.via is not None and net_state.vif_of(entry.via) is None:
                    continue
                uplink = net_state.uplink_for(address)
            except net_state.NetError:
                continue  # reported by _decide
            if uplink is not None:
                candidates[address] = uplink
        return candidates

    def _watch(self, targets: Mapping[IPAddress, Target]) -> None:
        """Probe new edge addresses, stop watching gone ones; a raw socket pair per uplink."""
        self.guard.sync(self._edge_candidates(targets), time.monotonic())
        ifaces = {watch.iface for watch in self.guard.watches.values()}
        for iface in set(self.links) - ifaces:
            self.links.pop(iface).close()
        for iface in sorted(ifaces):
            try:
                link = self.links.get(iface) or Link(iface)
                self.links[iface] = link
                link.listen_for(a for a, w in self.guard.watches.items()
                                if w.iface == iface and a.version == 6)
            except OSError as err:
                log.error("routing: cannot watch %s for address conflicts: %s", iface, err)

    def fds(self) -> tuple[int, ...]:
        return tuple(fd for link in self.links.values() for fd in link.fds())

    def next_wake(self) -> float | None:
        return self.guard.next_deadline()

    def wake(self, ready: Collection[int], now: float) -> None:
        """Claims heard on an uplink, probes and announcements due: decide, then send."""
        sends, changed = [], False
        for iface, link in list(self.links.items()):
            if not set(link.fds()) & set(ready):
                continue
            try:
                claims = link.receive()
            except OSError as err:
                log.error("routing: reading %s: %s", iface, err)
                continue
            more, moved = self.guard.seen(iface, claims, mac_text(link.mac), now)
            sends += more
            changed |= moved
        more, moved = self.guard.tick(now)
        if changed or moved:
            self.commit()
        for send in sends + more:
            link = self.links.get(send.iface)
            if link is None or send.address not in self.guard.watches:
                continue
            try:
                local = net_state.link_local(send.iface) if send.address.version == 6 else None
                frame = frame_for(send, link.mac, local)
                if frame is not None:
                    link.send(frame)
            except (OSError, net_state.NetError) as err:
                log.error("routing: sending a %s for %s on %s: %s",
                          send.kind, send.address, send.iface, err)

    # -- applying ---------------------------------------------------------

    def commit(self) -> bool:
        """Take the kernel to what the entries ask, in the fail-closed order."""
        targets = super()._effective()
        self._watch(targets)
        wanted, reports = self._decide(targets)
        before = dict(self.installed)
        gone = [
            a for a, item in before.items() if a not in wanted or wanted[a].kernel != item.kernel
        ]
        for address in gone:
            self._withdraw(address)
        self._publish({**before, **wanted})
        committed = self._commit_nft()
        carried = {a: w for a, w in wanted.items() if committed and a not in self.refused}
        failed = [a for a, item in carried.items() if not self._install(a, item)]
        for address in failed:
            del carried[address]
            self.refused[address] = "the kernel refused its route or proxy entry"
        self._publish(carried)
        if failed:  # take their firewall part out again
            committed = self._commit_nft() and committed
        reports.update({a: status_value("failed") for a in wanted if a not in carried})
        self._report(reports)
        return committed

    def _commit_nft(self) -> bool:
        """ChainDirectory's transaction (chains, antispoof pairs); remember the pairs it holds."""
        committed = super().commit()
        if committed:
            self.elements = antispoof_elements(self._decide(self._effective())[0])
        return committed

    def handle(self, changes: Changes) -> None:
        """As ChainDirectory, but a change of the connected clients always re-decides.

        A client that reconnected has a new vif even with the same address.
        """
        super().handle(changes)
        if changes.connected and not changes.full and not changes.targets:
            self.commit()

    def _publish(self, carried: Mapping[IPAddress, Wanted]) -> None:
        self.publish_outbound({
            address: dict(item.entry.outbound)
            for address, item in carried.items() if item.entry.via is not None
        })

    def _install(self, address: IPAddress, item: Wanted) -> bool:
        """Route, then proxy entry; False (and nothing left of it) if the kernel refuses."""
        installed = self.installed.get(address)
        if installed is not None and installed.kernel == item.kernel:
            self.installed[address] = item
            return True
        try:
            if item.entry.via is not None and item.vif is not None:
                net_state.add_route(address, item.entry.via, item.vif)
            self.installed[address] = item
            if item.uplink is not None:
                net_state.prepare_uplink(item.uplink, address.version)
                net_state.add_proxy(address, item.uplink)
        except net_state.NetError as err:
            log.error("routing to %s: %s", address, err)
            self._withdraw(address)
            return False
        log.info("routing to %s: carried%s", address,
                 f", answering on {item.uplink}" if item.uplink else "")
        return True

    def _withdraw(self, address: IPAddress) -> None:
        """Proxy entry first, then the route; the firewall part goes with the next nft commit."""
        item = self.installed.pop(address, None)
        if item is None:
            return
        try:
            if item.uplink is not None:
                net_state.del_proxy(address, item.uplink)
            if item.entry.via is not None:
                net_state.del_route(address)
        except net_state.NetError as err:
            log.error("routing to %s: withdrawing: %s", address, err)
        log.info("routing to %s: withdrawn", address)

    def _report(self, reports: Mapping[IPAddress, str]) -> None:
        """Write what changed to ``/qns-routing_status/``; drop reports of targets gone."""
        for address in sorted(self.reported.keys() - reports.keys(), key=str):
            self.db.rm(f"{STATUS_DIR}{address}")
            del self.reported[address]
        for address, value in reports.items():
            if self.reported.get(address) != value:
                self.db.write(f"{STATUS_DIR}{address}", value)
                self.reported[address] = value
                if value.split()[0] in ("state=conflict", "state=squatter", "state=outside"):
                    log.warning("routing to %s: %s", address, value)

    # -- entry points -----------------------------------------------------

    def reload(self, *, force: bool = False) -> None:
        """Re-read every target; at the first, withdraw whatever an earlier worker left."""
        if not self.started:
            self.started = True
            self._clean_leftovers()
        super().reload(force=force)

    def remove(self) -> None:
        """Withdraw everything (clean stop, or nft refused twice): proxies, routes, chains."""
        for address in list(self.installed):
            self._withdraw(address)
        self.guard.sync({}, time.monotonic())
        for link in self.links.values():
            link.close()
        self.links.clear()
        self._publish({})
        try:
            super().remove()
        finally:
            self._delete_elements(self.elements)
            self.elements = set()
            self._put_in_force({})  # ends the flows of what was carried
            self._report({})

    def _delete_elements(self, elements: set[tuple[Family, str, str]]) -> None:
        text = ""
        for family in ("ip", "ip6"):
            items = nft_chains.list_table(family, self.runner)
            if items is not None:
                mine = {e for e in elements if e[0] == family}
                text += "".join(
                    line + "\n"
                    for line in element_commands(set(), mine, present_elements(family, items))
                )
        if text:
            self.runner(text)

    def _clean_leftovers(self) -> None:
        """What the reports of an earlier worker say it left: proxy entries, routes, pairs."""
        self._load_connected()
        recorded = set()
        for path in self.db.list(STATUS_DIR):
            try:
                recorded.add(parse_address(path[len(STATUS_DIR):]))
            except EntryError:
                continue
        recorded |= net_state.our_routes()
        if not recorded:
            return
        try:
            for address, iface in net_state.proxies():
                if address in recorded:
                    net_state.del_proxy(address, iface)
            for address in recorded:
                net_state.del_route(address)
        except net_state.NetError as err:
            log.error("routing: cleaning up after an earlier worker: %s", err)
        leftovers: set[tuple[Family, str, str]] = set()
        for family in ("ip", "ip6"):
            items = nft_chains.list_table(family, self.runner) or []
            for element in present_elements(family, items):
                vif, _, text = element[2].partition(" . ")
                try:
                    address = parse_address(text)
                    # the address's own vif, if it became a client here, is vif-route-qubes' pair
                    if address in recorded and vif.strip('"') != net_state.vif_of(address):
                        leftovers.add(element)
                except (EntryError, net_state.NetError):
                    continue
        try:
            self._delete_elements(leftovers)
        except NftError as err:
            log.error("routing: removing antispoof pairs left behind: %s", err)
        for address in recorded:
            self.db.rm(f"{STATUS_DIR}{address}")
        try:
            flows = [f for address in recorded for f in self._lan_flows(address, both_ways=True)]
            conntrack.end(flows, "routing left by an earlier worker", self.tool)
        except conntrack.ConntrackError as err:
            log.error("routing: ending the flows an earlier worker carried: %s", err)
