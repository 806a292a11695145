"""``srcqube=work`` in the lab: the rule follows work when its IP changes.

Lab ``lab/topologies/inbound.toml`` (IPv6 on): web, work and work2 behind
sys-firewall. Rules go in through the real ``qvm-firewall``; dom0 resolves
``srcqube`` to work's addresses at every plan, and re-plans on every ip
change, so after ``qubes-lab set work ip`` the entries, hence the nft
rulesets, name work's new IP and nothing names its old one. Its IPv6
address comes from its qid, as on Qubes, so the change keeps it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from conftest import lab_up, set_rules, wait_for
from test_lab_forward_ipv6 import answers6
from test_lab_inbound import (
    TOPOLOGY,
    WEB,
    WORK,
    answers,
    inbound_rules,
    open_ports,
    qvm_firewall,
)

from admin_client_patch.qubesd_client import QubesException, qubesd_call
from lab.control import Lab

pytestmark = pytest.mark.lab

FW = "10.137.0.6"
WEB6, WORK6 = "fd09:24ef:4179::a89:14", "fd09:24ef:4179::a89:15"
NEW_WORK = "10.137.0.40"
SSH_FROM_WORK = ("action=accept", "srcqube=work", "proto=tcp", "dstports=22")
INTERNAL_FROM_WORK = (
    "action=forward", "forwardtype=internal", "srcqube=work", "proto=tcp",
    "srcports=2222", "dstports=80",
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The inbound topology (with work2), up for this module."""
    yield from lab_up(tmp_path_factory, TOPOLOGY)


@pytest.fixture
def api(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    yield lab
    set_rules("web", "action=accept")
    wait_for(lambda: not inbound_rules(lab, "sys-firewall"), "sys-firewall has no inbound rule")


def mentions(lab: Lab, qube: str, *addresses: str) -> list[str]:
    """Parts of ``qube``'s nft ruleset (nft -j) naming any of ``addresses``."""
    return [
        part for part in json.dumps(lab.nft_json(qube)).split("{")
        if any(f'"{address}"' in part for address in addresses)
    ]


def forwarded(lab: Lab, client: str) -> bool:
    """Does web's port 80 answer ``client`` at sys-firewall:2222 (the internal forward)?"""
    with lab.serve("web", "tcp", 80, reply="web-80"):
        return lab.connect(client, "tcp", FW, 2222, timeout=0.5) == "web-80"


def test_srcqube_admits_work_and_follows_its_ip_change(api: Lab) -> None:
    qvm_firewall(api, "web", "add", *SSH_FROM_WORK)
    qvm_firewall(api, "web", "add", *INTERNAL_FROM_WORK)
    wait_for(lambda: answers(api, "work", 22), "work reaches web:22")
    assert open_ports(api, "work") == [22]
    assert open_ports(api, "work2") == []  # a sibling the rule does not name
    assert answers6(api, "work", "tcp", WEB6, 22, 22)  # work's IPv6 address too
    assert not answers6(api, "work2", "tcp", WEB6, 22, 22)
    wait_for(lambda: forwarded(api, "work"), "work reaches web through sys-firewall:2222")
    assert not forwarded(api, "work2")
    netvm_db = api.qubesdb("sys-firewall")
    assert list(netvm_db.multiread(f"/qns-inbound/{WEB}/").values()) == [
        f"action=accept srchost={WORK}/32 proto=tcp dstports=22-22".encode()
    ]
    assert list(netvm_db.multiread(f"/qns-inbound/{WEB6}/").values()) == [
        f"action=accept srchost={WORK6}/128 proto=tcp dstports=22-22".encode()
    ]
    # The table names the qube; GetPaths says where the forward is reachable from.
    listing = qvm_firewall(api, "web")
    assert f"from work ({WORK})" in listing

    api.set_ip("work", NEW_WORK)
    try:
        wait_for(lambda: answers(api, "work", 22), "work at its new IP reaches web:22")
        assert open_ports(api, "work") == [22]
        assert open_ports(api, "work2") == []
        assert answers6(api, "work", "tcp", WEB6, 22, 22)
        wait_for(lambda: forwarded(api, "work"), "the internal forward follows work")
        assert not forwarded(api, "work2")
        for qube in ("sys-firewall", "web"):
            stale = mentions(api, qube, WORK)
            assert not stale, f"{qube} still names work's old IP: {stale}"
            assert mentions(api, qube, NEW_WORK), f"{qube} does not name work's new IP"
        assert list(netvm_db.multiread(f"/qns-inbound/{WEB}/").values()) == [
            f"action=accept srchost={NEW_WORK}/32 proto=tcp dstports=22-22".encode()
        ]
        assert list(netvm_db.multiread(f"/qns-inbound/{WEB6}/").values()) == [
            f"action=accept srchost={WORK6}/128 proto=tcp dstports=22-22".encode()
        ]
        assert f"from work ({NEW_WORK})" in qvm_firewall(api, "web")
    finally:
        api.set_ip("work", WORK)
    wait_for(lambda: answers(api, "work", 22), "work at its first address is admitted again")
    for qube in ("sys-firewall", "web"):
        assert not mentions(api, qube, NEW_WORK), qube


def test_a_name_that_is_no_qube_is_refused_and_reaches_no_nft(api: Lab) -> None:
    with pytest.raises(QubesException, match="srcqube 'wrok'"):
        set_rules("web", "action=accept srcqube=wrok proto=tcp dstports=22")
    assert inbound_rules(api, "sys-firewall") == []
    with pytest.raises(QubesException, match="needs forwardtype=internal"):
        qubesd_call("web", "admin.vm.firewall.Set", "forward",
                    b"action=forward forwardtype=external srcqube=work proto=tcp dstports=80\n")
