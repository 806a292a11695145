"""Agent-side parsing of forward steps and input openings: strict, never crashing."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_worker import forward_steps, input_rules
from agent_worker.entries import EntryError

EDGE = "proto=tcp ports=8443-8443 iif=upstream daddr=local to=10.137.0.6 toports=8443-8443"


def test_edge_step_with_a_source_is_an_element_of_the_source_map() -> None:
    (step,) = forward_steps.parse_target({"0000": (EDGE + " srchost=192.0.2.0/24").encode()})
    assert step.daddr == "local"
    assert step.srchost == ipaddress.ip_network("192.0.2.0/24")
    # any local address (fib daddr type local, checked by the chain) from 192.0.2.0/24
    assert forward_steps.dnat_elements(step) == (
        ("qns-dnat-upstream-source",
         "192.0.2.0/24 . 0.0.0.0/0 . tcp . 8443 : 10.137.0.6 . 8443"),
    )


def test_range_maps_one_to_one_one_element_per_port() -> None:
    step = forward_steps.parse_step(
        "proto=udp ports=5000-5002 iif=upstream daddr=10.137.0.6 to=10.137.0.20 toports=6000-6002"
    )
    assert forward_steps.dnat_elements(step) == tuple(
        ("qns-dnat-upstream-addressed", f"10.137.0.6 . udp . {port} : 10.137.0.20 . {port + 1000}")
        for port in (5000, 5001, 5002)
    )


def test_same_range_keeps_ports_and_internal_matches_downstream() -> None:
    step = forward_steps.parse_step(
        "proto=tcp ports=80-81 iif=downstream daddr=10.137.0.6 to=10.137.0.20 toports=80-81"
    )
    assert forward_steps.dnat_elements(step) == (
        ("qns-dnat-downstream-addressed", "10.137.0.6 . tcp . 80 : 10.137.0.20 . 80"),
        ("qns-dnat-downstream-addressed", "10.137.0.6 . tcp . 81 : 10.137.0.20 . 81"),
    )


def test_ipv6_step_goes_to_ip6_family() -> None:
    step = forward_steps.parse_step(
        "proto=tcp ports=443-443 iif=upstream daddr=local to=fd09:24ef:4179::a89:14 toports=443-443"
    )
    elements = forward_steps.family_elements([step])
    assert elements["ip6"]["qns-dnat-upstream-local"] == {
        "tcp . 443 : fd09:24ef:4179::a89:14 . 443"
    }
    assert not any(elements["ip"].values())
    assert set(elements["ip6"]) == set(forward_steps.OBJECTS)


def test_every_map_has_its_lookup_and_translation_after_the_local_check() -> None:
    rules = forward_steps.dnat_rules("ip6")
    assert rules[:2] == ["fib daddr type != local return", "meta l4proto != { tcp, udp } return"]
    for name in forward_steps.OBJECTS:
        label, translate = (rule for rule in rules if rule.endswith(f"@{name}")
                            or f"@{name} " in rule)
        labels = f"@{name} ct label set {forward_steps.FORWARDED_LABEL}"
        if name.startswith("qns-dnat-upstream-"):  # its replies go back by the uplink
            labels += f" ct label set {forward_steps.UPLINK_LABEL}"
        assert label.endswith(labels)
        assert translate.endswith(f"map @{name}") and " dnat ip6 to " in translate
        assert label.split(" @")[0].split(" ")[-1] == "dport"  # same key, same lookup
    assert set(forward_steps.declarations("ip")) == set(forward_steps.OBJECTS)


def test_steps_meeting_on_a_port_are_found_by_map_and_protocol() -> None:
    up = forward_steps.parse_step(EDGE)
    wide = forward_steps.parse_step(EDGE.replace("ports=8443-8443", "ports=8440-8449", 1)
                              .replace("toports=8443-8443", "toports=8440-8449"))
    udp = forward_steps.parse_step(EDGE.replace("proto=tcp", "proto=udp"))
    down = forward_steps.parse_step(EDGE.replace("iif=upstream", "iif=downstream"))
    held = forward_steps.TakenPorts()
    assert held.meets((up, udp, down)) is None  # other protocol, other side: other keys
    assert held.meets((wide,)) == (wide, up)
    assert held.meets((forward_steps.parse_step(EDGE.replace("8443-8443", "8444-8444")),
                       wide)) == (wide, up)
    own = forward_steps.TakenPorts()
    assert own.meets((up, wide)) == (wide, up)  # a target meeting itself


@pytest.mark.parametrize(
    "value",
    [
        "",
        EDGE + " ",
        EDGE.replace("tcp", "icmp"),
        EDGE.replace("toports=8443-8443", "toports=8443-8444"),
        EDGE.replace("ports=8443-8443", "ports=0-0", 1),
        EDGE.replace("ports=8443-8443", "ports=9-8", 1),
        EDGE.replace("ports=8443-8443", "ports=8443", 1),
        EDGE.replace("ports=8443-8443", "ports=65536-65536", 1),
        EDGE.replace("to=10.137.0.6", "to=10.137.0.6;drop"),
        EDGE.replace("to=10.137.0.6", "to=sys-firewall"),
        EDGE.replace("daddr=local", "daddr=2001:db8::1"),
        EDGE + " srchost=192.0.2.1/24",
        EDGE + " srchost=192.0.2.0/024",
        EDGE + " proto=udp",
        EDGE + " extra=1",
        EDGE.replace("iif=upstream", "iif=sideways"),
        EDGE.replace(" iif=upstream", ""),
        EDGE + " srchost=2001:db8::/32",
        EDGE.replace(" ", "  "),
    ],
)
def test_bad_steps_are_refused(value: str) -> None:
    with pytest.raises(EntryError):
        forward_steps.parse_step(value)


def test_one_bad_entry_fails_the_target_and_names_it() -> None:
    with pytest.raises(EntryError, match="entry 0001"):
        forward_steps.parse_target({"0000": EDGE.encode(), "0001": b"proto=tcp"})
    with pytest.raises(EntryError, match="unexpected key"):
        forward_steps.parse_target({"x": EDGE.encode()})
    with pytest.raises(EntryError, match="not ASCII"):
        forward_steps.parse_target({"0000": "proto=tcp\u00e9".encode()})


def test_input_openings_render_in_order() -> None:
    openings = input_rules.parse_openings(
        {
            "0001": b"action=drop srchost=10.137.0.21/32",
            "0000": b"action=accept proto=tcp dstports=443-443 srchost=192.0.2.0/24",
            "0002": b"action=accept proto=icmp icmptype=8",
        }
    )
    # Behind the SYN guard, and only from the netvm's side (never the qube's own vifs).
    assert input_rules.chain_rules(openings, "ip") == [
        input_rules.ONLY_SYN_OPENS,
        "iifgroup != 2 ip saddr 192.0.2.0/24 meta l4proto tcp th dport 443 ct state new accept",
        "iifgroup != 2 ip saddr 10.137.0.21/32 ct state new drop",
        "iifgroup != 2 meta l4proto icmp icmp type 8 ct state new accept",
    ]
    assert input_rules.chain_rules(openings, "ip6") == [
        input_rules.ONLY_SYN_OPENS,
        "iifgroup != 2 meta l4proto icmpv6 icmpv6 type 8 ct state new accept",
    ]
    assert input_rules.chain_rules([], "ip") == []


@pytest.mark.parametrize(
    "value",
    [
        "action=forward",
        "proto=tcp dstports=1-2",
        "action=accept dstports=1-2",
        "action=accept proto=icmp dstports=1-2",
        "action=accept proto=tcp icmptype=8",
        "action=accept proto=icmp icmptype=256",
        "action=accept proto=icmp icmptype=-1",
        "action=accept srchost=example.com",
        "action=accept action=drop",
    ],
)
def test_bad_openings_are_refused(value: str) -> None:
    with pytest.raises(EntryError):
        input_rules.parse_opening(value)


@given(st.dictionaries(st.text(max_size=8), st.binary(max_size=200), max_size=4))
def test_fuzzed_forward_entries_raise_only_entry_errors(untrusted: dict[str, bytes]) -> None:
    try:
        steps = forward_steps.parse_target(untrusted)
    except EntryError:
        return
    for step in steps:
        assert forward_steps.dnat_elements(step)


@given(st.lists(st.sampled_from([*EDGE.split(" "), "srchost=10.0.0.0/8", "x=y", "ports=1-1"])))
def test_fuzzed_word_mixes_raise_only_entry_errors(words: list[str]) -> None:
    with contextlib.suppress(EntryError):
        forward_steps.parse_step(" ".join(words))


@pytest.mark.parametrize(
    "parse",
    [
        lambda: input_rules.parse_opening("action=accept\n"),
        lambda: input_rules.parse_opening("action=accept proto=icmp icmptype=8\n"),
        lambda: input_rules.parse_openings({"0000\n": b"action=accept"}),
        lambda: forward_steps.parse_step(EDGE + "\n"),
        lambda: forward_steps.parse_step(EDGE.replace("8443-8443 ", "8443-8443\n ", 1)),
        lambda: forward_steps.parse_target({"0000\n": EDGE.encode()}),
    ],
)
def test_a_trailing_newline_is_refused(parse: object) -> None:
    """``$`` matches before a final newline: every pattern must match the whole text."""
    with pytest.raises(EntryError):
        parse()  # type: ignore[operator]


def test_ranges_are_bounded() -> None:
    """A step takes at most 1024 ports (each remapped one is an nft map element)."""
    base = "proto=tcp iif=upstream daddr=local to=10.137.0.6"
    step = forward_steps.parse_step(f"{base} ports=1000-2023 toports=3000-4023")
    assert len(forward_steps.dnat_elements(step)) == 1024
    same = forward_steps.parse_step(f"{base} ports=1000-2023 toports=1000-2023")
    assert same.ports == (1000, 2023)
    with pytest.raises(EntryError, match="range of 1025 ports: at most 1024"):
        forward_steps.parse_step(f"{base} ports=1000-2024 toports=3000-4024")
    with pytest.raises(EntryError, match="range of 65535 ports"):
        forward_steps.parse_step(f"{base} ports=1-65535 toports=1-65535")
