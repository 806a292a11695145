"""The decisions of the qubesd extension, without importing ``qubes``.

:mod:`core_admin_patch.extension` is the thin shell qubesd loads (entry
point ``qubes.ext``); everything it decides lives here so it is tested
without a Qubes dom0: which qubesd events re-plan the forwards, when the
expiry timer fires, how entries reach a qube's QubesDB, how our
exceptions become qubesd's, and the outbound view of a firewall.xml that
upstream's loader would refuse (version 3).

The qubesd objects are only used through the attributes named in the
protocols below (``vm.name``, ``vm.dir_path``, ``vm.firewall_conf``,
``vm.untrusted_qdb``, ``vm.is_running()``, ...), which is what lets the
tests hand in small stand-ins.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from core_admin_patch import errors
from core_admin_patch.admin_api import load_rules
from core_admin_patch.network_server import DomainLike, NetworkServer
from firewall_rules import (
    Rule,
    default_rules,
    load_firewall_xml,
    outbound_qdb_entries,
    save_firewall_xml,
)

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

#: Fire the expiry re-plan this long after the rule's expiry time, so the
#: rule is already expired when the planner looks (no zero-length re-arm).
EXPIRY_SLACK = 0.5

FIREWALL_CONF = "firewall.xml"


class VMLike(DomainLike, Protocol):
    """A qubesd VM as the extension uses it."""

    dir_path: str
    firewall_conf: str
    untrusted_qdb: Any


class LoopLike(Protocol):
    """The part of an asyncio loop the expiry timer needs."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Any: ...

    def call_soon(self, callback: Callable[[], object]) -> Any: ...


def firewall_path(vm: VMLike) -> Path:
    """The qube's firewall.xml, where upstream keeps it."""
    return Path(vm.dir_path) / (getattr(vm, "firewall_conf", None) or FIREWALL_CONF)


def read_rules(vm: VMLike) -> list[Rule]:
    """All three rule kinds from firewall.xml (upstream's vm.firewall sees only outbound).

    No file means rules were never set: those cloned into the qube and not
    saved yet, else upstream's default, accept all.
    """
    firewall = getattr(vm, _FIREWALL_ATTRIBUTE, None)
    if isinstance(firewall, OutboundFirewall):
        return firewall.current()  # rules cloned into a qube not saved yet
    path = firewall_path(vm)
    return load_firewall_xml(path) if path.exists() else default_rules()


@dataclass(frozen=True)
class QubeRef:
    """core_admin_patch.admin_api.QubeRef for a qubesd VM."""

    name: str
    firewall_path: Path


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


class ExtensionCore:
    """Event handling and the AdminContext of the qubesd extension.

    ``domains`` lists qubesd's VMs (``app.domains``), ``lookup`` finds one
    by name (KeyError if none), ``fire_firewall_changed`` fires qubesd's
    ``firewall-changed`` on a VM, so upstream's handler rewrites the
    outbound entries in its netvm and ours re-plans the forwards.
    """

    def __init__(
        self,
        domains: Callable[[], Iterable[VMLike]],
        lookup: Callable[[str], VMLike],
        fire_firewall_changed: Callable[[VMLike], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._domains = domains
        self._lookup = lookup
        self._fire_firewall_changed = fire_firewall_changed
        self._clock = clock
        self._expiry_checked = clock()
        self.writer = QdbWriter(lookup)
        self.server = NetworkServer(
            self.planned_domains, read_rules, self.writer  # type: ignore[arg-type]
        )
        self.timer: ExpiryTimer | None = None
        self._startup_scheduled = False

    def planned_domains(self) -> list[VMLike]:
        """The qubes that can take part in a forward: not dom0 (no firewall.xml, no netvm)."""
        return [vm for vm in self._domains() if has_firewall(vm)]

    def start_timer(self, loop: LoopLike) -> None:
        """Arm expiry re-plans on qubesd's loop (once it runs)."""
        if self.timer is None:
            self.timer = ExpiryTimer(loop, self.on_expiry, self._clock)

    def on_load(self, vm: VMLike, loop: LoopLike) -> None:
        """qubesd loaded qubes.xml (``domain-load`` on each qube): re-plan once its loop runs.

        After a qubesd restart nothing else would reconcile QubesDB (rules
        that expired meanwhile) or arm the expiry timer before the first
        event. ``call_soon`` on a loop not yet running runs when it starts.
        """
        self.start_timer(loop)
        if not self._startup_scheduled:
            self._startup_scheduled = True
            loop.call_soon(self.refresh)

    def on_expiry(self) -> None:
        """A rule expired: outbound entries of its qube too, then the forwards.

        Upstream re-applies expired outbound rules from a systemd timer its
        own ``Set`` starts; ours replaces that ``Set``, so the expiry timer
        fires ``firewall-changed`` for each qube with a rule that expired
        since the last check (its netvm rewrites the qube's entries).
        """
        now = self._clock()
        since, self._expiry_checked = self._expiry_checked, now
        for vm in self.planned_domains():
            try:
                rules = read_rules(vm)
            except Exception:
                continue  # logged at every re-plan already
            if any(
                rule.expire is not None and since <= rule.expire.timestamp < now
                for rule in rules
            ):
                self._fire_firewall_changed(vm)
        self.refresh()

    # --- events -------------------------------------------------------------

    def on_domain_event(self, vm: VMLike, event: str) -> None:
        """A per-domain qubesd event; re-plans when it can change the plan."""
        if event not in REPLAN_EVENTS:
            return
        if event in QDB_RESET_EVENTS:
            self.server.qube_reset(vm.name)
            self.writer.failed.discard(vm.name)
        self.refresh()

    def on_app_event(self, event: str) -> None:
        if event in APP_EVENTS:
            self.refresh()

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

    # --- AdminContext -------------------------------------------------------

    def find_qube(self, untrusted_name: str) -> QubeRef:
        """The qube's firewall.xml; dom0 (AdminVM, no dir_path) has none."""
        try:
            vm = self._lookup(untrusted_name)
        except KeyError:
            raise errors.QubesVMNotFoundError(untrusted_name) from None
        if not has_firewall(vm):
            raise errors.QubesValueError(f"{vm.name} has no firewall")
        return QubeRef(vm.name, firewall_path(vm))

    def check_rules(self, qube: QubeRef, rules: list[Rule]) -> None:
        with _not_planned(qube):
            self.server.check_rules(qube.name, rules, self._clock())

    def firewall_changed(self, qube: QubeRef) -> None:
        try:
            vm = self._lookup(qube.name)
        except KeyError:
            raise errors.QubesVMNotFoundError(qube.name) from None
        self._fire_firewall_changed(vm)

    def describe_forwards(self, qube: QubeRef, now: float) -> dict[int, str]:
        with _not_planned(qube):
            return self.server.describe(qube.name, now)

    def describe_routing(self, qube: QubeRef, now: float) -> list[str]:
        with _not_planned(qube):
            return self.server.describe_routing(qube.name, now)


@contextlib.contextmanager
def _not_planned(qube: QubeRef) -> Iterator[None]:
    """The planner's KeyError for a qube gone from the domains (removed meanwhile)."""
    try:
        yield
    except KeyError as err:
        if err.args != (qube.name,):
            raise
        raise errors.QubesVMNotFoundError(qube.name) from None


def has_firewall(vm: object) -> bool:
    """Whether a qube has a firewall.xml of its own (dom0 has no directory)."""
    return getattr(vm, "klass", None) != "AdminVM" and bool(getattr(vm, "dir_path", None))


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


class OutboundFirewall:
    """Stand-in for upstream's ``vm.firewall`` that reads every firewall.xml version.

    Upstream's loader refuses version 3 (written when forward or inbound
    rules exist), so its ``reload_firewall_for_vm`` would fail for such a
    qube. This object gives it the same ``/qubes-firewall/`` entries from
    our reader; a file that cannot be read blocks the qube (policy drop),
    as an unreadable rule set must never open it.

    One object per qube (:func:`firewall_for`), as upstream's. firewall.xml,
    once it exists, is the rule list (our Set writes it directly); before
    that, rules given by ``clone()`` (a disposable is cloned from its
    template before its directory exists) or assignment are held here
    until ``save()``.
    """

    def __init__(self, vm: VMLike, clock: Callable[[], float] = time.time) -> None:
        self._vm = vm
        self._clock = clock
        self._unsaved: list[Rule] | None = None

    @property
    def policy(self) -> str:
        return "drop"

    @property
    def rules(self) -> list[Rule]:
        """Our rules (all kinds); an unreadable file raises admin_api's QubesVMError."""
        path = firewall_path(self._vm)
        if path.exists():
            return load_rules(QubeRef(self._vm.name, path))
        return self._fallback()

    @rules.setter
    def rules(self, rules: Iterable[object]) -> None:
        self._unsaved = [_own_rule(rule) for rule in rules]

    def current(self) -> list[Rule]:
        """The rules in force, for planning; raises the reader's error for a bad file."""
        path = firewall_path(self._vm)
        return load_firewall_xml(path) if path.exists() else self._fallback()

    def _fallback(self) -> list[Rule]:
        return list(self._unsaved) if self._unsaved is not None else default_rules()

    def clone(self, other: Any) -> None:
        """Take every rule of ``other`` (forward and inbound too), as upstream's ``clone``.

        An unreadable source raises: a copy never falls back to accept-all.
        Saved at once if the qube already has its directory, else at ``save()``.
        """
        self.rules = list(other.rules)
        if Path(self._vm.dir_path).is_dir():
            self.save()

    def save(self) -> None:
        """Write the rules to firewall.xml and announce it (``firewall-changed``), as upstream."""
        rules = self._unsaved if self._unsaved is not None else self.rules
        save_firewall_xml(firewall_path(self._vm), rules, self._clock())
        self._unsaved = None
        fire_event = getattr(self._vm, "fire_event", None)
        if fire_event is not None:
            fire_event("firewall-changed")

    def qdb_entries(self, addr_family: int | None = None) -> dict[str, str]:
        try:
            return outbound_qdb_entries(self.current(), addr_family, self._clock())
        except Exception as err:
            log.error("%s: firewall rules unusable, blocking its traffic: %s", self._vm.name, err)
            return {"policy": "drop"}


def _own_rule(rule: object) -> Rule:
    """A copy of one of our rules, or ours parsed from another's ``api_rule`` line."""
    if isinstance(rule, Rule):
        return copy.copy(rule)
    return Rule.from_api_string(str(getattr(rule, "api_rule", rule)))


#: Attribute under which a qube keeps its OutboundFirewall.
_FIREWALL_ATTRIBUTE = "_qns_firewall"


def firewall_for(vm: VMLike) -> OutboundFirewall:
    """The qube's one OutboundFirewall (``vm.firewall``), made on first use."""
    firewall = getattr(vm, _FIREWALL_ATTRIBUTE, None)
    if not isinstance(firewall, OutboundFirewall):
        firewall = OutboundFirewall(vm)
        setattr(vm, _FIREWALL_ATTRIBUTE, firewall)
    return firewall
