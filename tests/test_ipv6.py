"""IPv6 rules that follow qubesd: who has IPv6, which address, how topologies carry it."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace
from typing import Any

import pytest

from core_admin_patch.network_server import (
    QUBES_IPV6_PREFIX,
    derived_ip6,
    ipv6_enabled,
    qube_state,
)
from lab.topology import (
    DEFAULT_TOPOLOGY,
    TopologyError,
    default_qid,
    load_topology,
    parse_topology,
)


@pytest.mark.parametrize(
    ("chain", "enabled"),
    [
        ([{}, {}, {}], False),  # nobody sets it: off (qubesd's default False)
        ([{}, {}, {"ipv6": "1"}], True),  # on at the edge netvm, inherited
        ([{}, {"ipv6": "1"}, {}], True),  # on at a ProxyVM only (a tunnel qube)
        ([{"ipv6": ""}, {}, {"ipv6": "1"}], False),  # '' on the qube wins
        ([{}, {"ipv6": ""}, {"ipv6": "1"}], False),  # '' on its netvm, for all below it
        ([{"ipv6": "1"}, {}, {}], True),  # on for the qube alone, as qubesd allows
        ([{"ipv6": "0"}], True),  # qubesd tests truth: any non-empty string is on
        ([], False),
    ],
)
def test_ipv6_enabled_follows_check_with_netvm(
    chain: list[dict[str, str]], enabled: bool
) -> None:
    assert ipv6_enabled(chain) is enabled


@pytest.mark.parametrize(
    ("qid", "ip", "ip6"),
    [  # qubesd's default ip and ip6 of a qube with that qid (vmid_to_ipv4, get_ip6_for_vm)
        (20, "10.137.0.20", "fd09:24ef:4179::a89:14"),
        (5, "10.137.0.5", "fd09:24ef:4179::a89:5"),
        (254, "10.137.0.254", "fd09:24ef:4179::a89:fe"),
        (255, "10.137.1.1", "fd09:24ef:4179::a89:ff"),  # .0 and .255 skipped from here on
        (258, "10.137.1.4", "fd09:24ef:4179::a89:102"),  # not the IPv4 address's last bits
        (10000, "10.137.39.94", "fd09:24ef:4179::a89:2710"),  # qubesd's max_qid
    ],
)
def test_ip6_comes_from_the_qid_as_qubesd_derives_it(qid: int, ip: str, ip6: str) -> None:
    address = derived_ip6(qid)
    assert str(address) == ip6
    assert address in QUBES_IPV6_PREFIX
    assert default_qid(ipaddress.IPv4Address(ip)) == qid


@pytest.mark.parametrize(
    "ip", ["10.137.0.0", "10.137.0.255", "10.137.1.0", "10.137.39.95", "10.138.0.7", "10.0.0.5"]
)
def test_an_ip_no_qid_gets_by_default_has_no_default_qid(ip: str) -> None:
    assert default_qid(ipaddress.IPv4Address(ip)) is None


def test_a_qube_keeps_its_qid_and_ip6_when_its_ip_changes() -> None:
    topology = load_topology(DEFAULT_TOPOLOGY)
    web = topology.qubes["web"]
    assert web.qid == 20
    web.ip = ipaddress.IPv4Address("10.137.0.30")
    assert parse_topology(topology.to_dict()).qubes["web"].qid == 20  # as topology.json has it


def test_qube_state_carries_ip6_when_the_domain_has_one() -> None:
    domain: Any = SimpleNamespace(
        name="web", netvm=None, ip="10.137.0.20", ip6="fd09:24ef:4179::a89:14",
        provides_network=False, features={}, is_running=lambda: True,
    )
    assert str(qube_state(domain, []).ip6) == "fd09:24ef:4179::a89:14"
    domain.ip6 = None
    assert qube_state(domain, []).ip6 is None
    del domain.ip6  # a host whose VMs have no ip6 at all
    assert qube_state(domain, []).ip6 is None


def test_default_topology_has_ipv6_on_sys_net_and_a_one_hop_qube() -> None:
    topology = load_topology(DEFAULT_TOPOLOGY)
    assert topology.qubes["sys-net"].features["ipv6"] == "1"
    assert str(topology.qubes["sys-net"].uplink6) == "2001:db8::2/64"
    assert topology.qubes["direct"].netvm == "sys-net"
    assert topology.lan is not None and str(topology.lan.gateway6) == "2001:db8::1"
    assert "2001:db8::10/64" in [str(a) for a in topology.lan.hosts[0].addresses]
    assert [q.name for q in topology.netvm_chain("web")] == ["web", "sys-firewall", "sys-net"]
    assert [q.name for q in topology.below("sys-net")] == [
        "sys-firewall", "web", "work", "direct",
    ]


def test_a_qube_may_take_a_lan_ipv6_address() -> None:
    data = _with(lambda d: _qube(d, "web").update(ip6="2001:db8::20"))
    assert str(parse_topology(data).qubes["web"].ip6) == "2001:db8::20"


def _with(change: Any) -> dict[str, Any]:
    data = load_topology(DEFAULT_TOPOLOGY).to_dict()
    change(data)
    return data


def _qube(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(q for q in data["qubes"] if q["name"] == name)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["lan"].update(gateway6="2001:db9::1"), "gateway6 2001:db9::1 is not"),
        (lambda d: _qube(d, "sys-net").update(uplink6="2001:db9::2/64"), "not in the LAN"),
        (lambda d: d["lan"]["hosts"][1].update(addresses=["2001:db8::10"]), "given to both"),
        (lambda d: d["lan"]["hosts"][0].update(routes=["fd09::/64 via 192.0.2.2"]),
         "mixes IPv4 and IPv6"),
        (lambda d: d["lan"]["hosts"][0].update(routes=["fd09::/64 via 2001:db9::2"]),
         "is not on the LAN"),
        (lambda d: (d["lan"].pop("network6"), d["lan"].pop("gateway6")), "has no network6"),
    ],
)
def test_broken_ipv6_topologies_are_refused(change: Any, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse_topology(_with(change))
    assert message in str(info.value)
