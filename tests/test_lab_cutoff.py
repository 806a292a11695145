"""Rule changes end the live flows they stop admitting, in every hop and the target (issue 9).

Default lab. Each test keeps real flows going (``probe talk`` to ``probe
echo``: a line every 50 ms, each answer time-stamped), changes a rule or the
topology through ``qvm-firewall`` / ``qubes-lab``, then checks that the flows
the change concerns stop passing and stay stopped, that no conntrack entry
of theirs is left in the hops and the target, and that flows of other rules
keep running. How fast they stop is measured by ``bench.cutoff``, not here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from conftest import wait_for
from test_lab_exposure import firewall, reset

from admin_client_patch.firewall import QubeFirewall
from firewall_rules import Rule, RuleKind
from lab.control import Lab, Talker

pytestmark = pytest.mark.lab

UPLINK, UPLINK6 = "192.0.2.2", "2001:db8::2"
LAN_HOST, LAN2_HOST = "192.0.2.10", "192.0.2.11"
SYS_FIREWALL, WEB, WORK = "10.137.0.6", "10.137.0.20", "10.137.0.21"
HTTP = ("action=forward", "forwardtype=external", "proto=tcp", "srcports=8080", "dstports=80")
DNS = ("action=forward", "forwardtype=external", "proto=udp", "srcports=5353", "dstports=53")
OTHER = ("action=forward", "forwardtype=external", "proto=tcp", "srcports=8081", "dstports=81")
QUIET = 1.5  # seconds without an answer: the flow has stopped


@pytest.fixture
def api(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    reset(lab)
    yield lab
    for qube in ("web", "sys-net", "sys-firewall"):
        lab.start(qube)
    if lab.qube_info("web")["netvm"] != "sys-firewall":
        lab.set_netvm("web", "sys-firewall")
    reset(lab)


def flowing(talker: Talker) -> None:
    """Wait until the flow answers (the rules it needs are in force)."""
    start = time.time()
    wait_for(lambda: talker.answered_since(start), "the flow answers")


def stopped(talker: Talker, since: float) -> None:
    """The flow stops passing after ``since`` and does not come back."""
    wait_for(lambda: time.time() - max([since, *talker.answers]) > QUIET, "the flow stops")
    settled = time.time()
    time.sleep(QUIET)
    assert not talker.answered_since(settled), "the flow came back"


def still_flowing(talker: Talker) -> None:
    now = time.time()
    wait_for(lambda: talker.answered_since(now), "the other flow keeps running")


def conntrack(lab: Lab, qube: str, version: int, *filters: str) -> list[str]:
    """Entries of ``qube``'s conntrack table matching ``filters``."""
    family = "ipv4" if version == 4 else "ipv6"
    result = lab.exec(qube, ["conntrack", "-L", "-f", family, *filters], check=True)
    return result.stdout.splitlines()


def no_entries(lab: Lab, proto: str, port: int) -> None:
    """No qube on the path keeps an entry of the LAN host's flows to ``port`` at the edge."""
    for qube in ("sys-net", "sys-firewall", "web"):
        if lab.qube_info(qube)["running"]:
            left = conntrack(lab, qube, 4, "-p", proto, "--orig-src", LAN_HOST,
                             "--orig-port-dst", str(port))
            assert left == [], f"{qube} keeps {left}"


def test_del_ends_the_flows_of_that_rule_only(api: Lab) -> None:
    firewall("web", "add", *HTTP)
    firewall("web", "add", *DNS)
    firewall("web", "add", *OTHER)
    with ExitStack() as stack:
        for proto, port, bind in (("tcp", 80, None), ("udp", 53, None), ("tcp", 81, None),
                                  ("tcp", 80, "::")):
            stack.enter_context(api.echo("web", proto, port, bind=bind))
        tcp = stack.enter_context(api.talk("lan", "tcp", UPLINK, 8080))
        tcp6 = stack.enter_context(api.talk("lan", "tcp", UPLINK6, 8080))
        udp = stack.enter_context(api.talk("lan", "udp", UPLINK, 5353))
        other = stack.enter_context(api.talk("lan", "tcp", UPLINK, 8081))
        for talker in (tcp, tcp6, udp, other):
            flowing(talker)
        firewall("web", "del", *HTTP)
        changed = time.time()
        stopped(tcp, changed)
        stopped(tcp6, changed)
        still_flowing(udp)
        firewall("web", "del", *DNS)
        changed = time.time()
        stopped(udp, changed)
        still_flowing(other)
        no_entries(api, "tcp", 8080)
        no_entries(api, "udp", 5353)
        assert conntrack(api, "web", 6, "-p", "tcp", "--orig-port-dst", "80") == []


def test_narrowing_a_forward_ends_what_it_no_longer_admits(api: Lab) -> None:
    firewall("web", "add", *HTTP)
    with api.echo("web", "tcp", 80), api.talk("lan", "tcp", UPLINK, 8080) as lan, \
            api.talk("lan2", "tcp", UPLINK, 8080) as lan2:
        flowing(lan)
        flowing(lan2)
        narrowed = Rule.from_api_string(" ".join([*HTTP, f"srchost={LAN2_HOST}"]))
        QubeFirewall("web").save(RuleKind.FORWARD, [narrowed])  # one Set: never without a rule
        changed = time.time()
        stopped(lan, changed)
        still_flowing(lan2)
        no_entries(api, "tcp", 8080)


def test_expiry_ends_the_flows(api: Lab) -> None:
    expire = int(time.time()) + 3
    firewall("web", "add", *HTTP, f"expire={expire}")
    firewall("web", "add", *DNS, f"expire={expire}")
    with api.echo("web", "tcp", 80), api.echo("web", "udp", 53), \
            api.talk("lan", "tcp", UPLINK, 8080) as tcp, \
            api.talk("lan", "udp", UPLINK, 5353) as udp:
        flowing(tcp)
        flowing(udp)
        stopped(tcp, expire)
        stopped(udp, expire)
        no_entries(api, "tcp", 8080)
        no_entries(api, "udp", 5353)


def test_stopping_the_target_ends_its_flows_in_every_hop(api: Lab) -> None:
    firewall("web", "add", *HTTP)
    firewall("web", "add", *DNS)
    with api.echo("web", "tcp", 80), api.echo("web", "udp", 53), \
            api.talk("lan", "tcp", UPLINK, 8080) as tcp, \
            api.talk("lan", "udp", UPLINK, 5353) as udp:
        flowing(tcp)
        flowing(udp)
        api.stop("web")
        changed = time.time()
        stopped(tcp, changed)
        stopped(udp, changed)
        no_entries(api, "tcp", 8080)
        no_entries(api, "udp", 5353)


def test_a_netvm_change_ends_the_flows_of_the_old_path(api: Lab) -> None:
    """After web moves behind sys-net, no hop keeps the old path's translation.

    The TCP connection is over (its next packet is no SYN); the UDP client's
    next datagrams are a new flow, which the rule (still in force) takes to
    web along the new path. Had sys-net kept its entry, they would still go
    to sys-firewall, which no longer reaches web.
    """
    firewall("web", "add", *HTTP)
    firewall("web", "add", *DNS)
    with api.echo("web", "tcp", 80), api.echo("web", "udp", 53), \
            api.talk("lan", "tcp", UPLINK, 8080) as tcp, \
            api.talk("lan", "udp", UPLINK, 5353) as udp:
        flowing(tcp)
        flowing(udp)
        api.set_netvm("web", "sys-net")
        changed = time.time()
        stopped(tcp, changed)
        wait_for(lambda: udp.answered_since(changed + QUIET), "UDP flows on the new path")
        for proto, port in (("tcp", 8080), ("udp", 5353)):
            old_path = conntrack(api, "sys-net", 4, "-p", proto, "--orig-port-dst", str(port),
                                 "--reply-src", SYS_FIREWALL)
            assert old_path == [], old_path
            assert conntrack(api, "sys-firewall", 4, "-p", proto, "--orig-port-dst",
                             str(port)) == []


def test_inbound_rule_removal_and_narrowing_end_its_flows(api: Lab) -> None:
    firewall("web", "add", "action=accept", "srcqube=work", "proto=tcp", "dstports=22-23")
    firewall("web", "add", "action=accept", "srcqube=work", "proto=udp", "dstports=53")
    firewall("web", "add", "action=accept", "srcqube=work", "proto=tcp", "dstports=80")
    with ExitStack() as stack:
        for proto, port in (("tcp", 22), ("tcp", 23), ("udp", 53), ("tcp", 80)):
            stack.enter_context(api.echo("web", proto, port))
        ssh, telnet, dns, http = (
            stack.enter_context(api.talk("work", proto, WEB, port))
            for proto, port in (("tcp", 22), ("tcp", 23), ("udp", 53), ("tcp", 80))
        )
        for talker in (ssh, telnet, dns, http):
            flowing(talker)
        firewall("web", "add", "--before", "1", "action=accept", "srcqube=work", "proto=tcp",
                 "dstports=23")
        firewall("web", "del", "action=accept", "srcqube=work", "proto=tcp", "dstports=22-23")
        changed = time.time()
        stopped(ssh, changed)
        still_flowing(telnet)
        firewall("web", "del", "action=accept", "srcqube=work", "proto=udp", "dstports=53")
        changed = time.time()
        stopped(dns, changed)
        still_flowing(http)
        for qube in ("sys-firewall", "web"):
            for proto, port in (("tcp", 22), ("udp", 53)):
                left = conntrack(api, qube, 4, "-p", proto, "--orig-src", WORK,
                                 "--orig-port-dst", str(port))
                assert left == [], f"{qube} keeps {left}"


def test_narrowed_outbound_rules_end_the_flows_they_no_longer_allow(api: Lab) -> None:
    with api.echo("lan", "tcp", 8000), api.echo("lan", "tcp", 443), \
            api.echo("lan", "udp", 5000), \
            api.talk("web", "tcp", LAN_HOST, 8000) as other_port, \
            api.talk("web", "udp", LAN_HOST, 5000) as udp, \
            api.talk("web", "tcp", LAN_HOST, 443) as https:
        for talker in (other_port, udp, https):
            flowing(talker)
        firewall("web", "add", "--before", "0", "action=accept", "proto=tcp", "dstports=443")
        firewall("web", "add", "action=drop")
        firewall("web", "del", "action=accept")
        changed = time.time()
        stopped(other_port, changed)
        stopped(udp, changed)
        still_flowing(https)
        left = conntrack(api, "sys-firewall", 4, "-p", "tcp", "--orig-src", WEB,
                         "--orig-port-dst", "8000")
        assert left == [], left
