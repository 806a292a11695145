"""The routing part of the plan, pure: ``routing-method forward`` to ``/qns-routing/`` entries.

Entries are pinned as the exact strings the agents parse (doc/qubesdb.md).
Topology: sys-net (edge) <- sys-firewall <- web, web at a LAN address.
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from test_applier import RecordingWriter
from test_planner import NOW, SUPPORT, qube

from core_admin_patch.applier import Applier
from core_admin_patch.planner import (
    INBOUND_DIR,
    INPUT_DIR,
    SUPPORT_FEATURE,
    QubeState,
    Snapshot,
)
from core_admin_patch.routing import (
    ROUTING_DIR,
    ROUTING_FEATURE,
    STATUS_DIR,
    describe_routing,
    plan,
    plan_routing,
    status_text,
)

WEB_IP = "192.0.2.25"
NET_IP, FW_IP = "10.137.0.5", "10.137.0.6"
ROUTED = {**SUPPORT, ROUTING_FEATURE: "forward"}
SSH_FROM_LAN = "action=accept srchost=192.0.2.0/24 proto=tcp dstports=22"
SSH_ENTRY = "action=accept srchost=192.0.2.0/24 proto=tcp dstports=22-22"
OUT = "action=accept dst4=192.0.2.10 proto=tcp dstports=80"


def web(*lines: str, netvm: str = "sys-firewall", **kwargs: object) -> QubeState:
    kwargs.setdefault("features", ROUTED)
    return qube("web", netvm, WEB_IP, lines, **kwargs)  # type: ignore[arg-type]


def snapshot(*qubes: QubeState, now: float = NOW) -> Snapshot:
    base = {
        "sys-net": qube("sys-net", None, NET_IP, provides_network=True),
        "sys-firewall": qube("sys-firewall", "sys-net", FW_IP, provides_network=True),
    }
    base.update({q.name: q for q in qubes})
    return Snapshot(base, now)


def with_ipv6(state: QubeState, ip6: str) -> QubeState:
    return dataclasses.replace(state, ip6=ipaddress.IPv6Address(ip6))


def test_two_hops_ipv4() -> None:
    result = plan_routing(snapshot(web(SSH_FROM_LAN, OUT, "action=drop")))
    directory = f"{ROUTING_DIR}/{WEB_IP}"
    assert result.entries == {
        "sys-firewall": {directory: {"route": "role=inner", "in/0000": SSH_ENTRY}},
        "sys-net": {
            directory: {
                "route": f"role=edge via={FW_IP}",
                "in/0000": SSH_ENTRY,
                # web's outbound rules, as /qubes-firewall/<ip>/ holds them in its netvm
                "out/policy": "drop",
                "out/0000": "action=accept dst4=192.0.2.10/32 proto=tcp dstports=80-80",
                "out/0001": "action=drop",
            },
        },
    }
    assert result.skipped == ()


def test_one_hop_is_the_edge_and_needs_no_via() -> None:
    result = plan_routing(snapshot(web(SSH_FROM_LAN, netvm="sys-net")))
    assert result.entries == {
        "sys-net": {f"{ROUTING_DIR}/{WEB_IP}": {"route": "role=edge", "in/0000": SSH_ENTRY}},
    }


def test_three_hops_each_route_to_the_next() -> None:
    vpn = qube("sys-vpn", "sys-firewall", "10.137.0.7", provides_network=True)
    result = plan_routing(snapshot(vpn, web(netvm="sys-vpn")))
    routes = {
        hop: directories[f"{ROUTING_DIR}/{WEB_IP}"]["route"]
        for hop, directories in result.entries.items()
    }
    assert routes == {
        "sys-vpn": "role=inner",
        "sys-firewall": "role=inner via=10.137.0.7",
        "sys-net": f"role=edge via={FW_IP}",
    }


def test_ipv6_goes_to_every_hop_by_its_ipv6_addresses() -> None:
    state = snapshot(
        with_ipv6(web("action=accept srchost=2001:db8::/64 proto=tcp dstports=22"),
                  "2001:db8::25"),
    )
    qubes = dict(state.qubes)
    qubes["sys-net"] = with_ipv6(qubes["sys-net"], "fd09:24ef:4179::a89:5")
    qubes["sys-firewall"] = with_ipv6(qubes["sys-firewall"], "fd09:24ef:4179::a89:6")
    result = plan_routing(Snapshot(qubes, NOW))
    net = result.entries["sys-net"]
    assert net[f"{ROUTING_DIR}/2001:db8::25"] == {
        "route": "role=edge via=fd09:24ef:4179::a89:6",
        "in/0000": "action=accept srchost=2001:db8::/64 proto=tcp dstports=22-22",
        "out/policy": "drop",
    }
    # The IPv4 address gets no IPv6 rule, and the reverse.
    assert net[f"{ROUTING_DIR}/{WEB_IP}"] == {"route": f"role=edge via={FW_IP}",
                                              "out/policy": "drop"}


def test_ipv6_through_a_hop_without_it_is_left_out_and_said() -> None:
    result = plan_routing(snapshot(with_ipv6(web(), "2001:db8::25")))
    assert [d for hop in result.entries.values() for d in hop] == [
        f"{ROUTING_DIR}/{WEB_IP}", f"{ROUTING_DIR}/{WEB_IP}",
    ]
    assert result.skipped == (
        "web routing: 2001:db8::25: 'sys-firewall' on its path has no IPv6 address",
    )


@pytest.mark.parametrize("value", ["masquerade", "", "Forward", "1"])
def test_only_forward_routes(value: str) -> None:
    result = plan_routing(snapshot(web(features={**SUPPORT, ROUTING_FEATURE: value})))
    assert result.entries == {}
    assert result.skipped == ()


def test_nothing_while_the_qube_or_a_hop_is_stopped() -> None:
    assert plan_routing(snapshot(web(running=False))).entries == {}
    stopped = snapshot(web(), qube("sys-firewall", "sys-net", FW_IP, provides_network=True,
                                   running=False))
    result = plan_routing(stopped)
    assert result.entries == {}
    assert result.skipped == ("web routing: 'sys-firewall' on its path is not running",)


def test_a_hop_without_our_agent_gets_nothing() -> None:
    bare = qube("sys-net", None, NET_IP, provides_network=True, features={})
    result = plan_routing(snapshot(web(), bare))
    assert result.entries == {}
    assert result.skipped == (f"web routing: 'sys-net' does not advertise {SUPPORT_FEATURE}",)


def test_no_netvm_no_exposure() -> None:
    result = plan_routing(snapshot(web(netvm=None)))  # type: ignore[arg-type]
    assert result.entries == {}
    assert result.skipped == ("web routing: 'web' has no netvm",)


def test_expired_rules_are_left_out() -> None:
    expired = f"{SSH_FROM_LAN} expire={int(NOW) - 1}"
    result = plan_routing(snapshot(web(expired, f"{OUT} expire={int(NOW) - 1}")))
    assert result.entries["sys-net"][f"{ROUTING_DIR}/{WEB_IP}"] == {
        "route": f"role=edge via={FW_IP}", "out/policy": "drop",
    }


def test_full_plan_keeps_inbound_and_input_and_adds_routing() -> None:
    result = plan(snapshot(web(SSH_FROM_LAN)))
    assert result.entries["sys-firewall"][f"{INBOUND_DIR}/{WEB_IP}"] == {"0000": SSH_ENTRY}
    assert result.entries["web"][INPUT_DIR] == {"0000": SSH_ENTRY}
    assert set(result.entries["sys-net"]) == {f"{ROUTING_DIR}/{WEB_IP}"}
    assert set(result.entries["sys-firewall"]) == {
        f"{INBOUND_DIR}/{WEB_IP}", f"{ROUTING_DIR}/{WEB_IP}",
    }


def test_paths_fit_qubesdb() -> None:
    longest = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    rules = [SSH_FROM_LAN.replace("192.0.2.0/24", "2001:db8::/64")] + [OUT] * 20
    state = snapshot(with_ipv6(web(*rules), longest))
    qubes = {
        name: with_ipv6(q, f"fd09:24ef:4179::a89:{n}")
        for n, (name, q) in enumerate(state.qubes.items()) if name != "web"
    }
    qubes["web"] = state.qubes["web"]
    result = plan_routing(Snapshot(qubes, NOW))
    keys = result.entries["sys-net"][f"{ROUTING_DIR}/{longest}"]
    paths = [f"{ROUTING_DIR}/{longest}/{key}" for key in keys]
    paths.append(f"{STATUS_DIR}/{longest}")
    assert max(len(path) for path in paths) <= 64
    assert all(len(value) <= 3072 for value in keys.values())


def test_applier_finds_routing_left_by_an_earlier_dom0() -> None:
    writer = RecordingWriter()
    writer.db["sys-net"] = {f"{ROUTING_DIR}/{WEB_IP}/route": "role=edge",
                            f"{ROUTING_DIR}/{WEB_IP}": ""}
    Applier(writer).apply(plan(snapshot()), running=["sys-net"])
    assert writer.db["sys-net"] == {}


def describe(state: Snapshot, reports: dict[tuple[str, str], bytes]) -> list[str]:
    return describe_routing(state, "web", lambda hop, path: reports.get((hop, path)))


def test_describe_shows_the_way_in_and_each_hop() -> None:
    status = f"{STATUS_DIR}/{WEB_IP}"
    lines = describe(snapshot(web(SSH_FROM_LAN)), {
        ("sys-net", status): b"state=exposed iface=eth0",
        ("sys-firewall", status): b"state=applied",
    })
    assert lines == [
        f"{WEB_IP}: LAN -> sys-net -> sys-firewall -> web",
        "  sys-net: exposed on eth0, answering for the address",
        "  sys-firewall: applied",
    ]
    assert describe(snapshot(web(running=False)), {}) == ["not exposed: 'web' is not running"]
    assert describe(snapshot(web(features=SUPPORT)), {}) == []


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "no report yet"),
        (b"state=conflict iface=eth0 mac=02:00:00:00:00:0b",
         "NOT exposed: 02:00:00:00:00:0b on eth0 already has the address"),
        (b"state=outside", "NOT exposed: the address is in no network of its uplink"),
        (b"state=exposed", "unreadable report"),  # iface missing
        (b"state=bogus", "unreadable report"),
        (b"state=applied \x1b[31m", "unreadable report"),
        (b"state=applied  iface=eth0", "unreadable report"),
        (b"state=conflict iface=eth0 mac=02:00:00:00:00:0B", "unreadable report"),
        (b"\xff\xfe", "unreadable report"),
    ],
)
def test_status_text_takes_only_the_documented_words(value: bytes | None, text: str) -> None:
    assert status_text(value) == text
