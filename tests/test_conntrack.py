"""The conntrack cut, pure: listings filtered, and which flows each kind of rule admits.

The lab tests (tests/test_lab_cutoff.py) prove the cut with real flows;
these pin the decisions: a step's DNAT, first match for openings,
upstream's verdict for outbound rules (tests/test_conntrack_netlink.py:
the kernel's table itself).
"""

from __future__ import annotations

import ipaddress

import pytest

from agent_worker import conntrack, forward_steps, input_rules, outbound_flows
from agent_worker.qdb_parse import Blocked, parse_source
from agent_worker.ruleset import Resolved


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


#: A forwarded TCP flow: to 192.0.2.2:8080, translated to 10.137.0.6:80.
TCP = conntrack.Flow(4, "tcp", ip("192.0.2.10"), ip("192.0.2.2"), 40000, 8080,
                     ip("10.137.0.6"), 80)
#: A DNS query from one client to another.
UDP = conntrack.Flow(4, "udp", ip("10.137.0.21"), ip("10.137.0.20"), 33907, 53,
                     ip("10.137.0.20"), 53)


class Recording:
    """A conntrack table recording what is deleted."""

    def __init__(self) -> None:
        self.deleted: list[conntrack.Flow] = []

    def list(self, version: int, match: conntrack.Match) -> list[conntrack.Flow]:
        return [TCP, UDP]

    def delete(self, flow: conntrack.Flow) -> None:
        self.deleted.append(flow)


def test_a_listing_keeps_only_what_its_filters_name() -> None:
    """Whether or not the kernel filtered (before Linux 5.9 it sends the family whole)."""
    table = Recording()
    assert conntrack.list_flows(4, [], table) == [TCP, UDP]
    assert conntrack.list_flows(4, ["-p", "udp"], table) == [UDP]
    assert conntrack.list_flows(4, ["--reply-src", "10.137.0.6"], table) == [TCP]
    assert conntrack.list_flows(4, ["--orig-src", "10.137.0.21", "-p", "tcp"], table) == []


def test_end_deletes_each_flow() -> None:
    table = Recording()
    assert conntrack.end([TCP, UDP], "test", table) == 2
    assert table.deleted == [TCP, UDP]


STEP = "proto=tcp ports=8080-8080 iif=upstream daddr=local to=10.137.0.6 toports=80-80"


@pytest.mark.parametrize(
    ("step", "admitted"),
    [
        (STEP, True),
        (STEP + " srchost=192.0.2.0/24", True),
        (STEP + " srchost=192.0.2.11/32", False),  # another source
        (STEP.replace("toports=80-80", "toports=81-81"), False),  # translated elsewhere
        (STEP.replace("to=10.137.0.6", "to=10.137.0.7"), False),
        (STEP.replace("proto=tcp", "proto=udp"), False),
        (STEP.replace("daddr=local", "daddr=192.0.2.3"), False),
        ("proto=tcp ports=8050-8149 iif=upstream daddr=local to=10.137.0.6 toports=50-149",
         True),
    ],
)
def test_a_step_admits_the_flows_its_dnat_made(step: str, admitted: bool) -> None:
    flow = TCP
    (parsed,) = forward_steps.parse_target({"0000": step.encode()})
    assert forward_steps.step_admits(parsed, flow) is admitted


def test_openings_decide_by_first_match() -> None:
    flow = UDP

    def admits(*values: str) -> bool:
        openings = input_rules.parse_openings(
            {f"{n:04}": v.encode() for n, v in enumerate(values)}
        )
        return input_rules.admits(openings, flow)

    assert admits("action=accept srchost=10.137.0.21/32 proto=udp dstports=53-53")
    assert not admits("action=drop srchost=10.137.0.21/32", "action=accept srchost=10.0.0.0/8")
    assert admits("action=accept srchost=10.0.0.0/8", "action=drop srchost=10.137.0.21/32")
    assert not admits("action=accept srchost=10.137.0.21/32 proto=tcp")
    assert not admits("action=accept srchost=10.137.0.21/32 proto=udp dstports=54-60")
    assert not admits("action=accept srchost=fd09::/16")  # other family: never applies
    assert not admits()  # nothing matching: refused, as Qubes' default


def test_outbound_verdict_follows_the_rules_on_the_translated_destination() -> None:
    flow = TCP  # to 10.137.0.6:80 once translated

    def allows(policy: str, *rules: str) -> bool:
        entries = {"policy": policy.encode()}
        entries.update({f"{n:04}": r.encode() for n, r in enumerate(rules)})
        parsed = parse_source(entries, 4)
        assert not isinstance(parsed, Blocked)
        return outbound_flows.allows(Resolved(parsed, {}), flow, frozenset())

    assert allows("accept")
    assert not allows("drop")
    assert allows("drop", "action=accept proto=tcp dstports=80")
    assert not allows("drop", "action=accept proto=tcp dstports=8080")  # the original port
    assert allows("drop", "action=accept dst4=10.137.0.0/24")
    assert not allows("accept", "action=drop dst4=10.137.0.6/32", "action=accept")
    assert not allows("drop", "action=accept specialtarget=dns")  # no DNS server known
    assert not outbound_flows.allows(Blocked("bad"), flow, frozenset())
