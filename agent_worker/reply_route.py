"""Replies to a forward that came in by the uplink go back out by the uplink.

A forward from the LAN enters each hop by its uplink (``eth0``, toward its
netvm) and is translated to the next hop down. The server's replies come
back from below and are routed by their destination, the LAN client. In a
hop whose main routing table sends everything into a tunnel (a VPN
ProxyVM), they would follow the tunnel and be lost.

So those replies are routed by policy. A step that takes a connection in
from the uplink labels it (:data:`agent_worker.forward_steps.UPLINK_LABEL`),
chain ``qns-reply`` gives its reply packets one bit of the packet mark
(:data:`~agent_worker.forward_steps.REPLY_MARK`), and one routing rule of
ours sends packets carrying that bit to table :data:`REPLY_TABLE`, whose
one route is the default via the hop's gateway (``/qubes-gateway``,
``/qubes-gateway6``) on the uplink, as Qubes' own default route. Nothing
else carries the bit: the qube's own traffic and forwards between qubes
keep the main table, tunnel included.

A hop without a gateway (the NetVM at the top of the path) holds no rule
and no route of ours. The rule and route live while the worker runs, and
are put back whenever the gateway is written again: when a netvm changes,
its uplink is attached again and the kernel drops every route through it.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable, Sequence
from typing import Literal

from agent_worker.directory import QubesDBConnection
from agent_worker.entries import EntryError, IPAddress, IpVersion, parse_address
from agent_worker.forward_steps import REPLY_MARK

log = logging.getLogger("qubes.firewall")

#: the hop's uplink, toward its netvm (so named in every Qubes NetVM and ProxyVM)
UPLINK = "eth0"
#: our routing table, holding one route: the default via the gateway on the uplink
REPLY_TABLE = 20814
#: our rule's priority: after ``local`` (0), ahead of ``main`` (32766) and of the
#: rules a VPN client adds (wg-quick's 32764-32765)
RULE_PRIORITY = 110
#: where this hop's gateway is, per IP version (written by dom0)
GATEWAYS: dict[IpVersion, str] = {4: "/qubes-gateway", 6: "/qubes-gateway6"}
IpRunner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_ip(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """``ip ARGV``, output captured, never raising on its exit code."""
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)


def route_argv(version: IpVersion, gateway: IPAddress) -> list[str]:
    """Our table's one route, written whole whether it was there or not."""
    return [f"-{version}", "route", "replace", "to", "unicast", "default", "via", str(gateway),
            "dev", UPLINK, "onlink", "table", str(REPLY_TABLE)]


def rule_argv(version: IpVersion, action: Literal["add", "del", "show"]) -> list[str]:
    """``add`` our rule, ``del`` one rule of our priority into our table (whatever it
    matches), or ``show`` the rules of our priority as JSON."""
    selector = ["pref", str(RULE_PRIORITY)]
    if action == "show":
        return ["-j", f"-{version}", "rule", "show", *selector]
    matches = ["fwmark", f"{REPLY_MARK:#x}/{REPLY_MARK:#x}"] if action == "add" else []
    return [f"-{version}", "rule", action, *selector, *matches, "lookup", str(REPLY_TABLE)]


def into_our_table(untrusted_rule: object) -> bool:
    """Whether one rule of ``ip -j rule show`` leads into our table (ours to keep or delete)."""
    return isinstance(untrusted_rule, dict) and untrusted_rule.get("table") == str(REPLY_TABLE)


def is_ours(untrusted_rule: object) -> bool:
    """Whether one rule of ``ip -j rule show`` is ours exactly, as :func:`rule_argv` adds it."""
    return isinstance(untrusted_rule, dict) and into_our_table(untrusted_rule) and (
        untrusted_rule.get("fwmark"), untrusted_rule.get("fwmask")
    ) == (f"{REPLY_MARK:#x}", f"{REPLY_MARK:#x}")


class RouteError(Exception):
    """``ip`` refused a command; the message says which, for the log."""


class ReplyRoute:
    """This hop's rule and route for replies to forwards (module doc), kept as the gateway says."""

    def __init__(self, db: QubesDBConnection, run: IpRunner = run_ip) -> None:
        #: this hop's QubesDB, where dom0 writes the gateway
        self.db = db
        self.run = run
        #: per IP version, the gateway our route goes through; none: no rule nor route
        #: of ours (at start too: a clean stop removed them, and a hop with a gateway
        #: writes its route and rule whole at the first change)
        self.in_force: dict[IpVersion, IPAddress] = {}
        #: versions where ``ip`` failed part way: what the kernel holds is unknown
        self.failed: set[IpVersion] = set()

    def gateways(self) -> dict[IpVersion, IPAddress | None]:
        """The gateway of each version, or None (none written, or not one address: logged)."""
        found: dict[IpVersion, IPAddress | None] = {}
        for version, path in GATEWAYS.items():
            untrusted_value = self.db.read(path)
            found[version] = None
            if not untrusted_value:
                continue
            try:
                gateway = parse_address(untrusted_value.decode("ascii"))
            except (UnicodeDecodeError, EntryError) as err:
                log.error("%s: not an address, no route for forward replies: %s", path, err)
                continue
            if gateway.version != version:
                log.error("%s: not an IPv%d address, no route for forward replies", path, version)
                continue
            found[version] = gateway
        return found

    def refresh(self, *, force: bool = False) -> None:
        """Bring the rule and route of each version to the gateway's (``force``: even if
        believed to be there)."""
        for version, gateway in self.gateways().items():
            if force or version in self.failed or self.in_force.get(version) != gateway:
                self._put(version, gateway)

    def remove(self) -> None:
        """No rule nor route of ours left (clean stop)."""
        for version in GATEWAYS:
            if version in self.in_force or version in self.failed:
                self._put(version, None)

    def _put(self, version: IpVersion, gateway: IPAddress | None) -> None:
        try:
            if gateway is None:
                self._delete(version)
            else:
                self._ip(route_argv(version, gateway))
                if not self._rule_in_place(version):
                    self._ip(rule_argv(version, "add"))
        except RouteError as err:
            log.error("forward replies by the uplink, IPv%d: %s", version, err)
            self.failed.add(version)  # tried again at the next change
            return
        self.failed.discard(version)
        if self.in_force.get(version) != gateway:
            if gateway is None:
                log.info("IPv%d forward replies: no rule nor route of ours", version)
            else:
                log.info("IPv%d forward replies go back via %s on %s", version, gateway, UPLINK)
        if gateway is None:
            self.in_force.pop(version, None)
        else:
            self.in_force[version] = gateway

    def _delete(self, version: IpVersion) -> None:
        """Every rule into our table, and our table's route."""
        for _ in self._into_our_table(version):
            self._ip(rule_argv(version, "del"))
        # an absent table is no error here: there is nothing to flush
        self.run([f"-{version}", "route", "flush", "table", str(REPLY_TABLE)])

    def _rule_in_place(self, version: IpVersion) -> bool:
        """Our rule alone leads into our table; any other (left by hand) is deleted."""
        shown = self._into_our_table(version)
        if len(shown) == 1 and is_ours(shown[0]):
            return True
        for _ in shown:
            self._ip(rule_argv(version, "del"))
        return False

    def _into_our_table(self, version: IpVersion) -> list[object]:
        result = self._ip(rule_argv(version, "show"))
        try:
            untrusted_rules = json.loads(result.stdout or "[]")
        except json.JSONDecodeError as err:
            raise RouteError(f"ip rule show: {err}") from None
        if not isinstance(untrusted_rules, list):
            raise RouteError("ip rule show: not a list")
        return [rule for rule in untrusted_rules if into_our_table(rule)]

    def _ip(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        result = self.run(argv)
        if result.returncode != 0:
            why = (result.stderr or result.stdout).strip().splitlines()
            raise RouteError(f"ip {' '.join(argv)}: {why[0] if why else result.returncode}")
        return result
