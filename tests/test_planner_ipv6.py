"""The planner in IPv6: per-family entries, where IPv6 is on for the whole path."""

from __future__ import annotations

import dataclasses
import ipaddress

from test_planner import NOW, ext, internal, no_reports, qube

from core_admin_patch.planner import (
    FORWARD_DIR,
    INBOUND_DIR,
    INPUT_DIR,
    REFUSED_DIR,
    QubeState,
    Snapshot,
    check_rules,
    describe_forwards,
    plan,
)
from firewall_rules import Rule, RuleLists

NET6, FW6, WEB6 = "fd09:24ef:4179::a89:5", "fd09:24ef:4179::a89:6", "fd09:24ef:4179::a89:14"


def with6(state: QubeState, ip6: str | None) -> QubeState:
    return dataclasses.replace(state, ip6=None if ip6 is None else ipaddress.IPv6Address(ip6))


def topology(*web_rules: str, web6: str | None = WEB6, fw6: str | None = FW6) -> Snapshot:
    """sys-net <- sys-firewall <- web, IPv6 on where an address is given."""
    net = with6(qube("sys-net", None, "10.137.0.5", provides_network=True), NET6)
    fw = with6(qube("sys-firewall", "sys-net", "10.137.0.6", provides_network=True), fw6)
    web = with6(qube("web", "sys-firewall", "10.137.0.20", web_rules), web6)
    return Snapshot({q.name: q for q in (net, fw, web)}, NOW)


def test_external_forward_open_to_both_families_gets_both_paths() -> None:
    entries = plan(topology(ext("8443", "443"))).entries
    assert entries["sys-net"][f"{FORWARD_DIR}/{WEB6}"] == {
        "0000": f"proto=tcp ports=8443-8443 iif=upstream daddr=local to={FW6} toports=8443-8443"
    }
    assert entries["sys-firewall"][f"{FORWARD_DIR}/{WEB6}"] == {
        "0000": f"proto=tcp ports=8443-8443 iif=upstream daddr={FW6} to={WEB6} toports=443-443"
    }
    assert f"{FORWARD_DIR}/10.137.0.20" in entries["sys-net"]
    # One input opening serves both families (no srchost).
    assert entries["web"][INPUT_DIR] == {"0000": "action=accept proto=tcp dstports=443-443"}


def test_ipv6_off_anywhere_on_the_path_means_ipv4_only() -> None:
    for snap in (topology(ext("8443", "443"), web6=None), topology(ext("8443", "443"), fw6=None)):
        result = plan(snap)
        assert all(WEB6 not in d for dirs in result.entries.values() for d in dirs)
        assert f"{FORWARD_DIR}/10.137.0.20" in result.entries["sys-net"]
        assert result.skipped == ()


def test_srchost_picks_the_family() -> None:
    v6 = plan(topology(ext("8443", "443", extra="srchost=2001:db8::/64"))).entries
    assert set(v6["sys-net"]) == {f"{FORWARD_DIR}/{WEB6}"}
    assert v6["sys-net"][f"{FORWARD_DIR}/{WEB6}"]["0000"].endswith("srchost=2001:db8::/64")
    v4 = plan(topology(ext("8443", "443", extra="srchost=192.0.2.0/24"))).entries
    assert set(v4["sys-net"]) == {f"{FORWARD_DIR}/10.137.0.20"}


def test_ipv6_only_rule_without_ipv6_is_skipped_with_the_reason() -> None:
    result = plan(topology(ext("8443", "443", extra="srchost=2001:db8::/64"), web6=None))
    assert result.entries == {}
    assert result.skipped == ("web forward rule 0: 'web' has no IPv6 address",)


def test_internal_forward_in_ipv6() -> None:
    entries = plan(topology(internal("2222", "22"))).entries
    assert entries["sys-firewall"][f"{FORWARD_DIR}/{WEB6}"] == {
        "0000": f"proto=tcp ports=2222-2222 iif=downstream daddr={FW6} to={WEB6} toports=22-22"
    }
    assert "sys-net" not in entries


def test_both_families_claim_the_port_once() -> None:
    # The same rule in two families is not a conflict with itself, and a
    # second qube wanting the port is still refused.
    snap = topology(ext("8443", "443"))
    check_rules(snap, "web", snap.qubes["web"].rules)
    work = with6(qube("work", "sys-firewall", "10.137.0.21", (ext("8443", "80"),)), None)
    result = plan(Snapshot({**snap.qubes, "work": work}, NOW))
    assert result.skipped == ("work forward rule 0: port conflict with 'web'",)


def test_inbound_rules_per_family_in_list_order() -> None:
    snap = topology(
        "action=accept srchost=fd09:24ef:4179::a89:15 proto=tcp dstports=22",
        "action=drop srchost=10.137.0.21 proto=tcp dstports=23",
    )
    entries = plan(snap).entries
    assert entries["sys-firewall"][f"{INBOUND_DIR}/{WEB6}"] == {
        "0000": "action=accept srchost=fd09:24ef:4179::a89:15/128 proto=tcp dstports=22-22"
    }
    assert entries["sys-firewall"][f"{INBOUND_DIR}/10.137.0.20"] == {
        "0001": "action=drop srchost=10.137.0.21/32 proto=tcp dstports=23-23"
    }
    assert list(entries["web"][INPUT_DIR].values()) == [
        "action=accept srchost=fd09:24ef:4179::a89:15/128 proto=tcp dstports=22-22",
        "action=drop srchost=10.137.0.21/32 proto=tcp dstports=23-23",
    ]
    without6 = plan(topology(*(r.api_rule for r in snap.qubes["web"].rules.all()), web6=None))
    assert f"{INBOUND_DIR}/{WEB6}" not in without6.entries["sys-firewall"]
    assert len(without6.entries["web"][INPUT_DIR]) == 1


def test_describe_says_ipv6_too() -> None:
    with6 = describe_forwards(topology(ext("8443", "443")), "web", no_reports)[0]
    assert with6.endswith(f"(IPv6: {WEB6} too)")
    without6 = describe_forwards(topology(ext("8443", "443"), web6=None), "web", no_reports)[0]
    assert not without6.endswith("too)")



def test_checking_a_set_keeps_the_ipv6_addresses() -> None:
    snap = topology()
    forward = Rule.from_api_string(ext("8443", "443"))
    proposed = snap.with_rules("web", RuleLists(forward=(forward,)))
    assert proposed.qubes["web"].ip6 == ipaddress.IPv6Address(WEB6)
    assert proposed.qubes["web"].rules.forward == (forward,)


def test_describe_says_which_family_a_hop_refused() -> None:
    """sys-net's reports, per target address of web; sys-firewall reports nothing."""
    reports = {("sys-net", f"{REFUSED_DIR}/{WEB6}"): b"tcp 22-22: this qube listens on it"}
    refused = "REFUSED by sys-net: tcp/22 is its own (it listens on it)"
    snap = topology(ext("22", "22"))
    text = describe_forwards(snap, "web", lambda hop, path: reports.get((hop, path)))[0]
    assert text.endswith(f"too); {refused} (IPv6)")
    reports[("sys-net", f"{REFUSED_DIR}/10.137.0.20")] = b"tcp 22-22: this qube listens on it"
    text = describe_forwards(snap, "web", lambda hop, path: reports.get((hop, path)))[0]
    assert text.endswith(f"too); {refused}")
