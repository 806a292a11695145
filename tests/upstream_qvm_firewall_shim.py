"""Put our qvm-firewall where upstream's tests import ``qubesadmin.tools.qvm_firewall``.

Preloaded by tests/upstream_unittest.py (``--preload``) before upstream's
``qubesadmin/tests/tools/qvm_firewall.py`` is imported, so its cases run
unchanged against admin_client_patch.qvm_firewall:

- ``main(args, app)``: our main, with every Admin API call going to the
  test's ``app.qubesd_call`` (its table of expected calls and replies)
  instead of the qubesd socket. Stricter than upstream's cases: our main
  must return 0 and make every expected call that changes something
  (Set, Reload); reads are up to the tool. The cases' qubes hold outbound
  rules only, so the forward and inbound lists our tool also reads (and
  ``reset`` also empties), and the routing exposure it asks for
  (``GetRouting``: a qube that is not routed has none), are answered as
  such a qube's dom0 answers: empty; any rule sent there fails the case.
- ``RuleAction``: upstream's argparse action for rule words, built on our
  word parser (admin_client_patch.firewall.rule_from_words), handing back
  upstream's ``qubesadmin.firewall.Rule`` of our canonical line, so the
  cases compare what our parser makes with what upstream's makes.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from collections.abc import Sequence
from typing import Any

import qubesadmin.exc
import qubesadmin.firewall
import qubesadmin.tools

from admin_client_patch import firewall as client_firewall
from admin_client_patch import qvm_firewall as our_tool
from admin_client_patch.qubesd_client import QubesException
from firewall_rules import RuleError

#: Calls a case expects that must be made: the ones with an effect.
MUST_CALL = frozenset({"admin.vm.firewall.Set", "admin.vm.firewall.Reload"})

#: The lists upstream has no calls for (admin.vm.firewall.Get+forward, ...).
OTHER_LISTS = frozenset({"forward", "inbound"})
#: Nor for a qube's routing exposure.
GET_ROUTING = "admin.vm.firewall.GetRouting"


def other_list_call(method: str, arg: str, payload: bytes) -> bytes:
    """What dom0 answers for a qube without forward or inbound rules."""
    if method == "admin.vm.firewall.Get" or (method == "admin.vm.firewall.Set" and not payload):
        return b""
    raise AssertionError(f"{method}+{arg} with {payload!r} for a qube of outbound rules")


def main(args: Sequence[str] | None = None, app: Any = None) -> int:
    """Our qvm-firewall's main against the test's app instead of qubesd."""
    def call(dest: str, method: str, arg: str = "", payload: bytes = b"") -> bytes:
        if arg in OTHER_LISTS and (dest, method, arg, payload or None) not in app.expected_calls:
            return other_list_call(method, arg, payload)
        if method == GET_ROUTING and (dest, method, None, None) not in app.expected_calls:
            return b""
        try:
            reply = app.qubesd_call(dest, method, arg or None, payload or None)
        except qubesadmin.exc.QubesException as err:
            raise QubesException(str(err), type(err).__name__) from None
        return bytes(reply or b"")

    original = client_firewall.qubesd_call
    client_firewall.qubesd_call = call
    try:
        code = our_tool.main(list(args or []))
    finally:
        client_firewall.qubesd_call = original
    if code != 0:
        raise AssertionError(f"our qvm-firewall exited {code}")
    missing = {
        key for key in app.expected_calls
        if key not in app.actual_calls and key[1] in MUST_CALL
    }
    if missing:
        raise AssertionError(f"expected calls not made: {sorted(missing)}")
    return code


class RuleAction(argparse.Action):
    """Upstream's rule-words action, parsing with our client's parser."""

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any,
        option_string: str | None = None,
    ) -> None:
        try:
            rule = client_firewall.rule_from_words(list(values), time.time())
        except (client_firewall.FirewallEditError, RuleError) as err:
            raise argparse.ArgumentError(None, str(err)) from None
        setattr(namespace, self.dest, qubesadmin.firewall.Rule(rule.api_rule))


shim = types.ModuleType("qubesadmin.tools.qvm_firewall", __doc__)
shim.main = main  # type: ignore[attr-defined]
shim.RuleAction = RuleAction  # type: ignore[attr-defined]
sys.modules[shim.__name__] = shim
qubesadmin.tools.qvm_firewall = shim  # type: ignore[attr-defined]
