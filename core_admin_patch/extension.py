"""qubesd extension (entry point ``qubes.ext``): the only module importing ``qubes``.

A thin shell around :class:`core_admin_patch.extension_core.ExtensionCore`,
which holds every decision and is tested without a Qubes dom0. This module
only connects it to qubesd, leaving upstream in charge of outbound rules:

- ``vm.firewall`` is :class:`NetworkServerFirewall`, upstream's
  ``Firewall`` with the forward and inbound lists beside its outbound
  ``rules``: it reads every firewall.xml version and its ``save()`` writes
  all three lists in one atomic write (upstream's would drop ours). Its
  ``rules``, ``qdb_entries()`` and ``clone()`` are upstream's, so the r3
  compatibility path, a DispVM's cloned rules and upstream's QubesDB
  entries only ever see outbound rules;
- the Admin API: ``admin.vm.firewall.Get`` and ``Set`` without argument
  run upstream's own handlers (``Set`` after our one-line check of the
  payload); with ``+forward``/``+inbound`` they, ``GetPaths`` and ``GetRouting`` are
  answered by :func:`core_admin_patch.admin_api.handle_call`. ``Reload``
  stays upstream's: its ``firewall-changed`` re-plans the forwards too;
- event handlers: every per-domain event in ``REPLAN_EVENTS`` and the
  app's ``domain-add``/``domain-delete`` re-plan the forward entries.

State (the applier's memory, the expiry timer) belongs to one app: an
ExtensionCore per ``qubes.Qubes`` object, dropped at its ``qubes-close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import qubes.api
import qubes.api.admin
import qubes.exc
import qubes.ext
import qubes.firewall
import qubes.vm.mix.net

from core_admin_patch import errors
from core_admin_patch.admin_api import (
    GET,
    GET_PATHS,
    GET_ROUTING,
    SET,
    handle_call,
    parse_set_payload,
)
from core_admin_patch.extension_core import (
    APP_EVENTS,
    CLOSE_EVENT,
    LOAD_EVENT,
    REPLAN_EVENTS,
    ExtensionCore,
    save_lists,
    stored_lists,
    upstream_error,
)
from firewall_rules import FirewallFileError, Rule, RuleError, RuleKind

log = logging.getLogger("qubes.network-server")


class NetworkServerFirewall(qubes.firewall.Firewall):  # type: ignore[misc]
    """Upstream's ``vm.firewall``, with a qube's forward and inbound lists beside it.

    ``rules`` stays upstream's list of outbound ``Rule`` objects; the other
    kinds never enter it, so nothing of upstream's can see or drop them.
    """

    def __init__(self, vm: Any, load: bool = True) -> None:
        self.forward_rules: list[Rule] = []
        self.inbound_rules: list[Rule] = []
        super().__init__(vm, load)

    def load(self) -> None:
        """Every version upstream reads, and ours: version 3 and the sibling lists.

        No file gives upstream's default (one accept rule), as upstream's
        ``load_defaults()``.
        """
        try:
            lists = stored_lists(self.vm)
        except FirewallFileError as err:
            raise qubes.exc.QubesVMError(self.vm, str(err)) from None
        self.rules = [qubes.firewall.Rule.from_api_string(rule.api_rule) for rule in lists.outbound]
        self.forward_rules, self.inbound_rules = list(lists.forward), list(lists.inbound)

    def save(self) -> None:
        """Write all three lists (expired rules left out); ``firewall-changed``, as upstream."""
        try:
            save_lists(self.vm, self, time.time())
        except (OSError, RuleError) as err:
            log.error("%s: firewall save error: %s", self.vm.name, err)
            raise qubes.exc.QubesException(f"firewall save error: {err}") from None
        self.vm.fire_event("firewall-changed")


def _firewall(vm: Any) -> NetworkServerFirewall:
    """``vm.firewall``: one object per qube, made on first use, as upstream's property."""
    if vm._firewall is None:  # upstream's own attribute for it
        vm._firewall = NetworkServerFirewall(vm)
    return vm._firewall  # type: ignore[no-any-return]


def _api_method(name: str, wants_payload: bool | None, **classifiers: Any) -> Any:
    """``qubes.api.method`` for both of its signatures.

    The argument is checked by our handlers (None disables qubesd's check).
    """
    params = inspect.signature(qubes.api.method).parameters
    if "wants_payload" in params:  # R4.3 style
        return qubes.api.method(
            name, dest_adminvm=False, wants_arg=None, wants_payload=wants_payload, **classifiers
        )
    return qubes.api.method(name, **classifiers)  # R4.1/4.2: payload always passed


def _as_qubes_exc(err: Exception, dest: Any) -> Exception:
    """One of our errors as the qubes.exc class qubesd reports; others unchanged."""
    mapped = upstream_error(err)
    if mapped is None:
        return err
    exc_name, args = mapped
    if exc_name == "QubesVMError":
        args = (dest, *args[1:])
    return getattr(qubes.exc, exc_name)(*args)  # type: ignore[no-any-return]


def _ours(api: Any, untrusted_payload: bytes) -> str:
    """A call with an argument, GetPaths or GetRouting: our handle_call, our errors as qubesd's."""
    core = NetworkServerExtension().core(api.app)
    try:
        # fire_event_for_permission runs inside, after parsing (Set: rules=)
        data = handle_call(
            core.server, api.method, api.arg, api.dest.name, untrusted_payload,
            time.time(), permission=api.fire_event_for_permission,
        )
    except Exception as err:
        raise _as_qubes_exc(err, api.dest) from None
    return data.decode("ascii")


Upstream = Callable[..., Awaitable[Any]]


def _get(upstream_get: Upstream) -> Callable[..., Awaitable[Any]]:
    async def vm_firewall_get(self: Any, untrusted_payload: bytes = b"") -> Any:
        if getattr(self, "arg", ""):
            return _ours(self, untrusted_payload)
        return await upstream_get(self)

    return vm_firewall_get


def _set(upstream_set: Upstream) -> Callable[..., Awaitable[Any]]:
    async def vm_firewall_set(self: Any, untrusted_payload: bytes = b"") -> Any:
        if getattr(self, "arg", ""):
            return _ours(self, untrusted_payload)
        try:
            parse_set_payload(RuleKind.OUTBOUND, untrusted_payload, time.time())
        except Exception as err:
            raise _as_qubes_exc(err, self.dest) from None
        return await upstream_set(self, untrusted_payload)

    return vm_firewall_set


async def vm_firewall_getpaths(self: Any, untrusted_payload: bytes = b"") -> str:
    return _ours(self, untrusted_payload)


async def vm_firewall_getrouting(self: Any, untrusted_payload: bytes = b"") -> str:
    return _ours(self, untrusted_payload)


def install_api_methods() -> None:
    """Get/Set take our arguments (else run upstream's own), GetPaths and GetRouting are added.

    The attribute names of Get and Set are upstream's, so ours replace them
    instead of making two candidates for one method name; upstream's
    functions are kept and called for the calls without argument.
    """
    api = qubes.api.admin.QubesAdminAPI
    local = {"scope": "local"}
    api.vm_firewall_get = _api_method(GET, False, read=True, **local)(_get(api.vm_firewall_get))
    api.vm_firewall_set = _api_method(SET, None, write=True, **local)(_set(api.vm_firewall_set))
    api.vm_firewall_getpaths = _api_method(GET_PATHS, False, read=True, **local)(
        vm_firewall_getpaths
    )
    api.vm_firewall_getrouting = _api_method(GET_ROUTING, False, read=True, **local)(
        vm_firewall_getrouting
    )
    for cached in ("list_all_methods", "list_methods"):  # R4.3 caches the method table
        cache_clear = getattr(getattr(api, cached, None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


def _qubesd_loop() -> asyncio.AbstractEventLoop | None:
    """qubesd's loop: running, or set by qubesd's main() before it loads qubes.xml."""
    with contextlib.suppress(RuntimeError):
        return asyncio.get_running_loop()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # no current loop (3.12+)
        try:
            return asyncio.get_event_loop()
        except RuntimeError:
            return None


class NetworkServerExtension(qubes.ext.Extension):  # type: ignore[misc]
    """Keeps forward and input entries right as qubesd's state changes.

    qubesd makes one instance per process; the state lives in one
    ExtensionCore per app (a test run or a tool may make several apps).
    """

    _installed = False
    _cores: ClassVar[weakref.WeakKeyDictionary[Any, ExtensionCore]] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        super().__init__()
        cls = type(self)
        if not cls._installed:
            cls._installed = True
            install_api_methods()
            qubes.vm.mix.net.NetVMMixin.firewall = property(_firewall)  # type: ignore[assignment]

    def core(self, app: Any) -> ExtensionCore:
        """``app``'s ExtensionCore, made on first use.

        It holds the app only weakly: a closed app is not kept alive by us.
        """
        cores = type(self)._cores
        core = cores.get(app)
        if core is None:
            app_ref = weakref.ref(app)
            core = cores[app] = ExtensionCore(
                domains=lambda: list(_alive(app_ref).domains),
                lookup=lambda name: _alive(app_ref).domains[name],
            )
        # Outside qubesd's loop (loading qubes.xml) there is none yet: arm later.
        with contextlib.suppress(RuntimeError):
            core.start_timer(asyncio.get_running_loop())
        return core

    @qubes.ext.handler(*sorted(REPLAN_EVENTS))
    def on_domain_event(self, vm: Any, event: str, **kwargs: Any) -> None:
        self.core(vm.app).on_domain_event(vm, event)

    @qubes.ext.handler(*sorted(APP_EVENTS), system=True)
    def on_app_event(self, app: Any, event: str, **kwargs: Any) -> None:
        self.core(app).on_app_event(event)

    @qubes.ext.handler(CLOSE_EVENT, system=True)
    def on_app_close(self, app: Any, event: str, **kwargs: Any) -> None:
        """The app is closing: its state goes, and its timer with it."""
        core = type(self)._cores.pop(app, None)
        if core is not None:
            core.close()

    @qubes.ext.handler(LOAD_EVENT)
    def on_domain_load(self, vm: Any, event: str, **kwargs: Any) -> None:
        """qubesd start: one re-plan (and the expiry timer) once its loop runs."""
        loop = _qubesd_loop()
        if loop is None:
            log.error("no event loop at %s: rule expiry waits for the first event", event)
            return
        self.core(vm.app).on_load(vm, loop)

    @qubes.ext.handler("property-pre-set:netvm")
    def on_netvm_pre_set(
        self, vm: Any, event: str, newvalue: Any = None, **kwargs: Any
    ) -> None:
        """Veto a netvm change that would make two qubes' forwards share a port."""
        try:
            self.core(vm.app).check_netvm_change(vm, newvalue)
        except errors.QubesValueError as err:
            raise qubes.exc.QubesValueError(str(err)) from None

    @qubes.ext.handler("property-pre-reset:netvm")
    def on_netvm_pre_reset(self, vm: Any, event: str, **kwargs: Any) -> None:
        """The same veto when netvm goes back to its default (``qvm-prefs -D``).

        The event carries no new value; the default is what qubesd will use.
        """
        self.on_netvm_pre_set(vm, event, newvalue=vm.property_get_default("netvm"))


def _alive(app_ref: weakref.ReferenceType[Any]) -> Any:
    app = app_ref()
    if app is None:
        raise errors.QubesException("qubesd app closed")
    return app
