"""qubes-firewall tables as nft text: pinned rules, client chains and blocks, the deltas."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_worker import ruleset
from agent_worker.qdb_parse import Blocked, IPAddress, OutboundRule, SourceRules, parse_source
from agent_worker.ruleset import (
    INLINE_RULES,
    Chains,
    Resolved,
    TableState,
    chain_name,
    client_chains,
    rebuild_commands,
    rewrite_commands,
    rule_text,
    update_commands,
)

addr = ipaddress.ip_address
net = ipaddress.ip_network
WEB = addr("10.137.0.5")
WORK = addr("10.137.0.6")
WEB6 = addr("fd09:24ef:4179::a89:5")


@pytest.mark.parametrize(
    ("rule", "family", "expected"),
    [
        (OutboundRule("accept"), "ip", "accept"),
        (OutboundRule("drop"), "ip", "reject with icmp type admin-prohibited"),
        (OutboundRule("drop"), "ip6", "reject with icmpv6 type admin-prohibited"),
        (
            OutboundRule("accept", "tcp", dst=net("192.168.1.0/24"), dstports=(443, 443)),
            "ip",
            "meta l4proto tcp ip daddr 192.168.1.0/24 th dport 443 accept",
        ),
        (
            OutboundRule("drop", "udp", dst=net("2001:db8::/32"), dstports=(1000, 2000)),
            "ip6",
            "meta l4proto udp ip6 daddr 2001:db8::/32 th dport 1000-2000 "
            "reject with icmpv6 type admin-prohibited",
        ),
        (
            OutboundRule("accept", "tcp", dsthost="www.example.com", dstports=(80, 80)),
            "ip",
            "meta l4proto tcp ip daddr { 192.0.2.7, 192.0.2.10 } th dport 80 accept",
        ),
        (
            OutboundRule("accept", "icmp", icmptype=8),
            "ip",
            "meta l4proto icmp icmp type 8 accept",
        ),
        (
            OutboundRule("accept", "icmp", icmptype=128),
            "ip6",
            "meta l4proto icmpv6 icmpv6 type 128 accept",
        ),
        (
            OutboundRule("accept", dns=True),
            "ip",
            "meta l4proto { tcp, udp } ip daddr @dns-addr th dport 53 accept",
        ),
        (
            OutboundRule("drop", "udp", dns=True),
            "ip",
            "meta l4proto udp ip daddr @dns-addr th dport 53 "
            "reject with icmp type admin-prohibited",
        ),
        (
            OutboundRule("accept", "tcp", dstports=(53, 53), dns=True),
            "ip6",
            "meta l4proto tcp ip6 daddr @dns-addr th dport 53 accept",
        ),
        # a destination and the DNS target must both match, as upstream's two daddr matches
        (
            OutboundRule("accept", dst=net("10.139.0.0/16"), dns=True),
            "ip",
            "meta l4proto { tcp, udp } ip daddr 10.139.0.0/16 "
            "ip daddr @dns-addr th dport 53 accept",
        ),
    ],
)
def test_pinned_rule_text(rule: OutboundRule, family: str, expected: str) -> None:
    names = {"www.example.com": frozenset({addr("192.0.2.10"), addr("192.0.2.7")})}
    assert rule_text(rule, family, names) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "rule",
    [
        OutboundRule("accept", "tcp", dstports=(80, 80), dns=True),
        OutboundRule("accept", "icmp", dns=True),
    ],
)
def test_dns_rules_that_match_nothing_are_left_out(rule: OutboundRule) -> None:
    assert rule_text(rule, "ip", {}) is None


def test_chain_ends_with_policy_and_blocked_rejects_all() -> None:
    rules = SourceRules((OutboundRule("accept", dns=True, dstports=(1, 1)),
                         OutboundRule("drop", "icmp")), "drop")
    assert client_chains(WEB, Resolved(rules, {})) == {"qbs-10-137-0-5": (
        "meta l4proto icmp reject with icmp type admin-prohibited",
        "reject with icmp type admin-prohibited",
    )}
    accept_all = Resolved(SourceRules((), "accept"), {})
    assert client_chains(WEB6, accept_all) == {"qbs-fd09-24ef-4179--a89-5": ("accept",)}
    assert client_chains(WEB6, Blocked("x")) == {
        "qbs-fd09-24ef-4179--a89-5": ("reject with icmpv6 type admin-prohibited",)
    }


def test_chain_names_follow_upstream() -> None:
    assert chain_name(WEB) == "qbs-10-137-0-5"
    assert chain_name(WEB6) == "qbs-fd09-24ef-4179--a89-5"


def _port_rules(ports: list[int], policy: str = "drop") -> Resolved:
    rules = tuple(OutboundRule("accept", "tcp", dstports=(p, p)) for p in ports)
    return Resolved(SourceRules(rules, policy), {})  # type: ignore[arg-type]


def _tcp_to(port: int) -> str:
    return f"10.{port // 256}.{port % 256}.0/24"


def _unfoldable(ports: list[int]) -> Resolved:
    """For each port, accept tcp to it, then refuse tcp to a network: every rule meets the
    next, of the other verdict, so none may move and nothing folds."""
    rules = tuple(
        rule
        for p in ports
        for rule in (OutboundRule("accept", "tcp", dstports=(p, p)),
                     OutboundRule("drop", "tcp", dst=net(_tcp_to(p))))
    )
    return Resolved(SourceRules(rules, "drop"), {})


def _unfolded_texts(ports: list[int]) -> list[str]:
    return [
        text
        for p in ports
        for text in (
            f"meta l4proto tcp th dport {p} accept",
            f"meta l4proto tcp ip daddr {_tcp_to(p)} reject with icmp type admin-prohibited",
        )
    ]


def _inline(chains: dict[str, tuple[str, ...]]) -> list[str]:
    """The rules a packet meets, blocks expanded in place of their jumps."""
    flat = []
    for rule in chains["qbs-10-137-0-5"]:
        target = rule.removeprefix("jump ")
        flat += chains[target] if target != rule else [rule]
    return flat


def test_a_long_list_is_cut_into_blocks_in_order() -> None:
    short = client_chains(WEB, _unfoldable(list(range(1, INLINE_RULES // 2 + 1))))
    assert list(short) == ["qbs-10-137-0-5"]
    ports = list(range(1000, 1200))
    chains = client_chains(WEB, _unfoldable(ports))
    own = chains["qbs-10-137-0-5"]
    assert len(chains) > 3 and list(chains)[-1] == "qbs-10-137-0-5"  # blocks created first
    assert all(rule.startswith("jump qbs-10-137-0-5-") for rule in own[:-1])
    assert own[-1] == "reject with icmp type admin-prohibited"
    assert _inline(chains) == [*_unfolded_texts(ports), own[-1]]


def test_one_edited_rule_changes_one_block() -> None:
    ports = list(range(1000, 1200))
    before = client_chains(WEB, _unfoldable(ports))
    for edit in ([*ports[:100], 5, *ports[100:]], ports[:100] + ports[101:],
                 [*ports[:100], 5, *ports[101:]]):
        after = client_chains(WEB, _unfoldable(edit))
        new_blocks = after.keys() - before.keys()
        assert len(new_blocks) <= 2, new_blocks  # the edited block (split in two at most)
        old = TableState(clients={WEB: before})
        commands = update_commands(old, TableState(clients={WEB: after}), [WEB])
        added = [c for c in commands if c.startswith("add rule")]
        assert len(added) <= len(after["qbs-10-137-0-5"]) + sum(
            len(after[b]) for b in new_blocks)
        assert len(added) < 150  # not the 400 rules of the list


def _sets(chains: dict[str, tuple[str, ...]]) -> list[str]:
    return [rule for rule in _inline(chains) if "{" in rule]


def _elements(rule: str) -> list[str]:
    return rule[rule.index("{") + 1 : rule.index("}")].replace(" ", "").split(",")


def test_rules_of_one_shape_fold_into_sets_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    short = client_chains(WEB, _port_rules(list(range(1000, 1000 + ruleset.FOLD_FROM - 1))))
    assert not _sets(short)  # folding a short list costs Python what it saves nft
    monkeypatch.setattr(ruleset, "FOLD_FROM", 0)
    ports = list(range(1000, 1400))
    chains = client_chains(WEB, _port_rules(ports))
    sets = _sets(chains)
    assert all(rule.startswith("meta l4proto tcp th dport { ") for rule in sets)
    assert all(rule.endswith(" } accept") for rule in sets)
    assert sorted(e for rule in sets for e in _elements(rule)) == [str(p) for p in ports]
    assert 2 < len(sets) < 20  # chunks: an edit re-sends one, not all 400 elements
    assert _inline(chains)[len(sets):] == ["reject with icmp type admin-prohibited"]
    edited = client_chains(WEB, _port_rules([*ports[:200], 5, *ports[201:]]))
    assert len(set(_sets(edited)) - set(sets)) <= 2


def test_a_rule_moves_past_the_other_verdict_only_when_they_cannot_meet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ruleset, "FOLD_FROM", 0)
    tcp = [OutboundRule("accept", "tcp", dstports=(p, p)) for p in range(80, 87)]
    udp_drop = OutboundRule("drop", "udp", dstports=(80, 90))
    http_drop = OutboundRule("drop", "tcp", dst=net("192.0.2.0/24"))
    # the udp rule is disjoint from every tcp rule: the tcp rules after it fold with those before
    apart = client_chains(WEB, Resolved(SourceRules((*tcp[:3], udp_drop, *tcp[3:]), "drop"), {}))
    assert _inline(apart) == [
        "meta l4proto tcp th dport { 80, 81, 82, 83, 84, 85, 86 } accept",
        "meta l4proto udp th dport 80-90 reject with icmp type admin-prohibited",
        "reject with icmp type admin-prohibited",
    ]
    # tcp to 192.0.2.0/24 port 84 meets both: the rules after it stay after it
    met = client_chains(WEB, Resolved(SourceRules((*tcp[:3], http_drop, *tcp[3:]), "drop"), {}))
    assert _inline(met) == [
        *(rule_text(r, "ip", {}) for r in (*tcp[:3], http_drop, *tcp[3:])),
        "reject with icmp type admin-prohibited",
    ]


def test_overlapping_elements_of_a_concatenation_stay_in_rules_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """nft refuses a concatenated set whose elements overlap (tests/test_worker_nft.py)."""
    monkeypatch.setattr(ruleset, "FOLD_FROM", 0)
    rules = [OutboundRule("accept", "tcp", dst=net(f"10.0.{n}.0/24"), dstports=(80, 80))
             for n in range(6)]
    rules += [OutboundRule("accept", "tcp", dst=net("10.0.0.0/16"), dstports=(70, 90)),
              OutboundRule("accept", "tcp", dst=net("10.0.3.7/32"), dstports=(443, 443))]
    chains = client_chains(WEB, Resolved(SourceRules(tuple(rules), "drop"), {}))
    assert _inline(chains) == [
        "meta l4proto tcp ip daddr . th dport { 10.0.0.0/16 . 70-90, 10.0.3.7/32 . 443 } accept",
        *(rule_text(r, "ip", {}) for r in rules[:6]),
        "reject with icmp type admin-prohibited",
    ]


def test_update_touches_only_the_named_clients_and_set_elements() -> None:
    web = client_chains(WEB, _port_rules([80]))
    work = client_chains(WORK, _port_rules([25], policy="accept"))
    old = TableState(frozenset({addr("10.139.1.1")}), frozenset({WEB, WORK}),
                     {WEB: web, WORK: work})
    new_web = client_chains(WEB, _port_rules([443]))
    new = old.with_clients(frozenset({addr("10.139.1.2")}), frozenset({WEB, WORK, WEB6}),
                           {WEB: new_web})
    assert update_commands(old, new, [WEB]) == [
        "delete element ip qubes-firewall dns-addr { 10.139.1.1 }",
        "add element ip qubes-firewall dns-addr { 10.139.1.2 }",
        "add element ip6 qubes-firewall connected { fd09:24ef:4179::a89:5 }",
        "flush chain ip qubes-firewall qbs-10-137-0-5",
        "add rule ip qubes-firewall qbs-10-137-0-5 meta l4proto tcp th dport 443 accept",
        "add rule ip qubes-firewall qbs-10-137-0-5 reject with icmp type admin-prohibited",
    ]
    assert update_commands(old, old, [WEB, WORK]) == []


def test_clients_come_and_go_with_their_map_element() -> None:
    chains = client_chains(WEB, _port_rules(list(range(1000, 1100))))
    empty, full = TableState(), TableState(clients={WEB: chains})
    added = update_commands(empty, full, [WEB])
    assert added[: len(chains)] == [f"add chain ip qubes-firewall {name}" for name in chains]
    assert added[-1] == (
        "add element ip qubes-firewall clients { 10.137.0.5 : jump qbs-10-137-0-5 }"
    )
    removed = update_commands(full, empty, [WEB])
    assert removed[0] == "delete element ip qubes-firewall clients { 10.137.0.5 }"
    # emptied first, deleted once nothing jumps to them any more
    flushes = [c for c in removed if c.startswith("flush chain")]
    deletes = [c for c in removed if c.startswith("delete chain")]
    assert len(flushes) == len(deletes) == len(chains)
    assert removed.index(deletes[0]) > removed.index(flushes[-1])


def test_rewrite_and_rebuild_write_everything() -> None:
    web = client_chains(WEB, _port_rules([80]))
    old = TableState(frozenset(), frozenset({WEB, WORK}),
                     {WEB: web, WORK: client_chains(WORK, _port_rules([1]))})
    new = TableState(frozenset({addr("10.139.1.1")}), frozenset({WEB}), {WEB: web})
    rewrite = rewrite_commands(old, new)
    assert "flush set ip qubes-firewall connected" in rewrite
    assert "add element ip qubes-firewall connected { 10.137.0.5 }" in rewrite
    assert "flush map ip6 qubes-firewall clients" in rewrite
    assert "add rule ip qubes-firewall qbs-10-137-0-5 meta l4proto tcp th dport 80 accept" in (
        rewrite)  # unchanged, written again
    assert rewrite[-1] == "delete chain ip qubes-firewall qbs-10-137-0-6"
    rebuild = rebuild_commands(new)
    assert rebuild[:3] == ["add table ip qubes-firewall", "delete table ip qubes-firewall",
                           "add table ip qubes-firewall"]
    assert "add element ip qubes-firewall dns-addr { 10.139.1.1 }" in rebuild
    assert rebuild[-1] == (
        "add element ip qubes-firewall clients { 10.137.0.5 : jump qbs-10-137-0-5 }"
    )


_SAFE = re.compile(r'^[a-z0-9 .:/{},!="*@_-]+$')


@st.composite
def _rules(draw: st.DrawFn) -> tuple[OutboundRule, str]:
    family = draw(st.sampled_from(["ip", "ip6"]))
    version = 4 if family == "ip" else 6
    proto = draw(st.sampled_from([None, "tcp", "udp", "icmp"]))
    dst = draw(st.one_of(st.none(), st.builds(
        lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False),
        st.ip_addresses(v=version), st.integers(0, 32 if version == 4 else 128))))
    ports = None
    if proto in ("tcp", "udp"):
        ports = draw(st.one_of(st.none(), st.tuples(st.integers(0, 65535), st.integers(0, 65535))
                               .map(lambda t: (min(t), max(t)))))
    icmptype = draw(st.one_of(st.none(), st.integers(0, 255))) if proto == "icmp" else None
    rule = OutboundRule(
        action=draw(st.sampled_from(["accept", "drop"])),
        proto=proto,
        dst=dst,
        dsthost=draw(st.sampled_from([None, "name"])) if dst is None else None,
        dstports=ports,
        icmptype=icmptype,
        dns=draw(st.booleans()),
    )
    return rule, family


@given(_rules())
def test_fuzz_rule_text_is_plain_nft(case: tuple[OutboundRule, str]) -> None:
    rule, family = case
    version = 4 if family == "ip" else 6
    target = ipaddress.ip_address("192.0.2.1" if version == 4 else "2001:db8::1")
    names = {"name": frozenset({target})}
    text = rule_text(rule, family, names)  # type: ignore[arg-type]
    if text is not None:
        assert _SAFE.match(text), text
        assert text.endswith(("accept", "admin-prohibited"))


_ENTRY_VALUES = st.lists(
    st.sampled_from(["action=accept", "action=drop", "proto=tcp", "proto=udp", "proto=icmp",
                     "dst4=10.1.2.3/16", "dst6=fd00::1/64", "dsthost=name", "dstports=1-9",
                     "icmptype=3", "specialtarget=dns", "dst4=1.2.3.4"]),
    min_size=1, max_size=5,
).map(lambda ws: " ".join(ws).encode())


@given(st.dictionaries(st.sampled_from(["policy", "0000", "0001", "0002"]),
                       st.one_of(_ENTRY_VALUES, st.sampled_from([b"accept", b"drop"])),
                       max_size=4),
       st.sampled_from([4, 6]))
def test_fuzz_parse_then_build_never_raises(entries: dict[str, bytes], version: int) -> None:
    source = WEB if version == 4 else WEB6
    parsed = parse_source(entries, version)  # type: ignore[arg-type]
    names = {"name": frozenset({ipaddress.ip_address("192.0.2.1" if version == 4 else "::2")})}
    built = parsed if isinstance(parsed, Blocked) else Resolved(parsed, names)
    state = TableState(frozenset(), frozenset({source}), {source: client_chains(source, built)})
    commands = rebuild_commands(state)
    assert all(_SAFE.match(c.replace(";", "")) for c in commands)


def test_changed_blocks_are_refilled_in_place_under_the_names_of_blocks_gone() -> None:
    """Creating and deleting chains costs nft more than flushing one: a block no longer
    wanted lends its name to a new one, and the client's chain keeps its jumps."""
    def chains_of(ports: list[int]) -> dict[IPAddress, Chains]:
        return {WEB: client_chains(WEB, _unfoldable(ports))}

    ports = list(range(1000, 1200))
    old = TableState().with_clients(frozenset(), frozenset(), chains_of(ports))
    edited = [*ports[:100], 5, *ports[101:]]
    new = old.with_clients(frozenset(), frozenset(), chains_of(edited))
    commands = update_commands(old, new, [WEB])
    assert not [c for c in commands if c.startswith(("add chain", "delete chain"))]
    assert "flush chain ip qubes-firewall qbs-10-137-0-5" not in commands  # same jumps
    assert _inline(dict(new.clients[WEB])) == [
        *_unfolded_texts(edited), "reject with icmp type admin-prohibited"]
    # a list new from end to end: every block refilled, none created or deleted but extras
    other = old.with_clients(frozenset(), frozenset(), chains_of(list(range(3000, 3200))))
    renamed = update_commands(old, other, [WEB])
    blocks = min(len(old.clients[WEB]), len(other.clients[WEB])) - 1
    assert len([c for c in renamed if c.startswith("flush chain")]) >= blocks
    assert len([c for c in renamed if c.startswith(("add chain", "delete chain"))]) <= abs(
        len(old.clients[WEB]) - len(other.clients[WEB]))
    assert _inline(dict(other.clients[WEB]))[:-1] == _unfolded_texts(list(range(3000, 3200)))
