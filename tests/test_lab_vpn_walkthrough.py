"""doc/install.md, "A server behind a VPN ProxyVM", in the lab.

``sys-vpn`` is a ProxyVM between ``web`` and ``sys-firewall`` whose default
route goes into a tunnel (a tun device no VPN client reads, so what enters
it is lost, as on a VPN qube whose tunnel carries all traffic). A forward
from the LAN reaches ``web`` through sys-net, sys-firewall and sys-vpn, and
web's replies go back by sys-vpn's uplink (agent_worker.reply_route), while
everything else web sends still takes the tunnel.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import lab_up, wait_for

from admin_client_patch.qvm_firewall import main as qvm_firewall
from agent_worker import reply_route
from lab.control import Lab

pytestmark = pytest.mark.lab

LAN_HOST_NET = "192.0.2.0/24"
LAN_HOST = "192.0.2.10"
UPLINK = "192.0.2.2"  # sys-net on the LAN
SYS_FIREWALL = "10.137.0.6"

TOPOLOGY = f"""
[lan]
network = "{LAN_HOST_NET}"
gateway = "192.0.2.1"

[[lan.hosts]]
name = "lan"
addresses = ["192.0.2.10", "192.0.2.1"]

[[qubes]]
name = "sys-net"
netvm = "none"
ip = "10.137.0.5"
provides_network = true
uplink = "{UPLINK}/24"
features = {{ "supported-feature.qubes-network-server" = "1" }}

[[qubes]]
name = "sys-firewall"
netvm = "sys-net"
ip = "{SYS_FIREWALL}"
provides_network = true
features = {{ "supported-feature.qubes-network-server" = "1" }}

[[qubes]]
name = "sys-vpn"
netvm = "sys-firewall"
ip = "10.137.0.7"
provides_network = true
features = {{ "supported-feature.qubes-network-server" = "1" }}

[[qubes]]
name = "web"
netvm = "sys-vpn"
ip = "10.137.0.20"
features = {{ "supported-feature.qubes-network-server" = "1" }}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    topology = Path(tmp_path_factory.mktemp("topology")) / "vpn.toml"
    topology.write_text(TOPOLOGY)
    yield from lab_up(tmp_path_factory, topology)


def served_from_the_lan(lab: Lab) -> bool:
    with lab.serve("web", "tcp", 80, reply="web-80"):
        return lab.connect("lan", "tcp", UPLINK, 8080, timeout=1.0) == "web-80"


def reply_rules(lab: Lab, qube: str) -> list[dict[str, object]]:
    """Our routing rule in ``qube`` (IPv4), as ``ip -j rule show`` lists it."""
    shown = lab.exec(qube, ["ip", "-j", "-4", "rule", "show", "pref",
                            str(reply_route.RULE_PRIORITY)], check=True)
    return [rule for rule in json.loads(shown.stdout or "[]") if reply_route.is_ours(rule)]


def reply_routes(lab: Lab, qube: str) -> list[dict[str, object]]:
    shown = lab.exec(qube, ["ip", "-j", "-4", "route", "show", "table",
                            str(reply_route.REPLY_TABLE)])
    return json.loads(shown.stdout or "[]") if shown.returncode == 0 else []


def test_forward_behind_a_vpn_proxyvm_answers_by_the_uplink_the_rest_takes_the_tunnel(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    assert qvm_firewall(["web", "add", "action=forward", "forwardtype=external", "proto=tcp",
                         "srcports=8080", "dstports=80"]) == 0
    wait_for(lambda: served_from_the_lan(lab), "the forward through sys-vpn answers", 15.0)
    with lab.serve("lan", "tcp", 9000, reply="lan-9000"):
        assert lab.connect("web", "tcp", LAN_HOST, 9000) == "lan-9000"  # no tunnel yet

    # Each hop with a gateway routes marked replies by its uplink; sys-net has none.
    gateway = (lab.qubesdb("sys-vpn").read("/qubes-gateway") or b"").decode()
    assert gateway == SYS_FIREWALL
    assert len(reply_rules(lab, "sys-vpn")) == 1
    assert [(r["dst"], r["gateway"], r["dev"]) for r in reply_routes(lab, "sys-vpn")] == [
        ("default", SYS_FIREWALL, "eth0")]
    assert reply_rules(lab, "sys-net") == [] and reply_routes(lab, "sys-net") == []

    # The VPN comes up in sys-vpn and takes every route but its own uplink's.
    for argv in (["ip", "tuntap", "add", "tun0", "mode", "tun"],
                 ["ip", "address", "add", "10.8.0.2/24", "dev", "tun0"],
                 ["ip", "link", "set", "tun0", "up"],
                 ["ip", "route", "add", "0.0.0.0/1", "dev", "tun0"],
                 ["ip", "route", "add", "128.0.0.0/1", "dev", "tun0"]):
        lab.exec("sys-vpn", argv, check=True)
    assert served_from_the_lan(lab)  # replies to the forward: back by the uplink
    with lab.serve("lan", "tcp", 9000, reply="lan-9000"):
        # web's own connection to the LAN: into the tunnel, as the VPN wants
        assert lab.connect("web", "tcp", LAN_HOST, 9000, timeout=1.0) is None

    # The route goes with the uplink when the kernel drops it; a write of the
    # gateway (as dom0 does when the netvm changes) puts it back.
    lab.exec("sys-vpn", ["ip", "route", "flush", "table", str(reply_route.REPLY_TABLE)],
             check=True)
    assert not served_from_the_lan(lab)
    lab.qubesdb("sys-vpn").write("/qubes-gateway", gateway)
    wait_for(lambda: served_from_the_lan(lab), "the route back after the gateway's write", 15.0)
