"""The default lab is wired like Qubes: traffic, NAT, isolation, antispoof, QubesDB."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from lab.control import Lab

pytestmark = pytest.mark.lab

LAN_HOST = "192.0.2.10"
UPLINK = "192.0.2.2"
WEB, WORK = "10.137.0.20", "10.137.0.21"


def _rules(ruleset: dict[str, Any], family: str, table: str, chain: str) -> list[dict[str, Any]]:
    return [
        item["rule"] for item in ruleset["nftables"]
        if "rule" in item and item["rule"]["family"] == family
        and item["rule"]["table"] == table and item["rule"]["chain"] == chain
    ]


def _antispoof_drops(lab: Lab, qube: str) -> int:
    """Packets counted by the final drop of the antispoof chain."""
    for rule in _rules(lab.nft_json(qube), "ip", "qubes", "antispoof"):
        for expr in rule["expr"]:
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    raise AssertionError("antispoof chain has no counter")


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("qube", ["web", "work"])
def test_qube_reaches_the_lan_through_two_masquerading_hops(
    lab: Lab, qube: str, proto: str
) -> None:
    with lab.serve("lan", proto, 8080, reply=f"hello {proto}") as server:
        assert lab.connect(qube, proto, LAN_HOST, 8080) == f"hello {proto}"
    assert server.peers == [UPLINK]


def test_lan_cannot_reach_qubes_directly(lab: Lab) -> None:
    with lab.serve("web", "tcp", 8080), lab.serve("sys-firewall", "tcp", 8081):
        assert lab.connect("lan", "tcp", WEB, 8080, timeout=0.5) is None
        assert lab.connect("lan", "tcp", "10.137.0.6", 8081, timeout=0.5) is None
    with lab.serve("sys-net", "tcp", 8082):
        assert lab.connect("lan", "tcp", UPLINK, 8082, timeout=0.5) is None


def test_qubes_behind_one_netvm_cannot_reach_each_other(lab: Lab) -> None:
    with lab.serve("web", "tcp", 8080):
        assert lab.connect("work", "tcp", WEB, 8080, timeout=0.5) is None


@pytest.fixture
def compromised_work(lab: Lab) -> Iterator[None]:
    """work as an attacker controls it: its own masquerade no longer hides spoofing.

    The base ruleset masquerades everything a qube sends out of eth0, which
    would rewrite a spoofed source to the qube's own address; a compromised
    qube simply skips that, so the test does too.
    """
    added = lab.exec("work", ["nft", "-e", "-a", "insert", "rule", "ip", "qubes", "postrouting",
                              "ip", "saddr", "!=", WORK, "accept"], check=True).stdout
    handle = added.split("# handle")[-1].split()[0]
    yield
    lab.exec("work", ["nft", "delete", "rule", "ip", "qubes", "postrouting", "handle", handle],
             check=True)


@pytest.mark.parametrize("spoofed", [WEB, "10.137.0.99", LAN_HOST])
@pytest.mark.usefixtures("compromised_work")
def test_spoofed_source_from_work_is_dropped(lab: Lab, spoofed: str) -> None:
    before = _antispoof_drops(lab, "sys-firewall")
    with lab.serve("lan", "tcp", 8080) as server:
        assert lab.connect("work", "tcp", LAN_HOST, 8080, timeout=0.5, source=spoofed) is None
        assert lab.connect("work", "tcp", LAN_HOST, 8080) == "ok"
    assert server.peers == [UPLINK]
    assert _antispoof_drops(lab, "sys-firewall") > before


def test_every_qube_has_the_qubes_base_ruleset(lab: Lab) -> None:
    for qube in ("sys-net", "sys-firewall", "web", "work"):
        ruleset = lab.nft_json(qube)
        chains = {
            (item["chain"]["family"], item["chain"]["name"])
            for item in ruleset["nftables"] if "chain" in item and item["chain"]["table"] == "qubes"
        }
        common = ("prerouting", "antispoof", "input", "forward", "postrouting",
                  "custom-input", "custom-forward")
        # as on Qubes: qubes-setup-dnat-to-ns adds dnat-dns to ip only, and
        # the ip6 input hands downstream ICMPv6 to _icmpv6
        expected = {("ip", c) for c in (*common, "dnat-dns")}
        expected |= {("ip6", c) for c in (*common, "_icmpv6")}
        assert expected <= chains, qube
        assert ("ip6", "dnat-dns") not in chains, qube
        assert _rules(ruleset, "ip", "qubes", "custom-input") == []
        assert _rules(ruleset, "ip", "qubes", "custom-forward") == []


def test_netvms_run_the_firewall_worker(lab: Lab) -> None:
    for netvm in ("sys-net", "sys-firewall"):
        tables = {
            (item["table"]["family"], item["table"]["name"])
            for item in lab.nft_json(netvm)["nftables"] if "table" in item
        }
        assert ("ip", "qubes-firewall") in tables
        assert lab.qube_info(netvm)["services"]["firewall"]["alive"]
    assert "firewall" not in lab.qube_info("web")["services"]


def test_vif_side_is_wired_like_vif_route_qubes(lab: Lab) -> None:
    vif = lab.vif("web")
    assert vif is not None and vif.startswith("vif") and vif.endswith(".0")
    link = lab.exec("sys-firewall", ["ip", "-d", "link", "show", vif], check=True).stdout
    assert "group 2" in link
    addresses = lab.exec("sys-firewall", ["ip", "-4", "-o", "addr", "show", vif],
                         check=True).stdout
    assert "10.137.0.6/32" in addresses
    routes = lab.exec("sys-firewall", ["ip", "route", "show", WEB], check=True).stdout
    assert f"dev {vif}" in routes
    ruleset = lab.exec("sys-firewall", ["nft", "list", "set", "ip", "qubes", "allowed"],
                       check=True).stdout
    assert f'"{vif}" . {WEB}' in ruleset
    web = lab.exec("web", ["ip", "-4", "-o", "addr", "show", "eth0"], check=True).stdout
    assert f"{WEB}/32" in web
    default = lab.exec("web", ["ip", "route", "show", "default"], check=True).stdout
    assert "via 10.137.0.6 dev eth0" in default


def test_qubesdb_holds_what_qubesd_writes(lab: Lab) -> None:
    web = lab.qubesdb("web")
    assert web.read("/name") == b"web"
    assert web.read("/qubes-vm-type") == b"AppVM"
    assert web.read("/qubes-ip") == WEB.encode()
    assert web.read("/qubes-netmask") == b"255.255.255.255"
    assert web.read("/qubes-gateway") == b"10.137.0.6"
    assert web.read("/qubes-primary-dns") == b"10.139.1.1"
    assert web.read("/qubes-secondary-dns") == b"10.139.1.2"
    firewall = lab.qubesdb("sys-firewall")
    assert firewall.read("/qubes-vm-type") == b"NetVM"
    assert firewall.read("/qubes-netvm-gateway") == b"10.137.0.6"
    assert firewall.read("/qubes-netvm-netmask") == b"255.255.255.255"
    assert firewall.read("/qubes-netvm-network") == b"10.137.0.6"
    assert firewall.read("/qubes-service/qubes-firewall") == b"1"
    assert sorted(firewall.read("/connected-ips").split()) == [WEB.encode(), WORK.encode()]
    assert firewall.read(f"/qubes-firewall/{WEB}") == b""
    assert firewall.read(f"/qubes-firewall/{WEB}/policy") in (b"accept", b"drop")
    assert firewall.read(f"/mapped-ip/{WEB}/visible-gateway") == b"10.137.0.6"
    assert lab.qubesdb("sys-net").read("/connected-ips") == b"10.137.0.6 10.137.0.8"
    assert lab.qubesdb("sys-net").read("/qubes-ip") is None


def test_exec_gives_the_qube_environment(lab: Lab) -> None:
    script = ("import qubesdb, os; db = qubesdb.QubesDB(); "
              "print(db.read('/name').decode(), os.environ['QUBESDB_QUBE'])")
    result = lab.exec("web", ["python3", "-c", script], check=True)
    assert result.stdout.split() == ["web", "web"]
    dom0 = lab.exec("dom0", ["sh", "-c", "echo $QUBESD_SOCKET"], check=True)
    assert dom0.stdout.strip() == str(lab.qubesd_socket)
