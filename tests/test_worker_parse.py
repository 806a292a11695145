"""Outbound entries of /qubes-firewall/: strict parsing, one bad entry blocks the source."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_worker.entries import EntryError, parse_address
from agent_worker.qdb_parse import (
    Blocked,
    OutboundRule,
    SourceRules,
    parse_address_list,
    parse_resolv_conf,
    parse_rule,
    parse_source,
)

net = ipaddress.ip_network
addr = ipaddress.ip_address


@pytest.mark.parametrize(
    ("value", "version", "expected"),
    [
        ("action=accept", 4, OutboundRule("accept")),
        ("action=drop", 6, OutboundRule("drop")),
        (
            "action=accept proto=tcp dst4=192.168.1.0/24 dstports=443-443",
            4,
            OutboundRule("accept", "tcp", dst=net("192.168.1.0/24"), dstports=(443, 443)),
        ),
        # dom0 keeps host bits as typed; nft masks them, so do we
        (
            "action=drop dst4=192.168.1.7/24",
            4,
            OutboundRule("drop", dst=net("192.168.1.0/24")),
        ),
        ("action=accept dst4=10.0.0.1", 4, OutboundRule("accept", dst=net("10.0.0.1/32"))),
        (
            "action=accept dst6=2001:db8::/32 proto=udp dstports=1000-2000",
            6,
            OutboundRule("accept", "udp", dst=net("2001:db8::/32"), dstports=(1000, 2000)),
        ),
        (
            "action=accept dsthost=www.qubes-os.org proto=tcp",
            4,
            OutboundRule("accept", "tcp", dsthost="www.qubes-os.org"),
        ),
        ("action=accept specialtarget=dns", 4, OutboundRule("accept", dns=True)),
        (
            "action=drop proto=udp specialtarget=dns",
            6,
            OutboundRule("drop", "udp", dns=True),
        ),
        (
            "action=accept proto=icmp icmptype=8",
            4,
            OutboundRule("accept", "icmp", icmptype=8),
        ),
        (
            "action=accept proto=tcp dstports=22",
            4,
            OutboundRule("accept", "tcp", dstports=(22, 22)),
        ),
    ],
)
def test_upstream_rules_parse(value: str, version: int, expected: OutboundRule) -> None:
    assert parse_rule(value, version) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "version", "why"),
    [
        ("", 4, "malformed word"),
        ("action=accept  proto=tcp", 4, "malformed word"),
        ("action=accept proto=tcp ", 4, "malformed word"),
        ("proto=tcp", 4, "action must be"),
        ("action=reject", 4, "action must be"),
        ("action=accept action=drop", 4, "repeated option"),
        ("action=accept expire=1700000000", 4, "unsupported option 'expire'"),
        ("action=accept comment=x", 4, "unsupported option 'comment'"),
        ("action=accept srchost=10.0.0.0/8", 4, "unsupported option 'srchost'"),
        ("action=accept proto=sctp", 4, "proto must be"),
        ("action=accept dst6=2001:db8::/32", 4, "dst6 rule for an IPv4 source"),
        ("action=accept dst4=10.0.0.0/8", 6, "dst4 rule for an IPv6 source"),
        ("action=accept dst4=10.0.0.0/33", 4, "bad IPv4 network"),
        ("action=accept dst4=010.0.0.1/32", 4, "bad IPv4 network"),
        ("action=accept dst4=10.0.0.0/255.0.0.0", 4, "bad IPv4 network"),
        ("action=accept dst6=10.0.0.0/8", 6, "bad IPv6 network"),
        ("action=accept dst4=1.2.3.0/24 dsthost=example.com", 4, "more than one"),
        ("action=accept dsthost=Example.com", 4, "bad dsthost"),
        ("action=accept dstports=80-80", 4, "dstports needs proto"),
        ("action=accept proto=icmp dstports=80-80", 4, "dstports needs proto"),
        ("action=accept proto=tcp dstports=80-79", 4, "out of order"),
        ("action=accept proto=tcp dstports=65536", 4, "out of 0-65535"),
        ("action=accept proto=tcp dstports=1-2-3", 4, "bad dstports"),
        ("action=accept proto=icmp icmptype=256", 4, "icmptype out of"),
        ("action=accept proto=tcp icmptype=8", 4, "icmptype needs proto icmp"),
        ("action=accept specialtarget=ntp", 4, "specialtarget must be dns"),
        ("action=accept proto=tcp;drop", 4, "malformed word"),
        ('action=accept dsthost="a b"', 4, "malformed word"),
        ("action=accept\nproto=tcp", 4, "malformed word"),
        ("action=accept " + "proto=tcp " * 400, 4, "value too long"),
    ],
)
def test_refused_rules_say_why(value: str, version: int, why: str) -> None:
    with pytest.raises(EntryError, match=why):
        parse_rule(value, version)  # type: ignore[arg-type]


def test_source_rules_in_key_order_then_policy() -> None:
    entries = {
        "policy": b"drop",
        "0003": b"action=accept proto=udp",
        "0001": b"action=drop dst4=10.0.0.0/8",
    }
    assert parse_source(entries, 4) == SourceRules(
        (OutboundRule("drop", dst=net("10.0.0.0/8")), OutboundRule("accept", "udp")), "drop"
    )


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ({}, "no policy entry"),
        ({"0000": b"action=accept"}, "no policy entry"),
        ({"policy": b"reject"}, "bad policy"),
        ({"policy": b"drop", "0000": b"action=maybe"}, "rule 0000: action must be"),
        ({"policy": b"drop", "rule1": b"action=accept"}, "unexpected entry 'rule1'"),
        ({"policy": b"drop", "00000": b"action=accept"}, "unexpected entry"),
        ({"policy": b"drop", "0000/x": b"action=accept"}, "unexpected entry"),
        ({"policy": b"drop", "0000": "action=accépt".encode()}, "not ASCII"),
        ({"policy": b"dr\xffop"}, "not ASCII"),
    ],
)
def test_one_bad_entry_blocks_the_source(entries: dict[str, bytes], why: str) -> None:
    result = parse_source(entries, 4)
    assert isinstance(result, Blocked)
    assert why in result.reason


def test_addresses_must_be_canonical() -> None:
    assert parse_address("10.137.0.5") == addr("10.137.0.5")
    assert parse_address("fd09:24ef:4179::a89:5") == addr("fd09:24ef:4179::a89:5")
    bad_texts = ("10.137.0.05", "FD09::1", "fd09:0::1", "10.137.0.5/32", "", "x", "::1%0")
    for bad in bad_texts:
        with pytest.raises(EntryError):
            parse_address(bad)


def test_connected_ips_keep_the_family_and_report_garbage() -> None:
    addresses, problems = parse_address_list(b"10.137.0.5 fd09::1 bogus 10.137.0.6", 4)
    assert addresses == {addr("10.137.0.5"), addr("10.137.0.6")}
    assert len(problems) == 2
    assert parse_address_list(None, 6) == (frozenset(), [])
    assert parse_address_list(b"", 6) == (frozenset(), [])
    assert parse_address_list(b"\xff", 4) == (frozenset(), ["value is not ASCII"])


def test_resolv_conf_leaves_out_link_local_and_zone_ids() -> None:
    """nft refuses ``fe80::1%eth0``: one such line would block every IPv6 dns rule."""
    text = (
        "nameserver fe80::1%eth0\nnameserver fe80::2\nnameserver 169.254.1.1\n"
        "nameserver 2001:db8::1%2\nnameserver 2001:db8::53\n"
    )
    assert parse_resolv_conf(text) == {addr("2001:db8::53")}


def test_resolv_conf_nameservers_without_local_stubs() -> None:
    text = (
        "# comment\nnameserver 10.139.1.1\nnameserver 127.0.0.53\nnameserver ::1\n"
        "nameserver 2001:db8::53\nsearch example.com\nnameserver garbage\nnameserver\n"
    )
    assert parse_resolv_conf(text) == {addr("10.139.1.1"), addr("2001:db8::53")}


_KEYS = st.one_of(
    st.just("policy"),
    st.from_regex(r"\A[0-9]{4}\Z"),
    st.text(max_size=12),
)
_WORDS = st.sampled_from(
    [
        "action=accept", "action=drop", "proto=tcp", "proto=udp", "proto=icmp",
        "dst4=10.0.0.0/8", "dst6=fd00::/8", "dsthost=example.com", "dstports=53-53",
        "dstports=0-65535", "icmptype=0", "specialtarget=dns", "action=", "=", "dst4=::/0",
    ]
)
_VALUES = st.one_of(
    st.binary(max_size=80),
    st.lists(_WORDS, max_size=6).map(lambda ws: " ".join(ws).encode()),
    st.lists(st.one_of(_WORDS, st.text(max_size=10)), max_size=5).map(
        lambda ws: " ".join(ws).encode("utf-8", "surrogatepass")
    ),
)


@given(st.dictionaries(_KEYS, _VALUES, max_size=6), st.sampled_from([4, 6]))
def test_fuzz_parse_source_never_raises(entries: dict[str, bytes], version: int) -> None:
    result = parse_source(entries, version)  # type: ignore[arg-type]
    assert isinstance(result, SourceRules | Blocked)
    if isinstance(result, SourceRules):
        assert result.policy in ("accept", "drop")


@given(st.text(max_size=200), st.sampled_from([4, 6]))
def test_fuzz_parse_rule_only_raises_entry_error(value: str, version: int) -> None:
    try:
        rule = parse_rule(value, version)  # type: ignore[arg-type]
    except EntryError:
        return
    assert rule.action in ("accept", "drop")


@given(st.binary(max_size=120), st.sampled_from([4, 6]))
def test_fuzz_address_list_never_raises(value: bytes, version: int) -> None:
    addresses, _problems = parse_address_list(value, version)  # type: ignore[arg-type]
    assert all(a.version == version for a in addresses)


@pytest.mark.parametrize(
    "value",
    [
        "action=accept\n",
        "action=accept dsthost=example.com\n",
        "action=accept dst4=10.0.0.0/8\n",
        "action=accept proto=tcp dstports=443\n",
        "action=accept proto=icmp icmptype=8\n",
    ],
)
def test_a_trailing_newline_is_refused(value: str) -> None:
    with pytest.raises(EntryError):
        parse_rule(value, 4)
    assert isinstance(parse_source({"policy": b"drop", "0000\n": b"action=accept"}, 4), Blocked)
