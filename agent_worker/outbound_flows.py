"""Which tracked flows of a client its outbound rules no longer allow, as upstream decides.

Upstream's worker, after applying a client's new rules, lists the client's
conntrack entries and deletes those its rules now block; ours does the
same (:meth:`agent_worker.firewall.Worker.apply`), with the rules' meaning
of :func:`agent_worker.ruleset.rule_text` evaluated here in Python. A flow
is judged where it really goes: its destination after any DNAT (the
reply's source), which is what the forward-hook chains saw. Flows to this
qube itself (its own services, the updates proxy behind a DNAT to
loopback) never pass those chains and are left alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from agent_worker import conntrack
from agent_worker.qdb_parse import Blocked, IPAddress, OutboundRule
from agent_worker.ruleset import DNS_PORTS, Source

_PORT_PROTOS = ("tcp", "udp")


def _in_ports(port: int | None, ports: tuple[int, int]) -> bool:
    return port is not None and ports[0] <= port <= ports[1]


def rule_matches(
    rule: OutboundRule,
    flow: conntrack.Flow,
    names: Mapping[str, frozenset[IPAddress]],
    dns_servers: frozenset[IPAddress],
) -> bool:
    """Whether the rule, as rendered for the flow's family, matches its first packet."""
    destination, port = flow.reply_src, flow.reply_sport
    if rule.proto is not None and rule.proto != flow.proto:
        return False
    if rule.dns:
        servers = {server for server in dns_servers if server.version == flow.version}
        if rule.dstports not in (None, DNS_PORTS) or rule.proto == "icmp" or not servers:
            return False  # left out of the chain, as rule_text does
        if flow.proto not in _PORT_PROTOS or destination not in servers or port != DNS_PORTS[0]:
            return False
    if rule.dst is not None and destination not in rule.dst:
        return False
    if rule.dsthost is not None and destination not in names.get(rule.dsthost, frozenset()):
        return False
    if rule.dstports is not None and (
        flow.proto not in _PORT_PROTOS or not _in_ports(port, rule.dstports)
    ):
        return False
    return rule.icmptype is None or (flow.icmp is not None and flow.icmp[0] == rule.icmptype)


def allows(source: Source, flow: conntrack.Flow, dns_servers: frozenset[IPAddress]) -> bool:
    """The client's chain's verdict on the flow: first matching rule, else the policy."""
    if isinstance(source, Blocked):
        return False
    for rule in source.rules.rules:
        if rule_matches(rule, flow, source.names, dns_servers):
            return rule.action == "accept"
    return source.rules.policy == "accept"


def flows_to_end(
    sources: Mapping[IPAddress, Source],
    clients: Iterable[IPAddress],
    dns_servers: frozenset[IPAddress],
    tool: conntrack.Tool,
) -> list[conntrack.Flow]:
    """Flows opened by each of ``clients`` that its rules in ``sources`` no longer allow."""
    ended = []
    local: frozenset[IPAddress] | None = None
    for client in sorted(clients, key=lambda a: (a.version, a)):
        source = sources.get(client)
        if source is None:
            continue
        for flow in conntrack.list_flows(client.version, ["--orig-src", str(client)], tool):
            if allows(source, flow, dns_servers):
                continue
            if local is None:
                local = conntrack.local_addresses()
            if flow.reply_src.is_loopback or flow.reply_src in local:
                continue
            ended.append(flow)
    return ended
