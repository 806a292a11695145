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
list is cut into blocks, each a chain of its own named after its content
(``qbs-10-137-0-5-<hash>``), and the client's chain jumps to them in order
before its policy: a verdict in a block ends the evaluation as it would
inline, and a block nothing matched returns to the next jump. Blocks end
where a rule's own checksum says so, not at fixed positions, so adding,
changing or removing one rule changes one block, and a change costs the
rules of that block and the jumps, not the whole list.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from agent_worker.nft_chains import Family
from agent_worker.qdb_parse import (
    PARSED_RULES_KEPT,
    Blocked,
    IPAddress,
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
#: a list of at most this many rules stays in the client's own chain
INLINE_RULES = 48
#: rules per block on average (the checksum of one rule in BLOCK_RULES ends a block)
BLOCK_RULES = 32
#: a block ends here at the latest, whatever the checksums say
MAX_BLOCK_RULES = 4 * BLOCK_RULES

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
                clients[address] = chains
        return TableState(dns, connected, clients)


def family_of(address: IPAddress) -> Family:
    return "ip" if address.version == 4 else "ip6"


def in_order(addresses: Iterable[IPAddress]) -> list[IPAddress]:
    """IPv4 first, then by address: the order every transaction lists clients in."""
    return sorted(addresses, key=lambda a: (a.version, a))


def chain_name(source: IPAddress) -> str:
    """``qbs-`` and the address with ``.``/``:`` turned into ``-`` (upstream's naming)."""
    return CHAIN_PREFIX + str(source).replace(".", "-").replace(":", "-")


def reject(family: Family) -> str:
    icmp = "icmp" if family == "ip" else "icmpv6"
    return f"reject with {icmp} type admin-prohibited"


def _ports(ports: tuple[int, int]) -> str:
    return str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"


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
    icmp = "icmp" if family == "ip" else "icmpv6"
    parts = []
    ports = rule.dstports
    if rule.dns:
        if ports not in (None, DNS_PORTS) or rule.proto == "icmp":
            return None
        ports = DNS_PORTS
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
        parts.append(f"th dport {_ports(ports)}")
    if rule.icmptype is not None:
        parts.append(f"{icmp} type {rule.icmptype}")
    parts.append("accept" if rule.action == "accept" else reject(family))
    return " ".join(parts)


def _blocks(rules: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """Consecutive runs of ``rules``, cut after each rule whose checksum says so."""
    start = 0
    for end, rule in enumerate(rules, start=1):
        if end - start >= MAX_BLOCK_RULES or zlib.crc32(rule.encode()) % BLOCK_RULES == 0:
            yield rules[start:end]
            start = end
    if start < len(rules):
        yield rules[start:]


def client_chains(address: IPAddress, source: Source) -> dict[str, tuple[str, ...]]:
    """The chains of one client: its rules then its policy, or a blanket reject.

    A list longer than INLINE_RULES goes into block chains (module doc).
    """
    family = family_of(address)
    name = chain_name(address)
    if isinstance(source, Blocked):
        return {name: (reject(family),)}
    texts = (rule_text(r, family, source.names) for r in source.rules.rules)
    rules = tuple(t for t in texts if t is not None)
    policy = "accept" if source.rules.policy == "accept" else reject(family)
    if len(rules) <= INLINE_RULES:
        return {name: (*rules, policy)}
    chains: dict[str, tuple[str, ...]] = {}
    jumps = []
    for block in _blocks(rules):
        digest = hashlib.blake2b("\n".join(block).encode(), digest_size=6).hexdigest()
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
