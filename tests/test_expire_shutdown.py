"""``expire=shutdown``: the rule language and the planner's check.

dom0's deletion of such rules when the qube stops is proven in the lab
(tests/test_lab_expire_shutdown.py).
"""

from __future__ import annotations

import pytest
from test_planner import NOW, ext, qube, rules, snapshot

from core_admin_patch.planner import NotRunningError, check_rules, next_expiry
from firewall_rules import Rule, RuleError, RuleKind


@pytest.mark.parametrize(("line", "kind"), [
    ("action=forward forwardtype=external proto=tcp srcports=80 dstports=80 expire=shutdown",
     RuleKind.FORWARD),
    ("action=accept srcqube=work proto=tcp dstports=22 expire=shutdown", RuleKind.INBOUND),
])
def test_forward_and_inbound_rules_take_expire_shutdown(line: str, kind: RuleKind) -> None:
    rule = Rule.from_api_string(line)
    assert rule.kind is kind
    assert rule.expires_at_shutdown
    assert "expire=shutdown" in rule.api_rule
    assert ("expire", "shutdown") in rule.properties()
    assert Rule.from_api_string(rule.api_rule) == rule
    # never expired by the clock
    assert not rule.is_expired(NOW) and not rule.is_expired(2**40)


def test_an_epoch_expiry_is_not_at_shutdown() -> None:
    rule = Rule.from_api_string("action=accept srcqube=work expire=1800000000")
    assert not rule.expires_at_shutdown
    assert Rule.from_api_string("action=accept srcqube=work").expires_at_shutdown is False


@pytest.mark.parametrize("line", [
    "action=accept expire=shutdown",
    "action=drop dsthost=10.0.0.0/8 expire=shutdown",
])
def test_outbound_rules_refuse_expire_shutdown(line: str) -> None:
    with pytest.raises(RuleError, match="expire=shutdown is for forward and inbound rules only"):
        Rule.from_api_string(line)


@pytest.mark.parametrize("value", ["Shutdown", "shutdown ", "stop", "+shutdown", ""])
def test_near_misses_are_refused(value: str) -> None:
    with pytest.raises(RuleError, match="seconds since the epoch or shutdown"):
        Rule.from_options([("action", "accept"), ("srcqube", "work"), ("expire", value)])


SHUTDOWN_FORWARD = ext("8080", "80", extra="expire=shutdown")


def test_check_rules_refuses_expire_shutdown_for_a_stopped_qube() -> None:
    snap = snapshot(qube("web", "sys-firewall", "10.137.0.10", running=False))
    with pytest.raises(NotRunningError, match="'web' is not running"):
        check_rules(snap, "web", rules(SHUTDOWN_FORWARD))
    check_rules(snap, "web", rules(ext("8080", "80")))  # other rules still fine


def test_check_rules_takes_expire_shutdown_for_a_running_qube() -> None:
    # the inbound rule's source: a qube, not a netvm (a netvm is never a srcqube)
    snap = snapshot(qube("web", "sys-firewall", "10.137.0.10"),
                    qube("work", "sys-firewall", "10.137.0.11"))
    check_rules(snap, "web", rules(SHUTDOWN_FORWARD, "action=accept srcqube=work "
                                   "expire=shutdown"))


def test_next_expiry_has_no_time_for_expire_shutdown() -> None:
    snap = snapshot(qube("web", "sys-firewall", "10.137.0.10",
                         [SHUTDOWN_FORWARD, ext("9090", "90", extra=f"expire={int(NOW) + 60}")]))
    assert next_expiry(snap) == int(NOW) + 60
    snap = snapshot(qube("web", "sys-firewall", "10.137.0.10", [SHUTDOWN_FORWARD]))
    assert next_expiry(snap) is None
