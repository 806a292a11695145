"""IPv6 in the lab, the Qubes way: feature ``ipv6`` on sys-net, inherited below it.

Real traffic over IPv6 through one hop (direct) and two masquerading hops
(web, work), outbound rules split by family as upstream writes them, the
antispoof sets, and the feature toggled live, off and on again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import set_rules, wait_for

from lab.control import Lab

pytestmark = pytest.mark.lab

LAN6, LAN2_6 = "2001:db8::10", "2001:db8::11"
LAN4 = "192.0.2.10"
UPLINK6 = "2001:db8::2"
WEB4, WORK4 = "10.137.0.20", "10.137.0.21"
SYS_NET6 = "fd09:24ef:4179::a89:5"
SYS_FIREWALL6 = "fd09:24ef:4179::a89:6"
WEB6, WORK6, DIRECT6 = (
    "fd09:24ef:4179::a89:14", "fd09:24ef:4179::a89:15", "fd09:24ef:4179::a89:8",
)


@pytest.fixture
def api(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """The lab with qvm-firewall's socket set; web's rules and IPv6 reset afterwards."""
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    yield lab
    lab.set_feature("sys-net", "ipv6", "1")
    lab.set_feature("web", "ipv6", None)
    set_rules("web", "action=accept")


def reaches(lab: Lab, qube: str, host: str, port: int = 8080, proto: str = "tcp") -> bool:
    """Does ``qube`` get an answer from a server on the LAN host that holds ``host``?"""
    server_host = "lan2" if host in (LAN2_6, "192.0.2.11") else "lan"
    with lab.serve(server_host, proto, port, reply="pong", bind=host):
        return lab.connect(qube, proto, host, port, timeout=0.5) == "pong"


def global_ip6(lab: Lab, qube: str) -> list[str]:
    """The qube's global IPv6 addresses on eth0, as ``addr/len``."""
    result = lab.exec(qube, ["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"])
    return [line.split()[3] for line in result.stdout.splitlines()]


def allowed6(lab: Lab, netvm: str) -> str:
    return lab.exec(netvm, ["nft", "list", "set", "ip6", "qubes", "allowed"], check=True).stdout


def firewall_dirs(lab: Lab, netvm: str) -> set[str]:
    """Client addresses with a ``/qubes-firewall/<addr>`` completion entry in the netvm."""
    entries = lab.qubesdb(netvm).multiread("/qubes-firewall/")
    return {path.split("/")[2] for path in entries if path.count("/") == 2}


def test_qubes_below_sys_net_get_their_derived_ipv6_address(lab: Lab) -> None:
    assert global_ip6(lab, "web") == [f"{WEB6}/128"]
    assert global_ip6(lab, "work") == [f"{WORK6}/128"]
    assert global_ip6(lab, "direct") == [f"{DIRECT6}/128"]
    assert global_ip6(lab, "sys-firewall") == [f"{SYS_FIREWALL6}/128"]
    default = lab.exec("web", ["ip", "-6", "route", "show", "default"], check=True).stdout
    assert f"via {SYS_FIREWALL6} dev eth0" in default
    default = lab.exec("direct", ["ip", "-6", "route", "show", "default"], check=True).stdout
    assert f"via {SYS_NET6} dev eth0" in default
    assert lab.qube_info("web")["ip6"] == WEB6


def test_qubesdb_holds_the_ipv6_keys_qubesd_writes(lab: Lab) -> None:
    web = lab.qubesdb("web")
    assert web.read("/qubes-ip6") == WEB6.encode()
    assert web.read("/qubes-gateway6") == SYS_FIREWALL6.encode()
    firewall = lab.qubesdb("sys-firewall")
    assert firewall.read("/qubes-ip6") == SYS_FIREWALL6.encode()
    assert firewall.read("/qubes-gateway6") == SYS_NET6.encode()
    assert firewall.read("/qubes-netvm-gateway6") == SYS_FIREWALL6.encode()
    assert sorted(firewall.read("/connected-ips6").split()) == [WEB6.encode(), WORK6.encode()]
    assert firewall_dirs(lab, "sys-firewall") == {WEB4, WORK4, WEB6, WORK6}
    assert firewall.read(f"/qubes-firewall/{WEB6}/policy") in (b"accept", b"drop")
    sys_net = lab.qubesdb("sys-net")
    assert sys_net.read("/qubes-netvm-gateway6") == SYS_NET6.encode()
    assert sys_net.read("/qubes-ip6") is None  # no netvm: qubesd writes no client keys
    assert sorted(sys_net.read("/connected-ips6").split()) == sorted(
        [SYS_FIREWALL6.encode(), DIRECT6.encode()]
    )


def test_vif_side_is_wired_for_ipv6_like_vif_route_qubes(lab: Lab) -> None:
    vif = lab.vif("web")
    assert vif is not None
    addresses = lab.exec("sys-firewall", ["ip", "-6", "-o", "addr", "show", vif],
                         check=True).stdout
    assert f"{SYS_FIREWALL6}/128" in addresses
    routes = lab.exec("sys-firewall", ["ip", "-6", "route", "show", WEB6], check=True).stdout
    assert f"dev {vif}" in routes
    assert f'"{vif}" . {WEB6}' in allowed6(lab, "sys-firewall")
    for name in ("all/forwarding", f"{vif}/proxy_ndp"):
        value = lab.exec("sys-firewall", ["cat", f"/proc/sys/net/ipv6/conf/{name}"], check=True)
        assert value.stdout.strip() == "1", name


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("qube", ["web", "direct"])  # two hops, one hop
def test_qube_reaches_the_lan_over_ipv6_through_masquerading_hops(
    lab: Lab, qube: str, proto: str
) -> None:
    # Bound to one address so UDP answers from it (lan holds two IPv6 addresses).
    with lab.serve("lan", proto, 8080, reply="pong", bind=LAN6) as server:
        assert lab.connect(qube, proto, LAN6, 8080) == "pong"
    assert server.peers == [UPLINK6]


def test_lan_cannot_reach_qubes_over_ipv6(lab: Lab) -> None:
    with lab.serve("web", "tcp", 8080, bind="::"), lab.serve("direct", "tcp", 8081, bind="::"):
        assert lab.connect("lan", "tcp", WEB6, 8080, timeout=0.5) is None
        assert lab.connect("lan", "tcp", DIRECT6, 8081, timeout=0.5) is None


def test_qubes_behind_one_netvm_cannot_reach_each_other_over_ipv6(lab: Lab) -> None:
    with lab.serve("web", "tcp", 8080, bind="::"):
        assert lab.connect("work", "tcp", WEB6, 8080, timeout=0.5) is None


def test_an_ipv6_rule_applies_to_ipv6_only(api: Lab) -> None:
    set_rules("web", f"action=drop dst6={LAN6}/128", "action=accept")
    entries4 = api.qubesdb("sys-firewall").multiread(f"/qubes-firewall/{WEB4}/")
    entries6 = api.qubesdb("sys-firewall").multiread(f"/qubes-firewall/{WEB6}/")
    assert entries6[f"/qubes-firewall/{WEB6}/0000"] == f"action=drop dst6={LAN6}/128".encode()
    assert f"/qubes-firewall/{WEB4}/0000" not in entries4  # the other family's rule: a gap
    assert entries4[f"/qubes-firewall/{WEB4}/0001"] == b"action=accept"
    assert not reaches(api, "web", LAN6)
    assert reaches(api, "web", LAN2_6)
    assert reaches(api, "web", LAN4)
    assert reaches(api, "work", LAN6)  # other qubes keep their own rules


def test_an_ipv4_rule_does_not_touch_ipv6(api: Lab) -> None:
    set_rules("web", "action=drop dst4=192.0.2.0/24", "action=accept")
    assert not reaches(api, "web", LAN4)
    assert reaches(api, "web", LAN6)


def test_a_rule_without_address_applies_to_both_families(api: Lab) -> None:
    set_rules("web", "action=drop proto=tcp dstports=8080", "action=accept")
    assert not reaches(api, "web", LAN6, 8080)
    assert not reaches(api, "web", LAN4, 8080)
    assert reaches(api, "web", LAN6, 8081)
    assert reaches(api, "web", LAN6, 8080, proto="udp")


@pytest.fixture
def compromised_work(lab: Lab) -> Iterator[None]:
    """work skips its own IPv6 masquerade, which would otherwise hide a spoofed source."""
    added = lab.exec("work", ["nft", "-e", "-a", "insert", "rule", "ip6", "qubes", "postrouting",
                              "ip6", "saddr", "!=", WORK6, "accept"], check=True).stdout
    handle = added.split("# handle")[-1].split()[0]
    yield
    lab.exec("work", ["nft", "delete", "rule", "ip6", "qubes", "postrouting", "handle", handle],
             check=True)


def _antispoof6_drops(lab: Lab, netvm: str) -> int:
    for item in lab.nft_json(netvm)["nftables"]:
        rule: dict[str, Any] = item.get("rule", {})
        if rule.get("family") == "ip6" and rule.get("chain") == "antispoof":
            for expr in rule["expr"]:
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
    raise AssertionError("ip6 antispoof chain has no counter")


@pytest.mark.parametrize("spoofed", [WEB6, "fd09:24ef:4179::a89:63", LAN2_6])
@pytest.mark.usefixtures("compromised_work")
def test_spoofed_ipv6_source_from_work_is_dropped(lab: Lab, spoofed: str) -> None:
    before = _antispoof6_drops(lab, "sys-firewall")
    with lab.serve("lan", "tcp", 8080, bind="::") as server:
        assert lab.connect("work", "tcp", LAN6, 8080, timeout=0.5, source=spoofed) is None
        assert lab.connect("work", "tcp", LAN6, 8080) == "ok"
    assert server.peers == [UPLINK6]
    assert _antispoof6_drops(lab, "sys-firewall") > before


def test_ipv6_off_on_sys_net_removes_it_below_and_on_restores_it(api: Lab) -> None:
    set_rules("web", f"action=drop dst6={LAN2_6}/128", "action=accept")
    api.set_feature("sys-net", "ipv6", "")
    for qube in ("web", "work", "direct", "sys-firewall"):
        assert global_ip6(api, qube) == [], qube
        assert api.qubesdb(qube).read("/qubes-ip6") is None, qube
        assert api.qubesdb(qube).read("/qubes-gateway6") is None, qube
    for netvm in ("sys-net", "sys-firewall"):
        db = api.qubesdb(netvm)
        assert db.read("/qubes-netvm-gateway6") is None
        assert db.read("/connected-ips6") == b""
        assert all(":" not in address for address in firewall_dirs(api, netvm))
        assert "fd09" not in allowed6(api, netvm)
        forwarding = api.exec(netvm, ["cat", "/proc/sys/net/ipv6/conf/all/forwarding"])
        assert forwarding.stdout.strip() == "0"
    assert not reaches(api, "web", LAN6)
    assert not reaches(api, "direct", LAN6)
    assert reaches(api, "web", LAN4)  # IPv4 untouched

    api.set_feature("sys-net", "ipv6", "1")
    assert global_ip6(api, "web") == [f"{WEB6}/128"]
    assert firewall_dirs(api, "sys-firewall") == {WEB4, WORK4, WEB6, WORK6}
    rule = api.qubesdb("sys-firewall").read(f"/qubes-firewall/{WEB6}/0000")
    assert rule == f"action=drop dst6={LAN2_6}/128".encode()
    wait_for(lambda: reaches(api, "web", LAN6), "web reaches the LAN over IPv6 again")
    assert not reaches(api, "web", LAN2_6)
    assert reaches(api, "direct", LAN6)


def test_ipv6_empty_on_one_qube_turns_it_off_there_only(api: Lab) -> None:
    api.set_feature("web", "ipv6", "")
    assert global_ip6(api, "web") == []
    assert api.qube_info("web")["ip6"] is None
    assert WEB6 not in firewall_dirs(api, "sys-firewall")
    assert not reaches(api, "web", LAN6)
    assert reaches(api, "work", LAN6)
    api.set_feature("web", "ipv6", None)  # unset: inherited from sys-net again
    assert global_ip6(api, "web") == [f"{WEB6}/128"]
    assert reaches(api, "web", LAN6)


def test_a_netvm_change_moves_ipv6_along(api: Lab) -> None:
    """work moved to sys-net keeps IPv6 (sys-net has it) with sys-net as gateway."""
    api.set_netvm("work", "sys-net")
    try:
        assert api.qubesdb("work").read("/qubes-gateway6") == SYS_NET6.encode()
        assert WORK6 in api.qubesdb("sys-net").read("/connected-ips6").decode().split()
        assert WORK6 not in firewall_dirs(api, "sys-firewall")
        assert reaches(api, "work", LAN6)
    finally:
        api.set_netvm("work", "sys-firewall")
    assert reaches(api, "work", LAN6)
