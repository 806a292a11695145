"""Routing exposure end to end in the lab: a qube on the LAN at its own address.

Default lab: web behind sys-firewall behind sys-net (two hops), direct
behind sys-net (one hop). A test gives web (or direct) an address of the
LAN, IPv4 and IPv6, as ``qvm-prefs`` would, sets ``routing-method
forward`` and inbound rules through the real Admin API, and sends real
TCP from the LAN hosts and from the qubes.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import set_rules, wait_for

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


def reaches(lab: Lab, client: str, host: str, port: int = 22, qube: str = "web",
            source: str | None = None, timeout: float = 3) -> list[str] | None:
    """The source addresses a server in ``qube`` saw, or None when the client got no answer.

    The first packets to a new address wait for neighbour discovery on every
    hop (the lab has no permanent neighbour entries), hence the long default.
    """
    bind = "::" if ":" in host else None
    with lab.serve(qube, "tcp", port, reply=f"{qube}-{port}", bind=bind) as server:
        reply = lab.connect(client, "tcp", host, port, timeout=timeout, source=source)
        if reply != f"{qube}-{port}":
            return None
        wait_for(lambda: bool(server.peers), "the server's report of its peer")
        return server.peers


def seen_from(lab: Lab, qube: str, host: str) -> list[str] | None:
    """The source address a LAN host sees for a connection ``qube`` opens to it."""
    lan_host = "lan"
    bind = "::" if ":" in host else None
    with lab.serve(lan_host, "tcp", 80, reply="lan-80", bind=bind) as server:
        reply = lab.connect(qube, "tcp", host, 80, timeout=3)
        if reply != "lan-80":
            return None
        wait_for(lambda: bool(server.peers), "the server's report of its peer")
        return server.peers


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
    wait_for(lambda: exposed(api, WEB) and exposed(api, WEB6), "sys-net answers for web")
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
    wait_for(lambda: exposed(api, DIRECT) and exposed(api, DIRECT6), "sys-net answers for direct")
    yield api
    unexpose(api, "direct", "10.137.0.8")
    wait_for(lambda: not reports(api, "sys-net"), "sys-net reports nothing")


@pytest.mark.parametrize(("address", "lan", "lan2"),
                         [(DIRECT, LAN, LAN2), (DIRECT6, LAN6, LAN2_6)])
def test_lan_reaches_a_qube_one_hop_away(direct: Lab, address: str, lan: str, lan2: str) -> None:
    assert reaches(direct, "lan", address, qube="direct", source=lan) == [lan]
    assert reaches(direct, "lan2", address, qube="direct", source=lan2, timeout=1) is None
    assert seen_from(direct, "direct", lan) == [address]


# -- what the edge answers ------------------------------------------------------


def answering(lab: Lab, address: str, host: str = "lan") -> list[str]:
    """MACs answering ARP/NDP for ``address`` on the LAN, asked by a LAN host."""
    source = LAN6 if ":" in address else LAN
    if host == "lan2":
        source = LAN2_6 if ":" in address else LAN2
    result = lab.exec(host, [*probe_argv(), "neigh", "eth0", address, "--source", source],
                      check=True)
    return result.stdout.split()


def probe_argv() -> list[str]:
    return ["python3", "-m", "lab.probe"]


def mac(lab: Lab, qube: str) -> str:
    return str(json.loads(lab.exec(qube, ["ip", "-j", "link", "show", "eth0"], check=True)
                          .stdout)[0]["address"])


INTERNAL = ("10.137.0.20", "10.137.0.21", "10.137.0.6", "10.137.0.8",
            "fd09:24ef:4179::a89:14", "fd09:24ef:4179::a89:6")


def test_sys_net_answers_for_web_and_nothing_else(web: Lab) -> None:
    sys_net = mac(web, "sys-net")
    assert answering(web, WEB) == [sys_net]
    assert answering(web, WEB6) == [sys_net]
    for other in ("192.0.2.99", "2001:db8::99", *INTERNAL):
        assert answering(web, other) == [], other
    # LAN hosts still answer for themselves, and only they do
    assert answering(web, LAN2) == [mac(web, "lan2")]
    assert answering(web, LAN2_6) == [mac(web, "lan2")]
    proxy_arp = web.exec("sys-net", ["sysctl", "-n", "net.ipv4.conf.eth0.proxy_arp"], check=True)
    assert proxy_arp.stdout.strip() == "0"  # no interface-wide switch


# -- life cycle: nothing answered, nothing left ---------------------------------


def left_for(lab: Lab, address: str) -> list[str]:
    """What any running hop still holds for ``address``: proxy entries, routes, rules, entries."""
    found = []
    for hop in ("sys-net", "sys-firewall"):
        if not lab.qube_info(hop)["running"]:
            continue
        family = "-6" if ":" in address else "-4"
        proxies = lab.exec(hop, ["ip", family, "neigh", "show", "proxy"], check=True).stdout
        routes = lab.exec(hop, ["ip", family, "route", "show", "proto", "145"], check=True).stdout
        ruleset = lab.exec(hop, ["nft", "list", "table", "ip6" if ":" in address else "ip",
                                 "qubes"], check=True).stdout
        db = lab.qubesdb(hop)
        found += [f"{hop}: proxy {line}" for line in proxies.splitlines() if address in line]
        found += [f"{hop}: route {line}" for line in routes.splitlines() if address in line]
        found += [f"{hop}: nft {line.strip()}" for line in ruleset.splitlines()
                  if address in line]
        found += [f"{hop}: qubesdb {path}" for path in db.list(f"/qns-routing/{address}")]
        found += [f"{hop}: report {path}" for path in db.list(f"/qns-routing_status/{address}")]
    return found


def withdrawn(lab: Lab, *addresses: str) -> bool:
    return all(not left_for(lab, a) and not answering(lab, a) for a in addresses)


def exposed(lab: Lab, address: str) -> bool:
    status = lab.qubesdb("sys-net").read(f"/qns-routing_status/{address}") or b""
    return status.startswith(b"state=exposed") and answering(lab, address) == [
        mac(lab, "sys-net")
    ]


def test_nothing_is_answered_or_left_once_web_stops(web: Lab) -> None:
    web.stop("web")
    try:
        wait_for(lambda: withdrawn(web, WEB, WEB6), "sys-net withdraws web's addresses")
    finally:
        web.start("web")
    wait_for(lambda: exposed(web, WEB) and exposed(web, WEB6), "web exposed again")
    assert reaches(web, "lan", WEB, source=LAN) == [LAN]


def test_an_ip_change_moves_the_exposure(web: Lab) -> None:
    web.set_ip("web", "192.0.2.27")
    web.set("web", "ip6", "2001:db8::27")
    wait_for(lambda: withdrawn(web, WEB, WEB6), "the old addresses are withdrawn")
    wait_for(lambda: exposed(web, "192.0.2.27") and exposed(web, "2001:db8::27"),
             "the new addresses are exposed")
    set_rules("web", f"action=accept srchost={LAN} proto=tcp dstports=22", "action=accept")
    wait_for(lambda: reaches(web, "lan", "192.0.2.27", source=LAN) == [LAN], "lan reaches web")


def test_a_netvm_change_moves_the_exposure(web: Lab) -> None:
    web.set_netvm("web", "sys-net")  # one hop now: sys-firewall carries nothing any more
    wait_for(lambda: exposed(web, WEB) and exposed(web, WEB6), "web exposed one hop away")
    assert not web.qubesdb("sys-firewall").list("/qns-routing/")
    assert reaches(web, "lan", WEB, source=LAN) == [LAN]
    web.set_netvm("web", None)
    try:
        wait_for(lambda: withdrawn(web, WEB, WEB6), "nothing answered without a netvm")
    finally:
        web.set_netvm("web", "sys-firewall")


def test_nothing_is_answered_while_sys_firewall_is_stopped(web: Lab) -> None:
    web.stop("sys-firewall", force=True)
    try:
        wait_for(lambda: withdrawn(web, WEB, WEB6), "sys-net withdraws web's addresses")
    finally:
        web.start("sys-firewall")
    wait_for(lambda: exposed(web, WEB) and exposed(web, WEB6), "web exposed again")
    assert reaches(web, "lan", WEB, source=LAN) == [LAN]


def conntrack(lab: Lab, qube: str, address: str) -> str:
    family = "ipv6" if ":" in address else "ipv4"
    listed = lab.exec(qube, ["conntrack", "-L", "-f", family, "-d", address])
    return listed.stdout


def test_unexposing_ends_the_lan_flows_and_keeps_the_siblings(web: Lab) -> None:
    set_rules("web", *SSH_FROM_LAN, "action=accept srcqube=work proto=tcp dstports=22",
              "action=accept")
    wait_for(lambda: reaches(web, "work", WEB) == ["10.137.0.21"], "work reaches web")
    assert reaches(web, "lan", WEB, source=LAN) == [LAN]
    assert "src=192.0.2.10" in conntrack(web, "sys-net", WEB)
    web.set_feature("web", FEATURE, None)
    wait_for(lambda: "src=192.0.2.10" not in conntrack(web, "sys-firewall", WEB),
             "sys-firewall ends the LAN's flows to web")
    wait_for(lambda: WEB not in conntrack(web, "sys-net", WEB), "sys-net ends web's flows")
    assert "src=10.137.0.21" in conntrack(web, "sys-firewall", WEB)  # a sibling's: kept
    assert reaches(web, "lan", WEB, source=LAN, timeout=1) is None
    web.set_feature("web", FEATURE, "forward")  # for the fixture's teardown


# -- conflicts on the LAN ---------------------------------------------------------


def report(lab: Lab, address: str) -> str:
    return (lab.qubesdb("sys-net").read(f"/qns-routing_status/{address}") or b"").decode()


def test_an_address_a_lan_host_already_has_is_refused_and_reported(api: Lab) -> None:
    expose(api, "web", LAN2, LAN2_6, *SSH_FROM_LAN)  # lan2's own addresses
    try:
        owner = mac(api, "lan2")
        for address in (LAN2, LAN2_6):
            wait_for(lambda a=address: report(api, a).startswith("state=conflict"),
                     f"sys-net reports the conflict on {address}")
            assert report(api, address) == f"state=conflict iface=eth0 mac={owner}"
            # lan2 keeps its address: sys-net never answers for it, nor routes it inwards
            assert answering(api, address) == [owner]
            held = [line for line in left_for(api, address)
                    if line.startswith("sys-net") and "qubesdb" not in line]
            assert held == [f"sys-net: report /qns-routing_status/{address}"]
        listing = qvm_firewall(api, "web", "list")
        assert f"    sys-net: NOT exposed: {owner} on eth0 already has the address" in listing
    finally:
        unexpose(api, "web", "10.137.0.20")
    wait_for(lambda: not reports(api, "sys-net"), "sys-net reports nothing")


def test_a_later_squatter_is_reported_and_answered(web: Lab) -> None:
    assert reaches(web, "lan", WEB, source=LAN) == [LAN]  # lan caches sys-net's MAC
    sys_net, lan2 = mac(web, "sys-net"), mac(web, "lan2")
    time.sleep(1.1)  # past the kernel's ARP locktime: a claim now does turn lan's cache
    # lan2 claims the IPv4 address once (an ARP request from it), and takes the
    # IPv6 one (its duplicate address detection probes for it)
    web.exec("lan2", [*probe_argv(), "neigh", "eth0", "192.0.2.98", "--source", WEB],
             check=True)
    web.exec("lan2", ["ip", "address", "add", f"{WEB6}/128", "dev", "eth0"], check=True)
    try:
        for address in (WEB, WEB6):
            wait_for(lambda a=address: report(web, a).startswith("state=squatter"),
                     f"sys-net reports lan2 on {address}")
            assert report(web, address) == f"state=squatter iface=eth0 mac={lan2}"
        # sys-net answered: an announcement turned lan's cache back, an
        # advertisement made lan2's kernel give the IPv6 address up
        wait_for(lambda: sys_net in web.exec("lan", ["ip", "neigh", "show", WEB],
                                             check=True).stdout, "lan's cache turned back")
        wait_for(lambda: "dadfailed" in web.exec("lan2", ["ip", "-6", "address", "show",
                                                          "to", WEB6]).stdout,
                 "lan2's duplicate address detection fails")
        for address in (WEB, WEB6):  # and web stays exposed
            assert answering(web, address) == [sys_net]
        assert reaches(web, "lan", WEB, source=LAN) == [LAN]
    finally:
        web.exec("lan2", ["ip", "address", "del", f"{WEB6}/128", "dev", "eth0"])


def qvm_firewall(lab: Lab, *argv: str) -> str:
    """The real command line, as a user runs it in dom0 (the venv's console script)."""
    result = lab.exec("dom0", [str(Path(sys.executable).parent / "qvm-firewall"), *argv])
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_qvm_firewall_shows_the_exposure_and_each_hop(web: Lab) -> None:
    below = qvm_firewall(web, "web", "list").split("\n\n")[-1].splitlines()
    assert below == [
        "Routing exposure (routing-method forward: reached at its own address):",
        f"  {WEB}: LAN -> sys-net -> sys-firewall -> web",
        "    sys-net: exposed on eth0, answering for the address",
        "    sys-firewall: applied",
        f"  {WEB6}: LAN -> sys-net -> sys-firewall -> web",
        "    sys-net: exposed on eth0, answering for the address",
        "    sys-firewall: applied",
        "  admitted as inbound rules inbound:0, inbound:1 say, nothing else",
    ]
    web.stop("web")
    try:
        listing = qvm_firewall(web, "web", "list")
        assert "  not exposed: 'web' is not running" in listing
    finally:
        web.start("web")


def test_narrowing_the_rules_ends_only_the_flows_no_longer_admitted(web: Lab) -> None:
    set_rules("web", f"action=accept srchost={LAN} proto=tcp dstports=22-23", "action=accept")
    wait_for(lambda: reaches(web, "lan", WEB, port=23, source=LAN) == [LAN], "lan reaches :23")
    assert reaches(web, "lan", WEB, source=LAN) == [LAN]
    set_rules("web", f"action=accept srchost={LAN} proto=tcp dstports=23", "action=accept")

    def lan_flows(hop: str, port: int) -> list[str]:
        pattern = rf"src={LAN} dst={WEB} sport=\d+ dport={port} "
        return re.findall(pattern, conntrack(web, hop, WEB))

    for hop in ("sys-net", "sys-firewall"):
        wait_for(lambda h=hop: not lan_flows(h, 22), f"{hop} ends the flow to port 22")
        assert lan_flows(hop, 23)  # still admitted: kept


def test_an_agent_restart_withdraws_then_exposes_again(web: Lab) -> None:
    web.restart_service("sys-net", "firewall")
    wait_for(lambda: exposed(web, WEB) and exposed(web, WEB6), "web exposed again")
    assert reaches(web, "lan", WEB, source=LAN) == [LAN]
    proxies = web.exec("sys-net", ["ip", "neigh", "show", "proxy"], check=True).stdout
    assert sorted(proxies.split("\n")[:-1]) == [f"{WEB} dev eth0 proxy ", f"{WEB6} dev eth0 proxy "]
    web.restart_service("sys-firewall", "firewall")
    wait_for(lambda: reaches(web, "lan", WEB, source=LAN) == [LAN], "lan reaches web again")


def test_a_routed_qubes_own_forward_keeps_working(web: Lab) -> None:
    set_rules("web", *SSH_FROM_LAN,
              "action=forward forwardtype=external proto=tcp srcports=8080 dstports=80",
              "action=accept")
    with web.serve("web", "tcp", 80, reply="web-80"):
        wait_for(lambda: web.connect("lan", "tcp", UPLINK, 8080, timeout=1) == "web-80",
                 "lan reaches web's forward at sys-net's address")
    assert reaches(web, "lan", WEB, source=LAN) == [LAN]  # and its own address still


def test_exposing_announces_the_address_to_the_lan(api: Lab) -> None:
    # lan believes another machine had these addresses: the announcement corrects it
    for address in (WEB, WEB6):
        api.exec("lan", ["ip", "neigh", "replace", address, "lladdr", "02:00:00:00:00:99",
                         "dev", "eth0", "nud", "stale"], check=True)
    expose(api, "web", WEB, WEB6, *SSH_FROM_LAN)
    try:
        sys_net = mac(api, "sys-net")
        for address in (WEB, WEB6):
            wait_for(lambda a=address: sys_net in api.exec(
                "lan", ["ip", "neigh", "show", a], check=True).stdout,
                f"lan learns sys-net's MAC for {address} without asking")
    finally:
        unexpose(api, "web", "10.137.0.20")
    wait_for(lambda: not reports(api, "sys-net"), "sys-net reports nothing")


def test_web_with_outbound_policy_drop_still_serves_the_lan(web: Lab) -> None:
    set_rules("web", *SSH_FROM_LAN, "action=drop")
    wait_for(lambda: seen_from(web, "web", LAN) is None, "web's own connections refused")
    assert reaches(web, "lan", WEB, source=LAN) == [LAN]
    assert reaches(web, "lan", WEB6, source=LAN6) == [LAN6]
