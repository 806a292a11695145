"""The decisions of the qubesd extension, without importing ``qubes``.

:mod:`core_admin_patch.extension` is the thin shell qubesd loads (entry
point ``qubes.ext``); everything it decides lives here so it is tested
without a Qubes dom0: which qubesd events re-plan the forwards, when the
expiry timer fires, how entries reach a qube's QubesDB, how our
exceptions become qubesd's, and how firewall.xml is read and written
beside upstream's ``Firewall`` object.

Upstream stays in charge of the outbound rules: ``vm.firewall`` is
upstream's ``Firewall`` (a subclass, :mod:`core_admin_patch.extension`)
holding them as upstream's ``Rule`` objects, so its Admin API handlers, its
QubesDB entries, its DispVM ``clone`` and its r3 compatibility path see
exactly what they see without us. The forward and inbound lists ride
along on the same object (``forward_rules``, ``inbound_rules``) and in the
same file, and are saved with it by its ``save()``, atomically.

The qubesd objects are only used through the attributes named in the
protocols below (``vm.name``, ``vm.dir_path``, ``vm.firewall``,
``vm.untrusted_qdb``, ``vm.is_running()``, ...), which is what lets the
tests hand in small stand-ins.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, cast

from core_admin_patch import errors
from core_admin_patch.network_server import (
    DomainLike,
    ExpiryTimer,
    LoopLike,
    NetworkServer,
)
from firewall_rules import Rule, RuleKind, RuleLists, read_rule_lists, save_firewall_xml

log = logging.getLogger("qubes.network-server")

#: Events fired on a domain after which the forward plan may differ: the
#: qube's running state, its place in the network, its address, its rules,
#: its IPv6 setting, or whether its agent supports forwards. Most reach
#: other qubes too (a hop's restart moves every forward through it), so
#: every one re-plans the whole system rather than guessing who is touched.
REPLAN_EVENTS: frozenset[str] = frozenset({
    "domain-start",
    "domain-shutdown",
    "domain-qdb-create",
    "property-set:netvm",
    "property-reset:netvm",
    "property-set:ip",
    "property-reset:ip",
    # srcqube= rules name a qube's IPv6 address too, which can be set apart
    "property-set:ip6",
    "property-reset:ip6",
    "property-set:provides_network",
    "property-reset:provides_network",
    "firewall-changed",
    "domain-feature-set:ipv6",
    "domain-feature-delete:ipv6",
    "domain-feature-set:supported-feature.qubes-network-server",
    "domain-feature-delete:supported-feature.qubes-network-server",
    # routing exposure (core_admin_patch.routing), set on the qube or its template
    "domain-feature-set:routing-method",
    "domain-feature-delete:routing-method",
})

#: Events after which the qube's QubesDB is new (start) or gone (stop): what
#: dom0 remembers having written there no longer holds.
QDB_RESET_EVENTS: frozenset[str] = frozenset({"domain-qdb-create", "domain-shutdown"})

#: Fired on every qube once qubesd has loaded qubes.xml (at qubesd start).
LOAD_EVENT = "domain-load"

#: Events fired on the app (system-wide): a qube appeared or disappeared.
APP_EVENTS: frozenset[str] = frozenset({"domain-add", "domain-delete"})

#: Fired on the app by ``Qubes.close()``: its extension state goes with it.
CLOSE_EVENT = "qubes-close"

FIREWALL_CONF = "firewall.xml"


class FirewallLike(Protocol):
    """``vm.firewall`` as this module uses it: upstream's object with our two lists."""

    #: upstream's ``qubes.firewall.Rule`` objects: the outbound list
    rules: list[Any]
    forward_rules: list[Rule]
    inbound_rules: list[Rule]

    def save(self) -> None: ...


class VMLike(DomainLike, Protocol):
    """A qubesd VM as the extension uses it."""

    dir_path: str
    firewall_conf: str
    untrusted_qdb: Any

    @property
    def firewall(self) -> FirewallLike: ...

    def fire_event(self, event: str, **kwargs: Any) -> Any: ...


def firewall_path(vm: VMLike) -> Path:
    """The qube's firewall.xml, where upstream keeps it."""
    return Path(vm.dir_path) / (getattr(vm, "firewall_conf", None) or FIREWALL_CONF)


def has_firewall(vm: object) -> bool:
    """Whether a qube has a firewall.xml of its own (dom0 has no directory)."""
    return getattr(vm, "klass", None) != "AdminVM" and bool(getattr(vm, "dir_path", None))


def stored_lists(vm: VMLike) -> RuleLists:
    """What ``Firewall.load()`` loads: firewall.xml (every version), else the default.

    A file that cannot be read raises FirewallFileError (naming it), never
    "no rules", as upstream's loader.
    """
    return read_rule_lists(firewall_path(vm))


def our_rules(upstream_rules: Iterable[Any]) -> tuple[Rule, ...]:
    """Upstream's outbound ``Rule`` objects as ours, through their canonical line.

    Upstream's ``api_rule`` is None for a rule that has expired: it is
    left out, as upstream's own ``save()`` and ``Get`` leave it out.
    """
    return tuple(
        Rule.from_api_string(line)
        for rule in upstream_rules
        if (line := rule.api_rule) is not None
    )


def save_lists(vm: VMLike, firewall: FirewallLike, now: float) -> None:
    """``Firewall.save()``'s file: upstream's ``<rules>`` and our lists, in one atomic write."""
    lists = RuleLists(
        our_rules(firewall.rules), tuple(firewall.forward_rules), tuple(firewall.inbound_rules)
    )
    save_firewall_xml(firewall_path(vm), lists, now)


class QdbWriter:
    """applier.EntryWriter on qubesd's ``vm.untrusted_qdb``.

    A qube that is not running has no QubesDB: nothing is written, and the
    qube's entries are rewritten whole at its next ``domain-qdb-create``.
    A failed write (the qube is going down) is logged and remembered, so the
    extension makes the applier forget that qube instead of stopping the
    re-plan of all the others.
    """

    def __init__(self, lookup: Callable[[str], VMLike]) -> None:
        self._lookup = lookup
        self.failed: set[str] = set()

    def _qdb(self, qube: str) -> Any:
        try:
            vm = self._lookup(qube)
        except KeyError:
            return None
        if not vm.is_running():
            return None
        return vm.untrusted_qdb

    def write(self, qube: str, path: str, value: str) -> None:
        self._do(qube, "write", path, value)

    def rm(self, qube: str, path: str) -> None:
        self._do(qube, "rm", path)

    def list(self, qube: str, prefix: str) -> list[str]:
        """Paths under ``prefix``; a failure marks the qube for a full rewrite later."""
        if qube in self.failed:
            return []
        qdb = self._qdb(qube)
        if qdb is None:
            return []
        try:
            return [str(path) for path in qdb.list(prefix)]
        except Exception as err:  # qubesdb.Error, or the connection is gone
            log.warning("%s: QubesDB list %s failed, will look again later: %s", qube, prefix, err)
            self.failed.add(qube)
            return []

    def read(self, qube: str, path: str) -> bytes | None:
        """A value the qube wrote (a hop's routing report); None if absent or unreadable."""
        qdb = None if qube in self.failed else self._qdb(qube)
        if qdb is None:
            return None
        try:
            value = qdb.read(path)
        except Exception as err:  # qubesdb.Error, or the connection is gone
            log.warning("%s: QubesDB read %s failed: %s", qube, path, err)
            return None
        return None if value is None else bytes(value)

    def _do(self, qube: str, op: str, *args: str) -> None:
        if qube in self.failed:
            return
        qdb = self._qdb(qube)
        if qdb is None:
            return
        try:
            getattr(qdb, op)(*args)
        except Exception as err:  # qubesdb.Error, or the connection is gone
            log.warning("%s: QubesDB %s %s failed, will rewrite later: %s", qube, op, args[0], err)
            self.failed.add(qube)


class ExtensionCore:
    """The extension's state for one qubesd app: its NetworkServer host, events and timer.

    ``domains`` lists qubesd's VMs (``app.domains``), ``lookup`` finds one
    by name (KeyError if none). A ``firewall-changed`` fired on a VM makes
    upstream's handler rewrite the outbound entries in its netvm, and ours
    re-plan the forwards.
    """

    def __init__(
        self,
        domains: Callable[[], Iterable[VMLike]],
        lookup: Callable[[str], VMLike],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._all_domains = domains
        self._lookup = lookup
        self._clock = clock
        self._expiry_checked = clock()
        self.writer = QdbWriter(lookup)
        self.server = NetworkServer(self, self.writer)
        self.timer: ExpiryTimer | None = None
        self._startup_scheduled = False

    # --- DomHost ------------------------------------------------------------

    def domains(self) -> list[VMLike]:
        """The qubes that can take part in a forward: not dom0 (no firewall.xml, no netvm)."""
        return [vm for vm in self._all_domains() if has_firewall(vm)]

    def domain(self, name: str) -> VMLike:
        """The qube's VM; dom0 (AdminVM, no dir_path) has no firewall."""
        vm = self._lookup(name)
        if not has_firewall(vm):
            raise errors.QubesValueError(f"{vm.name} has no firewall")
        return vm

    def read_rules(self, domain: DomainLike) -> RuleLists:
        """What ``vm.firewall`` holds: the rules the qube enforces (a new DispVM's cloned ones)."""
        firewall = cast(VMLike, domain).firewall
        return RuleLists(
            our_rules(firewall.rules), tuple(firewall.forward_rules), tuple(firewall.inbound_rules)
        )

    def store_rules(self, domain: DomainLike, kind: RuleKind, rules: list[Rule]) -> None:
        """Replace the forward or inbound list and save through ``vm.firewall.save()``.

        Outbound rules are stored by upstream's own ``Set`` handler only.
        """
        if kind is RuleKind.OUTBOUND:
            raise errors.ProtocolError("outbound rules are set by upstream's own Set")
        firewall = cast(VMLike, domain).firewall
        setattr(firewall, f"{kind.value}_rules", list(rules))
        firewall.save()

    def reload(self, domain: DomainLike) -> None:
        cast(VMLike, domain).fire_event("firewall-changed")

    # --- events -------------------------------------------------------------

    def start_timer(self, loop: LoopLike) -> None:
        """Arm expiry re-plans on qubesd's loop (once it runs)."""
        if self.timer is None:
            self.timer = ExpiryTimer(loop, self.on_expiry, self._clock)

    def on_load(self, vm: VMLike, loop: Any) -> None:
        """qubesd loaded qubes.xml (``domain-load`` on each qube): re-plan once its loop runs.

        After a qubesd restart nothing else would reconcile QubesDB (rules
        that expired meanwhile) or arm the expiry timer before the first
        event. ``call_soon`` on a loop not yet running runs when it starts.
        """
        self.start_timer(loop)
        if not vm.is_running():  # dom0 went down without stopping it
            self._drop_shutdown_rules(vm)
        if not self._startup_scheduled:
            self._startup_scheduled = True
            loop.call_soon(self.refresh)

    def on_expiry(self) -> None:
        """A rule expired: the outbound entries of its qube, then the forwards.

        An outbound rule that expired is left out of the entries upstream's
        ``firewall-changed`` handler writes; the timer fires it for each
        qube with one that expired since the last check, here too after a
        qubesd restart (upstream's own timer lives in its process).
        """
        now = self._clock()
        since, self._expiry_checked = self._expiry_checked, now
        for vm in self.domains():
            try:
                outbound = self.read_rules(vm).outbound
            except Exception:
                continue  # logged at every re-plan already
            if any(
                rule.expire is not None
                and rule.expire.timestamp is not None  # expire=shutdown: not outbound
                and since <= rule.expire.timestamp < now
                for rule in outbound
            ):
                vm.fire_event("firewall-changed")
        self.refresh()

    def on_domain_event(self, vm: VMLike, event: str) -> None:
        """A per-domain qubesd event; re-plans when it can change the plan."""
        if event not in REPLAN_EVENTS:
            return
        if event in QDB_RESET_EVENTS:
            self.server.qube_reset(vm.name)
            self.writer.failed.discard(vm.name)
        if event == "domain-shutdown":
            self._drop_shutdown_rules(vm)
        self.refresh()

    def _drop_shutdown_rules(self, vm: VMLike) -> None:
        """Delete the stopped qube's ``expire=shutdown`` rules; never raises into qubesd."""
        if not has_firewall(vm):
            return
        try:
            self.server.drop_shutdown_rules(vm.name)
        except Exception:
            log.exception("%s: cannot delete its rules that lasted until it stopped", vm.name)

    def on_app_event(self, event: str) -> None:
        if event in APP_EVENTS:
            self.refresh()

    def close(self) -> None:
        """The app is closing: nothing may fire for it any more."""
        if self.timer is not None:
            self.timer.cancel()

    def check_netvm_change(self, vm: VMLike, new_netvm: object) -> None:
        """Refuse (QubesValueError) a netvm change that would make two forwards share a port.

        For qubesd's ``property-pre-set:netvm``: ``new_netvm`` is the VM (or
        its name, or None) about to be set. Without this the planner would
        give the port to whichever qube sorts first.
        """
        new_name = None if new_netvm is None else str(getattr(new_netvm, "name", new_netvm))
        self.server.check_netvm_change(vm.name, new_name, self._clock())

    def refresh(self) -> None:
        """Re-plan and write; never raises into qubesd's event dispatch."""
        try:
            next_expiry = self.server.refresh(self._clock())
        except Exception:
            log.exception("re-plan of forward rules failed")
            next_expiry = None
        for qube in sorted(self.writer.failed):
            self.server.qube_reset(qube)
        self.writer.failed.clear()
        if self.timer is not None:
            self.timer.arm(next_expiry)


def upstream_error(err: BaseException) -> tuple[str, tuple[object, ...]] | None:
    """qubes.exc class name and constructor arguments for one of our errors.

    qubesd frames only its own exception classes as errors for the caller;
    ours must be re-raised as those. None: not ours (let qubesd log it).
    """
    if isinstance(err, errors.QubesVMNotFoundError):
        return "QubesVMNotFoundError", (err.vmname,)
    if isinstance(err, errors.QubesVMError):
        return "QubesVMError", (err.vm, str(err))
    if isinstance(err, errors.QubesValueError):
        return "QubesValueError", (str(err),)
    if isinstance(err, errors.QubesException):
        return "QubesException", (str(err),)
    if isinstance(err, errors.ProtocolError):
        return "ProtocolError", (str(err),)
    if isinstance(err, errors.PermissionDenied):
        return "PermissionDenied", (str(err),)
    return None
