"""qubes-firewall tables as nft text: pinned rules, target state, diff against the kernel."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_worker.qdb_parse import Blocked, OutboundRule, SourceRules, parse_source
from agent_worker.ruleset import (
    Desired,
    Jump,
    KernelTable,
    Resolved,
    chain_name,
    desired_table,
    parse_listing,
    rule_text,
    source_chain,
    table_definition,
    update_commands,
)

addr = ipaddress.ip_address
net = ipaddress.ip_network
DNS = frozenset({addr("10.139.1.1"), addr("10.139.1.2")})
DNS6 = frozenset({addr("2001:db8::53")})
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
            "meta l4proto { tcp, udp } ip daddr { 10.139.1.1, 10.139.1.2 } th dport 53 accept",
        ),
        (
            OutboundRule("drop", "udp", dns=True),
            "ip",
            "meta l4proto udp ip daddr { 10.139.1.1, 10.139.1.2 } th dport 53 "
            "reject with icmp type admin-prohibited",
        ),
        (
            OutboundRule("accept", "tcp", dstports=(53, 53), dns=True),
            "ip6",
            "meta l4proto tcp ip6 daddr { 2001:db8::53 } th dport 53 accept",
        ),
        # a destination and the DNS target must both match, as upstream's two daddr matches
        (
            OutboundRule("accept", dst=net("10.139.0.0/16"), dns=True),
            "ip",
            "meta l4proto { tcp, udp } ip daddr 10.139.0.0/16 "
            "ip daddr { 10.139.1.1, 10.139.1.2 } th dport 53 accept",
        ),
    ],
)
def test_pinned_rule_text(rule: OutboundRule, family: str, expected: str) -> None:
    names = {"www.example.com": frozenset({addr("192.0.2.10"), addr("192.0.2.7")})}
    servers = DNS if family == "ip" else DNS6
    assert rule_text(rule, family, names, servers) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "rule",
    [
        OutboundRule("accept", "tcp", dstports=(80, 80), dns=True),
        OutboundRule("accept", "icmp", dns=True),
    ],
)
def test_dns_rules_that_match_nothing_are_left_out(rule: OutboundRule) -> None:
    assert rule_text(rule, "ip", {}, DNS) is None


def test_dns_rule_left_out_without_servers() -> None:
    assert rule_text(OutboundRule("accept", dns=True), "ip", {}, frozenset()) is None


def test_chain_ends_with_policy_and_blocked_rejects_all() -> None:
    rules = SourceRules((OutboundRule("accept", dns=True), OutboundRule("drop", "icmp")), "drop")
    assert source_chain(Resolved(rules, {}), "ip", frozenset()) == (
        "meta l4proto icmp reject with icmp type admin-prohibited",
        "reject with icmp type admin-prohibited",
    )
    accept_all = Resolved(SourceRules((), "accept"), {})
    assert source_chain(accept_all, "ip6", DNS6) == ("accept",)
    assert source_chain(Blocked("x"), "ip6", DNS6) == ("reject with icmpv6 type admin-prohibited",)


def test_chain_names_follow_upstream() -> None:
    assert chain_name(WEB) == "qbs-10-137-0-5"
    assert chain_name(WEB6) == "qbs-fd09-24ef-4179--a89-5"


def test_desired_table_only_for_connected_clients() -> None:
    sources = {
        WEB: Resolved(SourceRules((OutboundRule("accept", dns=True),), "drop"), {}),
        WORK: Blocked("garbage"),
        addr("10.137.0.9"): Resolved(SourceRules((), "accept"), {}),  # not connected
        WEB6: Resolved(SourceRules((), "accept"), {}),
    }
    connected = frozenset({WORK, WEB, WEB6, addr("10.137.0.20")})
    desired = desired_table("ip", sources, connected, DNS | DNS6)
    assert desired.jumps == ((WEB, "qbs-10-137-0-5"), (WORK, "qbs-10-137-0-6"))
    assert desired.chains == {
        "prerouting": (
            'iifname != "vif*" ip saddr { 10.137.0.5, 10.137.0.6, 10.137.0.20 } drop',
        ),
        "postrouting": (
            'oifname != "vif*" ip daddr { 10.137.0.5, 10.137.0.6, 10.137.0.20 } drop',
        ),
        "qbs-10-137-0-5": (
            "meta l4proto { tcp, udp } ip daddr { 10.139.1.1, 10.139.1.2 } th dport 53 accept",
            "reject with icmp type admin-prohibited",
        ),
        "qbs-10-137-0-6": ("reject with icmp type admin-prohibited",),
    }
    desired6 = desired_table("ip6", sources, connected, DNS | DNS6)
    assert desired6.jumps == ((WEB6, "qbs-fd09-24ef-4179--a89-5"),)
    empty = desired_table("ip", {}, frozenset(), DNS)
    assert empty == Desired({"prerouting": (), "postrouting": ()}, ())


def test_missing_table_is_defined_then_filled() -> None:
    desired = Desired({"prerouting": (), "postrouting": (), "qbs-10-137-0-5": ("accept",)},
                      ((WEB, "qbs-10-137-0-5"),))
    commands = update_commands("ip", desired, KernelTable(exists=False), {"qbs-10-137-0-5": ()})
    assert commands == [
        *table_definition("ip"),
        "flush chain ip qubes-firewall prerouting",
        "flush chain ip qubes-firewall postrouting",
        "add chain ip qubes-firewall qbs-10-137-0-5",
        "flush chain ip qubes-firewall qbs-10-137-0-5",
        "add rule ip qubes-firewall qbs-10-137-0-5 accept",
        "add rule ip qubes-firewall forward ip saddr 10.137.0.5 jump qbs-10-137-0-5",
    ]
    assert table_definition("ip")[:3] == [
        "add table ip qubes-firewall",
        "delete table ip qubes-firewall",
        "add table ip qubes-firewall",
    ]


def test_diff_touches_only_what_changed() -> None:
    chains = {
        "prerouting": ("p",),
        "postrouting": ("q",),
        "qbs-10-137-0-5": ("accept",),
        "qbs-10-137-0-6": ("reject with icmp type admin-prohibited",),
    }
    desired = Desired(chains, ((WEB, "qbs-10-137-0-5"), (WORK, "qbs-10-137-0-6")))
    kernel = KernelTable(
        exists=True,
        chains=frozenset({"forward", "prerouting", "postrouting", "qbs-10-137-0-5",
                          "qbs-10-137-0-6", "qbs-10-137-0-7"}),
        jumps=(
            Jump(11, "10.137.0.5", "qbs-10-137-0-5"),
            Jump(12, "10.137.0.7", "qbs-10-137-0-7"),
            Jump(13, "10.137.0.5", "qbs-10-137-0-5"),  # a duplicate goes too
            Jump(14, "10.137.0.6", "qbs-10-137-0-5"),  # wrong target
        ),
    )
    applied = dict(chains, **{"qbs-10-137-0-6": ("accept",)})
    assert update_commands("ip", desired, kernel, applied) == [
        "flush chain ip qubes-firewall qbs-10-137-0-6",
        "add rule ip qubes-firewall qbs-10-137-0-6 reject with icmp type admin-prohibited",
        "delete rule ip qubes-firewall forward handle 12",
        "delete rule ip qubes-firewall forward handle 13",
        "delete rule ip qubes-firewall forward handle 14",
        "add rule ip qubes-firewall forward ip saddr 10.137.0.6 jump qbs-10-137-0-6",
        "delete chain ip qubes-firewall qbs-10-137-0-7",
    ]
    in_sync = KernelTable(
        exists=True,
        chains=frozenset(chains) | {"forward"},
        jumps=(Jump(1, "10.137.0.5", "qbs-10-137-0-5"), Jump(2, "10.137.0.6", "qbs-10-137-0-6")),
    )
    assert update_commands("ip", desired, in_sync, chains) == []


def test_listing_finds_our_jumps_and_leaves_user_rules() -> None:
    def rule(handle: int, expr: list[object], chain: str = "forward") -> dict[str, object]:
        return {"rule": {"family": "ip6", "table": "qubes-firewall", "chain": chain,
                         "handle": handle, "expr": expr}}

    saddr = {"payload": {"protocol": "ip6", "field": "saddr"}}
    listing = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "ip6", "name": "qubes-firewall", "handle": 3}},
        {"chain": {"family": "ip6", "table": "qubes-firewall", "name": "forward", "handle": 1}},
        {"chain": {"family": "ip6", "table": "qubes-firewall", "name": "qbs-fd09--5",
                   "handle": 4}},
        rule(5, [{"match": {"op": "==", "left": saddr, "right": "fd09:0::5"}},
                 {"jump": {"target": "qbs-fd09--5"}}]),
        rule(6, [{"match": {"op": "==", "left": saddr, "right": "fd09::6"}},
                 {"accept": None}]),  # a user's rule
        rule(7, [{"jump": {"target": "qbs-x"}}]),  # not ours: no saddr match
        rule(8, [{"match": {"op": "==", "left": saddr, "right": "fd09::5"}},
                 {"jump": {"target": "qbs-fd09--5"}}], chain="qbs-fd09--5"),
    ]}
    assert parse_listing("ip6", listing) == KernelTable(
        exists=True,
        chains=frozenset({"forward", "qbs-fd09--5"}),
        jumps=(Jump(5, "fd09::5", "qbs-fd09--5"),),
    )
    assert parse_listing("ip6", None) == KernelTable(exists=False)


_SAFE = re.compile(r'^[a-z0-9 .:/{},!="*-]+$')


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


@given(_rules(), st.frozensets(st.ip_addresses(), max_size=3))
def test_fuzz_rule_text_is_plain_nft(case: tuple[OutboundRule, str], servers: frozenset) -> None:
    rule, family = case
    version = 4 if family == "ip" else 6
    target = ipaddress.ip_address("192.0.2.1" if version == 4 else "2001:db8::1")
    names = {"name": frozenset({target})}
    mine = frozenset(s for s in servers if s.version == version)
    text = rule_text(rule, family, names, mine)  # type: ignore[arg-type]
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
    family = "ip" if version == 4 else "ip6"
    desired = desired_table(family, {source: built}, frozenset({source}), DNS | DNS6)
    commands = update_commands(family, desired, KernelTable(exists=False), {})
    assert all(_SAFE.match(c.replace(";", "")) for c in commands)
