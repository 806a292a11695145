"""Our outbound worker against upstream's, judged by real packets (tests/outbound_diff.py).

Generated dom0-valid rule sets (IPv4 and IPv6 clients; addresses, networks,
host names, ``specialtarget=dns``, icmp types, ports and ranges, both
policies, long lists edited in place) go to upstream's ``NftablesWorker``
and to ours, each in its own namespace; the same probes go through both;
every verdict must agree. The divergences doc/agent.md lists have a test
each below, pinning exactly how the two differ.

``QNS_DIFF_SEED`` and ``QNS_DIFF_ROUNDS`` replay or lengthen a run; a
failure names its seed and round.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from outbound_diff import (
    BARE_CLIENTS,
    CLIENTS4,
    CLIENTS6,
    DNS4,
    OURS,
    RESOLV_CONF,
    UNLISTED,
    UPSTREAM,
    Generator,
    Pair,
    Probe,
    divergences,
    dom0_entries,
    hop_pair,
)

pytestmark = pytest.mark.lab

SEED = int(os.environ.get("QNS_DIFF_SEED", "1010"))
ROUNDS = int(os.environ.get("QNS_DIFF_ROUNDS", "10"))
PROBES_PER_CLIENT = 40
V4, V6 = CLIENTS4[0], CLIENTS6[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with hop_pair(tmp_path_factory.mktemp("diff")) as both:
        yield both


def _report(seed: int, number: int, rules: dict[str, list[str]], found: list) -> str:
    lines = [f"seed {seed}, round {number}: {len(found)} probes judged differently"]
    for probe, upstream, ours in found[:20]:
        lines.append(
            f"  {probe.source} -> {probe.destination} {probe.proto} {probe.value}:"
            f" upstream {upstream}, ours {ours}"
        )
    for source in sorted({probe.source for probe, _, _ in found}):
        listed = rules.get(source, [])
        shown = listed if len(listed) <= 20 else f"{len(listed)} rules (replay the seed)"
        lines.append(f"  rules of {source}: {shown}")
    return "\n".join(lines)


def test_generated_rule_sets_get_upstreams_verdicts(pair: Pair) -> None:
    generator = Generator(random.Random(SEED))
    clients = (*CLIENTS4, *CLIENTS6)
    # one client of each family starts with a list ours folds into sets
    rules = {a: generator.rule_set(6 if ":" in a else 4, folding=a in (V4, V6)) for a in clients}
    seen: Counter[str] = Counter()
    for number in range(ROUNDS):
        if number:
            rules = {a: generator.changed(rules[a], 6 if ":" in a else 4) for a in clients}
        policies = {a: "accept" if generator.rng.random() < 0.2 else "drop" for a in clients}
        pair.write({a: dom0_entries(rules[a], a, policies[a]) for a in clients})
        probes: list[Probe] = []
        for source in (*clients, *BARE_CLIENTS):
            probes += generator.probes(source, rules.get(source, []), 10000 + len(probes),
                                       PROBES_PER_CLIENT)
        verdicts = pair.verdicts(probes)
        found = divergences(probes, verdicts)
        assert not found, _report(SEED, number, rules, found)
        seen.update(verdicts[OURS].values())
    # the probes told the verdicts apart: a run that saw only one proves nothing
    assert min(seen[verdict] for verdict in ("accept", "reject", "drop")) > 20, seen


def _judge(pair: Pair, probes: list[Probe]) -> dict[str, dict[int, str]]:
    verdicts = pair.verdicts(probes)
    return {side: dict(verdicts[side]) for side in (UPSTREAM, OURS)}


def test_dns_servers_are_resolv_confs_not_qubesdbs(pair: Pair) -> None:
    """No divergence: both admit DNS to resolv.conf's servers, not to /qubes-primary-dns."""
    pair.write({V4: dom0_entries(["action=accept specialtarget=dns"], V4)})
    probes = [Probe(100, V4, DNS4, "udp", 53), Probe(101, V4, "10.139.1.1", "udp", 53),
              Probe(102, V4, DNS4, "tcp", 53), Probe(103, V4, "10.139.1.2", "tcp", 53)]
    expected = {100: "accept", 101: "reject", 102: "accept", 103: "reject"}
    assert _judge(pair, probes) == {UPSTREAM: expected, OURS: expected}


def test_divergence_icmp_rule_with_dns_target(pair: Pair) -> None:
    """``proto=icmp specialtarget=dns`` can match no packet; upstream's nft refuses its
    rendering and blocks the whole client, ours leaves that one rule out."""
    pair.write({V4: dom0_entries(
        ["action=accept proto=icmp specialtarget=dns", "action=accept proto=tcp dstports=80"], V4)})
    probes = [Probe(200, V4, "192.0.2.7", "tcp", 80), Probe(201, V4, DNS4, "icmp", 8)]
    assert _judge(pair, probes) == {
        UPSTREAM: {200: "reject", 201: "reject"},
        OURS: {200: "accept", 201: "reject"},
    }


def test_divergence_client_not_connected(pair: Pair) -> None:
    """Rules for an address not in /connected-ips: upstream applies them, ours drops it all."""
    pair.write({UNLISTED: dom0_entries(["action=accept proto=tcp dstports=80"], UNLISTED)})
    probes = [Probe(300, UNLISTED, "192.0.2.7", "tcp", 80), Probe(301, UNLISTED, DNS4, "udp", 53)]
    assert _judge(pair, probes) == {
        UPSTREAM: {300: "accept", 301: "reject"},
        OURS: {300: "drop", 301: "drop"},
    }


def test_divergence_removed_rules(pair: Pair) -> None:
    """Entries removed: upstream keeps a chain rejecting everything, ours removes the chain
    and the client meets the forward policy drop. Blocked both ways."""
    client = CLIENTS4[1]
    pair.write({client: dom0_entries(["action=accept"], client)})
    pair.remove(client)
    probes = [Probe(400, client, "192.0.2.7", "tcp", 80), Probe(401, client, DNS4, "icmp", 8)]
    assert _judge(pair, probes) == {
        UPSTREAM: {400: "reject", 401: "reject"},
        OURS: {400: "drop", 401: "drop"},
    }


def test_divergence_ipv6_extension_headers(pair: Pair) -> None:
    """UDP behind a Destination Options header: upstream's ``ip6 nexthdr udp`` misses it
    (its drop rule lets it through, its accept rule does not admit it), ours matches the
    transport protocol wherever it sits. Rejections of such packets quote the extra
    header, so the observer only tells accepted from not accepted here."""
    other = CLIENTS6[1]
    pair.write({
        V6: dom0_entries(["action=drop proto=udp dstports=53"], V6, policy="accept"),
        other: dom0_entries(["action=accept proto=udp"], other),
    })
    probes = [
        Probe(500, V6, "2001:db8::7", "udp", 53, extension_header=True),
        Probe(501, other, "2001:db8::7", "udp", 53, extension_header=True),
        Probe(502, V6, "2001:db8::7", "udp", 53),
        Probe(503, other, "2001:db8::7", "udp", 53),
    ]
    verdicts = _judge(pair, probes)
    accepted = {side: {i for i, v in verdicts[side].items() if v == "accept"} for side in verdicts}
    assert accepted == {UPSTREAM: {500, 503}, OURS: {501, 503}}


def test_divergence_nameserver_with_zone_id(tmp_path: Path) -> None:
    """``nameserver fe80::1%eth0`` (NetworkManager writes such lines): upstream's nft
    refuses the address, so no IPv6 client gets its rules; ours leaves that server out."""
    with hop_pair(tmp_path, resolv_conf=RESOLV_CONF + "nameserver fe80::1%eth0\n") as zoned:
        zoned.write({
            V6: dom0_entries(["action=accept proto=tcp dstports=80"], V6),
            V4: dom0_entries(["action=accept proto=tcp dstports=80"], V4),
        })
        probes = [Probe(600, V6, "2001:db8::7", "tcp", 80), Probe(601, V4, "192.0.2.7", "tcp", 80)]
        verdicts = _judge(zoned, probes)
    assert verdicts[OURS] == {600: "accept", 601: "accept"}
    assert verdicts[UPSTREAM][600] != "accept"
    assert verdicts[UPSTREAM][601] == "accept"
