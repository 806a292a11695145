"""Forwards over IPv6 in the lab: both hops, internal, and the ``ipv6`` feature toggled.

The default topology has feature ``ipv6`` on sys-net, so web and work have
their derived fd09:24ef:4179::/64 addresses and the LAN reaches sys-net at
2001:db8::2. Real TCP/UDP over IPv6, rulesets read back with ``nft -j``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import set_rules
from test_lab_forward import EXTERNAL_HTTP, UPLINK, answers, eventually, qns_rules

from lab.control import Lab

pytestmark = pytest.mark.lab

UPLINK6 = "2001:db8::2"
FW6 = "fd09:24ef:4179::a89:6"
WEB6 = "fd09:24ef:4179::a89:14"


def answers6(
    lab: Lab, client: str, proto: str, host: str, port: int, served_port: int,
    source: str | None = None,
) -> bool:
    """Does a server in web listening on IPv6 ``served_port`` answer the client?"""
    reply = f"web6-{served_port}"
    with lab.serve("web", proto, served_port, reply=reply, bind="::"):
        return lab.connect(client, proto, host, port, timeout=0.5, source=source) == reply


def ipv6_dnat_rules(lab: Lab, qube: str) -> list[str]:
    return [rule for rule in qns_rules(lab, qube, "qns-dnat") if '"ip6"' in rule]


@pytest.fixture
def api(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    set_rules("web", "action=accept")
    yield lab
    lab.set_feature("sys-net", "ipv6", "1")
    set_rules("web", "action=accept")
    for qube in ("sys-net", "sys-firewall"):
        eventually(lambda q=qube: not qns_rules(lab, q, "qns-dnat"), f"{qube} has no forwards")


def test_external_forward_over_ipv6_through_two_hops(api: Lab) -> None:
    assert not answers6(api, "lan", "tcp", UPLINK6, 8080, 80)
    set_rules("web", EXTERNAL_HTTP)
    eventually(lambda: answers6(api, "lan", "tcp", UPLINK6, 8080, 80), "IPv6 LAN reaches web")
    assert answers(api, "lan", "tcp", UPLINK, 8080, 80)  # and IPv4, from the same rule
    assert not answers6(api, "lan", "tcp", UPLINK6, 8081, 80)
    assert not answers6(api, "lan", "tcp", WEB6, 80, 80)


def test_udp_and_srchost_over_ipv6(api: Lab) -> None:
    set_rules("web",
        "action=forward forwardtype=external proto=udp srcports=5353 dstports=53"
        " srchost=2001:db8::10/128"
    )
    # lan holds 2001:db8::1 (the LAN gateway) too, and picks it as source by default.
    eventually(lambda: answers6(api, "lan", "udp", UPLINK6, 5353, 53, source="2001:db8::10"),
               "lan reaches web over UDP from 2001:db8::10")
    assert not answers6(api, "lan", "udp", UPLINK6, 5353, 53, source="2001:db8::1")
    assert not answers6(api, "lan2", "udp", UPLINK6, 5353, 53)  # 2001:db8::11
    # srchost is IPv6, so the rule has no IPv4 half at all.
    assert not answers(api, "lan", "udp", UPLINK, 5353, 53)


def test_internal_forward_over_ipv6(api: Lab) -> None:
    set_rules("web", "action=forward forwardtype=internal proto=tcp srcports=2222 dstports=22")
    eventually(lambda: answers6(api, "work", "tcp", FW6, 2222, 22), "work reaches web over IPv6")
    assert not answers6(api, "work", "tcp", WEB6, 22, 22)


def test_ipv6_toggled_off_and_on(api: Lab) -> None:
    set_rules("web", EXTERNAL_HTTP)
    eventually(lambda: answers6(api, "lan", "tcp", UPLINK6, 8080, 80), "the IPv6 forward works")
    api.set_feature("sys-net", "ipv6", "")
    for qube in ("sys-net", "sys-firewall"):
        eventually(lambda q=qube: not ipv6_dnat_rules(api, q), f"{qube} drops the IPv6 forward")
        assert not api.qubesdb(qube).list(f"/qns-forward/{WEB6}")
    assert answers(api, "lan", "tcp", UPLINK, 8080, 80)  # IPv4 untouched
    api.set_feature("sys-net", "ipv6", "1")
    eventually(lambda: answers6(api, "lan", "tcp", UPLINK6, 8080, 80), "the IPv6 forward is back")


WORK6 = "fd09:24ef:4179::a89:15"


def test_inbound_rule_over_ipv6(api: Lab) -> None:
    """work may open TCP 22 on web over IPv6 only, from its own IPv6 address."""
    assert not answers6(api, "work", "tcp", WEB6, 22, 22)
    set_rules("web", f"action=accept srchost={WORK6} proto=tcp dstports=22", "action=accept")
    eventually(lambda: answers6(api, "work", "tcp", WEB6, 22, 22), "work reaches web:22 over IPv6")
    assert not answers6(api, "work", "tcp", WEB6, 23, 23)
    assert not answers(api, "work", "tcp", "10.137.0.20", 22)  # the rule is IPv6 only
    set_rules("web", "action=accept")
    eventually(lambda: not answers6(api, "work", "tcp", WEB6, 22, 22), "the rule is gone")
