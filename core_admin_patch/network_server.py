"""dom0 service around the planner: snapshot, check, plan, apply.

Both hosts of the dom0 side use it: the qubesd extension on Qubes
(:mod:`core_admin_patch.extension`) and the lab's dom0 stand-in. Each hands
it its qubes as objects shaped like qubesd's VMs (``name``, ``netvm``,
``ip``, ``ip6``, ``provides_network``, ``is_running()``, ``features``) plus a
way to read a qube's rules, and a writer for QubesDB; this class does the rest.

qubesd computes ``ip6`` itself; hosts without qubesd (the lab) use
:func:`ipv6_enabled` and :func:`derived_ip6`, which follow qubesd's rules.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from core_admin_patch import planner, routing
from core_admin_patch.applier import Applier, EntryWriter
from core_admin_patch.errors import QubesValueError
from firewall_rules import Rule

log = logging.getLogger("qubes.network-server")


class DomainLike(Protocol):
    """The attributes of a qubesd VM that planning needs."""

    name: str
    provides_network: bool

    @property
    def netvm(self) -> DomainLike | None: ...

    @property
    def ip(self) -> object: ...

    @property
    def ip6(self) -> object:
        """None when IPv6 is off for the qube (qubesd's ``vm.ip6``)."""

    @property
    def features(self) -> Mapping[str, str]: ...

    def is_running(self) -> bool: ...


RulesReader = Callable[[DomainLike], list[Rule]]

#: Qubes' site-local prefix for qubes' IPv6 addresses (qubes.config.qubes_ipv6_prefix).
QUBES_IPV6_PREFIX = ipaddress.IPv6Network("fd09:24ef:4179::/64")


def ipv6_enabled(features_up_the_chain: Iterable[Mapping[str, str]]) -> bool:
    """Whether IPv6 is on for a qube, as qubesd's ``features.check_with_netvm('ipv6', False)``.

    ``features_up_the_chain`` are the qube's features, then its netvm's, and
    so on to the edge. The first that has ``ipv6`` decides, so enabling it
    on a netvm reaches every qube below, and ``ipv6 = ''`` on a qube turns
    it off there (and below it) whatever its netvms say. qubesd tests the
    value's truth: any non-empty string is on.
    """
    for features in features_up_the_chain:
        if "ipv6" in features:
            return bool(features["ipv6"])
    return False


def derived_ip6(ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    """A qube's default IPv6 address: Qubes' prefix, then the IPv4 address as the last 32 bits.

    qubesd builds ``<prefix>::a89:<qid in hex>`` from the qid it also builds
    ``10.137.<qid>`` from, so 10.137.0.20 gives ``fd09:24ef:4179::a89:14``
    either way (and 10.138.x.y of a disposable gives ``::a8a:...``, as there).
    """
    return ipaddress.IPv6Address(int(QUBES_IPV6_PREFIX.network_address) | int(ip))


#: Features read as qubesd's consumers read them, with ``check_with_template``.
TEMPLATE_FEATURES = (planner.SUPPORT_FEATURE, routing.ROUTING_FEATURE)


def planning_features(features: Mapping[str, str]) -> dict[str, str]:
    """The qube's features, with those of :data:`TEMPLATE_FEATURES` as qubesd sees them.

    qubesd keeps the ``supported-feature.*`` requests of a template-based
    qube on its template and reads them with ``check_with_template``, and
    ``routing-method`` set on a template counts for its qubes (as in
    Rudd-O's extension); a plain mapping (the lab) holds the qube's own value.
    """
    planned = dict(features)
    check_with_template = getattr(features, "check_with_template", None)
    if callable(check_with_template):
        for feature in TEMPLATE_FEATURES:
            value = check_with_template(feature, None)
            planned.pop(feature, None)
            if value is not None:
                planned[feature] = str(value)
    return planned


def qube_state(domain: DomainLike, rules: list[Rule]) -> planner.QubeState:
    """Freeze one domain into the planner's picture."""
    netvm = getattr(domain, "netvm", None)
    ip = getattr(domain, "ip", None)
    ip6 = getattr(domain, "ip6", None)
    return planner.QubeState(
        name=domain.name,
        netvm=None if netvm is None else netvm.name,
        ip=None if ip is None else ipaddress.IPv4Address(str(ip)),
        provides_network=bool(getattr(domain, "provides_network", False)),
        running=domain.is_running(),
        features=planning_features(domain.features),
        rules=tuple(rules),
        ip6=None if ip6 is None else ipaddress.IPv6Address(str(ip6)),
    )


class NetworkServer:
    """Keeps every qube's forward and input entries right as things change."""

    def __init__(
        self,
        domains: Callable[[], Iterable[DomainLike]],
        read_rules: RulesReader,
        writer: EntryWriter,
    ) -> None:
        self._domains = domains
        self._read_rules = read_rules
        self._writer = writer
        self._applier = Applier(writer)

    def snapshot(self, now: float) -> planner.Snapshot:
        qubes = {}
        for domain in self._domains():
            try:
                rules = self._read_rules(domain)
            except Exception as err:  # a corrupt firewall.xml must not stop others
                log.error("%s: firewall rules unreadable, no forwards for it: %s", domain.name, err)
                rules = []
            qubes[domain.name] = qube_state(domain, rules)
        return planner.Snapshot(qubes, now)

    def check_rules(self, name: str, rules: list[Rule], now: float) -> None:
        """Refuse, with a one-line reason, rules that cannot work (before saving)."""
        try:
            planner.check_rules(self.snapshot(now), name, rules)
        except planner.PlanError as err:
            raise QubesValueError(str(err)) from None

    def check_netvm_change(self, name: str, new_netvm: str | None, now: float) -> None:
        """Refuse (QubesValueError) moving ``name`` under ``new_netvm`` if forwards would clash.

        Run before the change takes effect: the planner would otherwise give
        the port to whichever qube sorts first, silently taking a live
        service away from the other.
        """
        conflict = planner.netvm_conflict(self.snapshot(now), name, new_netvm)
        if conflict is not None:
            raise QubesValueError(f"cannot set netvm of '{name}' to '{new_netvm}': {conflict}")

    def refresh(self, now: float) -> float | None:
        """Re-plan everything and write the differences; returns the next expiry."""
        snapshot = self.snapshot(now)
        running = [q.name for q in snapshot.qubes.values() if q.running]
        self._applier.apply(routing.plan(snapshot), running)
        return planner.next_expiry(snapshot)

    def qube_reset(self, name: str) -> None:
        """``name``'s QubesDB was created anew (start) or is gone (stop)."""
        self._applier.forget(name)

    def describe(self, name: str, now: float) -> dict[int, str]:
        """Path of each forward rule of ``name``, for qvm-firewall."""
        return planner.describe_forwards(self.snapshot(now), name)

    def describe_routing(self, name: str, now: float) -> list[str]:
        """The routing exposure of ``name`` and each hop's report, for qvm-firewall."""
        return routing.describe_routing(self.snapshot(now), name, self._writer.read)
