"""nft commands for the ``ip``/``ip6`` ``qubes-firewall`` tables, as upstream lays them out.

Pure: the parsed state comes in, command text goes out; the worker
(:mod:`agent_worker.firewall`) reads QubesDB, resolves names, lists the
kernel's table and runs the commands in a single libnftables call.

Layout (per family, same names and meaning as upstream's worker)::

    table ip qubes-firewall {
      chain forward {        # base chain, forward hook, policy drop
        ct state established,related accept
        iifname != "vif*" accept
        ip saddr 10.137.0.5 jump qbs-10-137-0-5      # one per client
      }
      chain prerouting {     # anti-spoofing: client addresses only on vifs
        iifname != "vif*" ip saddr { ... } drop
      }
      chain postrouting { oifname != "vif*" ip daddr { ... } drop }
      chain qbs-10-137-0-5 { <rules in order> <policy> }
    }

A rule's ``drop`` becomes ``reject with icmp[v6] type admin-prohibited``,
so the client sees at once that the firewall refused it. A client gets a
chain only while it is listed in ``/connected-ips``/``/connected-ips6``:
rules never outlive the address they were written for.

The worker owns the per-client chains, the jumps to them and the
prerouting/postrouting content; it leaves any other rule a user script
added to ``forward`` alone. :func:`update_commands` therefore diffs what
should be against what the kernel has (chains, jump handles) and what this
worker last wrote (chain contents), and emits only the difference.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent_worker.qdb_parse import Blocked, IPAddress, OutboundRule, SourceRules

Family = Literal["ip", "ip6"]
FAMILIES: tuple[Family, ...] = ("ip", "ip6")
TABLE = "qubes-firewall"
CHAIN_PREFIX = "qbs-"
ANTISPOOF_CHAINS = ("prerouting", "postrouting")
DNS_PORTS = (53, 53)


@dataclass(frozen=True)
class Resolved:
    """A parsed source with each of its ``dsthost`` names resolved in its family."""

    rules: SourceRules
    names: Mapping[str, frozenset[IPAddress]]


Source = Resolved | Blocked


@dataclass(frozen=True)
class Desired:
    """What one family's table should hold: chain contents and the jumps to them."""

    chains: Mapping[str, tuple[str, ...]]
    jumps: tuple[tuple[IPAddress, str], ...]


@dataclass(frozen=True)
class Jump:
    """A ``saddr X jump qbs-*`` rule found in the kernel's forward chain."""

    handle: int
    saddr: str
    chain: str


@dataclass(frozen=True)
class KernelTable:
    """The parts of one family's table, as listed by the kernel, that the diff needs."""

    exists: bool
    chains: frozenset[str] = frozenset()
    jumps: tuple[Jump, ...] = ()


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
    rule: OutboundRule,
    family: Family,
    names: Mapping[str, frozenset[IPAddress]],
    dns_servers: frozenset[IPAddress],
) -> str | None:
    """One rule body, or None when the rule can match nothing here.

    specialtarget=dns means "the DNS servers of this hop, port 53, tcp or
    udp"; like upstream, such a rule is left out when it names another
    port or when no DNS server of ``family`` is known.
    """
    icmp = "icmp" if family == "ip" else "icmpv6"
    version = 4 if family == "ip" else 6
    servers = [s for s in dns_servers if s.version == version]
    parts = []
    ports = rule.dstports
    if rule.dns:
        if ports not in (None, DNS_PORTS) or rule.proto == "icmp" or not servers:
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
        parts.append(f"{family} daddr {_addresses(servers)}")
    if ports is not None:
        parts.append(f"th dport {_ports(ports)}")
    if rule.icmptype is not None:
        parts.append(f"{icmp} type {rule.icmptype}")
    parts.append("accept" if rule.action == "accept" else reject(family))
    return " ".join(parts)


def source_chain(
    source: Source, family: Family, dns_servers: frozenset[IPAddress]
) -> tuple[str, ...]:
    """Content of one client's chain: its rules then its policy, or a blanket reject."""
    if isinstance(source, Blocked):
        return (reject(family),)
    texts = (rule_text(r, family, source.names, dns_servers) for r in source.rules.rules)
    policy = "accept" if source.rules.policy == "accept" else reject(family)
    return (*(t for t in texts if t is not None), policy)


def desired_table(
    family: Family,
    sources: Mapping[IPAddress, Source],
    connected: frozenset[IPAddress],
    dns_servers: frozenset[IPAddress],
) -> Desired:
    """The whole target state of one family's table, in a stable order."""
    version = 4 if family == "ip" else 6
    mine = sorted(a for a in connected if a.version == version)
    prerouting: tuple[str, ...] = ()
    postrouting: tuple[str, ...] = ()
    if mine:
        prerouting = (f'iifname != "vif*" {family} saddr {_addresses(mine)} drop',)
        postrouting = (f'oifname != "vif*" {family} daddr {_addresses(mine)} drop',)
    chains: dict[str, tuple[str, ...]] = {"prerouting": prerouting, "postrouting": postrouting}
    jumps = []
    for address in mine:
        source = sources.get(address)
        if source is None:
            continue
        chain = chain_name(address)
        chains[chain] = source_chain(source, family, dns_servers)
        jumps.append((address, chain))
    return Desired(chains, tuple(jumps))


def table_definition(family: Family) -> list[str]:
    """The empty table with its three base chains, replacing any previous one."""
    return [
        f"add table {family} {TABLE}",
        f"delete table {family} {TABLE}",
        f"add table {family} {TABLE}",
        f"add chain {family} {TABLE} forward"
        " { type filter hook forward priority filter; policy drop; }",
        f"add rule {family} {TABLE} forward ct state established,related accept",
        f'add rule {family} {TABLE} forward iifname != "vif*" accept',
        f"add chain {family} {TABLE} prerouting"
        " { type filter hook prerouting priority -300; policy accept; }",
        f"add chain {family} {TABLE} postrouting"
        " { type filter hook postrouting priority -300; policy accept; }",
    ]


def update_commands(
    family: Family,
    desired: Desired,
    kernel: KernelTable,
    applied: Mapping[str, tuple[str, ...]],
) -> list[str]:
    """Commands taking the kernel's table to ``desired``; empty when nothing changes.

    ``applied`` is what this worker last wrote into each chain; chains whose
    content is unchanged are not touched (their counters keep counting). A
    missing table is recreated first, so a table deleted behind our back
    heals on the next change.
    """
    commands: list[str] = []
    if not kernel.exists:
        commands += table_definition(family)
        kernel = KernelTable(exists=True, chains=frozenset({*ANTISPOOF_CHAINS, "forward"}))
        applied = {}
    for chain, rules in desired.chains.items():
        if chain in kernel.chains and applied.get(chain) == rules:
            continue
        if chain not in kernel.chains:
            commands.append(f"add chain {family} {TABLE} {chain}")
        commands.append(f"flush chain {family} {TABLE} {chain}")
        commands += [f"add rule {family} {TABLE} {chain} {rule}" for rule in rules]
    wanted = {(str(address), chain) for address, chain in desired.jumps}
    present = set()
    for jump in kernel.jumps:
        if (jump.saddr, jump.chain) in wanted and (jump.saddr, jump.chain) not in present:
            present.add((jump.saddr, jump.chain))
        else:
            commands.append(f"delete rule {family} {TABLE} forward handle {jump.handle}")
    for address, chain in desired.jumps:
        if (str(address), chain) not in present:
            commands.append(
                f"add rule {family} {TABLE} forward {family} saddr {address} jump {chain}"
            )
    for chain in sorted(kernel.chains - desired.chains.keys()):
        if chain.startswith(CHAIN_PREFIX):
            commands.append(f"delete chain {family} {TABLE} {chain}")
    return commands


def chain_check_commands(family: Family, chain: str, rules: tuple[str, ...]) -> str:
    """A stand-alone transaction holding just one chain, for nft's check mode."""
    lines = [f"add table {family} {TABLE}", f"add chain {family} {TABLE} {chain}"]
    lines += [f"add rule {family} {TABLE} {chain} {rule}" for rule in rules]
    return "\n".join(lines) + "\n"


def cleanup_commands() -> str:
    """Remove both tables, as upstream's worker does when it stops."""
    return "".join(
        f"add table {family} {TABLE}\ndelete table {family} {TABLE}\n" for family in FAMILIES
    )


def _jump_of(rule: Mapping[str, Any], family: Family) -> Jump | None:
    """The rule as a Jump if it is exactly ``<family> saddr X jump qbs-*``."""
    expr = rule.get("expr")
    if not isinstance(expr, list) or len(expr) != 2:
        return None
    match, verdict = expr
    target = verdict.get("jump", {}).get("target") if isinstance(verdict, dict) else None
    if not isinstance(target, str) or not target.startswith(CHAIN_PREFIX):
        return None
    cond = match.get("match") if isinstance(match, dict) else None
    if not isinstance(cond, dict) or cond.get("op") != "==":
        return None
    if cond.get("left") != {"payload": {"protocol": family, "field": "saddr"}}:
        return None
    saddr = cond.get("right")
    if not isinstance(saddr, str):
        return None
    try:
        canonical = str(ipaddress.ip_address(saddr))
    except ValueError:
        return None
    return Jump(int(rule["handle"]), canonical, target)


def parse_listing(family: Family, listing: Mapping[str, Any] | None) -> KernelTable:
    """Read ``nft -j list table <family> qubes-firewall`` output (None: no table)."""
    if listing is None:
        return KernelTable(exists=False)
    chains = set()
    jumps = []
    for item in listing.get("nftables", []):
        if "chain" in item:
            chains.add(item["chain"]["name"])
        rule = item.get("rule")
        if rule and rule.get("chain") == "forward":
            jump = _jump_of(rule, family)
            if jump is not None:
                jumps.append(jump)
    return KernelTable(exists=True, chains=frozenset(chains), jumps=tuple(jumps))


def names_to_resolve(rules: SourceRules) -> frozenset[str]:
    """The ``dsthost`` names a source's rules need."""
    return frozenset(r.dsthost for r in rules.rules if r.dsthost is not None)
