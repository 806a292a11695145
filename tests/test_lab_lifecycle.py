"""Qube life cycle in the lab: start, stop, restart, netvm and ip changes, live."""

from __future__ import annotations

import pytest

from lab.control import Lab, LabError

pytestmark = pytest.mark.lab

LAN_HOST = "192.0.2.10"
WEB, WORK = "10.137.0.20", "10.137.0.21"
DIRECT = "10.137.0.8"  # behind sys-net


def _connected(lab: Lab, netvm: str) -> list[str]:
    value = lab.qubesdb(netvm).read("/connected-ips")
    return sorted(value.decode().split()) if value else []


def _firewall_clients(lab: Lab, netvm: str) -> set[str]:
    """IPv4 client addresses with a completed ``/qubes-firewall/<ip>`` in the netvm."""
    return {
        path.split("/")[2] for path in lab.qubesdb(netvm).list("/qubes-firewall/")
        if path.count("/") == 2 and ":" not in path
    }


def _reaches_lan(lab: Lab, qube: str) -> bool:
    with lab.serve("lan", "tcp", 8080):
        return lab.connect(qube, "tcp", LAN_HOST, 8080) == "ok"


def test_stop_and_start_give_a_new_vif_and_update_connected_ips(lab: Lab) -> None:
    old_vif = lab.vif("work")
    lab.stop("work")
    info = lab.qube_info("work")
    assert (info["running"], info["vif"], info["domid"]) == (False, None, None)
    assert _connected(lab, "sys-firewall") == [WEB]
    assert _firewall_clients(lab, "sys-firewall") == {WEB}
    assert lab.qubesdb("sys-firewall").read(f"/mapped-ip/{WORK}/visible-ip") is None
    links = lab.exec("sys-firewall", ["ip", "-o", "link"], check=True).stdout
    assert f"{old_vif}@" not in links
    with pytest.raises(LabError, match="not running"):
        lab.exec("work", ["true"])
    lab.start("work")
    new_vif = lab.vif("work")
    assert new_vif is not None and new_vif != old_vif
    assert _connected(lab, "sys-firewall") == [WEB, WORK]
    assert _firewall_clients(lab, "sys-firewall") == {WEB, WORK}
    assert _reaches_lan(lab, "work")


def test_restart_gives_a_new_domid_and_vif(lab: Lab) -> None:
    before = lab.qube_info("web")
    lab.restart("web")
    after = lab.qube_info("web")
    assert after["domid"] > before["domid"]
    assert after["vif"] == f"vif{after['domid']}.0" != before["vif"]
    assert _connected(lab, "sys-firewall") == [WEB, WORK]
    assert _reaches_lan(lab, "web")


def test_netvm_stop_is_refused_while_clients_run(lab: Lab) -> None:
    with pytest.raises(LabError, match="other qubes connected to sys-firewall: web, work"):
        lab.stop("sys-firewall")
    assert lab.qube_info("sys-firewall")["running"]


def test_netvm_restart_reattaches_its_clients(lab: Lab) -> None:
    clients_before = {q: lab.vif(q) for q in ("web", "work")}
    firewall_vif = lab.vif("sys-firewall")
    lab.restart("sys-firewall")
    assert lab.vif("sys-firewall") != firewall_vif
    # A client keeps its domid, so its vif keeps its name in the new netvm.
    assert {q: lab.vif(q) for q in ("web", "work")} == clients_before
    assert _connected(lab, "sys-firewall") == [WEB, WORK]
    assert _connected(lab, "sys-net") == ["10.137.0.6", DIRECT]
    assert lab.qube_info("sys-firewall")["services"]["firewall"]["alive"]
    assert _reaches_lan(lab, "web")
    assert _reaches_lan(lab, "work")


def test_start_of_a_qube_starts_its_netvm_first(lab: Lab) -> None:
    lab.stop("web")
    lab.stop("work")
    lab.stop("sys-firewall")
    assert _connected(lab, "sys-net") == [DIRECT]
    lab.start("web")
    assert lab.qube_info("sys-firewall")["running"]
    assert not lab.qube_info("work")["running"]
    assert _connected(lab, "sys-firewall") == [WEB]
    assert _reaches_lan(lab, "web")
    lab.start("work")


def test_set_netvm_rewires_a_running_qube(lab: Lab) -> None:
    lab.set_netvm("work", "sys-net")
    assert _connected(lab, "sys-firewall") == [WEB]
    assert WORK not in _firewall_clients(lab, "sys-firewall")
    assert _connected(lab, "sys-net") == sorted([WORK, "10.137.0.6", DIRECT])
    assert WORK in _firewall_clients(lab, "sys-net")
    assert lab.qubesdb("work").read("/qubes-gateway") == b"10.137.0.5"
    assert _reaches_lan(lab, "work")
    lab.set_netvm("work", None)
    assert lab.vif("work") is None
    assert _connected(lab, "sys-net") == ["10.137.0.6", DIRECT]
    assert lab.qubesdb("work").read("/qubes-ip") is None
    assert lab.exec("work", ["ip", "link", "show", "eth0"]).returncode != 0
    lab.set_netvm("work", "sys-firewall")
    assert _connected(lab, "sys-firewall") == [WEB, WORK]
    assert _reaches_lan(lab, "work")


def test_set_ip_rewires_and_moves_the_entries(lab: Lab) -> None:
    lab.set_ip("web", "10.137.0.30")
    assert _connected(lab, "sys-firewall") == sorted(["10.137.0.30", WORK])
    assert _firewall_clients(lab, "sys-firewall") == {"10.137.0.30", WORK}
    assert lab.qubesdb("web").read("/qubes-ip") == b"10.137.0.30"
    assert _reaches_lan(lab, "web")
    lab.set_ip("sys-firewall", "10.137.0.7")
    assert lab.qubesdb("web").read("/qubes-gateway") == b"10.137.0.7"
    assert _connected(lab, "sys-net") == ["10.137.0.7", DIRECT]
    assert _reaches_lan(lab, "web")
    lab.set_ip("sys-firewall", "10.137.0.6")
    lab.set_ip("web", WEB)
    assert _connected(lab, "sys-firewall") == [WEB, WORK]


@pytest.mark.parametrize(
    ("qube", "prop", "value", "message"),
    [
        ("web", "ip", "10.137.0.21", "given to both"),
        ("web", "ip", "not-an-ip", "invalid ip"),
        ("web", "ip6", "10.137.0.99", "invalid ip6"),
        ("web", "netvm", "work", "does not provide network"),
        ("web", "netvm", "nope", "does not exist"),
        ("sys-net", "netvm", "sys-firewall", "netvm loop"),
        ("web", "label", "red", "only netvm, ip, ip6 and provides_network"),
        ("web", "provides_network", "yes", "true or false"),
        ("sys-firewall", "provides_network", "false", "does not provide network"),
        ("nope", "ip", "10.137.0.99", "no such qube"),
    ],
)
def test_bad_changes_are_refused_and_change_nothing(
    lab: Lab, qube: str, prop: str, value: str, message: str
) -> None:
    before = lab.status()["qubes"]
    with pytest.raises(LabError, match=message):
        lab.set(qube, prop, value)
    assert lab.status()["qubes"] == before
