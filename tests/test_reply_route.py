"""agent_worker.reply_route: the rule and route sending forward replies back by the uplink.

Run with the real ``ip`` in a throwaway namespace holding an uplink
``eth0``; what the kernel holds is read back with ``ip -j``.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator, Sequence

import pytest
from worker_netns import MemoryQubesDB, in_netns, make_netns, ns_run
from worker_netns import reply_routes as routes
from worker_netns import reply_rules as rules

from agent_worker import reply_route
from agent_worker.reply_route import REPLY_TABLE, RULE_PRIORITY, ReplyRoute, run_ip

pytestmark = pytest.mark.lab

GATEWAY = "10.137.0.6"
GATEWAY6 = "fd09:24ef:4179::a89:6"
OTHER_GATEWAY = "10.137.0.9"


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace with an uplink ``eth0`` (a veth, up, with an address of each family)."""
    for name in make_netns():
        subprocess.run(["ip", "link", "add", "eth0", "netns", name, "type", "veth", "peer",
                        "name", "peer0", "netns", name], check=True)
        for argv in (["ip", "link", "set", "peer0", "up"], ["ip", "link", "set", "eth0", "up"],
                     ["ip", "address", "add", "10.137.0.7/32", "dev", "eth0"],
                     ["ip", "-6", "address", "add", "fd09:24ef:4179::a89:7/128", "dev", "eth0",
                      "nodad"]):
            ns_run(name, *argv)
        yield name


class Counted:
    """The real ``ip``, each command recorded."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.commands.append(list(argv))
        return run_ip(argv)


def test_a_hop_with_a_gateway_holds_one_rule_and_one_route_per_family(netns: str) -> None:
    db = MemoryQubesDB({"/qubes-gateway": GATEWAY, "/qubes-gateway6": GATEWAY6})

    def start() -> int:
        ip = Counted()
        route = ReplyRoute(db, ip)
        route.refresh()
        first = len(ip.commands)
        route.refresh()  # unchanged: not one command
        assert len(ip.commands) == first
        return first

    assert in_netns(netns, start) > 0
    for version, gateway in ((4, GATEWAY), (6, GATEWAY6)):
        assert [reply_route.is_ours(rule) for rule in rules(netns, version)] == [True]
        assert routes(netns, version)[0] == ("default", gateway, "eth0")
        assert len(routes(netns, version)) == 1


def test_copies_of_our_rule_become_one_and_a_new_gateway_replaces_the_route(
    netns: str,
) -> None:
    db = MemoryQubesDB({"/qubes-gateway": GATEWAY})
    in_netns(netns, ReplyRoute(db).refresh)
    # a rule into our table matching everything (left by hand), and another's rule at our
    # priority: the first goes, the second stays
    ns_run(netns, "ip", "-4", "rule", "add", "pref", str(RULE_PRIORITY), "lookup",
           str(REPLY_TABLE))
    ns_run(netns, "ip", "-4", "rule", "add", "pref", str(RULE_PRIORITY), "lookup", "main")
    assert len(rules(netns)) == 3

    def force_then_move() -> None:
        route = ReplyRoute(db)
        route.refresh(force=True)
        db.write("/qubes-gateway", OTHER_GATEWAY)
        route.refresh()

    in_netns(netns, force_then_move)
    assert sorted(reply_route.is_ours(rule) for rule in rules(netns)) == [False, True]
    assert [reply_route.into_our_table(rule) for rule in rules(netns)].count(True) == 1
    assert routes(netns) == [("default", OTHER_GATEWAY, "eth0")]


def test_remove_leaves_no_rule_nor_route_of_ours(netns: str) -> None:
    db = MemoryQubesDB({"/qubes-gateway": GATEWAY, "/qubes-gateway6": GATEWAY6})

    def up_then_down() -> None:
        route = ReplyRoute(db)
        route.refresh()
        route.remove()

    in_netns(netns, up_then_down)
    for version in (4, 6):
        assert rules(netns, version) == [] and routes(netns, version) == []


def test_a_gateway_that_is_no_address_of_its_family_gets_nothing_and_is_logged(
    netns: str,
) -> None:
    db = MemoryQubesDB({"/qubes-gateway": GATEWAY})

    def bad_values() -> list[str]:
        route = ReplyRoute(db)
        route.refresh()
        logged = []
        handler = logging.Handler()
        handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("qubes.firewall").addHandler(handler)
        for untrusted_value in ("10.137.0.6 ; ip", GATEWAY6, "10.137.000.6"):
            db.write("/qubes-gateway", untrusted_value)
            route.refresh()
            assert route.in_force == {}
        return logged

    logged = in_netns(netns, bad_values)
    assert rules(netns) == [] and routes(netns) == []  # the good route went with the value
    assert sum("/qubes-gateway: not" in line for line in logged) == 3


def test_no_gateway_runs_no_ip_command() -> None:
    """The NetVM at the top of the path: nothing to route, nothing run (no namespace needed)."""
    ip = Counted()
    route = ReplyRoute(MemoryQubesDB({}), ip)
    route.refresh()
    route.remove()
    assert ip.commands == []


def test_a_refused_command_is_tried_again_at_the_next_change(netns: str) -> None:
    db = MemoryQubesDB({"/qubes-gateway": GATEWAY})
    ns_run(netns, "ip", "link", "set", "eth0", "down")  # an uplink not attached yet

    def fail_then_retry() -> tuple[bool, bool]:
        route = ReplyRoute(db)
        route.refresh()
        failed = 4 in route.failed
        subprocess.run(["ip", "link", "set", "eth0", "up"], check=True)
        route.refresh()  # same gateway: tried again all the same
        return failed, 4 in route.failed

    assert in_netns(netns, fail_then_retry) == (True, False)
    assert routes(netns) == [("default", GATEWAY, "eth0")]
    assert len(rules(netns)) == 1
