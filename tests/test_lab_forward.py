"""Port forwarding end to end in the lab: real TCP/UDP from the LAN and from qubes.

Rules go in through the Admin API on the lab's qubesd socket; dom0 plans,
writes QubesDB, the workers in sys-firewall and sys-net and the hook in
web apply nft; probes in the namespaces send real traffic. After every
topology change the test also reads every qube's ruleset back (``nft -j``)
and QubesDB to prove nothing points at an address the target left.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import set_rules, wait_for

from admin_client_patch.qubesd_client import QubesException, qubesd_call
from lab.control import Lab, LabError

pytestmark = pytest.mark.lab

LAN_HOST, LAN2_HOST = "192.0.2.10", "192.0.2.11"
UPLINK = "192.0.2.2"  # sys-net on the LAN
SYS_FIREWALL = "10.137.0.6"
WEB = "10.137.0.20"
NETVMS = ("sys-net", "sys-firewall")

EXTERNAL_HTTP = "action=forward forwardtype=external proto=tcp srcports=8080 dstports=80"


def eventually(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Workers apply QubesDB changes asynchronously: poll until ``predicate`` holds."""
    wait_for(predicate, f"until {what}", timeout)


def answers(
    lab: Lab, client: str, proto: str, host: str, port: int, served_port: int | None = None,
    source: str | None = None,
) -> bool:
    """Does a server in web, on ``served_port`` (default ``port``), answer the client?"""
    reply = f"web-{served_port or port}"
    with lab.serve("web", proto, served_port or port, reply=reply):
        got = lab.connect(client, proto, host, port, timeout=0.5, source=source)
    return got == reply


def qns_rules(lab: Lab, qube: str, prefix: str = "qns") -> list[str]:
    """Our rules in ``qube`` (chains named qns-*, or ``prefix``*), as JSON text."""
    ruleset = lab.nft_json(qube)["nftables"]
    return [
        json.dumps({k: v for k, v in item["rule"].items() if k != "handle"})
        for item in ruleset
        if "rule" in item and item["rule"]["chain"].startswith(prefix)
    ]


def running(lab: Lab) -> list[str]:
    return [q["name"] for q in lab.status()["qubes"] if q["running"]]


def assert_nothing_points_at(lab: Lab, address: str) -> None:
    """No nft rule and no QubesDB forward entry anywhere mentions ``address``."""
    for qube in running(lab):
        stale = [rule for rule in qns_rules(lab, qube) if f'"{address}"' in rule]
        assert not stale, f"{qube} still has rules for {address}: {stale}"
        assert not lab.qubesdb(qube).list(f"/qns-forward/{address}"), qube


def forward_rules_in(lab: Lab, qube: str) -> int:
    """IPv4 DNAT rules of ours in ``qube``, one per forward step.

    The default lab has IPv6 on, so each step also has an ip6 twin.
    """
    return sum('"family": "ip"' in rule for rule in qns_rules(lab, qube, "qns-dnat"))


@pytest.fixture
def api(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    set_rules("web", "action=accept")
    yield lab
    set_rules("web", "action=accept")
    for qube in NETVMS:
        eventually(lambda q=qube: qns_rules(lab, q, "qns-dnat") == [], f"{qube} has no forwards")


def test_external_tcp_through_two_hops(api: Lab) -> None:
    assert not answers(api, "lan", "tcp", UPLINK, 8080, 80)
    set_rules("web", EXTERNAL_HTTP, "action=accept")
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "the LAN reaches web:80")
    assert answers(api, "lan2", "tcp", UPLINK, 8080, 80)
    # Only at the uplink's port: not at web's own address, not on another port.
    assert not answers(api, "lan", "tcp", WEB, 80)
    assert not answers(api, "lan", "tcp", UPLINK, 8081, 80)
    assert not answers(api, "lan", "tcp", UPLINK, 80, 80)
    set_rules("web", "action=accept")
    eventually(lambda: not answers(api, "lan", "tcp", UPLINK, 8080, 80), "the forward is gone")
    assert_nothing_points_at(api, WEB)


def test_external_udp(api: Lab) -> None:
    set_rules("web", "action=forward forwardtype=external proto=udp srcports=5353 dstports=53")
    eventually(lambda: answers(api, "lan", "udp", UPLINK, 5353, 53), "UDP reaches web:53")
    assert not answers(api, "lan", "tcp", UPLINK, 5353, 53)  # udp only


def test_srchost_limits_the_source(api: Lab) -> None:
    set_rules("web", f"{EXTERNAL_HTTP} srchost={LAN_HOST}/32")
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "lan reaches web")
    assert not answers(api, "lan2", "tcp", UPLINK, 8080, 80)
    # Refused at the edge, and again by web's own INPUT: a packet that gets past
    # sys-net with lan2's address (spoofed from sys-firewall) is still dropped.
    assert not answers(api, "sys-firewall", "tcp", WEB, 80, source=LAN2_HOST)


def test_port_range_maps_one_to_one(api: Lab) -> None:
    set_rules("web",
              "action=forward forwardtype=external proto=tcp srcports=9000-9002 dstports=7000-7002")
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 9001, 7001), "9001 reaches 7001")
    assert answers(api, "lan", "tcp", UPLINK, 9000, 7000)
    assert answers(api, "lan", "tcp", UPLINK, 9002, 7002)
    assert not answers(api, "lan", "tcp", UPLINK, 9001, 7000)
    assert not answers(api, "lan", "tcp", UPLINK, 9003, 7003)


def test_internal_forward(api: Lab) -> None:
    set_rules("web", "action=forward forwardtype=internal proto=tcp srcports=2222 dstports=22")
    eventually(lambda: answers(api, "work", "tcp", SYS_FIREWALL, 2222, 22), "work reaches web:22")
    assert not answers(api, "work", "tcp", SYS_FIREWALL, 2223, 23)
    assert not answers(api, "work", "tcp", WEB, 22)  # Qubes keeps qubes apart
    assert not answers(api, "work", "tcp", WEB, 23)
    assert not answers(api, "lan", "tcp", UPLINK, 2222, 22)  # internal only
    assert forward_rules_in(api, "sys-net") == 0


def test_scan_finds_exactly_the_forwarded_ports(api: Lab) -> None:
    ports = "1-1024,2000-2300,7000-9100"
    assert api.scan("lan", UPLINK, ports, timeout=0.3) == []
    set_rules("web", EXTERNAL_HTTP, "action=forward forwardtype=external proto=tcp"
              " srcports=9000-9001 dstports=9000-9001")
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "the forward works")
    with api.serve("web", "tcp", 80), api.serve("web", "tcp", 9000), \
            api.serve("web", "tcp", 9001), api.serve("web", "tcp", 22):
        assert api.scan("lan", UPLINK, ports, timeout=0.3) == [8080, 9000, 9001]
        assert api.scan("lan", WEB, "1-1024,9000-9001", timeout=0.3) == []
        assert api.scan("work", WEB, "1-1024,9000-9001", timeout=0.3) == []
    set_rules("web", "action=accept")
    eventually(lambda: forward_rules_in(api, "sys-net") == 0, "sys-net forgets the forward")
    assert api.scan("lan", UPLINK, ports, timeout=0.3) == []


def test_rule_expiry_closes_the_port(api: Lab) -> None:
    set_rules("web", f"{EXTERNAL_HTTP} expire={int(time.time()) + 4}")
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "the forward works")
    eventually(lambda: forward_rules_in(api, "sys-net") == 0, "the rule expires", timeout=20)
    assert not answers(api, "lan", "tcp", UPLINK, 8080, 80)
    assert_nothing_points_at(api, WEB)


def test_outbound_drop_still_serves_forwards(api: Lab) -> None:
    set_rules("web", EXTERNAL_HTTP, "action=drop")
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "the forward works")
    with api.serve("lan", "tcp", 8000):
        assert api.connect("web", "tcp", LAN_HOST, 8000, timeout=0.5) is None


def test_conflicting_port_is_refused_naming_both_qubes(api: Lab) -> None:
    set_rules("web", EXTERNAL_HTTP)
    try:
        with pytest.raises(QubesException) as info:
            qubesd_call("work", "admin.vm.firewall.Set", "forward", f"{EXTERNAL_HTTP}\n".encode())
        assert "'web'" in str(info.value) and "'work'" in str(info.value)
        assert qubesd_call("work", "admin.vm.firewall.Get", "forward") == b""
    finally:
        set_rules("work", "action=accept")


def test_stop_and_start_of_the_target(api: Lab) -> None:
    set_rules("web", EXTERNAL_HTTP)
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "the forward works")
    api.stop("web")
    try:
        for qube in NETVMS:
            eventually(lambda q=qube: forward_rules_in(api, q) == 0, f"{qube} drops the forward")
        assert_nothing_points_at(api, WEB)
    finally:
        api.start("web")
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "the forward is back")


def test_netvm_change_and_proxyvm_inserted(api: Lab) -> None:
    set_rules("web", EXTERNAL_HTTP)
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "the forward works")
    api.set_netvm("web", "sys-net")
    try:
        eventually(lambda: forward_rules_in(api, "sys-firewall") == 0, "sys-firewall is skipped")
        eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "one hop works")
    finally:
        api.set_netvm("web", "sys-firewall")  # the ProxyVM inserted again
    eventually(lambda: forward_rules_in(api, "sys-firewall") == 1, "sys-firewall is back")
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "two hops work again")


def test_ip_change_of_the_target(api: Lab) -> None:
    set_rules("web", EXTERNAL_HTTP)
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "the forward works")
    api.set_ip("web", "10.137.0.30")
    try:
        eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "the new address works")
        assert_nothing_points_at(api, WEB)
    finally:
        api.set_ip("web", WEB)
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "back at the old address")
    assert_nothing_points_at(api, "10.137.0.30")


def test_hop_restart(api: Lab) -> None:
    set_rules("web", EXTERNAL_HTTP)
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "the forward works")
    api.restart("sys-firewall")
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "works after the restart")
    assert forward_rules_in(api, "sys-firewall") == 1


def test_agent_restart(api: Lab) -> None:
    set_rules("web", EXTERNAL_HTTP)
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "the forward works")
    before = {qube: sorted(qns_rules(api, qube)) for qube in NETVMS}
    for qube in NETVMS:
        api.restart_service(qube, "firewall")
    api.restart_service("web", "input")
    eventually(lambda: answers(api, "lan", "tcp", UPLINK, 8080, 80), "works after the restarts")
    assert {qube: sorted(qns_rules(api, qube)) for qube in NETVMS} == before


def test_netvm_change_that_would_take_a_forwarded_port_is_refused(api: Lab) -> None:
    """direct (behind sys-net) and web both forward 2222 internally; moving direct
    behind sys-firewall would make them fight over sys-firewall's port."""
    internal_ssh = "action=forward forwardtype=internal proto=tcp srcports=2222 dstports=22"
    set_rules("web", internal_ssh)
    set_rules("direct", "action=accept", internal_ssh)
    try:
        conflict = r"on 'sys-firewall' is wanted by both 'web' .* and 'direct'"
        with pytest.raises(LabError, match=conflict):
            api.set_netvm("direct", "sys-firewall")
        assert api.qube_info("direct")["netvm"] == "sys-net"
        eventually(lambda: answers(api, "work", "tcp", SYS_FIREWALL, 2222, 22), "web keeps 2222")
    finally:
        set_rules("direct", "action=accept")
