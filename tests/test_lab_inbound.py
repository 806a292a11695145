"""Inbound rules between qubes in the lab, IPv4, with real TCP traffic.

Lab ``lab/topologies/inbound.toml``: web (10.137.0.20), work (10.137.0.21)
and work2 (10.137.0.22) behind sys-firewall. Rules go in through the real
``qvm-firewall`` and the Admin API on the lab's qubesd socket; dom0 plans
``/qns-inbound/`` in sys-firewall and ``/qns-input`` in web, the worker and
the input hook apply them, and probes send real traffic between the qubes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import lab_up, set_rules, wait_for

from admin_client_patch.qubesd_client import QubesException, qubesd_call
from core_admin_patch.planner import SUPPORT_FEATURE
from lab.control import Lab

pytestmark = pytest.mark.lab

TOPOLOGY = Path(__file__).resolve().parent.parent / "lab" / "topologies" / "inbound.toml"
WEB, WORK, WORK2 = "10.137.0.20", "10.137.0.21", "10.137.0.22"
SSH_FROM_WORK = f"action=accept srchost={WORK} proto=tcp dstports=22"
SERVED = (22, 23, 80, 8080)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The inbound topology, up for this module."""
    yield from lab_up(tmp_path_factory, TOPOLOGY)


@pytest.fixture
def api(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    yield lab
    for qube in ("web", "work", "work2"):
        set_rules(qube, "action=accept")
    wait_for(lambda: not inbound_rules(lab, "sys-firewall"), "sys-firewall has no inbound rule")


def inbound_rules(lab: Lab, qube: str) -> list[str]:
    """Rules of chain qns-inbound in ``qube`` (both families), as JSON text."""
    return [
        json.dumps(item["rule"]) for item in lab.nft_json(qube)["nftables"]
        if "rule" in item and item["rule"]["chain"] == "qns-inbound"
    ]


def open_ports(lab: Lab, client: str, host: str = WEB) -> list[int]:
    """Ports of web's servers the client can open (each served port, plus a 1-1024 scan)."""
    servers = [lab.serve("web", "tcp", port, reply=f"web-{port}") for port in SERVED]
    try:
        scanned = set(lab.scan(client, host, "1-1024", timeout=0.5))
        scanned |= {p for p in SERVED if lab.connect(client, "tcp", host, p, timeout=0.5)}
        return sorted(scanned)
    finally:
        for server in servers:
            server.stop()


def answers(lab: Lab, client: str, port: int, host: str = WEB) -> bool:
    with lab.serve("web", "tcp", port, reply=f"web-{port}"):
        return lab.connect(client, "tcp", host, port, timeout=0.5) == f"web-{port}"


def qvm_firewall(lab: Lab, *argv: str) -> str:
    """The real command line, as a user runs it in dom0 (the venv's console script)."""
    result = lab.exec("dom0", [str(Path(sys.executable).parent / "qvm-firewall"), *argv])
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_ssh_from_work_only(api: Lab) -> None:
    assert open_ports(api, "work") == []  # Qubes' default: qubes cannot reach each other
    qvm_firewall(api, "web", "add", "action=accept", f"srchost={WORK}", "proto=tcp",
                 "dstports=22")
    wait_for(lambda: answers(api, "work", 22), "work reaches web:22")
    assert open_ports(api, "work") == [22]
    assert open_ports(api, "work2") == []  # a sibling the rule does not name
    # Nothing in the other direction, and web's own address only.
    with api.serve("work", "tcp", 22, reply="work"):
        assert api.connect("web", "tcp", WORK, 22, timeout=0.5) is None
    entries = api.qubesdb("sys-firewall").multiread(f"/qns-inbound/{WEB}/")
    assert list(entries.values()) == [
        b"action=accept srchost=10.137.0.21/32 proto=tcp dstports=22-22"
    ]


def test_rules_apply_in_order(api: Lab) -> None:
    set_rules(
        "web",
        "action=drop srchost=10.137.0.21/32 proto=tcp dstports=23",
        "action=accept srchost=10.137.0.16/28",
    )
    wait_for(lambda: answers(api, "work", 22), "work reaches web")
    assert open_ports(api, "work") == [22, 80, 8080]  # 23 dropped before the /28 accept
    assert open_ports(api, "work2") == list(SERVED)  # in the /28, not named by the drop
    set_rules(
        "web",
        "action=accept srchost=10.137.0.16/28",
        "action=drop srchost=10.137.0.21/32 proto=tcp dstports=23",
    )
    wait_for(lambda: answers(api, "work", 23), "the accept now comes first")
    assert open_ports(api, "work") == list(SERVED)


def test_removal_closes_everything(api: Lab) -> None:
    set_rules("web", SSH_FROM_WORK, "action=accept")
    wait_for(lambda: answers(api, "work", 22), "work reaches web:22")
    set_rules("web", "action=accept")
    wait_for(lambda: not answers(api, "work", 22), "the rule is gone")
    assert inbound_rules(api, "sys-firewall") == []
    assert not api.qubesdb("sys-firewall").list("/qns-inbound/")
    assert not api.qubesdb("web").list("/qns-input")


def test_the_senders_outbound_rules_still_apply(api: Lab) -> None:
    set_rules("web", SSH_FROM_WORK)
    wait_for(lambda: answers(api, "work", 22), "work reaches web:22")
    set_rules("work", "action=drop")
    wait_for(lambda: not answers(api, "work", 22), "work's own policy drop stops it")
    set_rules("work", f"action=accept dst4={WEB} proto=tcp dstports=22", "action=drop")
    wait_for(lambda: answers(api, "work", 22), "work may send to web:22 again")


def test_work_ip_change_is_not_admitted_by_the_literal_rule(api: Lab) -> None:
    set_rules("web", SSH_FROM_WORK)
    wait_for(lambda: answers(api, "work", 22), "work reaches web:22")
    api.set_ip("work", "10.137.0.40")
    try:
        assert not answers(api, "work", 22)
        assert open_ports(api, "work") == []
    finally:
        api.set_ip("work", WORK)
    wait_for(lambda: answers(api, "work", 22), "work at its old address is admitted again")


def test_web_ip_change_moves_every_rule(api: Lab) -> None:
    set_rules("web", SSH_FROM_WORK)
    wait_for(lambda: answers(api, "work", 22), "work reaches web:22")
    new = "10.137.0.26"
    api.set_ip("web", new)
    try:
        wait_for(lambda: answers(api, "work", 22, host=new), "the rule follows web")
        assert open_ports(api, "work", host=new) == [22]
        for qube in ("sys-net", "sys-firewall", "web", "work", "work2"):
            stale = [r for r in json.dumps(api.nft_json(qube)).split("{") if f'"{WEB}"' in r]
            assert not stale, f"{qube} still has rules for {WEB}: {stale}"
        assert not api.qubesdb("sys-firewall").list(f"/qns-inbound/{WEB}")
    finally:
        api.set_ip("web", WEB)
    wait_for(lambda: answers(api, "work", 22), "back at the old address")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("action=accept srchost=10.137.0.21/24 proto=tcp dstports=22", "10.137.0.0/24"),
        ("action=accept srchost=work", "srchost="),
        (f"action=accept srchost={WORK} dstports=22", "dstports= needs proto"),
        (f"action=accept srchost={WORK} dsthost=10.137.0.20", "dsthost="),
        (f"action=accept srchost={WORK} proto=tcp srcports=22", "srcports="),
        (f"action=accept srchost={WORK} proto=tcp dstports=0", "port 0"),
        (f"action=accept srchost={WORK} proto=icmp icmptype=256", "icmptype="),
        (f"action=accept  srchost={WORK}", "one space"),
    ],
)
def test_malformed_rules_are_refused_and_reach_no_nft(api: Lab, line: str, reason: str) -> None:
    with pytest.raises(QubesException, match=reason):
        qubesd_call("web", "admin.vm.firewall.Set", "inbound", f"{line}\n".encode())
    assert qubesd_call("web", "admin.vm.firewall.Get") == b"action=accept\n"
    assert inbound_rules(api, "sys-firewall") == []
    assert not api.qubesdb("sys-firewall").list("/qns-inbound/")
    web_input = [
        item for item in api.nft_json("web")["nftables"]
        if "rule" in item and item["rule"]["chain"] == "qns-input"
    ]
    assert web_input == []


def test_a_netvm_without_our_agent_is_named(api: Lab) -> None:
    api.set_feature("sys-firewall", SUPPORT_FEATURE, None)
    try:
        with pytest.raises(QubesException, match="'sys-firewall'"):
            set_rules("web", SSH_FROM_WORK)
    finally:
        api.set_feature("sys-firewall", SUPPORT_FEATURE, "1")
    assert inbound_rules(api, "sys-firewall") == []
