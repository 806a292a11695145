"""Routing exposure end to end in the lab: a qube on the LAN at its own address.

Default lab: web behind sys-firewall behind sys-net (two hops), direct
behind sys-net (one hop). A test gives web (or direct) an address of the
LAN, IPv4 and IPv6, as ``qvm-prefs`` would, sets ``routing-method
forward`` and inbound rules through the real Admin API, and sends real
TCP from the LAN hosts and from the qubes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import wait_for

from admin_client_patch.qubesd_client import qubesd_call
from lab.control import Lab

pytestmark = pytest.mark.lab

LAN, LAN6 = "192.0.2.10", "2001:db8::10"
LAN2, LAN2_6 = "192.0.2.11", "2001:db8::11"
UPLINK, UPLINK6 = "192.0.2.2", "2001:db8::2"
WEB, WEB6 = "192.0.2.25", "2001:db8::25"
DIRECT, DIRECT6 = "192.0.2.26", "2001:db8::26"
#: sources the tests admit: the LAN host "lan" only, in both families
SSH_FROM_LAN = (
    f"action=accept srchost={LAN} proto=tcp dstports=22",
    f"action=accept srchost={LAN6} proto=tcp dstports=22",
)
FEATURE = "routing-method"


def set_rules(qube: str, *lines: str) -> None:
    qubesd_call(qube, "admin.vm.firewall.Set", payload="".join(f"{x}\n" for x in lines).encode())


def reaches(lab: Lab, client: str, host: str, port: int = 22, qube: str = "web",
            source: str | None = None, timeout: float = 3) -> list[str] | None:
    """The source addresses a server in ``qube`` saw, or None when the client got no answer.

    The first packets to a new address wait for neighbour discovery on every
    hop (the lab has no permanent neighbour entries), hence the long default.
    """
    bind = "::" if ":" in host else None
    with lab.serve(qube, "tcp", port, reply=f"{qube}-{port}", bind=bind) as server:
        reply = lab.connect(client, "tcp", host, port, timeout=timeout, source=source)
        return server.peers if reply == f"{qube}-{port}" else None


def seen_from(lab: Lab, qube: str, host: str) -> list[str] | None:
    """The source address a LAN host sees for a connection ``qube`` opens to it."""
    lan_host = "lan"
    bind = "::" if ":" in host else None
    with lab.serve(lan_host, "tcp", 80, reply="lan-80", bind=bind) as server:
        reply = lab.connect(qube, "tcp", host, 80, timeout=3)
        return server.peers if reply == "lan-80" else None


def expose(lab: Lab, qube: str, ip: str, ip6: str, *rules: str) -> None:
    lab.set_ip(qube, ip)
    lab.set(qube, "ip6", ip6)
    set_rules(qube, *rules, "action=accept")
    lab.set_feature(qube, FEATURE, "forward")


def unexpose(lab: Lab, qube: str, ip: str) -> None:
    lab.set_feature(qube, FEATURE, None)
    set_rules(qube, "action=accept")
    lab.set(qube, "ip6", "none")
    lab.set_ip(qube, ip)


def reports(lab: Lab, qube: str) -> dict[str, bytes]:
    return dict(lab.qubesdb(qube).multiread("/qns-routing_status/"))


@pytest.fixture
def api(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Lab:
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    return lab


@pytest.fixture
def web(api: Lab) -> Iterator[Lab]:
    """web exposed at 192.0.2.25 and 2001:db8::25, two hops away, ssh from "lan" only."""
    expose(api, "web", WEB, WEB6, *SSH_FROM_LAN)
    wait_for(lambda: reports(api, "sys-net").get(f"/qns-routing_status/{WEB6}", b"")
             .startswith(b"state=exposed"), "sys-net answers for web")
    yield api
    unexpose(api, "web", "10.137.0.20")
    wait_for(lambda: not reports(api, "sys-net"), "sys-net reports nothing")


@pytest.mark.parametrize(("address", "lan", "lan2"), [(WEB, LAN, LAN2), (WEB6, LAN6, LAN2_6)])
def test_lan_reaches_web_through_two_hops(web: Lab, address: str, lan: str, lan2: str) -> None:
    # No NAT either way: web sees the LAN host's own address.
    assert reaches(web, "lan", address, source=lan) == [lan]
    # What the inbound rules do not name stays refused: another port, another source.
    assert reaches(web, "lan", address, port=23, source=lan, timeout=1) is None
    assert reaches(web, "lan2", address, source=lan2, timeout=1) is None


@pytest.mark.parametrize(("lan", "own"), [(LAN, WEB), (LAN6, WEB6)])
def test_web_connects_out_with_its_own_address(web: Lab, lan: str, own: str) -> None:
    assert seen_from(web, "web", lan) == [own]


@pytest.mark.parametrize(("lan", "uplink"), [(LAN, UPLINK), (LAN6, UPLINK6)])
def test_an_ordinary_qube_on_the_same_hops_is_still_masqueraded(
    web: Lab, lan: str, uplink: str,
) -> None:
    assert seen_from(web, "work", lan) == [uplink]


def test_forwards_of_other_qubes_keep_working(web: Lab) -> None:
    set_rules("work", "action=forward forwardtype=external proto=tcp srcports=8080 dstports=80",
              "action=accept")
    try:
        with web.serve("work", "tcp", 80, reply="work-80") as server:
            wait_for(lambda: web.connect("lan", "tcp", UPLINK, 8080, timeout=1) == "work-80",
                     "lan reaches work's forward")
            assert set(server.peers) <= {LAN, "192.0.2.1"}
    finally:
        set_rules("work", "action=accept")


@pytest.fixture
def direct(api: Lab) -> Iterator[Lab]:
    """direct, right behind sys-net, exposed at 192.0.2.26 and 2001:db8::26."""
    expose(api, "direct", DIRECT, DIRECT6, *SSH_FROM_LAN)
    wait_for(lambda: reports(api, "sys-net").get(f"/qns-routing_status/{DIRECT6}", b"")
             .startswith(b"state=exposed"), "sys-net answers for direct")
    yield api
    unexpose(api, "direct", "10.137.0.8")
    wait_for(lambda: not reports(api, "sys-net"), "sys-net reports nothing")


@pytest.mark.parametrize(("address", "lan", "lan2"),
                         [(DIRECT, LAN, LAN2), (DIRECT6, LAN6, LAN2_6)])
def test_lan_reaches_a_qube_one_hop_away(direct: Lab, address: str, lan: str, lan2: str) -> None:
    assert reaches(direct, "lan", address, qube="direct", source=lan) == [lan]
    assert reaches(direct, "lan2", address, qube="direct", source=lan2, timeout=1) is None
    assert seen_from(direct, "direct", lan) == [address]
