"""nft commands for the ``ip``/``ip6`` ``qubes-firewall`` tables, one change at a time.

Pure: parsed clients come in, command text goes out; the worker
(:mod:`agent_worker.firewall`) reads QubesDB, resolves names, keeps the
:class:`TableState` it last committed and runs the commands in a single
libnftables call. It never lists the table to find out what to change.

Layout (per family; ``ip6`` alike with ``ip6``/``icmpv6``)::

    table ip qubes-firewall {
      set dns-addr { type ipv4_addr; }           # resolv.conf's servers (upstream's set)
      set connected { type ipv4_addr; }          # /connected-ips
      map clients { type ipv4_addr : verdict; }  # a connected client with rules: its chain
      chain forward {        # base chain, forward hook, policy drop
        ct state established,related accept
        iifname != "vif*" accept
        ip saddr vmap @clients
      }
      chain prerouting { iifname != "vif*" ip saddr @connected drop }    # anti-spoofing
      chain postrouting { oifname != "vif*" ip daddr @connected drop }
      chain qbs-10-137-0-5 { <rules in order> <policy> }
    }

A rule's ``drop`` becomes ``reject with icmp[v6] type admin-prohibited``,
so the client sees at once that the firewall refused it, as upstream.

A client's chain is named as upstream's (:func:`chain_name`). A long rule
list is cut into blocks, each a chain of its own named after the content
it was created with (``qbs-10-137-0-5-<hash>``), and the client's chain
jumps to them in order before its policy: a verdict in a block ends the
evaluation as it would inline, and a block nothing matched returns to the
next jump. Blocks end where a rule's own checksum says so, not at fixed
positions, so adding, changing or removing one rule changes one block, and
a change costs the rules of that block. A changed block is refilled in
place under the name of a block no longer wanted (:func:`_reusing`): the
client's chain keeps its jumps, and nft creates and deletes no chain.

A list of FOLD_FROM rules or more is folded first (:func:`_fold`): rules
of one shape (verdict, protocol, fields used) share one rule with an
anonymous set of their values, ``ip daddr . th dport { net . ports, ... }``.
A rule moves to an earlier rule's set only past rules of its own verdict or
rules of the other verdict no packet matches together with it, so the first
match of every packet keeps its verdict. Overlapping elements of a
concatenation (which the kernel refuses) stay in rules of their own; sets
are cut into chunks by element checksum. Folding works per segment of the
list, remembered, so that an edit folds one segment again.
"""

from __future__ import annotations

import bisect
import functools
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

try:  # CPython's own BLAKE2: hashlib would load OpenSSL, 3.7 MiB resident, for one hash
    from _blake2 import blake2b
except ImportError:  # an interpreter built without it
    from hashlib import blake2b

from agent_worker.entries import Family, family_of, port_text
from agent_worker.qdb_parse import (
    PARSED_RULES_KEPT,
    Blocked,
    IPAddress,
    IPNetwork,
    OutboundRule,
    SourceRules,
)

FAMILIES: tuple[Family, ...] = ("ip", "ip6")
TABLE = "qubes-firewall"
CHAIN_PREFIX = "qbs-"
DNS_SET = "dns-addr"
CONNECTED_SET = "connected"
CLIENTS_MAP = "clients"
DNS_PORTS = (53, 53)
#: a list of at most this many rules (a set counting as 1 + its elements / 4)
#: stays in the client's own chain
INLINE_RULES = 48
#: rules per block on average (the checksum of one rule in BLOCK_RULES ends a block)
BLOCK_RULES = 32
#: a block ends here at the latest, whatever the checksums say
MAX_BLOCK_RULES = 4 * BLOCK_RULES
#: lists of this many rules fold into sets (_segment_rules). From here an allow-list
#: applies 25-40% faster folded, a list of mixed verdicts costs about the same, an edit
#: 0.25 ms more; in a shorter list, folding costs Python what it saves nft
#: (doc/performance.md, "Folding, measured")
FOLD_FROM = 64
#: rules of one shape fold into a set lookup from this many elements (an anonymous
#: set costs nft about three rules)
FOLD_MIN = 6
#: set elements nft reads in the time of one rule
ELEMENTS_PER_RULE = 4
#: elements per set on average (the checksum of one element in SET_CHUNK ends a set)
SET_CHUNK = 64
#: a set ends here at the latest
MAX_SET_CHUNK = 4 * SET_CHUNK
#: rules per segment on average (the checksum of one rule in SEGMENT_RULES ends a
#: segment): rules fold within their segment (_segment_rules)
SEGMENT_RULES = 128
#: a segment ends here at the latest
MAX_SEGMENT_RULES = 4 * SEGMENT_RULES
#: folded segments remembered
SEGMENTS_KEPT = 64
#: rules compared at most when deciding whether a rule may move up to its group
MOVE_CHECKS = 64
_PROTOS = ("tcp", "udp", "icmp")

#: A client's chains: name -> rule bodies; blocks first, its own chain last.
Chains = Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class Resolved:
    """A parsed source with each of its ``dsthost`` names resolved in its family."""

    rules: SourceRules
    names: Mapping[str, frozenset[IPAddress]]


Source = Resolved | Blocked


@dataclass(frozen=True)
class TableState:
    """What both tables hold of ours: set contents and each client's chains."""

    dns: frozenset[IPAddress] = frozenset()
    connected: frozenset[IPAddress] = frozenset()
    clients: Mapping[IPAddress, Chains] = field(default_factory=dict)

    def with_clients(
        self,
        dns: frozenset[IPAddress],
        connected: frozenset[IPAddress],
        changes: Mapping[IPAddress, Chains | None],
    ) -> TableState:
        """This state with new set contents and ``changes`` (None: no chain any more)."""
        clients = dict(self.clients)
        for address, chains in changes.items():
            if chains is None:
                clients.pop(address, None)
            else:
                clients[address] = _reusing(self.clients.get(address), chains, address)
        return TableState(dns, connected, clients)


def _reusing(old: Chains | None, new: Chains, address: IPAddress) -> Chains:
    """``new`` with its blocks renamed onto the blocks of ``old``: a block whose rules a
    block of ``old`` holds takes its name; another takes the name of a block no longer
    wanted (refilled in place: creating and deleting chains costs nft more than the
    flush); the rest keep their own names. The client's chain jumps to the new names.
    """
    own = chain_name(address)
    if old is None or len(new) == 1:
        return new
    held = {rules: name for name, rules in old.items() if name != own}
    renamed = {name: held.pop(rules, None) for name, rules in new.items() if name != own}
    if all(name == old_name for name, old_name in renamed.items()):
        return new
    free = list(held.values())
    taken = set(old) | set(new)
    for name, old_name in renamed.items():
        if old_name is None:
            renamed[name] = free.pop(0) if free else _unused(name, taken)
            taken.add(renamed[name])
    chains = {renamed[name]: rules for name, rules in new.items() if name != own}
    chains[own] = tuple(
        f"jump {renamed[rule[5:]]}" if rule.startswith("jump ") else rule for rule in new[own]
    )
    return chains


def _unused(name: str, taken: set[str]) -> str:
    """``name``, or with a suffix when a chain of the client holds it already."""
    candidate, number = name, 0
    while candidate in taken:
        number += 1
        candidate = f"{name}-{number}"
    return candidate


def in_order(addresses: Iterable[IPAddress]) -> list[IPAddress]:
    """IPv4 first, then by address: the order every transaction lists clients in."""
    return sorted(addresses, key=lambda a: (a.version, a))


def chain_name(source: IPAddress) -> str:
    """``qbs-`` and the address with ``.``/``:`` turned into ``-`` (upstream's naming)."""
    return CHAIN_PREFIX + str(source).replace(".", "-").replace(":", "-")


def reject(family: Family) -> str:
    icmp = "icmp" if family == "ip" else "icmpv6"
    return f"reject with {icmp} type admin-prohibited"


def _addresses(addresses: Iterable[IPAddress]) -> str:
    return "{ " + ", ".join(str(a) for a in sorted(addresses)) + " }"


def rule_text(
    rule: OutboundRule, family: Family, names: Mapping[str, frozenset[IPAddress]]
) -> str | None:
    """One rule body, or None when the rule can match nothing (see :func:`_rule_text`)."""
    if rule.dsthost is None:
        return _rule_text_kept(rule, family)
    return _rule_text(rule, family, names)


@functools.lru_cache(maxsize=PARSED_RULES_KEPT)
def _rule_text_kept(rule: OutboundRule, family: Family) -> str | None:
    """:func:`_rule_text` of a rule without a host name, which nothing else changes."""
    return _rule_text(rule, family, {})


def _rule_text(
    rule: OutboundRule, family: Family, names: Mapping[str, frozenset[IPAddress]]
) -> str | None:
    """One rule body, or None when the rule can match nothing.

    specialtarget=dns means "a server of set ``dns-addr``, port 53, tcp or
    udp"; like upstream, such a rule is left out when it names another
    port. With proto icmp it is left out too (upstream's nft refuses it and
    blocks the client, see doc/agent.md).
    """
    if _matches_nothing(rule):
        return None
    icmp = "icmp" if family == "ip" else "icmpv6"
    parts = []
    ports = DNS_PORTS if rule.dns else rule.dstports
    if rule.proto is not None:
        parts.append(f"meta l4proto {icmp if rule.proto == 'icmp' else rule.proto}")
    elif rule.dns:
        parts.append("meta l4proto { tcp, udp }")
    if rule.dst is not None:
        parts.append(f"{family} daddr {rule.dst}")
    if rule.dsthost is not None:
        parts.append(f"{family} daddr {_addresses(names[rule.dsthost])}")
    if rule.dns:
        parts.append(f"{family} daddr @{DNS_SET}")
    if ports is not None:
        parts.append(f"th dport {port_text(ports)}")
    if rule.icmptype is not None:
        parts.append(f"{icmp} type {rule.icmptype}")
    parts.append("accept" if rule.action == "accept" else reject(family))
    return " ".join(parts)


def _matches_nothing(rule: OutboundRule) -> bool:
    """A ``specialtarget=dns`` rule naming another port than 53, or icmp."""
    return rule.dns and (rule.dstports not in (None, DNS_PORTS) or rule.proto == "icmp")


# -- folding rules into set lookups -----------------------------------------

Interval = tuple[int, int]
#: one element of a folded rule: its text per field, and each field as an interval
Element = tuple[tuple[str, ...], tuple[Interval, ...]]
#: the verdict, protocol ("" any) and which of destination, ports, icmp type a rule uses
Shape = tuple[str, str, bool, bool, bool]
Names = Mapping[str, frozenset[IPAddress]]

_PROTOS = ("tcp", "udp", "icmp")
_OTHER = {"accept": "drop", "drop": "accept"}
#: (action, proto or "" for any) keys of the rules of the other verdict a rule may meet
_BARRIERS = {
    (action, proto): ((_OTHER[action], ""),
                      *((_OTHER[action], p) for p in ((proto,) if proto else _PROTOS)))
    for action in _OTHER
    for proto in ("", *_PROTOS)
}


#: the keys a rule of (action, proto, dns) holds in _fold's table
_MARKS = {
    (action, proto, dns): tuple((action, p) for p in (
        ("tcp", "udp") if dns and proto is None else (proto or "",)))
    for action in _OTHER
    for proto in (None, *_PROTOS)
    for dns in (False, True)
}
#: -1 for every key map() looks up: a barrier not in the table lies before every group
_NONE = (-1, -1, -1, -1)


class _Match(NamedTuple):
    """What a rule matches, as far as moving it past another rule needs to know.

    ``None`` in a field: any value. Destinations of ``specialtarget=dns``
    count as any address (the servers change without the rules changing).
    """

    protos: tuple[str, ...] | None
    dst: tuple[Interval, ...] | None
    ports: Interval | None
    icmptype: int | None


def _disjoint(a: _Match, b: _Match) -> bool:
    """No packet matches both: one field on which the two sets of values do not meet."""
    if a.protos is not None and b.protos is not None and not set(a.protos) & set(b.protos):
        return True
    if a.dst is not None and b.dst is not None and not any(
        x[0] <= y[1] and y[0] <= x[1] for x in a.dst for y in b.dst
    ):
        return True
    if a.ports is not None and b.ports is not None and (
        a.ports[1] < b.ports[0] or b.ports[1] < a.ports[0]
    ):
        return True
    return a.icmptype is not None and b.icmptype is not None and a.icmptype != b.icmptype


def _network_span(network: IPNetwork) -> Interval:
    low = int(network.network_address)
    return low, low | ((1 << (network.max_prefixlen - network.prefixlen)) - 1)


def _protos(rule: OutboundRule) -> tuple[str, ...] | None:
    if rule.dns and rule.proto is None:
        return ("tcp", "udp")
    return None if rule.proto is None else (rule.proto,)


def _match(rule: OutboundRule, names: Names) -> _Match:
    if rule.dsthost is None:
        return _match_kept(rule)
    spans = None if rule.dns else tuple((int(a), int(a)) for a in names[rule.dsthost])
    return _Match(_protos(rule), spans, DNS_PORTS if rule.dns else rule.dstports, rule.icmptype)


@functools.lru_cache(maxsize=PARSED_RULES_KEPT)
def _match_kept(rule: OutboundRule) -> _Match:
    """:func:`_match` of a rule without a host name."""
    spans = None if rule.dst is None or rule.dns else (_network_span(rule.dst),)
    return _Match(_protos(rule), spans, DNS_PORTS if rule.dns else rule.dstports, rule.icmptype)


def _shape(rule: OutboundRule) -> Shape | None:
    """None: never folded (``specialtarget=dns``, or no field to look up)."""
    has_dst = rule.dst is not None or rule.dsthost is not None
    has_ports, has_type = rule.dstports is not None, rule.icmptype is not None
    if rule.dns or not (has_dst or has_ports or has_type):
        return None
    return (rule.action, rule.proto or "", has_dst, has_ports, has_type)


class _Group(NamedTuple):
    """Rules of one verdict at one place of the chain: any order among them is the same."""

    action: str
    shape: Shape | None
    members: list[OutboundRule]


def _fold(rules: Iterable[OutboundRule], names: Names) -> list[_Group]:
    """``rules`` in groups, each rule moved up into the last group of its shape where allowed.

    A rule may move past a rule of its own verdict (a packet both match
    gets that verdict either way) and past a rule of the other verdict that
    no packet matches together with it; otherwise it stays where it is.
    """
    groups: list[_Group] = []
    latest: dict[Shape, int] = {}
    #: (action, proto or "" for any): the last group holding a rule of that action and
    #: proto. When no rule of the other verdict a rule may meet lies past the last group
    #: of its shape, it joins that group at once; otherwise the rules in between are
    #: compared (_may_move_up).
    last_with: dict[tuple[str, str], int] = {}
    get = last_with.get
    for rule in rules:
        shape = _shape(rule)
        place = None if shape is None else latest.get(shape)
        if place is not None:
            barriers = _BARRIERS[rule.action, rule.proto or ""]
            if max(map(get, barriers, _NONE)) >= place and not _may_move_up(
                rule, groups, place, names
            ):
                place = None
        if place is None:
            place = len(groups)
            groups.append(_Group(rule.action, shape, []))
            if shape is not None:
                latest[shape] = place
        groups[place].members.append(rule)
        for key in _MARKS[rule.action, rule.proto, rule.dns]:
            if get(key, -1) < place:
                last_with[key] = place
    return groups


def _may_move_up(rule: OutboundRule, groups: list[_Group], place: int, names: Names) -> bool:
    """Whether ``rule`` may join group ``place``: no later rule of the other verdict meets it.

    Compares up to MOVE_CHECKS rules (more: it stays where it is).
    """
    match = _match(rule, names)
    checks = 0
    for group in groups[place + 1 :]:
        checks += 1
        if checks > MOVE_CHECKS:
            return False
        if group.action == rule.action:
            continue
        for member in group.members:
            checks += 1
            if checks > MOVE_CHECKS or not _disjoint(match, _match(member, names)):
                return False
    return True


def _meets(frame: tuple[Interval, list[int], list[int]], low: int, high: int) -> bool:
    """Whether [low, high] meets one of the frame's sorted, disjoint intervals."""
    index = bisect.bisect_right(frame[1], high) - 1
    return index >= 0 and frame[2][index] >= low


def _without_overlaps(elements: Iterable[Element]) -> tuple[list[Element], list[Element]]:
    """Elements of a two-field set split into those that overlap none kept before, and the rest.

    The kernel refuses a concatenation whose elements overlap. Destinations
    are networks or addresses, so two either nest or are apart: a sweep in
    address order keeps the kept elements whose destination holds the
    current one (a frame per destination, its ports or types sorted).
    """
    kept: list[Element] = []
    rest: list[Element] = []
    frames: list[tuple[Interval, list[int], list[int]]] = []
    for element in sorted(elements, key=lambda e: (e[1][0][0], -e[1][0][1], e[1][1][0])):
        destination, (low, high) = element[1]
        while frames and frames[-1][0][1] < destination[0]:
            frames.pop()
        if any(_meets(frame, low, high) for frame in frames):
            rest.append(element)
            continue
        if not frames or frames[-1][0] != destination:
            frames.append((destination, [], []))
        frames[-1][1].append(low)
        frames[-1][2].append(high)
        kept.append(element)
    return kept, rest


def _elements(rule: OutboundRule, names: Names) -> list[Element]:
    """The rule's values for a set: destination (each address of a name), then ports or type."""
    fields: list[list[tuple[str, Interval]]] = []
    if rule.dst is not None:
        fields.append([(str(rule.dst), _network_span(rule.dst))])
    elif rule.dsthost is not None:
        fields.append([(str(a), (int(a), int(a))) for a in sorted(names[rule.dsthost])])
    if rule.dstports is not None:
        fields.append([(port_text(rule.dstports), rule.dstports)])
    elif rule.icmptype is not None:
        fields.append([(str(rule.icmptype), (rule.icmptype, rule.icmptype))])
    if len(fields) == 1:
        return [((text,), (span,)) for text, span in fields[0]]
    second_text, second_span = fields[1][0]
    return [((text, second_text), (span, second_span)) for text, span in fields[0]]


def _chunks(elements: list[Element]) -> Iterator[list[Element]]:
    """Consecutive runs of a set's sorted elements, cut after each whose checksum says so."""
    start = 0
    for end, element in enumerate(elements, start=1):
        text = " ".join(element[0]).encode()
        if end - start >= MAX_SET_CHUNK or zlib.crc32(text) % SET_CHUNK == 0:
            yield elements[start:end]
            start = end
    if start < len(elements):
        yield elements[start:]


def _group_texts(group: _Group, family: Family, names: Names) -> list[tuple[str, int]]:
    """A group as rules with sets of its elements, or its rules as they are when few.

    Each rule comes with the number of set elements it holds (0: none).
    The elements are cut into chunks (:func:`_chunks`), a rule each, so
    that changing one rule of the group changes one chunk. Elements a
    two-field set cannot hold with the others (they overlap) stay in their
    own rules, after the sets: same verdict, same place.
    """
    count = sum(1 if m.dsthost is None else len(names[m.dsthost]) for m in group.members)
    if group.shape is None or count < FOLD_MIN:
        return [(text, 0) for text in _texts(group.members, family, names)]
    by_member = [(member, _elements(member, names)) for member in group.members]
    elements = {e[0]: e for _, member_elements in by_member for e in member_elements}
    action, proto, dst, ports, icmptype = group.shape
    icmp = "icmp" if family == "ip" else "icmpv6"
    fields = [f"{family} daddr"] if dst else []
    fields += ["th dport"] if ports else []
    fields += [f"{icmp} type"] if icmptype else []
    rest: list[Element] = []
    if len(fields) == 1:  # nft merges overlapping intervals of one field itself
        kept = sorted(elements.values(), key=lambda e: e[1])
    else:
        kept, rest = _without_overlaps(elements.values())
    match = f"meta l4proto {icmp if proto == 'icmp' else proto} " if proto else ""
    match += " . ".join(fields)
    verdict = "accept" if action == "accept" else reject(family)
    rules = [
        (f"{match} {{ {', '.join(' . '.join(e[0]) for e in chunk)} }} {verdict}", len(chunk))
        for chunk in _chunks(kept)
    ]
    left = {e[0] for e in rest}
    alone = [member for member, es in by_member if any(e[0] in left for e in es)]
    return rules + [(text, 0) for text in dict.fromkeys(_texts(alone, family, names))]


def _texts(rules: Iterable[OutboundRule], family: Family, names: Names) -> list[str]:
    """The rules, each as its own rule (segments left out those matching nothing)."""
    texts = (rule_text(rule, family, names) for rule in rules)
    return [text for text in texts if text is not None]


def _blocks(rules: list[tuple[str, int]]) -> Iterator[tuple[str, ...]]:
    """Consecutive runs of ``rules``: a rule with a set alone, other rules cut after each
    whose checksum says so."""
    block: list[str] = []
    for text, elements in rules:
        if elements and block:
            yield tuple(block)
            block = []
        block.append(text)
        cut = len(block) >= MAX_BLOCK_RULES or zlib.crc32(text.encode()) % BLOCK_RULES == 0
        if elements or cut:
            yield tuple(block)
            block = []
    if block:
        yield tuple(block)


NamesUsed = tuple[tuple[str, frozenset[IPAddress]], ...]
_CODES = {None: 1, "accept": 2, "drop": 3, "tcp": 4, "udp": 5, "icmp": 6}


def _checksum(rule: OutboundRule) -> int:
    """A checksum of the rule's values, the same in every process (``hash`` of a string
    is not), without rendering it."""
    value = _CODES[rule.action] * 8 + _CODES[rule.proto] + (64 if rule.dns else 0)
    if rule.dst is not None:
        value = value * 1000003 + int(rule.dst.network_address) * 129 + rule.dst.prefixlen
    if rule.dsthost is not None:
        value = value * 1000003 + zlib.crc32(rule.dsthost.encode())
    if rule.dstports is not None:
        value = value * 1000003 + rule.dstports[0] * 65536 + rule.dstports[1]
    if rule.icmptype is not None:
        value = value * 1000003 + rule.icmptype
    return (value * 2654435761) >> 16 & 0xFFFFFFFF


def _segments(
    rules: Iterable[OutboundRule], names: Names
) -> Iterator[tuple[tuple[OutboundRule, ...], NamesUsed]]:
    """Consecutive runs of ``rules``, cut after each whose checksum says so, with the
    resolved names each uses (rules that can match nothing left out)."""
    segment: list[OutboundRule] = []
    for rule in rules:
        if _matches_nothing(rule):
            continue
        segment.append(rule)
        if len(segment) >= MAX_SEGMENT_RULES or _checksum(rule) % SEGMENT_RULES == 0:
            yield _with_names(segment, names)
            segment = []
    if segment:
        yield _with_names(segment, names)


def _with_names(
    rules: list[OutboundRule], names: Names
) -> tuple[tuple[OutboundRule, ...], NamesUsed]:
    hosts = sorted({rule.dsthost for rule in rules if rule.dsthost is not None})
    return tuple(rules), tuple((host, names[host]) for host in hosts)


@functools.lru_cache(maxsize=SEGMENTS_KEPT)
def _segment_rules(
    family: Family, rules: tuple[OutboundRule, ...], names_used: NamesUsed
) -> tuple[tuple[str, int], ...]:
    """One segment's rules folded (:func:`_fold`), each with its number of set elements.

    Segments are folded on their own, so that an edit folds one again and
    the others are remembered; no rule moves out of its segment.
    """
    names = dict(names_used)
    groups = _fold(rules, names)
    return tuple(rule for group in groups for rule in _group_texts(group, family, names))


def client_chains(address: IPAddress, source: Source) -> dict[str, tuple[str, ...]]:
    """The chains of one client: its rules then its policy, or a blanket reject.

    A list of FOLD_FROM rules or more is folded into sets; a list longer
    than INLINE_RULES goes into block chains (module doc).
    """
    family = family_of(address)
    name = chain_name(address)
    if isinstance(source, Blocked):
        return {name: (reject(family),)}
    if len(source.rules.rules) < FOLD_FROM:
        texts = (rule_text(rule, family, source.names) for rule in source.rules.rules)
        rules = [(text, 0) for text in texts if text is not None]
    else:
        rules = [
            rule
            for segment in _segments(source.rules.rules, source.names)
            for rule in _segment_rules(family, *segment)
        ]
    policy = "accept" if source.rules.policy == "accept" else reject(family)
    if sum(1 + elements // ELEMENTS_PER_RULE for _, elements in rules) <= INLINE_RULES:
        return {name: (*(text for text, _ in rules), policy)}
    chains: dict[str, tuple[str, ...]] = {}
    jumps = []
    for block in _blocks(rules):
        digest = blake2b("\n".join(block).encode(), digest_size=6).hexdigest()
        chains[f"{name}-{digest}"] = block
        jumps.append(f"jump {name}-{digest}")
    chains[name] = (*jumps, policy)
    return chains


def _element_type(family: Family) -> str:
    return "ipv4_addr" if family == "ip" else "ipv6_addr"


def _of(family: Family, addresses: Iterable[IPAddress]) -> list[IPAddress]:
    version = 4 if family == "ip" else 6
    return sorted(a for a in addresses if a.version == version)


def table_definition(family: Family) -> list[str]:
    """The empty table with its sets, map and base chains, replacing any previous one."""
    table = f"{family} {TABLE}"
    kind = _element_type(family)
    return [
        f"add table {table}",
        f"delete table {table}",
        f"add table {table}",
        f"add set {table} {DNS_SET} {{ type {kind}; }}",
        f"add set {table} {CONNECTED_SET} {{ type {kind}; }}",
        f"add map {table} {CLIENTS_MAP} {{ type {kind} : verdict; }}",
        f"add chain {table} forward {{ type filter hook forward priority filter; policy drop; }}",
        f"add rule {table} forward ct state established,related accept",
        f'add rule {table} forward iifname != "vif*" accept',
        f"add rule {table} forward {family} saddr vmap @{CLIENTS_MAP}",
        f"add chain {table} prerouting"
        " { type filter hook prerouting priority -300; policy accept; }",
        f'add rule {table} prerouting iifname != "vif*" {family} saddr @{CONNECTED_SET} drop',
        f"add chain {table} postrouting"
        " { type filter hook postrouting priority -300; policy accept; }",
        f'add rule {table} postrouting oifname != "vif*" {family} daddr @{CONNECTED_SET} drop',
    ]


def _set_commands(
    family: Family, name: str, old: frozenset[IPAddress], new: frozenset[IPAddress]
) -> list[str]:
    """Element changes taking set ``name`` from ``old`` to ``new`` (this family's part)."""
    commands = []
    gone, added = _of(family, old - new), _of(family, new - old)
    if gone:
        commands.append(f"delete element {family} {TABLE} {name} {_addresses(gone)}")
    if added:
        commands.append(f"add element {family} {TABLE} {name} {_addresses(added)}")
    return commands


def _client_commands(address: IPAddress, old: Chains | None, new: Chains | None) -> list[str]:
    """Commands taking one client's chains and map element from ``old`` to ``new``.

    New chains are created before anything jumps to them; unchanged chains
    are not touched (their counters keep counting); chains no longer
    wanted are emptied, then deleted once nothing jumps to them.
    """
    family = family_of(address)
    table = f"{family} {TABLE}"
    before, after = old or {}, new or {}
    commands = [f"add chain {table} {name}" for name in after if name not in before]
    for name, rules in after.items():
        if before.get(name) == rules:
            continue
        if name in before:
            commands.append(f"flush chain {table} {name}")
        commands += [f"add rule {table} {name} {rule}" for rule in rules]
    if old is None and new is not None:
        element = f"{address} : jump {chain_name(address)}"
        commands.append(f"add element {table} {CLIENTS_MAP} {{ {element} }}")
    if old is not None and new is None:
        commands.append(f"delete element {table} {CLIENTS_MAP} {{ {address} }}")
    gone = [name for name in before if name not in after]
    commands += [f"flush chain {table} {name}" for name in gone]
    commands += [f"delete chain {table} {name}" for name in gone]
    return commands


def update_commands(old: TableState, new: TableState, addresses: Iterable[IPAddress]) -> list[str]:
    """The difference from ``old`` to ``new`` for the sets and the clients in ``addresses``.

    Only those clients are compared, so a change costs what it changes,
    not what the tables hold.
    """
    commands = []
    for family in FAMILIES:
        commands += _set_commands(family, DNS_SET, old.dns, new.dns)
        commands += _set_commands(family, CONNECTED_SET, old.connected, new.connected)
    for address in in_order(addresses):
        commands += _client_commands(
            address, old.clients.get(address), new.clients.get(address)
        )
    return commands


def rewrite_commands(old: TableState, new: TableState) -> list[str]:
    """Everything of ours written again into existing tables, e.g. after SIGHUP.

    Sets and map are emptied and refilled, every wanted chain created if
    missing and refilled, chains of ``old`` no longer wanted removed. Other
    rules of the tables (say a user script's in ``forward``) stay.
    """
    commands = []
    for family in FAMILIES:
        table = f"{family} {TABLE}"
        for name, addresses in ((DNS_SET, new.dns), (CONNECTED_SET, new.connected)):
            commands.append(f"flush set {table} {name}")
            if _of(family, addresses):
                commands.append(f"add element {table} {name} {_addresses(_of(family, addresses))}")
        commands.append(f"flush map {table} {CLIENTS_MAP}")
    for address in in_order(new.clients):
        chains = new.clients[address]
        table = f"{family_of(address)} {TABLE}"
        for name, rules in chains.items():
            commands += [f"add chain {table} {name}", f"flush chain {table} {name}"]
            commands += [f"add rule {table} {name} {rule}" for rule in rules]
        element = f"{address} : jump {chain_name(address)}"
        commands.append(f"add element {table} {CLIENTS_MAP} {{ {element} }}")
    for address, chains in old.clients.items():
        table = f"{family_of(address)} {TABLE}"
        gone = [name for name in chains if name not in new.clients.get(address, {})]
        for name in gone:
            commands += [f"add chain {table} {name}", f"flush chain {table} {name}"]
        commands += [f"delete chain {table} {name}" for name in gone]
    return commands


def rebuild_commands(state: TableState) -> list[str]:
    """Both tables from nothing, holding ``state``: after the kernel's copy was lost."""
    commands = [command for family in FAMILIES for command in table_definition(family)]
    return commands + update_commands(TableState(), state, state.clients)


def chain_check_commands(address: IPAddress, chains: Chains) -> str:
    """A stand-alone transaction holding one client's chains, for nft's check mode."""
    family = family_of(address)
    table = f"{family} {TABLE}"
    lines = [
        f"add table {table}",
        f"add set {table} {DNS_SET} {{ type {_element_type(family)}; }}",
    ]
    lines += [f"add chain {table} {name}" for name in chains]
    lines += [f"add rule {table} {name} {rule}" for name, rules in chains.items() for rule in rules]
    return "\n".join(lines) + "\n"


def cleanup_commands() -> str:
    """Remove both tables, as upstream's worker does when it stops."""
    return "".join(
        f"add table {family} {TABLE}\ndelete table {family} {TABLE}\n" for family in FAMILIES
    )


def names_to_resolve(rules: SourceRules) -> frozenset[str]:
    """The ``dsthost`` names a source's rules need."""
    return frozenset(r.dsthost for r in rules.rules if r.dsthost is not None)
