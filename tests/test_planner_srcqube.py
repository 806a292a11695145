"""``srcqube=NAME``, pure: resolved by the planner to the qube's current addresses.

The entries keep the format the agents already parse (``srchost=`` a
network), so what is pinned here is the resolution: which address, which
family, and what happens when the name resolves to nothing (the rule is
left out and reported, never written without a source).
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from test_planner import no_reports
from test_planner import rules as rule_lists
from test_planner_inbound import NOW, WEB_IP, WORK_IP, qube, snapshot, web

from agent_worker import inbound, input_rules
from core_admin_patch.planner import (
    FORWARD_DIR,
    INBOUND_DIR,
    INPUT_DIR,
    QubeState,
    Snapshot,
    SourceProvidesNetworkError,
    UnresolvedSourceError,
    check_rules,
    describe_forwards,
    plan,
)

SSH_FROM_WORK = "action=accept srcqube=work proto=tcp dstports=22"
INTERNAL_SSH = (
    "action=forward forwardtype=internal srcqube=work proto=tcp srcports=2222 dstports=22"
)
FW_IP = "10.137.0.6"
NET6 = "fd09:24ef:4179::a89:5"
FW6, WEB6, WORK6 = "fd09:24ef:4179::a89:6", "fd09:24ef:4179::a89:14", "fd09:24ef:4179::a89:15"


def with6(state: QubeState, ip6: str | None) -> QubeState:
    return dataclasses.replace(state, ip6=None if ip6 is None else ipaddress.IPv6Address(ip6))


def moved(snap: Snapshot, name: str, ip: str | None, ip6: str | None = None) -> Snapshot:
    """``snap`` after ``name``'s addresses changed, as dom0 sees it on its next plan."""
    state = dataclasses.replace(
        snap.qubes[name], ip=None if ip is None else ipaddress.IPv4Address(ip)
    )
    return Snapshot({**snap.qubes, name: with6(state, ip6)}, snap.now)


def dual_stack(*web_lines: str, work6: str | None = WORK6) -> Snapshot:
    """The inbound tests' topology with IPv6 on everywhere but (optionally) in work."""
    snap = snapshot(web(*web_lines))
    return Snapshot(
        {
            **snap.qubes,
            "sys-net": with6(snap.qubes["sys-net"], NET6),
            "sys-firewall": with6(snap.qubes["sys-firewall"], FW6),
            "web": with6(snap.qubes["web"], WEB6),
            "work": with6(snap.qubes["work"], work6),
        },
        NOW,
    )


def all_values(snap: Snapshot) -> str:
    entries = plan(snap).entries
    return repr(entries)


# --- inbound ------------------------------------------------------------------


def test_inbound_srcqube_becomes_the_qubes_address() -> None:
    result = plan(snapshot(web("action=accept", SSH_FROM_WORK)))
    value = f"action=accept srchost={WORK_IP}/32 proto=tcp dstports=22-22"
    assert result.entries == {
        "sys-firewall": {f"{INBOUND_DIR}/{WEB_IP}": {"0000": value}},
        "web": {INPUT_DIR: {"0000": value}},
    }
    assert result.skipped == ()


def test_inbound_srcqube_in_both_families_when_both_ends_have_ipv6() -> None:
    entries = plan(dual_stack(SSH_FROM_WORK)).entries
    v4 = f"action=accept srchost={WORK_IP}/32 proto=tcp dstports=22-22"
    v6 = f"action=accept srchost={WORK6}/128 proto=tcp dstports=22-22"
    assert entries["sys-firewall"] == {
        f"{INBOUND_DIR}/{WEB_IP}": {"0000": v4},
        f"{INBOUND_DIR}/{WEB6}": {"0000": v6},
    }
    assert sorted(entries["web"][INPUT_DIR].values()) == [v4, v6]


def test_ipv6_only_where_the_source_has_it() -> None:
    entries = plan(dual_stack(SSH_FROM_WORK, work6=None)).entries
    assert list(entries["sys-firewall"]) == [f"{INBOUND_DIR}/{WEB_IP}"]
    assert len(entries["web"][INPUT_DIR]) == 1


def test_ipv6_only_where_the_target_has_it() -> None:
    snap = dual_stack(SSH_FROM_WORK)
    entries = plan(moved(snap, "web", WEB_IP, None)).entries
    assert list(entries["sys-firewall"]) == [f"{INBOUND_DIR}/{WEB_IP}"]
    assert WORK6 not in all_values(moved(snap, "web", WEB_IP, None))


def test_a_stopped_source_is_resolved_to_the_address_it_holds() -> None:
    work = qube("work", "sys-firewall", WORK_IP, running=False)
    entries = plan(snapshot(web(SSH_FROM_WORK), work)).entries
    assert entries["sys-firewall"][f"{INBOUND_DIR}/{WEB_IP}"] == {
        "0000": f"action=accept srchost={WORK_IP}/32 proto=tcp dstports=22-22"
    }


@pytest.mark.parametrize(
    ("others", "reason"),
    [
        ((), "srcqube 'work2' names no qube"),
        ((qube("work2", None, None),), "srcqube 'work2' has no IP address"),
    ],
    ids=["missing", "no-ip"],
)
def test_an_unresolvable_source_skips_only_that_rule(
    others: tuple[QubeState, ...], reason: str
) -> None:
    lines = (
        "action=accept srcqube=work2 proto=tcp dstports=22",
        "action=drop srcqube=work2",  # skipped too: that qube cannot send anything
        SSH_FROM_WORK,
    )
    result = plan(snapshot(web(*lines), *others))
    assert result.entries["sys-firewall"] == {
        f"{INBOUND_DIR}/{WEB_IP}": {
            "0002": f"action=accept srchost={WORK_IP}/32 proto=tcp dstports=22-22"
        }
    }
    assert list(result.entries["web"][INPUT_DIR].values()) == [
        f"action=accept srchost={WORK_IP}/32 proto=tcp dstports=22-22"
    ]
    assert result.skipped == (f"web inbound rule 0: {reason}", f"web inbound rule 1: {reason}")


def test_nothing_is_written_when_the_only_rule_cannot_be_resolved() -> None:
    result = plan(snapshot(web("action=accept srcqube=gone")))
    assert result.entries == {}
    assert result.skipped == ("web inbound rule 0: srcqube 'gone' names no qube",)


def test_source_ip_change_gives_the_new_address_and_drops_the_old() -> None:
    before = dual_stack(SSH_FROM_WORK)
    after = moved(before, "work", "10.137.0.40", "fd09:24ef:4179::a89:28")
    text = all_values(after)
    assert "srchost=10.137.0.40/32" in text and "srchost=fd09:24ef:4179::a89:28/128" in text
    assert WORK_IP not in text and WORK6 not in text


def test_source_losing_its_netvm_closes_the_rule() -> None:
    result = plan(moved(snapshot(web(SSH_FROM_WORK)), "work", None))
    assert result.entries == {}
    assert result.skipped == ("web inbound rule 0: srcqube 'work' has no IP address",)


def test_srcqube_entries_parse_in_both_agents() -> None:
    lines = (SSH_FROM_WORK, "action=drop srcqube=work proto=icmp icmptype=8")
    result = plan(snapshot(web(*lines)))
    target = ipaddress.IPv4Address(WEB_IP)
    netvm = result.entries["sys-firewall"][f"{INBOUND_DIR}/{WEB_IP}"]
    parsed = inbound.parse_target(target, {k: v.encode() for k, v in netvm.items()})
    inputs = result.entries["web"][INPUT_DIR]
    assert parsed == input_rules.parse_openings({k: v.encode() for k, v in inputs.items()})
    assert [str(rule.srchost) for rule in parsed] == [f"{WORK_IP}/32"] * 2


# --- internal forwards -----------------------------------------------------------


def test_internal_forward_steps_carry_the_resolved_source_per_family() -> None:
    entries = plan(dual_stack(INTERNAL_SSH)).entries
    assert entries["sys-firewall"] == {
        f"{FORWARD_DIR}/{WEB_IP}": {
            "0000": f"proto=tcp ports=2222-2222 iif=downstream daddr={FW_IP} to={WEB_IP}"
            f" toports=22-22 srchost={WORK_IP}/32"
        },
        f"{FORWARD_DIR}/{WEB6}": {
            "0000": f"proto=tcp ports=2222-2222 iif=downstream daddr={FW6} to={WEB6}"
            f" toports=22-22 srchost={WORK6}/128"
        },
    }
    assert list(entries["web"][INPUT_DIR].values()) == [
        f"action=accept proto=tcp dstports=22-22 srchost={WORK_IP}/32",
        f"action=accept proto=tcp dstports=22-22 srchost={WORK6}/128",
    ]


def test_internal_forward_follows_the_source_and_skips_when_it_is_gone() -> None:
    snap = snapshot(web(INTERNAL_SSH))
    assert f"srchost={WORK_IP}/32" in all_values(snap)
    text = all_values(moved(snap, "work", "10.137.0.40"))
    assert "srchost=10.137.0.40/32" in text and WORK_IP not in text
    gone = Snapshot({k: v for k, v in snap.qubes.items() if k != "work"}, NOW)
    result = plan(gone)
    assert result.entries == {}
    assert result.skipped == ("web forward rule 0: srcqube 'work' names no qube",)


def test_describe_names_the_source_qube() -> None:
    assert describe_forwards(snapshot(web(INTERNAL_SSH)), "web", no_reports) == {
        0: f"sys-firewall ({FW_IP}) from work ({WORK_IP}) tcp/2222 -> web ({WEB_IP}) tcp/22"
    }
    gone = Snapshot({k: v for k, v in snapshot(web(INTERNAL_SSH)).qubes.items()
                     if k != "work"}, NOW)
    assert describe_forwards(gone, "web", no_reports) == {
        0: "not reachable: srcqube 'work' names no qube"
    }


# --- check at Set ------------------------------------------------------------------


def test_check_refuses_a_name_that_is_no_qube_and_names_it() -> None:
    rules = rule_lists("action=accept srcqube=wrok proto=tcp dstports=22")
    with pytest.raises(UnresolvedSourceError, match=r"srcqube 'wrok'.*no such qube"):
        check_rules(snapshot(web()), "web", rules)
    forward = rule_lists(INTERNAL_SSH.replace("=work", "=wrok"))
    with pytest.raises(UnresolvedSourceError, match="'wrok'"):
        check_rules(snapshot(web()), "web", forward)


def test_check_accepts_a_stopped_source_or_one_without_address() -> None:
    rules = rule_lists(SSH_FROM_WORK, INTERNAL_SSH)
    check_rules(snapshot(web(), qube("work", "sys-firewall", WORK_IP, running=False)),
                "web", rules)
    check_rules(snapshot(web(), qube("work", None, None)), "web", rules)


def test_check_ignores_expired_rules_naming_no_qube() -> None:
    rules = rule_lists(f"action=accept srcqube=gone expire={int(NOW) - 1}")
    check_rules(snapshot(web()), "web", rules)


# --- a qube that provides network is no source: its address carries its clients' traffic ----


def test_check_refuses_a_qube_providing_network_saying_why_and_what_instead() -> None:
    snap = snapshot(web(), qube("direct", "sys-net", "10.137.0.8"))
    for line in ("action=accept srcqube=sys-firewall proto=tcp dstports=22",
                 INTERNAL_SSH.replace("=work", "=sys-firewall")):
        with pytest.raises(SourceProvidesNetworkError) as info:
            check_rules(snap, "direct", rule_lists(line))
        message = str(info.value)
        assert "\n" not in message
        assert "srcqube 'sys-firewall' in the rules of 'direct'" in message
        assert "provides network" in message and "behind it" in message
        assert "srchost=10.137.0.6" in message  # what to give instead


def test_a_source_that_starts_providing_network_is_left_out_and_reported() -> None:
    snap = snapshot(web(SSH_FROM_WORK, INTERNAL_SSH))
    assert "srchost=10.137.0.21/32" in all_values(snap)
    work = dataclasses.replace(snap.qubes["work"], provides_network=True)
    result = plan(Snapshot({**snap.qubes, "work": work}, NOW))
    assert result.entries == {}
    assert len(result.skipped) == 2
    for kind, reason in zip(("forward", "inbound"), sorted(result.skipped), strict=True):
        assert reason.startswith(f"web {kind} rule 0: srcqube 'work' provides network")
    moved = Snapshot({**snap.qubes, "work": work}, NOW)
    assert describe_forwards(moved, "web", no_reports)[0].startswith(
        "not reachable: srcqube 'work' provides network"
    )
