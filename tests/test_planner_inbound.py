"""The planner's inbound part: rules admitting sibling qubes, pure.

Entries are pinned as the exact strings the agents parse (doc/qubesdb.md):
``/qns-inbound/<target ip>/NNNN`` in the target's netvm, keyed by the
rule's position in the target's list, and the same rules after the
forward openings in the target's own ``/qns-input``.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_planner import NOW, qube
from test_planner import rules as rule_lists

from agent_worker import inbound, input_rules
from core_admin_patch.planner import (
    INBOUND_DIR,
    INPUT_DIR,
    SUPPORT_FEATURE,
    NoNetVMError,
    QubeState,
    Snapshot,
    UnsupportedHopError,
    check_rules,
    next_expiry,
    plan,
)

WEB_IP, WORK_IP = "10.137.0.20", "10.137.0.21"
SSH_FROM_WORK = "action=accept srchost=10.137.0.21 proto=tcp dstports=22"


def snapshot(*qubes: QubeState, now: float = NOW) -> Snapshot:
    base = {
        "sys-net": qube("sys-net", None, "10.137.0.5", provides_network=True),
        "sys-firewall": qube("sys-firewall", "sys-net", "10.137.0.6", provides_network=True),
        "work": qube("work", "sys-firewall", WORK_IP),
    }
    base.update({q.name: q for q in qubes})
    return Snapshot(base, now)


def web(*lines: str, **kwargs: object) -> QubeState:
    return qube("web", "sys-firewall", WEB_IP, lines, **kwargs)  # type: ignore[arg-type]


def test_one_rule_goes_to_the_netvm_and_the_target() -> None:
    result = plan(snapshot(web("action=accept", SSH_FROM_WORK)))
    value = "action=accept srchost=10.137.0.21/32 proto=tcp dstports=22-22"
    assert result.entries == {
        "sys-firewall": {f"{INBOUND_DIR}/{WEB_IP}": {"0000": value}},
        "web": {INPUT_DIR: {"0000": value}},
    }
    assert result.skipped == ()


def test_order_is_kept_and_keys_are_positions_in_the_inbound_list() -> None:
    result = plan(
        snapshot(
            web(
                "action=drop srchost=10.137.0.21/32 proto=tcp dstports=23",
                "action=accept proto=tcp dstports=443",  # outbound: not here
                "action=accept srchost=10.137.0.16/28",
                "action=accept srchost=10.137.0.0/24 proto=icmp icmptype=8",
                "action=accept srchost=2001:db8::/64",  # other family: not planned yet
                "action=drop srchost=10.137.0.22 proto=udp dstports=1000-2000",
            )
        )
    )
    values = [
        "action=drop srchost=10.137.0.21/32 proto=tcp dstports=23-23",
        "action=accept srchost=10.137.0.16/28",
        "action=accept srchost=10.137.0.0/24 proto=icmp icmptype=8",
        "action=drop srchost=10.137.0.22/32 proto=udp dstports=1000-2000",
    ]
    assert result.entries["sys-firewall"] == {
        f"{INBOUND_DIR}/{WEB_IP}": dict(zip(["0000", "0001", "0002", "0004"], values, strict=True))
    }
    assert result.entries["web"] == {
        INPUT_DIR: {f"{n:04}": v for n, v in enumerate(values)}
    }


def test_forward_openings_come_first_in_the_input() -> None:
    forward = "action=forward forwardtype=external proto=tcp srcports=8080 dstports=80"
    result = plan(snapshot(web(SSH_FROM_WORK, forward)))
    assert result.entries["web"][INPUT_DIR] == {
        "0000": "action=accept proto=tcp dstports=80-80",
        "0001": "action=accept srchost=10.137.0.21/32 proto=tcp dstports=22-22",
    }
    assert result.entries["sys-firewall"][f"{INBOUND_DIR}/{WEB_IP}"] == {
        "0000": "action=accept srchost=10.137.0.21/32 proto=tcp dstports=22-22"
    }


def test_expired_rules_and_expiry_timer() -> None:
    soon, gone = int(NOW) + 60, int(NOW) - 1
    state = web(f"{SSH_FROM_WORK} expire={gone}", f"{SSH_FROM_WORK} expire={soon}")
    result = plan(snapshot(state))
    assert list(result.entries["sys-firewall"][f"{INBOUND_DIR}/{WEB_IP}"]) == ["0001"]
    assert next_expiry(snapshot(state)) == soon
    assert plan(snapshot(state, now=soon + 1)).entries == {}


@pytest.mark.parametrize(
    "state",
    [
        web(SSH_FROM_WORK, running=False),
        qube("web", None, WEB_IP, [SSH_FROM_WORK]),
        qube("web", "sys-firewall", None, [SSH_FROM_WORK]),
        qube("web", "missing", WEB_IP, [SSH_FROM_WORK]),
    ],
    ids=["halted", "no-netvm", "no-ip", "dangling-netvm"],
)
def test_nothing_while_the_rules_cannot_apply(state: QubeState) -> None:
    assert plan(snapshot(state)).entries == {}


def test_nothing_while_the_netvm_is_halted() -> None:
    halted = qube("sys-firewall", "sys-net", "10.137.0.6", provides_network=True, running=False)
    assert plan(snapshot(web(SSH_FROM_WORK), halted)).entries == {}


def test_a_netvm_without_our_agent_gets_nothing_and_it_is_reported() -> None:
    bare = qube("sys-firewall", "sys-net", "10.137.0.6", provides_network=True, features={})
    result = plan(snapshot(web(SSH_FROM_WORK), bare))
    assert result.entries == {}
    assert result.skipped == (
        f"web inbound rules: 'sys-firewall' does not advertise {SUPPORT_FEATURE}",
    )


def test_the_address_is_the_one_in_force() -> None:
    moved = qube("web", "sys-firewall", "10.137.0.30", [SSH_FROM_WORK])
    assert list(plan(snapshot(moved)).entries["sys-firewall"]) == [f"{INBOUND_DIR}/10.137.0.30"]


def test_check_refuses_a_netvm_without_support_naming_it() -> None:
    bare = qube("sys-firewall", "sys-net", "10.137.0.6", provides_network=True, features={})
    rules = rule_lists(SSH_FROM_WORK)
    with pytest.raises(UnsupportedHopError, match="'sys-firewall' on the path of 'web'"):
        check_rules(snapshot(web(), bare), "web", rules)
    # only the netvm matters, not the hops above it
    far = qube("sys-net", None, "10.137.0.5", provides_network=True, features={})
    check_rules(snapshot(web(), far), "web", rules)


def test_check_refuses_a_target_without_the_hook() -> None:
    rules = rule_lists(SSH_FROM_WORK)
    with pytest.raises(UnsupportedHopError, match="'web'"):
        check_rules(snapshot(web(features={})), "web", rules)


def test_check_accepts_without_netvm_and_refuses_a_dangling_one() -> None:
    rules = rule_lists(SSH_FROM_WORK)
    check_rules(snapshot(qube("web", None, WEB_IP, features={})), "web", rules)
    with pytest.raises(NoNetVMError, match="'missing'"):
        check_rules(snapshot(qube("web", "missing", WEB_IP)), "web", rules)


def test_check_ignores_expired_inbound_rules() -> None:
    rules = rule_lists(f"{SSH_FROM_WORK} expire={int(NOW) - 1}")
    check_rules(snapshot(web(features={})), "web", rules)


_INBOUND = st.builds(
    lambda action, net, extra: f"action={action} srchost={net}{extra}",
    st.sampled_from(["accept", "drop"]),
    st.sampled_from(["10.137.0.21", "10.137.0.16/28", "0.0.0.0/0", "192.0.2.0/24"]),
    st.sampled_from(
        ["", " proto=tcp", " proto=udp dstports=53", " proto=tcp dstports=1-65535",
         " proto=icmp", " proto=icmp icmptype=0", " comment=ssh from work"]
    ),
)


@given(st.lists(_INBOUND, max_size=12))
def test_every_planned_entry_parses_in_both_agents_in_order(lines: list[str]) -> None:
    result = plan(snapshot(web(*lines)))
    address = ipaddress.IPv4Address(WEB_IP)
    netvm = result.entries.get("sys-firewall", {}).get(f"{INBOUND_DIR}/{WEB_IP}", {})
    parsed = inbound.parse_target(address, {k: v.encode() for k, v in netvm.items()})
    target = result.entries.get("web", {}).get(INPUT_DIR, {})
    openings = input_rules.parse_openings({k: v.encode() for k, v in target.items()})
    assert parsed == openings
    assert len(parsed) == len(lines)
    assert [o.action for o in parsed] == [line.split()[0][len("action="):] for line in lines]
