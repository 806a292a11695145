"""The dom0 planner, pure: topology snapshots in, QubesDB entries and refusals out.

Entries are pinned as the exact strings the agents parse (doc/qubesdb.md),
so a change to the layout shows up here before it reaches a worker.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core_admin_patch.planner import (
    FORWARD_DIR,
    INPUT_DIR,
    REFUSED_DIR,
    SUPPORT_FEATURE,
    NoNetVMError,
    Plan,
    PlanError,
    PortConflictError,
    PortRange,
    QubeState,
    Snapshot,
    UnsupportedHopError,
    check_rules,
    describe_forwards,
    forward_path,
    netvm_chain,
    next_expiry,
    plan,
    refused_steps,
)
from firewall_rules import Rule, RuleLists

NOW = 1_700_000_000.0
SUPPORT: Mapping[str, str] = {SUPPORT_FEATURE: "1"}

NET_IP = "10.137.0.1"
FW_IP = "10.137.0.2"
VPN_IP = "10.137.0.3"
WEB_IP = "10.137.0.10"
WORK_IP = "10.137.0.11"
MAIL_IP = "10.137.0.12"


def rules(*lines: str) -> RuleLists:
    """The lines as a qube's rule lists, each kind in its own list."""
    return RuleLists.sorted_out(Rule.from_api_string(line) for line in lines)


def ext(srcports: str, dstports: str, proto: str = "tcp", extra: str = "") -> str:
    line = (
        f"action=forward forwardtype=external proto={proto}"
        f" srcports={srcports} dstports={dstports}"
    )
    return f"{line} {extra}" if extra else line


def internal(srcports: str, dstports: str, proto: str = "tcp", extra: str = "") -> str:
    line = (
        f"action=forward forwardtype=internal proto={proto}"
        f" srcports={srcports} dstports={dstports}"
    )
    return f"{line} {extra}" if extra else line


def qube(
    name: str,
    netvm: str | None,
    ip: str | None,
    lines: Sequence[str] = (),
    *,
    running: bool = True,
    features: Mapping[str, str] = SUPPORT,
    provides_network: bool = False,
) -> QubeState:
    return QubeState(
        name=name,
        netvm=netvm,
        ip=None if ip is None else ipaddress.IPv4Address(ip),
        provides_network=provides_network,
        running=running,
        features=dict(features),
        rules=rules(*lines),
    )


def infra(**overrides: QubeState) -> dict[str, QubeState]:
    """sys-net (edge) <- sys-firewall <- sys-vpn, all running and supported."""
    qubes = {
        "sys-net": qube("sys-net", None, NET_IP, provides_network=True),
        "sys-firewall": qube("sys-firewall", "sys-net", FW_IP, provides_network=True),
        "sys-vpn": qube("sys-vpn", "sys-firewall", VPN_IP, provides_network=True),
    }
    qubes.update(overrides)
    return qubes


def snapshot(*extra: QubeState, now: float = NOW, **overrides: QubeState) -> Snapshot:
    qubes = infra(**overrides)
    for state in extra:
        qubes[state.name] = state
    return Snapshot(qubes, now)


def step(
    ports: str,
    iif: str,
    daddr: str,
    to: str,
    toports: str,
    proto: str = "tcp",
    srchost: str | None = None,
) -> str:
    value = f"proto={proto} ports={ports} iif={iif} daddr={daddr} to={to} toports={toports}"
    return value if srchost is None else f"{value} srchost={srchost}"


def fwd(ip: str) -> str:
    return f"{FORWARD_DIR}/{ip}"


def no_reports(hop: str, path: str) -> bytes | None:
    """A HopReader for hops that reported nothing."""
    return None


# --- entries ---------------------------------------------------------------


def test_external_forward_through_two_hops() -> None:
    result = plan(snapshot(qube("web", "sys-firewall", WEB_IP, [ext("443", "8443")])))
    assert result.skipped == ()
    assert result.entries == {
        "sys-net": {
            fwd(WEB_IP): {"0000": step("443-443", "upstream", "local", FW_IP, "443-443")},
        },
        "sys-firewall": {
            fwd(WEB_IP): {"0000": step("443-443", "upstream", FW_IP, WEB_IP, "8443-8443")},
        },
        "web": {INPUT_DIR: {"0000": "action=accept proto=tcp dstports=8443-8443"}},
    }


def test_external_forward_through_three_hops_keeps_ports_at_intermediate_hops() -> None:
    result = plan(snapshot(qube("web", "sys-vpn", WEB_IP, [ext("443", "8443")])))
    assert result.entries == {
        "sys-net": {
            fwd(WEB_IP): {"0000": step("443-443", "upstream", "local", FW_IP, "443-443")},
        },
        "sys-firewall": {
            fwd(WEB_IP): {"0000": step("443-443", "upstream", FW_IP, VPN_IP, "443-443")},
        },
        "sys-vpn": {
            fwd(WEB_IP): {"0000": step("443-443", "upstream", VPN_IP, WEB_IP, "8443-8443")},
        },
        "web": {INPUT_DIR: {"0000": "action=accept proto=tcp dstports=8443-8443"}},
    }


def test_external_forward_through_one_hop_is_the_edge_step_to_the_target() -> None:
    result = plan(snapshot(qube("web", "sys-net", WEB_IP, [ext("80", "8080", "udp")])))
    assert result.entries == {
        "sys-net": {
            fwd(WEB_IP): {
                "0000": step("80-80", "upstream", "local", WEB_IP, "8080-8080", "udp"),
            },
        },
        "web": {INPUT_DIR: {"0000": "action=accept proto=udp dstports=8080-8080"}},
    }


def test_internal_forward_only_in_the_netvm_from_downstream_at_its_address() -> None:
    result = plan(snapshot(qube("web", "sys-vpn", WEB_IP, [internal("80", "8080")])))
    assert result.entries == {
        "sys-vpn": {
            fwd(WEB_IP): {"0000": step("80-80", "downstream", VPN_IP, WEB_IP, "8080-8080")},
        },
        "web": {INPUT_DIR: {"0000": "action=accept proto=tcp dstports=8080-8080"}},
    }


def test_internal_forward_at_the_edge_uses_its_address_not_local() -> None:
    result = plan(snapshot(qube("web", "sys-net", WEB_IP, [internal("80", "8080")])))
    assert result.entries["sys-net"] == {
        fwd(WEB_IP): {"0000": step("80-80", "downstream", NET_IP, WEB_IP, "8080-8080")},
    }


def test_srchost_is_carried_at_every_step_and_into_the_input_entry() -> None:
    line = ext("443", "8443", extra="srchost=192.0.2.0/24")
    result = plan(snapshot(qube("web", "sys-vpn", WEB_IP, [line])))
    for hop in ("sys-net", "sys-firewall", "sys-vpn"):
        (value,) = result.entries[hop][fwd(WEB_IP)].values()
        assert value.endswith(" srchost=192.0.2.0/24"), (hop, value)
    assert result.entries["web"] == {
        INPUT_DIR: {"0000": "action=accept proto=tcp dstports=8443-8443 srchost=192.0.2.0/24"},
    }


def test_srchost_single_address_is_written_as_a_network() -> None:
    line = internal("22", "22", extra="srchost=10.137.0.11")
    result = plan(snapshot(qube("web", "sys-firewall", WEB_IP, [line])))
    assert result.entries["sys-firewall"][fwd(WEB_IP)]["0000"] == step(
        "22-22", "downstream", FW_IP, WEB_IP, "22-22", srchost="10.137.0.11/32"
    )
    assert result.entries["web"][INPUT_DIR]["0000"] == (
        "action=accept proto=tcp dstports=22-22 srchost=10.137.0.11/32"
    )


def test_port_ranges_map_one_to_one() -> None:
    result = plan(snapshot(qube("web", "sys-firewall", WEB_IP, [ext("8000-8009", "9000-9009")])))
    assert result.entries["sys-net"][fwd(WEB_IP)]["0000"] == step(
        "8000-8009", "upstream", "local", FW_IP, "8000-8009"
    )
    assert result.entries["sys-firewall"][fwd(WEB_IP)]["0000"] == step(
        "8000-8009", "upstream", FW_IP, WEB_IP, "9000-9009"
    )
    assert result.entries["web"][INPUT_DIR]["0000"] == (
        "action=accept proto=tcp dstports=9000-9009"
    )


def test_several_rules_and_several_targets() -> None:
    web = qube(
        "web",
        "sys-firewall",
        WEB_IP,
        [
            "action=accept proto=tcp dstports=443",  # outbound: not the planner's
            ext("443", "8443"),
            "action=accept srchost=10.137.0.11 proto=tcp dstports=22",  # inbound
            internal("80", "8080", "udp"),
            ext("53", "53", "udp"),
        ],
    )
    work = qube("work", "sys-firewall", WORK_IP, [ext("2222", "22")])
    mail = qube("mail", "sys-net", MAIL_IP, [ext("25", "25")])
    result = plan(snapshot(web, work, mail))
    assert result.skipped == ()
    assert result.entries == {
        "sys-net": {
            fwd(WEB_IP): {
                "0000": step("443-443", "upstream", "local", FW_IP, "443-443"),
                "0001": step("53-53", "upstream", "local", FW_IP, "53-53", "udp"),
            },
            fwd(WORK_IP): {"0000": step("2222-2222", "upstream", "local", FW_IP, "2222-2222")},
            fwd(MAIL_IP): {"0000": step("25-25", "upstream", "local", MAIL_IP, "25-25")},
        },
        "sys-firewall": {
            fwd(WEB_IP): {
                "0000": step("443-443", "upstream", FW_IP, WEB_IP, "8443-8443"),
                "0001": step("80-80", "downstream", FW_IP, WEB_IP, "8080-8080", "udp"),
                "0002": step("53-53", "upstream", FW_IP, WEB_IP, "53-53", "udp"),
            },
            fwd(WORK_IP): {"0000": step("2222-2222", "upstream", FW_IP, WORK_IP, "22-22")},
            # the inbound rule: its position in web's inbound list, in web's netvm
            f"/qns-inbound/{WEB_IP}": {
                "0000": "action=accept srchost=10.137.0.11/32 proto=tcp dstports=22-22"
            },
        },
        "web": {
            INPUT_DIR: {
                "0000": "action=accept proto=tcp dstports=8443-8443",
                "0001": "action=accept proto=udp dstports=8080-8080",
                "0002": "action=accept proto=udp dstports=53-53",
                # forward openings first, then the inbound rules
                "0003": "action=accept srchost=10.137.0.11/32 proto=tcp dstports=22-22",
            },
        },
        "work": {INPUT_DIR: {"0000": "action=accept proto=tcp dstports=22-22"}},
        "mail": {INPUT_DIR: {"0000": "action=accept proto=tcp dstports=25-25"}},
    }


def test_outbound_rules_alone_plan_nothing() -> None:
    web = qube("web", "sys-firewall", WEB_IP, ["action=accept proto=tcp dstports=443"])
    assert plan(snapshot(web)) == Plan({}, ())


def test_expired_rules_are_ignored() -> None:
    web = qube(
        "web",
        "sys-firewall",
        WEB_IP,
        [
            ext("443", "8443", extra=f"expire={int(NOW) - 1}"),
            ext("80", "8080", extra=f"expire={int(NOW) + 60}"),
        ],
    )
    result = plan(snapshot(web))
    assert result.skipped == ()
    assert result.entries["sys-net"] == {
        fwd(WEB_IP): {"0000": step("80-80", "upstream", "local", FW_IP, "80-80")},
    }
    assert result.entries["web"] == {
        INPUT_DIR: {"0000": "action=accept proto=tcp dstports=8080-8080"},
    }
    # An expired rule frees its port for others.
    work = qube("work", "sys-firewall", WORK_IP, [ext("443", "443")])
    assert fwd(WORK_IP) in plan(snapshot(web, work)).entries["sys-net"]


def test_all_forwards_expired_plans_nothing() -> None:
    web = qube("web", "sys-firewall", WEB_IP, [ext("443", "443", extra=f"expire={int(NOW) - 1}")])
    assert plan(snapshot(web)) == Plan({}, ())


def test_target_not_running_writes_nothing_for_it() -> None:
    web = qube("web", "sys-firewall", WEB_IP, [ext("443", "8443")], running=False)
    work = qube("work", "sys-firewall", WORK_IP, [ext("80", "80")])
    result = plan(snapshot(web, work))
    assert "web" not in result.entries
    for directories in result.entries.values():
        assert fwd(WEB_IP) not in directories
    assert fwd(WORK_IP) in result.entries["sys-net"]


@pytest.mark.parametrize("stopped", ["sys-net", "sys-firewall", "sys-vpn"])
def test_any_hop_not_running_writes_nothing_for_the_target(stopped: str) -> None:
    web = qube("web", "sys-vpn", WEB_IP, [ext("443", "8443")])
    hop = infra()[stopped]
    stopped_hop = QubeState(
        hop.name, hop.netvm, hop.ip, hop.provides_network, False, hop.features, hop.rules
    )
    result = plan(snapshot(web, **{stopped: stopped_hop}))
    assert result.entries == {}


def test_hop_stopped_elsewhere_does_not_affect_other_targets() -> None:
    web = qube("web", "sys-vpn", WEB_IP, [ext("443", "8443")])
    work = qube("work", "sys-firewall", WORK_IP, [ext("80", "80")])
    vpn = qube("sys-vpn", "sys-firewall", VPN_IP, running=False, provides_network=True)
    result = plan(snapshot(web, work, **{"sys-vpn": vpn}))
    assert set(result.entries) == {"sys-net", "sys-firewall", "work"}
    assert set(result.entries["sys-net"]) == {fwd(WORK_IP)}


def test_target_without_netvm_plans_nothing() -> None:
    web = qube("web", None, None, [ext("443", "8443")])
    assert plan(snapshot(web)) == Plan({}, ())


def test_hop_without_ip_skips_the_rule_with_a_reason() -> None:
    web = qube("web", "sys-firewall", WEB_IP, [ext("443", "8443")])
    fw = qube("sys-firewall", "sys-net", None, provides_network=True)
    result = plan(snapshot(web, **{"sys-firewall": fw}))
    assert result.entries == {}
    assert result.skipped == (
        "web forward rule 0: 'sys-firewall' on the path of 'web' has no IP address",
    )


def test_running_target_with_netvm_but_no_ip_is_skipped_not_a_crash() -> None:
    """forward_path refuses a target without an IP; plan() must report it, not assert."""
    web = qube("web", "sys-firewall", None, [ext("443", "8443")])
    result = plan(snapshot(web))
    assert result.entries == {}
    assert len(result.skipped) == 1
    assert "'web' has no IP address" in result.skipped[0]


def test_plan_is_deterministic_and_independent_of_dict_order() -> None:
    web = qube("web", "sys-firewall", WEB_IP, [ext("443", "8443"), internal("80", "80")])
    work = qube("work", "sys-firewall", WORK_IP, [ext("443", "443")])  # conflicts with web
    mail = qube("mail", "sys-vpn", MAIL_IP, [ext("25", "25", "udp")])
    snap = snapshot(web, work, mail)
    reordered = Snapshot(dict(reversed(list(snap.qubes.items()))), NOW)
    first = plan(snap)
    assert first == plan(snap)
    assert first == plan(reordered)
    assert first.skipped == ("work forward rule 0: port conflict with 'web'",)


def test_plan_writes_nothing_into_a_hop_without_support_after_a_netvm_change() -> None:
    # check_rules accepted web's rule behind sys-firewall; web then moved
    # behind sys-old, whose template has no agent.
    old = qube("sys-old", "sys-net", "10.137.0.4", features={}, provides_network=True)
    web = qube("web", "sys-old", WEB_IP, [ext("443", "8443")])
    result = plan(snapshot(old, web))
    assert "sys-old" not in result.entries
    assert "sys-net" not in result.entries
    assert "web" not in result.entries
    assert len(result.skipped) == 1
    assert "'sys-old'" in result.skipped[0]


# --- plan(): conflicts created after Set ----------------------------------------


def test_plan_conflict_first_qube_by_name_wins() -> None:
    # Accepted separately (each behind its own edge), then "zeta" moved behind
    # sys-firewall: both now need tcp/443 at sys-net.
    alpha = qube("alpha", "sys-firewall", WEB_IP, [ext("443", "8443")])
    zeta = qube("zeta", "sys-vpn", WORK_IP, [ext("440-450", "440-450")])
    result = plan(snapshot(zeta, alpha))
    assert result.skipped == ("zeta forward rule 0: port conflict with 'alpha'",)
    assert set(result.entries["sys-net"]) == {fwd(WEB_IP)}
    assert "zeta" not in result.entries
    assert "sys-vpn" not in result.entries


def test_plan_conflict_skips_only_the_conflicting_rule() -> None:
    alpha = qube("alpha", "sys-firewall", WEB_IP, [ext("443", "443")])
    zeta = qube("zeta", "sys-firewall", WORK_IP, [ext("443", "443"), ext("80", "80")])
    result = plan(snapshot(alpha, zeta))
    assert result.skipped == ("zeta forward rule 0: port conflict with 'alpha'",)
    assert result.entries["sys-net"][fwd(WORK_IP)] == {
        "0000": step("80-80", "upstream", "local", FW_IP, "80-80"),
    }
    assert result.entries["zeta"] == {
        INPUT_DIR: {"0000": "action=accept proto=tcp dstports=80-80"},
    }


def test_plan_conflict_with_a_stopped_qube_does_not_count() -> None:
    alpha = qube("alpha", "sys-firewall", WEB_IP, [ext("443", "443")], running=False)
    zeta = qube("zeta", "sys-firewall", WORK_IP, [ext("443", "443")])
    result = plan(snapshot(alpha, zeta))
    assert result.skipped == ()
    assert set(result.entries["sys-net"]) == {fwd(WORK_IP)}


def test_plan_same_port_different_proto_both_written() -> None:
    alpha = qube("alpha", "sys-firewall", WEB_IP, [ext("53", "53", "tcp")])
    zeta = qube("zeta", "sys-firewall", WORK_IP, [ext("53", "53", "udp")])
    result = plan(snapshot(alpha, zeta))
    assert result.skipped == ()
    assert set(result.entries["sys-net"]) == {fwd(WEB_IP), fwd(WORK_IP)}


# --- check_rules ---------------------------------------------------------------


def test_check_rules_accepts_a_valid_forward() -> None:
    snap = snapshot(qube("web", "sys-firewall", WEB_IP))
    check_rules(snap, "web", rules(ext("443", "8443"), internal("80", "80")))


def test_check_rules_ignores_non_forward_rules_even_without_netvm() -> None:
    snap = snapshot(qube("web", None, None))
    check_rules(snap, "web", rules("action=accept proto=tcp dstports=443"))


def test_check_rules_no_netvm() -> None:
    snap = snapshot(qube("web", None, None))
    with pytest.raises(NoNetVMError, match=r"'web' has no netvm"):
        check_rules(snap, "web", rules(ext("443", "443")))


def test_check_rules_missing_netvm() -> None:
    snap = snapshot(qube("web", "sys-gone", WEB_IP))
    with pytest.raises(NoNetVMError, match=r"'web' has netvm 'sys-gone', which does not exist"):
        check_rules(snap, "web", rules(ext("443", "443")))


def test_check_rules_netvm_loop() -> None:
    loop_a = qube("loop-a", "loop-b", "10.137.0.20", provides_network=True)
    loop_b = qube("loop-b", "loop-a", "10.137.0.21", provides_network=True)
    snap = snapshot(loop_a, loop_b, qube("web", "loop-a", WEB_IP))
    with pytest.raises(NoNetVMError, match=r"netvm loop through 'loop-a'"):
        check_rules(snap, "web", rules(ext("443", "443")))
    with pytest.raises(NoNetVMError):
        netvm_chain(snap, snap.qubes["web"])


def test_check_rules_hop_without_support_feature_names_the_hop() -> None:
    fw = qube("sys-firewall", "sys-net", FW_IP, features={}, provides_network=True)
    snap = snapshot(qube("web", "sys-firewall", WEB_IP), **{"sys-firewall": fw})
    with pytest.raises(UnsupportedHopError) as caught:
        check_rules(snap, "web", rules(ext("443", "443")))
    message = str(caught.value)
    assert "'sys-firewall'" in message
    assert "'sys-net'" not in message
    assert SUPPORT_FEATURE in message
    assert "\n" not in message


def test_check_rules_support_feature_zero_is_not_support() -> None:
    net = qube("sys-net", None, NET_IP, features={SUPPORT_FEATURE: "0"}, provides_network=True)
    snap = snapshot(qube("web", "sys-firewall", WEB_IP), **{"sys-net": net})
    with pytest.raises(UnsupportedHopError, match=r"'sys-net'"):
        check_rules(snap, "web", rules(ext("443", "443")))


def test_check_rules_internal_forward_needs_only_the_netvm() -> None:
    net = qube("sys-net", None, NET_IP, features={}, provides_network=True)
    snap = snapshot(qube("web", "sys-firewall", WEB_IP), **{"sys-net": net})
    check_rules(snap, "web", rules(internal("80", "80")))
    with pytest.raises(UnsupportedHopError, match=r"'sys-net'"):
        check_rules(snap, "web", rules(ext("80", "80")))


def test_check_rules_target_without_support_is_named() -> None:
    snap = snapshot(qube("web", "sys-firewall", WEB_IP, features={}))
    with pytest.raises(UnsupportedHopError, match=r"'web'"):
        check_rules(snap, "web", rules(ext("443", "443")))


def test_check_rules_port_conflict_names_both_qubes_and_rule_numbers() -> None:
    work = qube(
        "work",
        "sys-firewall",
        WORK_IP,
        ["action=accept proto=tcp dstports=22", ext("443", "443")],
    )
    snap = snapshot(work, qube("web", "sys-vpn", WEB_IP))
    proposed = rules("action=accept proto=icmp", "action=accept proto=udp", ext("443", "8443"))
    with pytest.raises(PortConflictError) as caught:
        check_rules(snap, "web", proposed)
    message = str(caught.value)
    assert "'work' (forward rule 0)" in message
    assert "'web' (forward rule 0)" in message
    assert "tcp port 443" in message


def test_check_rules_conflict_with_a_stopped_qube_is_still_refused() -> None:
    work = qube("work", "sys-firewall", WORK_IP, [ext("443", "443")], running=False)
    snap = snapshot(work, qube("web", "sys-firewall", WEB_IP))
    with pytest.raises(PortConflictError, match=r"'work'"):
        check_rules(snap, "web", rules(ext("443", "443")))


def test_check_rules_overlapping_ranges_conflict() -> None:
    work = qube("work", "sys-firewall", WORK_IP, [ext("8000-8010", "8000-8010")])
    snap = snapshot(work, qube("web", "sys-firewall", WEB_IP))
    with pytest.raises(PortConflictError, match=r"'work'.*'web'"):
        check_rules(snap, "web", rules(ext("8010-8020", "9010-9020")))
    check_rules(snap, "web", rules(ext("8011-8020", "9011-9020")))


def test_check_rules_conflict_between_two_rules_of_the_same_qube() -> None:
    snap = snapshot(qube("web", "sys-firewall", WEB_IP))
    with pytest.raises(
        PortConflictError, match=r"'web' \(forward rule 0\) and 'web' \(forward rule 1\)"
    ):
        check_rules(snap, "web", rules(ext("443", "443"), ext("443", "8443")))


def test_check_rules_same_port_different_proto_is_fine() -> None:
    work = qube("work", "sys-firewall", WORK_IP, [ext("53", "53", "udp")])
    snap = snapshot(work, qube("web", "sys-firewall", WEB_IP))
    check_rules(snap, "web", rules(ext("53", "53", "tcp")))


def test_check_rules_internal_and_external_on_different_hops_are_fine() -> None:
    # web's internal forward claims only sys-vpn; work's external one claims
    # sys-firewall and sys-net.
    work = qube("work", "sys-firewall", WORK_IP, [ext("80", "80")])
    snap = snapshot(work, qube("web", "sys-vpn", WEB_IP))
    check_rules(snap, "web", rules(internal("80", "80")))
    # Internal forwards of siblings on different netvms do not meet either.
    mail = qube("mail", "sys-net", MAIL_IP, [internal("80", "80")])
    check_rules(snapshot(mail, qube("web", "sys-vpn", WEB_IP)), "web", rules(internal("80", "80")))


def test_check_rules_replaces_the_qubes_own_old_rules() -> None:
    """The qube's current rules do not conflict with their replacement."""
    snap = snapshot(qube("web", "sys-firewall", WEB_IP, [ext("443", "443")]))
    check_rules(snap, "web", rules(ext("443", "8443")))


def test_check_rules_ignores_expired_rules_on_either_side() -> None:
    expired = f"expire={int(NOW) - 1}"
    work = qube("work", "sys-firewall", WORK_IP, [ext("443", "443", extra=expired)])
    snap = snapshot(work, qube("web", "sys-firewall", WEB_IP))
    check_rules(snap, "web", rules(ext("443", "443")))
    check_rules(snapshot(qube("web", None, None)), "web", rules(ext("443", "443", extra=expired)))


def test_check_rules_other_qube_with_broken_path_does_not_block() -> None:
    broken = qube("broken", "sys-gone", "10.137.0.30", [ext("443", "443")])
    snap = snapshot(broken, qube("web", "sys-firewall", WEB_IP))
    check_rules(snap, "web", rules(ext("443", "443")))


def test_plan_errors_are_plan_error_subclasses() -> None:
    for error in (NoNetVMError, UnsupportedHopError, PortConflictError):
        assert issubclass(error, PlanError)


# --- next_expiry, describe ------------------------------------------------------


def test_next_expiry_is_the_earliest_unexpired_rule_of_any_kind() -> None:
    web = qube(
        "web",
        "sys-firewall",
        WEB_IP,
        [
            ext("443", "443", extra=f"expire={int(NOW) + 300}"),
            ext("80", "80", extra=f"expire={int(NOW) - 10}"),  # already expired
        ],
    )
    work = qube(
        "work",
        "sys-firewall",
        WORK_IP,
        [f"action=accept proto=tcp dstports=22 expire={int(NOW) + 120}"],
    )
    assert next_expiry(snapshot(web, work)) == NOW + 120
    assert next_expiry(snapshot(web)) == NOW + 300


def test_next_expiry_none_without_expiring_rules() -> None:
    web = qube("web", "sys-firewall", WEB_IP, [ext("443", "443")])
    assert next_expiry(snapshot(web)) is None
    expired = qube("web", "sys-firewall", WEB_IP, [ext("1", "1", extra=f"expire={int(NOW) - 1}")])
    assert next_expiry(snapshot(expired)) is None


def test_describe_forwards_text() -> None:
    web = qube(
        "web",
        "sys-firewall",
        WEB_IP,
        [
            "action=accept proto=tcp dstports=443",
            ext("443", "8443"),
            internal("8000-8009", "9000-9009", "udp"),
            ext("25", "25", extra=f"expire={int(NOW) - 1}"),
        ],
    )
    assert describe_forwards(snapshot(web), "web", no_reports) == {  # numbered in the forward list
        0: (
            f"sys-net uplink addresses tcp/443 -> sys-firewall ({FW_IP}) tcp/443"
            f" -> web ({WEB_IP}) tcp/8443"
        ),
        1: f"sys-firewall ({FW_IP}) from its qubes udp/8000-8009 -> web ({WEB_IP}) udp/9000-9009",
    }


def test_describe_forwards_three_hops_and_unreachable() -> None:
    web = qube("web", "sys-vpn", WEB_IP, [ext("443", "8443")])
    assert describe_forwards(snapshot(web), "web", no_reports) == {
        0: (
            f"sys-net uplink addresses tcp/443 -> sys-firewall ({FW_IP}) tcp/443"
            f" -> sys-vpn ({VPN_IP}) tcp/443 -> web ({WEB_IP}) tcp/8443"
        ),
    }
    orphan = qube("web", None, None, [ext("443", "8443")])
    assert describe_forwards(snapshot(orphan), "web", no_reports) == {
        0: "not reachable: 'web' has no netvm: nothing can forward to it",
    }


def test_describe_marks_the_steps_hops_refused() -> None:
    web = qube("web", "sys-firewall", WEB_IP, [ext("22", "22"), ext("8080", "80"), ext("25", "25")])
    reports = {
        ("sys-net", f"{REFUSED_DIR}/{WEB_IP}"): b"tcp 22-22: this qube listens on it\n"
                                               b"tcp 23-23: this qube listens on it",  # stale
        ("sys-firewall", f"{REFUSED_DIR}/{WEB_IP}"): b"tcp 8080-8080: its user opened it in"
                                                    b" custom-input",
    }
    described = describe_forwards(snapshot(web), "web", lambda hop, path: reports.get((hop, path)))
    assert described[0] == (
        f"sys-net uplink addresses tcp/22 -> sys-firewall ({FW_IP}) tcp/22 -> web ({WEB_IP})"
        " tcp/22; REFUSED by sys-net: tcp/22 is its own (it listens on it)"
    )
    assert described[1].endswith(
        "tcp/80; REFUSED by sys-firewall: tcp/8080 is its own (its user opened it in custom-input)"
    )
    assert "REFUSED" not in described[2]
    reports[("sys-net", f"{REFUSED_DIR}/{WEB_IP}")] = b"tcp 22-22: \x1b[31mowned"
    described = describe_forwards(snapshot(web), "web", lambda hop, path: reports.get((hop, path)))
    assert described[2].endswith("; sys-net may have refused it: its report is unreadable")


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        (b"tcp 22-22: this qube listens on it", {("tcp", (22, 22)): "it listens on it"}),
        (b"udp 5300-5301: its user opened it in custom-input\ntcp 1-1: this qube listens on it",
         {("udp", (5300, 5301)): "its user opened it in custom-input",
          ("tcp", (1, 1)): "it listens on it"}),
        (b"tcp 22-22: this qube listens on it\n", None),  # an empty line
        (b"tcp 22-22: this qube listens on it really", None),  # no reason of ours
        (b"tcp 22-22: this qube listens on it\x1b[2J", None),
        (b"icmp 8-8: this qube listens on it", None),
        (b"tcp 22-22:  this qube listens on it", None),
        (b"tcp 022-22: this qube listens on it", None),
        (b"tcp 22-22: this qube listens on it ", None),
        (b"tcp 22-22: th\xc3\xafs qube listens on it", None),
        (b"tcp 22: this qube listens on it", None),
    ],
)
def test_refused_steps_takes_only_the_documented_lines(
    value: bytes, refused: dict[tuple[str, tuple[int, int]], str] | None
) -> None:
    found = refused_steps(value)
    if refused is None:
        assert found is None
    else:
        assert found == {(proto, PortRange(*ports)): why for (proto, ports), why in refused.items()}


def test_forward_path_hops_run_from_the_netvm_outwards() -> None:
    web = qube("web", "sys-vpn", WEB_IP, [ext("443", "8443")])
    snap = snapshot(web)
    path = forward_path(snap, web, 0, web.rules.forward[0], source=None)
    assert path.hops == ["sys-vpn", "sys-firewall", "sys-net"]
    assert [step.to_qube for step in path.steps] == ["web", "sys-vpn", "sys-firewall"]


# --- properties -------------------------------------------------------------------

IP_BASE = int(ipaddress.IPv4Address("10.137.0.1"))


@st.composite
def forward_lines(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["external", "internal"]))
    proto = draw(st.sampled_from(["tcp", "udp"]))
    first = draw(st.integers(1, 30))
    size = draw(st.integers(0, 4))
    dst_first = draw(st.integers(1, 60000))
    words = [
        f"action=forward forwardtype={kind} proto={proto}",
        f"srcports={first}-{first + size}",
        f"dstports={dst_first}-{dst_first + size}",
    ]
    if draw(st.booleans()):
        words.append(draw(st.sampled_from(["srchost=192.0.2.0/24", "srchost=10.137.0.99"])))
    expire = draw(st.sampled_from([None, -5, 0, 5]))
    if expire is not None:
        words.append(f"expire={int(NOW) + expire}")
    return " ".join(words)


@st.composite
def topologies(draw: st.DrawFn) -> Snapshot:
    """1-2 edges, 0-3 ProxyVMs (chains up to 3 deep), 1-5 targets with forwards."""
    states: list[QubeState] = []
    network: list[str] = []
    ip_index = 0

    def next_ip() -> str:
        nonlocal ip_index
        ip_index += 1
        return str(ipaddress.IPv4Address(IP_BASE + ip_index))

    for n in range(draw(st.integers(1, 2))):
        name = f"net{n}"
        states.append(
            qube(name, None, next_ip(), running=draw(st.booleans()), provides_network=True)
        )
        network.append(name)
    for n in range(draw(st.integers(0, 3))):
        name = f"proxy{n}"
        parent = draw(st.sampled_from(network))
        lines = draw(st.lists(forward_lines(), max_size=2))
        states.append(
            qube(
                name,
                parent,
                next_ip(),
                lines,
                running=draw(st.booleans()),
                provides_network=True,
            )
        )
        network.append(name)
    for n in range(draw(st.integers(1, 5))):
        name = f"app{n}"
        parent = draw(st.sampled_from(network))
        lines = draw(st.lists(forward_lines(), max_size=4))
        states.append(qube(name, parent, next_ip(), lines, running=draw(st.booleans())))
    order = draw(st.permutations(states))
    return Snapshot({state.name: state for state in order}, NOW)


def parse(value: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in value.split(" "))


def chain_of(snap: Snapshot, name: str) -> list[QubeState]:
    return netvm_chain(snap, snap.qubes[name])


@settings(max_examples=300, deadline=None)
@given(topologies())
def test_property_plan_is_consistent_with_the_topology(snap: Snapshot) -> None:
    result = plan(snap)
    by_ip = {str(q.ip): q for q in snap.qubes.values() if q.ip is not None}
    claims: list[tuple[str, str, int, int, str]] = []
    accepted: dict[str, int] = {}
    for hop, directories in result.entries.items():
        for directory, keys in directories.items():
            if directory == INPUT_DIR:
                continue
            assert directory.startswith(FORWARD_DIR + "/")
            target = by_ip[directory.removeprefix(FORWARD_DIR + "/")]
            assert target.running
            chain = chain_of(snap, target.name)
            assert all(h.running for h in chain)
            names = [h.name for h in chain]
            assert hop in names
            position = names.index(hop)
            assert snap.qubes[hop].running
            previous = target if position == 0 else chain[position - 1]
            if hop == chain[0].name:
                accepted[target.name] = accepted.get(target.name, 0) + len(keys)
            assert sorted(keys) == [f"{n:04}" for n in range(len(keys))]
            for value in keys.values():
                words = parse(value)
                assert words["to"] == str(previous.ip)
                if words["iif"] == "downstream":
                    assert position == 0
                    assert words["daddr"] == str(snap.qubes[hop].ip)
                elif position == len(chain) - 1:
                    assert words["daddr"] == "local"
                else:
                    assert words["daddr"] == str(snap.qubes[hop].ip)
                if position > 0:
                    assert words["toports"] == words["ports"]
                first, last = (int(p) for p in words["ports"].split("-"))
                claims.append((hop, words["proto"], first, last, target.name))
    # No two accepted steps claim overlapping ports on the same hop and proto.
    for i, (hop, proto, first, last, _) in enumerate(claims):
        for other_hop, other_proto, other_first, other_last, _ in claims[i + 1 :]:
            if hop == other_hop and proto == other_proto:
                assert last < other_first or other_last < first, claims
    # Every accepted rule opens the target's input; only running targets get any.
    for name, directories in result.entries.items():
        if INPUT_DIR in directories:
            assert snap.qubes[name].running
            assert len(directories[INPUT_DIR]) == accepted.get(name, 0)
    for name, count in accepted.items():
        assert len(result.entries[name][INPUT_DIR]) == count
    # Deterministic, whatever the dict order.
    assert plan(snap) == result
    assert plan(Snapshot(dict(reversed(list(snap.qubes.items()))), NOW)) == result


def _model(snap: Snapshot) -> tuple[set[tuple[str, int]], int]:
    """Greedy reference: qubes by name, rules in order, first claim wins."""
    taken: list[tuple[str, str, int, int]] = []
    accepted: set[tuple[str, int]] = set()
    refused = 0
    for target in sorted(snap.qubes.values(), key=lambda q: q.name):
        if not target.running:
            continue
        chain = chain_of(snap, target.name)
        if not chain or not all(h.running for h in chain):
            continue
        for number, rule in enumerate(target.rules.forward):
            if rule.is_expired(snap.now):
                continue
            assert rule.srcports is not None
            first, last = rule.srcports.first, rule.srcports.last
            hops = [chain[0]] if str(rule.forwardtype) == "internal" else chain
            wanted = [(h.name, str(rule.proto), first, last) for h in hops]
            if any(
                h == th and p == tp and f <= tl and tf <= la
                for h, p, f, la in wanted
                for th, tp, tf, tl in taken
            ):
                refused += 1
                continue
            taken += wanted
            accepted.add((target.name, number))
    return accepted, refused


@settings(max_examples=300, deadline=None)
@given(topologies())
def test_property_plan_accepts_what_a_greedy_reference_accepts(snap: Snapshot) -> None:
    result = plan(snap)
    accepted, refused = _model(snap)
    assert len(result.skipped) == refused
    per_target: dict[str, int] = {}
    for name, _number in accepted:
        per_target[name] = per_target.get(name, 0) + 1
    assert {
        name: len(directories[INPUT_DIR])
        for name, directories in result.entries.items()
        if INPUT_DIR in directories
    } == per_target


@settings(max_examples=200, deadline=None)
@given(topologies(), st.data())
def test_property_check_rules_accepted_sets_never_conflict_in_plan(
    snap: Snapshot, data: st.DataObject
) -> None:
    """Rules that pass check_rules one qube at a time never get skipped by plan()."""
    qubes = {name: q for name, q in snap.qubes.items()}
    accepted_snap = Snapshot({name: _without_rules(q) for name, q in qubes.items()}, NOW)
    for name in data.draw(st.permutations(sorted(qubes))):
        try:
            check_rules(accepted_snap, name, qubes[name].rules)
        except PlanError:
            continue
        accepted_snap = accepted_snap.with_rules(name, qubes[name].rules)
    assert plan(accepted_snap).skipped == ()


def _without_rules(state: QubeState) -> QubeState:
    return QubeState(
        state.name,
        state.netvm,
        state.ip,
        state.provides_network,
        state.running,
        state.features,
        RuleLists(),
    )


def test_expiry_boundary_rule_expiring_now_is_still_active() -> None:
    """As upstream: a rule expires once ``expire < now``; next_expiry still names it."""
    web = qube("web", "sys-net", WEB_IP, [ext("443", "443", extra=f"expire={int(NOW)}")])
    assert fwd(WEB_IP) in plan(snapshot(web)).entries["sys-net"]
    assert next_expiry(snapshot(web)) == NOW
    assert plan(snapshot(web, now=NOW + 1)) == Plan({}, ())
    assert next_expiry(snapshot(web, now=NOW + 1)) is None
