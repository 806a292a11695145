"""The worker's routing half: /qns-routing/ entries to chains, antispoof pairs, routes, proxies.

Pure tests first (strict parsing, rule text, set element diffs), then the
half against the kernel in throwaway namespaces wired as an edge NetVM
(uplink eth0 on a LAN client, a ProxyVM behind vif1.0): what it installs,
in which order, what it reports, and that removal, refusal and a restart
leave nothing behind.
"""

from __future__ import annotations

import ipaddress
import json
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from worker_netns import (
    CLIENT_ADDRESS,
    HOP_UPLINK,
    REPO,
    MemoryQubesDB,
    chain_rules,
    in_netns,
    make_netns,
    ns_run,
    remove_directory,
    wire_hop,
)

from agent_worker import net_state, routing
from agent_worker.conntrack import Flow, Match
from agent_worker.directory import Changes
from agent_worker.entries import EntryError
from agent_worker.firewall import Nft
from agent_worker.input_rules import ONLY_NEW_WALK, ONLY_SYN_OPENS
from agent_worker.routing import Entry, Router, Wanted, parse_entry
from core_admin_patch.routing import status_text

A = "192.0.2.25"
A_IP = ipaddress.IPv4Address(A)
PROXYVM = "10.137.0.6"
SSH = "action=accept srchost=192.0.2.0/24 proto=tcp dstports=22-22"
EDGE = {
    "route": b"role=edge via=10.137.0.6",
    "in/0003": SSH.encode(),
    "out/policy": b"drop",
    "out/0000": b"action=accept proto=tcp dstports=80-80",
}


# -- pure -------------------------------------------------------------------


def test_an_edge_entry_parses() -> None:
    entry = parse_entry(A_IP, EDGE)
    assert entry.edge and entry.via == ipaddress.IPv4Address(PROXYVM)
    assert [rule.srchost for rule in entry.rules] == [ipaddress.IPv4Network("192.0.2.0/24")]
    assert dict(entry.outbound) == {
        "policy": b"drop", "0000": b"action=accept proto=tcp dstports=80-80",
    }


def test_the_qubes_own_netvm_needs_no_via() -> None:
    entry = parse_entry(A_IP, {"route": b"role=inner", "in/0000": SSH.encode()})
    assert entry == Entry(False, None, entry.rules, ())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"route": None}, "missing route"),
        ({"route": b"role=middle via=10.137.0.6"}, "role must be edge or inner"),
        ({"route": b"role=edge via=fd09::6"}, "same family"),
        ({"route": b"role=edge via=192.0.2.25"}, "another address"),
        ({"route": b"role=edge via=10.137.000.6"}, "not an address"),
        ({"route": b"role=edge  via=10.137.0.6"}, "malformed word"),
        ({"route": b"role=edge via=10.137.0.6 extra=1"}, "unknown key"),
        ({"route": b"role=edge\xff"}, "not ASCII"),
        ({"route": b"role=inner"}, "unexpected key 'out/0000'"),  # out/ without via
        ({"out/policy": None, "out/0000": None}, "out/ rules missing"),
        ({"in/03": SSH.encode()}, "unexpected key 'in/03'"),
        ({"extra": b""}, "unexpected key 'extra'"),
        ({"in/0003": b"action=accept proto=tcp dstports=22-22"}, "missing srchost"),
        ({"in/0003": b"action=accept srchost=2001:db8::/64"}, "another family"),
    ],
)
def test_bad_entries_are_refused(change: dict[str, bytes | None], reason: str) -> None:
    entries = {**EDGE, **change}
    with pytest.raises(EntryError, match=reason):
        parse_entry(A_IP, {k: v for k, v in entries.items() if v is not None})


def test_chains_and_pairs_for_an_address_behind_a_client() -> None:
    entry = parse_entry(A_IP, EDGE)
    six = ipaddress.IPv6Address("2001:db8::25")
    entry6 = parse_entry(six, {"route": b"role=edge via=fd09::6", "out/policy": b"drop"})
    wanted = {A_IP: Wanted(entry, "vif1.0", "eth0"), six: Wanted(entry6, "vif1.0", "eth0")}
    assert routing.chain_rules(wanted) == {
        "ip": {
            "qns-routing": [
                ONLY_NEW_WALK,  # established packets never walk the rules
                ONLY_SYN_OPENS,  # a flow conntrack cut is not taken up again mid-stream
                "ip daddr 192.0.2.25 ip saddr 192.0.2.0/24 meta l4proto tcp th dport 22"
                " ct state new accept",
            ],
            "qns-routing-nonat": ["ip saddr 192.0.2.25 accept"],
            "qns-routing-nd": [],
        },
        "ip6": {
            "qns-routing": [],
            "qns-routing-nonat": ["ip6 saddr 2001:db8::25 accept"],
            "qns-routing-nd": [
                'iifname "vif1.0" ip6 saddr fe80::/64 icmpv6 type'
                " { nd-neighbor-solicit, nd-neighbor-advert } accept",
            ],
        },
    }
    assert routing.antispoof_elements(wanted) == {
        ("ip", "allowed", '"vif1.0" . 192.0.2.25'), ("ip6", "allowed", '"vif1.0" . 2001:db8::25'),
    }


def test_element_commands_touch_only_what_is_ours() -> None:
    theirs = ("ip", "allowed", f'"vif1.0" . {PROXYVM}')
    old = ("ip", "allowed", '"vif1.0" . 192.0.2.26')
    new = ("ip", "allowed", f'"vif1.0" . {A}')
    assert routing.element_commands({new}, {old, new}, {theirs, old}) == [
        'delete element ip qubes allowed { "vif1.0" . 192.0.2.26 }',
        'add element ip qubes allowed { "vif1.0" . 192.0.2.25 }',
    ]


def test_present_elements_read_nft_json() -> None:
    items = [
        {"set": {"name": "allowed", "elem": [{"concat": ["vif1.0", A]}]}},
        {"set": {"name": "downstream", "elem": [A]}},
        {"set": {"name": "other", "elem": ["10.0.0.1"]}},
        {"chain": {"name": "forward"}},
    ]
    assert routing.present_elements("ip", items) == {("ip", "allowed", '"vif1.0" . 192.0.2.25')}


@pytest.mark.parametrize("state", sorted(routing.STATES))
def test_every_report_reads_in_dom0(state: str) -> None:
    value = routing.status_value(state, iface="eth0", mac="02:00:00:00:00:0b")
    assert status_text(value.encode()) not in ("unreadable report", "no report yet")
    with pytest.raises(ValueError, match="unknown state"):
        routing.status_value("maybe")


# -- in a namespace ---------------------------------------------------------


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """An edge NetVM: eth0 on a LAN host (192.0.2.10), a ProxyVM (10.137.0.6) on vif1.0.

    Yields the LAN host's namespace and the edge's.
    """
    names = []
    for _ in range(3):
        generator = make_netns()
        names.append((generator, next(generator)))
    lan, hop, proxyvm = (name for _, name in names)
    wire_hop(lan, hop, {proxyvm: PROXYVM})
    try:
        yield lan, hop
    finally:
        for generator, _ in names:
            with pytest.raises(StopIteration):
                next(generator)


@pytest.fixture
def edge(namespaces: tuple[str, str]) -> str:
    return namespaces[1]


def run_until(router: Router, done: Callable[[], bool], timeout: float = 5.0) -> None:
    """The worker's select loop for this half alone, until ``done()``."""
    deadline = time.monotonic() + timeout
    while not done():
        now = time.monotonic()
        assert now < deadline, "timed out"
        wake = router.next_wake()
        wait = 0.05 if wake is None else min(max(0.0, wake - now), 0.05)
        ready = select.select(list(router.fds()), [], [], wait)[0]
        router.wake(ready, time.monotonic())


def reported(db: MemoryQubesDB, state: str) -> Callable[[], bool]:
    return lambda: (db.read(f"/qns-routing_status/{A}") or b"").startswith(state.encode())


def _db(extra: dict[str, bytes] | None = None) -> MemoryQubesDB:
    db = MemoryQubesDB({"/connected-ips": PROXYVM})
    for key, value in {**EDGE, **(extra or {})}.items():
        db.write(f"/qns-routing/{A}/{key}", value)
    db.write(f"/qns-routing/{A}", "")
    return db


def _kernel(outbound: dict[Any, Any]) -> dict[str, Any]:
    """What the kernel of the current namespace holds of routing, as plain data."""
    nft = json.loads(Nft().run("list ruleset"))["nftables"]
    return {
        "routes": sorted(str(a) for a in net_state.our_routes()),
        "proxies": sorted(f"{a} {i}" for a, i in net_state.proxies()),
        "proxy_delay": (net_state.PROC_NET / "ipv4/neigh/eth0/proxy_delay").read_text().strip(),
        "chains": sorted(i["chain"]["name"] for i in nft
                         if "chain" in i and i["chain"]["name"].startswith("qns-routing")),
        "elements": sorted(
            json.dumps(e) for i in nft if "set" in i and i["set"]["family"] == "ip"
            for e in i["set"].get("elem", []) if A in json.dumps(e)
        ),
        "outbound": {str(a): dict(v) for a, v in outbound.items()},
    }


def _expose_then_remove() -> tuple[list[str], dict[str, Any], list[str], dict[str, Any], dict]:
    db = _db()
    calls: list[str] = []
    published: dict[Any, Any] = {}
    nft = Nft()

    def runner(commands: str, *, check: bool = False) -> str:
        if not check and not commands.startswith("list"):
            calls.append("nft")
        return nft.run(commands, check=check)

    def publish(routed: Any) -> None:
        if dict(routed) != published:
            calls.append(f"outbound {sorted(str(a) for a in routed)}")
        published.clear()
        published.update(routed)

    for name in ("add_route", "add_proxy", "del_route", "del_proxy"):
        real = getattr(net_state, name)

        def recorder(*args: Any, _real: Any = real, _name: str = name) -> None:
            calls.append(_name)
            _real(*args)

        setattr(net_state, name, recorder)
    router = Router(db, runner, publish)
    router.reload()
    probing = [db.read(f"/qns-routing_status/{A}").decode(), *calls]
    run_until(router, reported(db, "state=exposed"))
    exposed = _kernel(published)
    reports = [*probing, db.read(f"/qns-routing_status/{A}").decode()]
    added, calls[:] = list(calls), []
    remove_directory(db, f"/qns-routing/{A}")
    router.handle(Changes(targets={A}))
    reports.append(str(db.read(f"/qns-routing_status/{A}")))
    return added, exposed, list(calls), _kernel(published), {"reports": reports}


def test_exposure_is_installed_firewall_first_and_removed_in_reverse(edge: str) -> None:
    added, exposed, removed, after, rest = in_netns(edge, _expose_then_remove)
    assert added == ["outbound ['192.0.2.25']", "nft", "add_route", "add_proxy"]
    assert exposed == {
        "routes": [A],
        "proxies": [f"{A} eth0"],
        "proxy_delay": "0",
        "chains": ["qns-routing", "qns-routing-nd", "qns-routing-nonat"],  # IPv4 only
        "elements": ['{"concat": ["vif1.0", "192.0.2.25"]}'],
        "outbound": {A: {"policy": b"drop", "0000": b"action=accept proto=tcp dstports=80-80"}},
    }
    assert removed == ["del_proxy", "del_route", "nft", "outbound []"]
    assert after == {"routes": [], "proxies": [], "proxy_delay": "0", "chains": [],
                     "elements": [], "outbound": {}}
    # nothing at all while the edge probes the LAN for the address
    assert rest["reports"] == ["state=probing iface=eth0", "state=exposed iface=eth0", "None"]
    assert chain_rules(edge, "ip", "qubes", "postrouting")[-1] == "masquerade"


def _decide(extra: dict[str, bytes], connected: str = PROXYVM) -> tuple[str, dict[str, Any]]:
    db = _db(extra)
    db.write("/connected-ips", connected)
    router = Router(db, Nft().run, lambda routed: None)
    router.reload()
    return db.read(f"/qns-routing_status/{A}").decode(), _kernel({})


@pytest.mark.parametrize(
    ("extra", "connected", "report"),
    [
        ({}, "10.137.0.7", "state=waiting"),  # its ProxyVM is no client here (yet)
        ({"route": b"role=edge via=10.137.0.7"}, "10.137.0.7", "state=waiting"),  # no vif
        ({"in/0003": b"action=accept"}, PROXYVM, "state=failed"),  # bad entry
    ],
)
def test_what_cannot_be_carried_installs_nothing(
    edge: str, extra: dict[str, bytes], connected: str, report: str,
) -> None:
    got, kernel = in_netns(edge, _decide, extra, connected)
    assert got == report
    assert kernel == {"routes": [], "proxies": [], "proxy_delay": "80", "chains": [],
                      "elements": [], "outbound": {}}


def test_an_address_outside_every_uplink_network_is_not_answered(edge: str) -> None:
    def outside() -> tuple[str, dict[str, Any]]:
        subprocess.run(["ip", "address", "flush", "dev", "eth0"], check=True)
        subprocess.run(["ip", "address", "add", "198.51.100.2/24", "dev", "eth0"], check=True)
        return _decide({})

    report, kernel = in_netns(edge, outside)
    assert report == "state=outside"
    assert kernel["proxies"] == [] and kernel["routes"] == []


def _restart_after_crash() -> tuple[dict[str, Any], dict[str, Any], str | None]:
    db = _db()
    first = Router(db, Nft().run, lambda routed: None)
    first.reload()
    run_until(first, reported(db, "state=exposed"))  # then "killed": nothing withdrawn
    left = _kernel({})
    remove_directory(db, f"/qns-routing/{A}")  # dom0 removed it meanwhile
    Router(db, Nft().run, lambda routed: None).reload()
    status = db.read(f"/qns-routing_status/{A}")
    return left, _kernel({}), None if status is None else status.decode()


def test_a_restarted_worker_withdraws_what_an_earlier_one_left(edge: str) -> None:
    left, after, status = in_netns(edge, _restart_after_crash)
    assert left["proxies"] == [f"{A} eth0"] and left["routes"] == [A]
    assert after["routes"] == [] and after["proxies"] == [] and after["elements"] == []
    assert status is None
    # the ProxyVM's own antispoof pair is not ours: it stays
    assert f'"vif1.0" . {PROXYVM}' in ns_run(edge, "nft", "list", "set", "ip", "qubes", "allowed")


def _conflict() -> tuple[str, dict[str, Any]]:
    db = MemoryQubesDB({"/connected-ips": PROXYVM})
    base = f"/qns-routing/{CLIENT_ADDRESS}"
    for key, value in EDGE.items():
        db.write(f"{base}/{key}", value)
    db.write(base, "")
    router = Router(db, Nft().run, lambda routed: None)
    router.reload()
    path = f"/qns-routing_status/{CLIENT_ADDRESS}"
    run_until(router, lambda: (db.read(path) or b"").startswith(b"state=conflict"))
    return db.read(path).decode(), _kernel({})


def test_an_address_a_lan_host_has_is_refused_and_reported(
    namespaces: tuple[str, str],
) -> None:
    lan, edge = namespaces
    report, kernel = in_netns(edge, _conflict)
    assert report == f"state=conflict iface=eth0 mac={mac_of(lan)}"
    assert kernel == {"routes": [], "proxies": [], "proxy_delay": "80", "chains": [],
                      "elements": [], "outbound": {}}


def _squatter(lan: str) -> tuple[str, dict[str, Any]]:
    db = _db()
    router = Router(db, Nft().run, lambda routed: None)
    router.reload()
    run_until(router, reported(db, "state=exposed"))
    # a LAN host takes the address and talks from it: its ARP request gives it away
    subprocess.run(["ip", "netns", "exec", lan, "ip", "address", "add", f"{A}/32",
                    "dev", "eth0"], check=True)
    subprocess.run(["ip", "netns", "exec", lan, sys.executable, "-m", "lab.probe", "connect",
                    "udp", HOP_UPLINK, "9", "--source", A, "--timeout", "0.2"],
                   capture_output=True, check=False, cwd=REPO)
    run_until(router, reported(db, "state=squatter"))
    return db.read(f"/qns-routing_status/{A}").decode(), _kernel({})


def test_a_squatter_is_reported_and_the_exposure_stays(namespaces: tuple[str, str]) -> None:
    lan, edge = namespaces
    report, kernel = in_netns(edge, _squatter, lan)
    assert report == f"state=squatter iface=eth0 mac={mac_of(lan)}"
    assert kernel["proxies"] == [f"{A} eth0"] and kernel["routes"] == [A]


def mac_of(ns: str) -> str:
    return json.loads(ns_run(ns, "ip", "-j", "link", "show", "eth0"))[0]["address"]


# -- flows ------------------------------------------------------------------------


class Listing:
    """A conntrack table answering each listing by the address it filters on."""

    def __init__(self, flows: dict[Match, list[Flow]]) -> None:
        self.flows = flows

    def list(self, version: int, match: Match) -> list[Flow]:
        return self.flows.get(match, [])

    def delete(self, flow: Flow) -> None:
        raise AssertionError(f"only listed here, yet {flow} is deleted")


def lan_flow(src: str, dport: int) -> Flow:
    """A TCP flow from ``src`` to A's port ``dport``, not translated."""
    return Flow(4, "tcp", ipaddress.ip_address(src), A_IP, 41234, dport, A_IP, dport)


LAN_FLOW, PORT_23 = lan_flow("192.0.2.10", 22), lan_flow("192.0.2.10", 23)
SIBLING = lan_flow("10.137.0.21", 22)
OWN = Flow(4, "tcp", A_IP, ipaddress.ip_address("192.0.2.10"), 50000, 80,
           ipaddress.ip_address("192.0.2.10"), 80)


def router_with_flows() -> Router:
    router = Router(MemoryQubesDB(), lambda text, check=False: "", lambda routed: None)
    router.tool = Listing({
        Match(orig_dst=A_IP): [LAN_FLOW, PORT_23, SIBLING], Match(orig_src=A_IP): [OWN],
    })
    router.connected = frozenset({ipaddress.ip_address("10.137.0.21")})
    return router


def entry(*rules: bytes) -> tuple[Entry]:
    untrusted = {"route": b"role=inner"}
    untrusted.update({f"in/{n:04}": rule for n, rule in enumerate(rules)})
    return (parse_entry(A_IP, untrusted),)


def ends(flows: list[Any]) -> list[tuple[str, int | None]]:
    return [(str(flow.src), flow.dport) for flow in flows]


def test_an_address_no_longer_carried_loses_its_flows_but_its_siblings() -> None:
    before = {A_IP: entry(b"action=accept srchost=192.0.2.0/24 proto=tcp dstports=22-23")}
    assert ends(router_with_flows().flows_to_end(before, {})) == [
        ("192.0.2.10", 22), ("192.0.2.10", 23), (A, 80),  # its own flow out: unNATed, ended too
    ]


def test_narrowed_rules_end_only_what_they_no_longer_admit() -> None:
    before = {A_IP: entry(b"action=accept srchost=192.0.2.0/24 proto=tcp dstports=22-23")}
    after = {A_IP: entry(b"action=accept srchost=192.0.2.0/24 proto=tcp dstports=23-23")}
    router = router_with_flows()
    assert ends(router.flows_to_end(before, after)) == [("192.0.2.10", 22)]
    assert router.flows_to_end(before, before) == []


def _outbound_worker() -> tuple[str, str]:
    from agent_worker.firewall import Worker

    worker = Worker(MemoryQubesDB({"/connected-ips": PROXYVM}), Nft())
    worker.init_tables()
    worker.reload()
    worker.set_routed({A_IP: {"policy": b"drop", "0000": b"action=accept proto=tcp"}})
    routed = Nft().run("list table ip qubes-firewall")  # nft JSON
    worker.set_routed({})
    return routed, Nft().run("list table ip qubes-firewall")


def test_the_outbound_worker_filters_a_routed_address_with_its_own_rules(edge: str) -> None:
    routed, after = in_netns(edge, _outbound_worker)
    assert '"qbs-192-0-2-25"' in routed and f'"{A}"' in routed
    assert "qbs-192-0-2-25" not in after and A not in after
