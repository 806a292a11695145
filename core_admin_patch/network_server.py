"""dom0 service around the planner: snapshot, check, plan, apply; the API's context.

Both hosts of the dom0 side use it, one :class:`NetworkServer` per set of
qubes (per qubesd app): the qubesd extension on Qubes
(:mod:`core_admin_patch.extension_core`) and the lab's dom0 stand-in. Each
hands it a :class:`DomHost` (its qubes as objects shaped like qubesd's VMs,
how to read and store their rule lists, how to re-apply them) and a
QubesDB writer; everything else is here, once: the Admin API's view of a
qube (:class:`QubeRef`, :meth:`NetworkServer.rules`,
:meth:`NetworkServer.set_rules`), the system-wide checks, the plan and its
application, and the expiry timer.

qubesd computes ``ip6`` itself; hosts without qubesd (the lab) use
:func:`ipv6_enabled` and :func:`derived_ip6`, which follow qubesd's rules.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from core_admin_patch import planner, routing
from core_admin_patch.applier import Applier, EntryWriter
from core_admin_patch.errors import QubesValueError, QubesVMError, QubesVMNotFoundError
from firewall_rules import Rule, RuleKind, RuleLists

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


class DomHost(Protocol):
    """What a dom0 host (qubesd, the lab) gives :class:`NetworkServer`: its qubes, their rules."""

    def domains(self) -> Iterable[DomainLike]:
        """Every qube that has a firewall (not dom0)."""
        ...

    def domain(self, name: str) -> DomainLike:
        """The qube called ``name``; KeyError if none, a QubesException if it has no firewall."""
        ...

    def read_rules(self, domain: DomainLike) -> RuleLists:
        """The lists the qube enforces; raises (any exception) when they cannot be read."""
        ...

    def store_rules(self, domain: DomainLike, kind: RuleKind, rules: list[Rule]) -> None:
        """Replace one list, keeping the others, in one atomic save; then announce it.

        Announcing is qubesd's ``firewall-changed``: the qube's netvm gets
        its outbound entries again, and the forwards are re-planned.
        """
        ...

    def reload(self, domain: DomainLike) -> None:
        """Apply every list of the qube again (``admin.vm.firewall.Reload``)."""
        ...


@dataclass(frozen=True)
class QubeRef:
    """An Admin API call's destination, found by the host: its name, nothing unchecked."""

    name: str


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


def derived_ip6(qid: int) -> ipaddress.IPv6Address:
    """A qube's default IPv6 address, as qubesd's ``get_ip6_for_vm``: ``<prefix>::a89:<hex qid>``.

    It comes from the qid, not from the IPv4 address, so it stays when the
    qube's ``ip`` is changed (qid 20 gives ``fd09:24ef:4179::a89:14``).
    """
    return ipaddress.IPv6Address(f"{QUBES_IPV6_PREFIX.network_address}a89:{qid:x}")


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


def qube_state(domain: DomainLike, rules: RuleLists) -> planner.QubeState:
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
        rules=rules,
        ip6=None if ip6 is None else ipaddress.IPv6Address(str(ip6)),
    )


#: Fire the expiry re-plan this long after the rule's expiry time, so the
#: rule is already expired when the planner looks (``expire < now``).
EXPIRY_SLACK = 0.5


class LoopLike(Protocol):
    """The part of an asyncio loop the expiry timer needs."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Any: ...


class ExpiryTimer:
    """One pending call at the next rule expiry, on the loop's clock.

    Rule expiry is wall-clock time (epoch seconds), asyncio's ``call_at``
    takes the loop's monotonic clock; the delay is converted at arming.
    """

    def __init__(
        self, loop: LoopLike, callback: Callable[[], None],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._loop = loop
        self._callback = callback
        self._wall_clock = wall_clock
        self._handle: Any = None
        self.expiry: float | None = None

    def arm(self, expiry: float | None) -> None:
        """Replace the pending call with one at ``expiry`` (None: no call)."""
        if expiry == self.expiry and self._handle is not None:
            return
        self.cancel()
        if expiry is None:
            return
        delay = max(0.0, expiry - self._wall_clock()) + EXPIRY_SLACK
        self.expiry = expiry
        self._handle = self._loop.call_at(self._loop.time() + delay, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self.expiry = None

    def _fire(self) -> None:
        self._handle = None
        self.expiry = None
        try:
            self._callback()
        except Exception:
            log.exception("re-plan at rule expiry failed")


class NetworkServer:
    """Keeps every qube's forward and input entries right; answers the Admin API."""

    def __init__(self, host: DomHost, writer: EntryWriter) -> None:
        self._host = host
        self._writer = writer
        self._applier = Applier(writer)

    # --- planning ---------------------------------------------------------------

    def snapshot(self, now: float) -> planner.Snapshot:
        qubes = {}
        for domain in self._host.domains():
            try:
                rules = self._host.read_rules(domain)
            except Exception as err:  # a corrupt firewall.xml must not stop others
                log.error("%s: firewall rules unreadable, no forwards for it: %s", domain.name, err)
                rules = RuleLists()
            qubes[domain.name] = qube_state(domain, rules)
        return planner.Snapshot(qubes, now)

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

    def drop_shutdown_rules(self, name: str) -> bool:
        """Delete ``name``'s ``expire=shutdown`` rules, as it stopped; True if there were any.

        Called when the qube shuts down, and for every stopped qube when
        dom0 starts (it may have gone down without stopping them). Such a
        rule is only ever stored while its qube runs (the planner refuses
        it otherwise), so after this it can never come back with a start.
        """
        domain = self._host.domain(name)
        lists = self._host.read_rules(domain)
        dropped = False
        for kind in (RuleKind.FORWARD, RuleKind.INBOUND):
            kept = [rule for rule in lists.of(kind) if not rule.expires_at_shutdown]
            if len(kept) != len(lists.of(kind)):
                log.info("%s stopped: deleting its %s rules that lasted until then",
                         name, kind.value)
                self._host.store_rules(domain, kind, kept)
                dropped = True
        return dropped

    def qube_reset(self, name: str) -> None:
        """``name``'s QubesDB was created anew (start) or is gone (stop)."""
        self._applier.forget(name)

    # --- the Admin API's context ------------------------------------------------

    def find_qube(self, untrusted_name: str) -> QubeRef:
        """The qube of that (already validated) name; QubesVMNotFoundError if none."""
        try:
            domain = self._host.domain(untrusted_name)
        except KeyError:
            raise QubesVMNotFoundError(untrusted_name) from None
        return QubeRef(domain.name)

    def rules(self, qube: QubeRef) -> RuleLists:
        """The lists the qube enforces; a list that cannot be read is that qube's error."""
        domain = self._domain(qube)
        try:
            return self._host.read_rules(domain)
        except Exception as err:
            raise QubesVMError(
                qube, f"{qube.name}: firewall rules cannot be loaded: {err}"
            ) from None

    def set_rules(self, qube: QubeRef, kind: RuleKind, rules: list[Rule], now: float) -> None:
        """Replace one list: refuse (one line) what cannot work system-wide, else store it.

        Outbound rules are upstream's and need no system-wide check.
        """
        domain = self._domain(qube)
        proposed = self.rules(qube).replaced(kind, rules)  # the other lists must be readable
        if kind is not RuleKind.OUTBOUND:
            with self._planned(qube):
                try:
                    planner.check_rules(self.snapshot(now), qube.name, proposed)
                except planner.PlanError as err:
                    raise QubesValueError(str(err)) from None
        try:
            self._host.store_rules(domain, kind, rules)
        except OSError as err:
            raise QubesVMError(
                qube, f"{qube.name}: firewall.xml cannot be saved: {err}"
            ) from None

    def reload(self, qube: QubeRef) -> None:
        self._host.reload(self._domain(qube))

    def describe_forwards(self, qube: QubeRef, now: float) -> dict[int, str]:
        """Path of each forward rule of the qube in force at ``now``, and the hops' refusals.

        Keys are positions in its forward list (expired rules included).
        """
        with self._planned(qube):
            return planner.describe_forwards(self.snapshot(now), qube.name, self._writer.read)

    def describe_routing(self, qube: QubeRef, now: float) -> list[str]:
        """The qube's routing exposure and each hop's report (read from its QubesDB)."""
        with self._planned(qube):
            return routing.describe_routing(self.snapshot(now), qube.name, self._writer.read)

    def _domain(self, qube: QubeRef) -> DomainLike:
        try:
            return self._host.domain(qube.name)
        except KeyError:  # removed since it was found
            raise QubesVMNotFoundError(qube.name) from None

    @staticmethod
    @contextlib.contextmanager
    def _planned(qube: QubeRef) -> Iterator[None]:
        """The planner's KeyError for a qube gone from the domains (removed meanwhile)."""
        try:
            yield
        except KeyError as err:
            if err.args != (qube.name,):
                raise
            raise QubesVMNotFoundError(qube.name) from None
