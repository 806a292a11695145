"""qubesd extension (entry point ``qubes.ext``): the only module importing ``qubes``.

A thin shell around :class:`core_admin_patch.extension_core.ExtensionCore`,
which holds every decision and is tested without a Qubes dom0. This module
only connects it to qubesd:

- event handlers: every per-domain event in ``REPLAN_EVENTS`` and the
  app's ``domain-add``/``domain-delete`` re-plan the forward entries;
- the Admin API: ``admin.vm.firewall.Get``/``Set``/``Reload`` are replaced
  (upstream's parser refuses forward and inbound rules) and ``GetPaths``
  and ``GetRouting`` are added, all answered by :func:`core_admin_patch.admin_api.handle_call`;
- ``vm.firewall``: replaced by one OutboundFirewall per qube (every
  firewall.xml version, ``clone``/``save``), so upstream's outbound path
  and DispVM creation keep working for a version 3 file.

Not run on a real dom0 yet; doc/dom0-extension.md lists what is unverified.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import warnings
from typing import Any

import qubes.api
import qubes.api.admin
import qubes.exc
import qubes.ext
import qubes.vm.mix.net

from core_admin_patch import errors
from core_admin_patch.admin_api import METHODS, handle_call
from core_admin_patch.extension_core import (
    APP_EVENTS,
    LOAD_EVENT,
    REPLAN_EVENTS,
    ExtensionCore,
    firewall_for,
    upstream_error,
)

log = logging.getLogger("qubes.network-server")

#: method -> (attribute on QubesAdminAPI, qrexec policy classifiers). The
#: attribute names of Get/Set/Reload are upstream's, so ours replace them
#: instead of making two candidates for one method name.
_API_ATTRIBUTES: dict[str, tuple[str, dict[str, Any]]] = {
    "admin.vm.firewall.Get": ("vm_firewall_get", {"scope": "local", "read": True}),
    "admin.vm.firewall.Set": ("vm_firewall_set", {"scope": "local", "write": True}),
    "admin.vm.firewall.Reload": ("vm_firewall_reload", {"scope": "local", "execute": True}),
    "admin.vm.firewall.GetPaths": ("vm_firewall_getpaths", {"scope": "local", "read": True}),
    "admin.vm.firewall.GetRouting": ("vm_firewall_getrouting", {"scope": "local", "read": True}),
}


def _api_method(name: str, classifiers: dict[str, Any]) -> Any:
    """``qubes.api.method`` for both of its signatures.

    Argument and payload checks are left to handle_call (None disables
    qubesd's), so every call reaches it with ``untrusted_payload``.
    """
    params = inspect.signature(qubes.api.method).parameters
    if "wants_payload" in params:  # R4.3 style
        return qubes.api.method(
            name, dest_adminvm=False, wants_arg=None, wants_payload=None, **classifiers
        )
    return qubes.api.method(name, **classifiers)  # R4.1/4.2: payload always passed


def _api_handler(method: str) -> Any:
    async def call(self: Any, untrusted_payload: bytes = b"") -> str:
        core = NetworkServerExtension().core(self.app)
        try:
            # fire_event_for_permission runs inside, after parsing (Set: rules=)
            data = handle_call(
                core, method, getattr(self, "arg", ""), self.dest.name, untrusted_payload,
                time.time(), permission=self.fire_event_for_permission,
            )
        except Exception as err:
            mapped = upstream_error(err)
            if mapped is None:
                raise
            exc_name, args = mapped
            if exc_name == "QubesVMError":
                args = (self.dest, *args[1:])
            raise getattr(qubes.exc, exc_name)(*args) from None
        return data.decode("ascii")

    call.__name__ = _API_ATTRIBUTES[method][0]
    return call


def install_api_methods() -> None:
    """Put our Get/Set/Reload/GetPaths on qubesd's Admin API class."""
    for method in METHODS:
        attribute, classifiers = _API_ATTRIBUTES[method]
        setattr(
            qubes.api.admin.QubesAdminAPI, attribute,
            _api_method(method, classifiers)(_api_handler(method)),
        )


def install_firewall_reader() -> None:
    """``vm.firewall`` is the qube's one OutboundFirewall (all firewall.xml versions).

    Upstream's object refuses version 3; ours serves its ``qdb_entries`` to
    upstream's ``reload_firewall_for_vm`` and its ``clone``/``save`` to
    DispVM creation.
    """
    qubes.vm.mix.net.NetVMMixin.firewall = property(firewall_for)  # type: ignore[assignment]


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
    """Keeps forward and input entries right as qubesd's state changes."""

    _core: ExtensionCore | None = None
    _installed = False

    def __init__(self) -> None:
        super().__init__()
        cls = type(self)
        if not cls._installed:
            cls._installed = True
            install_api_methods()
            install_firewall_reader()

    def core(self, app: Any) -> ExtensionCore:
        """The one ExtensionCore, made on first use (the app is known then)."""
        cls = type(self)
        if cls._core is None:
            cls._core = ExtensionCore(
                domains=lambda: list(app.domains),
                lookup=lambda name: app.domains[name],
                fire_firewall_changed=lambda vm: vm.fire_event("firewall-changed"),
            )
        # Outside qubesd's loop (loading qubes.xml) there is none yet: arm later.
        with contextlib.suppress(RuntimeError):
            cls._core.start_timer(asyncio.get_running_loop())
        return cls._core

    @qubes.ext.handler(*sorted(REPLAN_EVENTS))
    def on_domain_event(self, vm: Any, event: str, **kwargs: Any) -> None:
        self.core(vm.app).on_domain_event(vm, event)

    @qubes.ext.handler(*sorted(APP_EVENTS), system=True)
    def on_app_event(self, app: Any, event: str, **kwargs: Any) -> None:
        self.core(app).on_app_event(event)

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
