"""Topology files: the default one loads, broken ones are refused with a clear reason."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from lab.topology import (
    DEFAULT_TOPOLOGY,
    TopologyError,
    load_topology,
    parse_topology,
)


def default_data() -> dict[str, Any]:
    return load_topology(DEFAULT_TOPOLOGY).to_dict()


def test_default_topology_is_the_documented_one() -> None:
    topology = load_topology(DEFAULT_TOPOLOGY)
    assert list(topology.qubes) == ["sys-net", "sys-firewall", "web", "work", "direct"]
    sys_net = topology.qubes["sys-net"]
    assert sys_net.netvm is None and sys_net.provides_network
    assert str(sys_net.uplink) == "192.0.2.2/24"
    assert topology.qubes["sys-firewall"].netvm == "sys-net"
    assert {q.name for q in topology.clients("sys-firewall")} == {"web", "work"}
    assert str(topology.qubes["web"].ip) == "10.137.0.20"
    # the qids qubesd gives these addresses, hence its IPv6 addresses
    assert [q.qid for q in topology.qubes.values()] == [5, 6, 20, 21, 8]
    assert topology.qubes["web"].vm_type == "AppVM"
    assert topology.qubes["sys-firewall"].vm_type == "NetVM"
    assert topology.lan is not None
    assert [h.name for h in topology.lan.hosts] == ["lan", "lan2"]
    assert str(topology.lan.hosts[0].addresses[0]) == "192.0.2.10/24"


def test_round_trip_through_plain_data() -> None:
    data = default_data()
    assert parse_topology(copy.deepcopy(data)).to_dict() == data


def _mutate(change: Any) -> dict[str, Any]:
    data = default_data()
    change(data)
    return data


def _qube(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(q for q in data["qubes"] if q["name"] == name)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: _qube(d, "web").update(colour="red"), "unknown key 'colour'"),
        (lambda d: _qube(d, "web").update(netvm="sys-nope"), "netvm 'sys-nope' does not exist"),
        (lambda d: _qube(d, "web").update(netvm="work"), "'work' does not provide network"),
        (lambda d: _qube(d, "sys-net").update(netvm="sys-firewall"), "netvm loop"),
        (lambda d: _qube(d, "work").update(ip="10.137.0.20"), "given to both 'web' and 'work'"),
        (lambda d: _qube(d, "web").update(ip="10.137.0.300"), "qube 'web' ip"),
        (lambda d: _qube(d, "work").update(qid=20), "qid 20 is given to both 'web' and 'work'"),
        (lambda d: _qube(d, "web").update(qid=0), "qid must be an integer from 1 to 10000"),
        (lambda d: _qube(d, "web").update(qid=10001), "qid must be an integer from 1 to 10000"),
        (lambda d: _qube(d, "web").update(qid="20"), "qid must be an integer"),
        (lambda d: _qube(d, "web").update(qid=True), "qid must be an integer"),
        (lambda d: _qube(d, "web").update(uplink="192.0.2.3/24"), "can have an uplink"),
        (lambda d: _qube(d, "sys-net").update(uplink="198.51.100.2/24"), "not in the LAN"),
        (lambda d: _qube(d, "web").update(name="dom0"), "reserved"),
        (lambda d: _qube(d, "web").update(name="lan"), "more than one qube or LAN host"),
        (lambda d: _qube(d, "web").update(name="9web"), "must start with a letter"),
        (lambda d: _qube(d, "web").update(autostart="yes"), "expected true or false"),
        (lambda d: _qube(d, "web").update(features={"x": 1}), "features must be a table"),
        (lambda d: d["lan"]["hosts"][1].update(addresses=["192.0.2.2"]), "given to both"),
        (lambda d: d["lan"]["hosts"][0].update(routes=["10.0.0.0/8 by 192.0.2.2"]),
         "not 'NETWORK via ADDRESS'"),
        (lambda d: d["lan"].update(gateway="198.51.100.1"), "gateway 198.51.100.1 is not"),
        (lambda d: d.pop("lan"), "there is no [lan]"),
        (lambda d: d.update(qubes=[]), "non-empty array"),
    ],
)
def test_broken_topologies_are_refused(change: Any, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse_topology(_mutate(change))
    assert message in str(info.value)


def test_a_qube_may_take_a_lan_address() -> None:
    # as on Qubes: that is routing exposure's address, or a conflict its edge reports
    for ip in ("192.0.2.50", "192.0.2.11"):
        assert str(parse_topology(_mutate(lambda d, ip=ip: _qube(d, "web").update(ip=ip)))
                   .qubes["web"].ip) == ip


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(TopologyError, match=r"missing\.toml: cannot read"):
        load_topology(missing)
    bad = tmp_path / "bad.toml"
    bad.write_text("[lan\n")
    with pytest.raises(TopologyError, match=r"bad\.toml: not valid TOML"):
        load_topology(bad)


def test_minimal_topology_without_lan(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        '[[qubes]]\nname = "net"\nip = "10.137.0.2"\nprovides_network = true\n'
        '[[qubes]]\nname = "app"\nnetvm = "net"\nip = "10.137.0.3"\nautostart = false\n'
        'ip6 = "fd09:24ef:4179::a89:3"\n'
    )
    topology = load_topology(path)
    assert topology.lan is None
    assert topology.qubes["app"].autostart is False
    assert str(topology.qubes["app"].ip6) == "fd09:24ef:4179::a89:3"


def test_an_explicit_qid_wins_over_the_ip(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[[qubes]]\nname = "net"\nip = "10.137.0.7"\nqid = 300\n'
                    'provides_network = true\n')
    assert load_topology(path).qubes["net"].qid == 300


def test_a_qube_off_qubesd_addresses_gets_the_lowest_unused_qid(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        '[[qubes]]\nname = "net"\nip = "10.200.0.5"\nprovides_network = true\n'
        '[[qubes]]\nname = "app"\nnetvm = "net"\nip = "10.137.0.1"\n'
        '[[qubes]]\nname = "other"\nnetvm = "net"\nip = "10.200.0.6"\nqid = 2\n'
    )
    qubes = load_topology(path).qubes
    assert (qubes["net"].qid, qubes["app"].qid, qubes["other"].qid) == (3, 1, 2)
