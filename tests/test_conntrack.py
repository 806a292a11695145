"""The conntrack cut, pure: the tool's lines parsed, and which flows each kind of rule admits.

The lab tests (tests/test_lab_cutoff.py) prove the cut with real flows;
these pin the decisions: exact tuples for deletion, a step's DNAT, first
match for openings, upstream's verdict for outbound rules.
"""

from __future__ import annotations

import ipaddress

import pytest

from agent_worker import conntrack, forward_steps, input_rules, outbound_flows
from agent_worker.qdb_parse import Blocked, parse_source
from agent_worker.ruleset import Resolved

# Lines as conntrack v1.4.7 prints them (-L -f ipv4 / ipv6).
TCP = ("tcp      6 431999 ESTABLISHED src=192.0.2.10 dst=192.0.2.2 sport=40000 dport=8080 "
       "src=10.137.0.6 dst=192.0.2.10 sport=80 dport=40000 [ASSURED] mark=0 use=1")
UDP = ("udp      17 29 src=10.137.0.21 dst=10.137.0.20 sport=33907 dport=53 [UNREPLIED] "
       "src=10.137.0.20 dst=10.137.0.21 sport=53 dport=33907 mark=0 use=1")
ICMP6 = ("icmpv6   58 29 src=fd09:24ef:4179::a89:15 dst=fd09:24ef:4179::a89:14 type=128 code=0 "
         "id=7 src=fd09:24ef:4179::a89:14 dst=fd09:24ef:4179::a89:15 type=129 code=0 id=7 "
         "mark=0 use=1")


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_lines_parse_into_original_and_translated_tuples() -> None:
    flow = conntrack.parse_line(TCP, 4)
    assert flow == conntrack.Flow(4, "tcp", ip("192.0.2.10"), ip("192.0.2.2"), 40000, 8080,
                                  ip("10.137.0.6"), 80)
    icmp = conntrack.parse_line(ICMP6, 6)
    assert icmp is not None and icmp.proto == "icmp" and icmp.icmp == (128, 0, 7)
    assert conntrack.parse_line(TCP, 6) is None  # other family
    for junk in ("", "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been shown.",
                 "tcp 6 1 src=1.2.3.4", TCP.replace("sport=40000", "sport=70000")):
        assert conntrack.parse_line(junk, 4) is None


def test_deletion_names_the_exact_original_tuple() -> None:
    flow = conntrack.parse_line(TCP, 4)
    assert flow is not None
    assert conntrack.delete_args(flow) == [
        "-D", "-f", "ipv4", "-p", "tcp", "--orig-src", "192.0.2.10", "--orig-dst", "192.0.2.2",
        "--sport", "40000", "--dport", "8080",
    ]
    icmp = conntrack.parse_line(ICMP6, 6)
    assert icmp is not None
    assert conntrack.delete_args(icmp)[4:5] == ["icmpv6"]
    assert conntrack.delete_args(icmp)[-6:] == [
        "--icmpv6-type", "128", "--icmpv6-code", "0", "--icmpv6-id", "7"
    ]


def test_end_runs_one_deletion_per_flow() -> None:
    calls: list[list[str]] = []
    flows = [f for f in (conntrack.parse_line(TCP, 4), conntrack.parse_line(UDP, 4)) if f]
    assert conntrack.end(flows, "test", lambda args: calls.append(args) or "") == 2
    assert [call[:1] for call in calls] == [["-D"], ["-D"]]


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
    flow = conntrack.parse_line(TCP, 4)
    assert flow is not None
    (parsed,) = forward_steps.parse_target({"0000": step.encode()})
    assert forward_steps.step_admits(parsed, flow) is admitted


def test_openings_decide_by_first_match() -> None:
    flow = conntrack.parse_line(UDP, 4)
    assert flow is not None

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
    flow = conntrack.parse_line(TCP, 4)  # to 10.137.0.6:80 once translated
    assert flow is not None

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
