"""Admin API ``admin.vm.firewall.Get``, ``.Set``, ``.Reload``, ``.GetPaths`` and ``.GetRouting``.

One function, :func:`handle_call`, takes a request exactly as it comes off
the qubesd socket (method, argument, destination, payload, all untrusted)
and returns the reply data or raises an exception from
:mod:`core_admin_patch.errors`. It talks to the rest of dom0 only through
:class:`AdminContext`, so the lab's qubesd stand-in and the real qubesd
extension run the very same validation and storage code; nothing here
imports ``qubes``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from core_admin_patch.errors import (
    ProtocolError,
    QubesValueError,
    QubesVMError,
)
from firewall_rules import (
    FirewallFileError,
    Rule,
    RuleError,
    default_rules,
    load_firewall_xml,
    parse_api_payload,
    save_firewall_xml,
)


class QubeRef(Protocol):
    """What the API needs to know of a destination qube."""

    name: str
    firewall_path: Path


class AdminContext(Protocol):
    """The dom0 around the API: qube lookup, system-wide checks, apply."""

    def find_qube(self, untrusted_name: str) -> QubeRef:
        """The qube of that name; raises QubesVMNotFoundError."""
        ...

    def check_rules(self, qube: QubeRef, rules: list[Rule]) -> None:
        """Refuse (QubesException) rules that cannot work system-wide."""
        ...

    def firewall_changed(self, qube: QubeRef) -> None:
        """Rewrite QubesDB entries after rules of ``qube`` changed."""
        ...

    def describe_forwards(self, qube: QubeRef, now: float) -> dict[int, str]:
        """Path of each forward rule of ``qube`` in force at ``now``.

        Keys are positions in the stored list (firewall.xml, expired rules
        included), as the planner numbers them; GetPaths renumbers them.
        """
        ...

    def describe_routing(self, qube: QubeRef, now: float) -> list[str]:
        """The qube's routing exposure, one line each (none when it is not routed)."""
        ...


#: qubesd's rule for qube names (qubes.vm.validate_name).
_NAME_RE = re.compile(r"\A[a-zA-Z][a-zA-Z0-9_-]*\Z")
_NAME_MAX = 31


def validate_qube_name(untrusted_name: str) -> str:
    """Check a destination name the way qubesd does before any lookup.

    A name that could never belong to a qube is refused early, so it never
    reaches a path join or a log line unchecked.
    """
    if len(untrusted_name) > _NAME_MAX:
        raise QubesValueError("VM name must be shorter than 32 characters")
    if _NAME_RE.match(untrusted_name) is None:
        raise QubesValueError("VM name contains illegal characters")
    if untrusted_name == "Domain-0":
        raise QubesValueError("VM name cannot be 'Domain-0'")
    if untrusted_name in ("none", "default"):
        raise QubesValueError("VM name cannot be 'none' nor 'default'")
    if untrusted_name.endswith("-dm"):
        raise QubesValueError("VM name cannot end with -dm")
    return untrusted_name


def load_rules(qube: QubeRef) -> list[Rule]:
    """The qube's stored rules; a broken file is that qube's error, not ours.

    No file means the rules were never set: the default (accept all), as in
    qubesd.
    """
    if not qube.firewall_path.exists():
        return default_rules()
    try:
        return load_firewall_xml(qube.firewall_path)
    except (FirewallFileError, RuleError, OSError) as err:
        raise QubesVMError(
            qube, f"{qube.name}: firewall.xml cannot be loaded: {err}"
        ) from None


def firewall_get(ctx: AdminContext, qube: QubeRef, untrusted_payload: bytes, now: float) -> bytes:
    """Canonical API line of every rule still in force, one per line."""
    return "".join(
        rule.api_rule + "\n" for rule in load_rules(qube) if not rule.is_expired(now)
    ).encode("ascii")


def parse_rules(untrusted_payload: bytes, now: float) -> list[Rule]:
    """A Set payload's rules; any bad line refuses all of it (one-line QubesValueError)."""
    if not untrusted_payload.isascii():
        raise QubesValueError("firewall rules must be ASCII text")
    try:
        return parse_api_payload(untrusted_payload, now)
    except RuleError as err:
        raise QubesValueError(str(err)) from None


def firewall_set(ctx: AdminContext, qube: QubeRef, untrusted_payload: bytes, now: float) -> bytes:
    """Replace all rules: parse everything, check, save, then apply.

    One bad line refuses the whole payload before anything is written, so
    the stored rules are either the old list or the new one, never a mix.
    """
    return set_rules(ctx, qube, parse_rules(untrusted_payload, now), now)


def set_rules(ctx: AdminContext, qube: QubeRef, rules: list[Rule], now: float) -> bytes:
    """Check, save and apply already parsed rules (the second half of Set)."""
    ctx.check_rules(qube, rules)
    try:
        save_firewall_xml(qube.firewall_path, rules, now)
    except OSError as err:
        raise QubesVMError(qube, f"{qube.name}: firewall.xml cannot be saved: {err}") from None
    ctx.firewall_changed(qube)
    return b""


def firewall_reload(
    ctx: AdminContext, qube: QubeRef, untrusted_payload: bytes, now: float
) -> bytes:
    """Re-apply the stored rules (e.g. after a hop was fixed)."""
    ctx.firewall_changed(qube)
    return b""


#: A path description as it may appear in a GetPaths reply line.
_PATH_TEXT_RE = re.compile(r"\A[\x21-\x7e][\x20-\x7e]*\Z")


def _path_text(text: str) -> str:
    """One printable ASCII line: the reply is line-based and shown in a terminal."""
    flat = " ".join(text.split()).encode("ascii", "replace").decode("ascii")
    return flat if _PATH_TEXT_RE.match(flat) else "path unknown"


def firewall_get_paths(
    ctx: AdminContext, qube: QubeRef, untrusted_payload: bytes, now: float
) -> bytes:
    """``<rule number> <path>`` per forward rule in force, numbered as Get lists them.

    The planner numbers rules by their place in firewall.xml, where expired
    rules still sit; Get (hence qvm-firewall) leaves those out. The numbers
    are translated here so "rule 2" means the same rule in both replies.
    """
    rules = load_rules(qube)
    listed: dict[int, int] = {}
    for stored, rule in enumerate(rules):
        if not rule.is_expired(now):
            listed[stored] = len(listed)
    lines = []
    for stored, text in sorted(ctx.describe_forwards(qube, now).items()):
        number = listed.get(stored)
        if number is None:  # expired between the two reads, or not a stored rule
            continue
        lines.append(f"{number} {_path_text(text)}\n")
    return "".join(lines).encode("ascii")


def firewall_get_routing(
    ctx: AdminContext, qube: QubeRef, untrusted_payload: bytes, now: float
) -> bytes:
    """The qube's exposure on the LAN (``routing-method forward``), one line each.

    Its addresses and the way in, then (indented by two spaces) what each
    hop reported; empty when the qube is not routed.
    """
    lines = []
    for line in ctx.describe_routing(qube, now):
        indent = "  " if line.startswith("  ") else ""
        lines.append(f"{indent}{_path_text(line)}\n")
    return "".join(lines).encode("ascii")


Handler = Callable[[AdminContext, QubeRef, bytes, float], bytes]

#: method -> (handler, takes a payload)
METHODS: dict[str, tuple[Handler, bool]] = {
    "admin.vm.firewall.Get": (firewall_get, False),
    "admin.vm.firewall.Set": (firewall_set, True),
    "admin.vm.firewall.Reload": (firewall_reload, False),
    "admin.vm.firewall.GetPaths": (firewall_get_paths, False),
    "admin.vm.firewall.GetRouting": (firewall_get_routing, False),
}


def handle_call(
    ctx: AdminContext,
    untrusted_method: str,
    untrusted_arg: str,
    untrusted_dest: str,
    untrusted_payload: bytes,
    now: float,
    permission: Callable[..., object] | None = None,
) -> bytes:
    """Run one Admin API call; the reply data, or a Qubes exception.

    Malformed requests (unknown method, argument or payload where none is
    taken) raise ProtocolError as in qubesd; everything the user can get
    wrong raises a QubesException whose message is meant for them.

    ``permission`` is qubesd's ``fire_event_for_permission``: called once
    the request is well formed, as upstream's methods do, and for Set after
    parsing, with ``rules=`` (the parsed list, parsed only once).
    """
    try:
        handler, takes_payload = METHODS[untrusted_method]
    except KeyError:
        raise ProtocolError(f"no such method: {untrusted_method!r}") from None
    if untrusted_arg:
        raise ProtocolError(f"{untrusted_method} takes no argument")
    if untrusted_payload and not takes_payload:
        raise ProtocolError(f"{untrusted_method} takes no payload")
    qube = ctx.find_qube(validate_qube_name(untrusted_dest))
    if permission is None:
        return handler(ctx, qube, untrusted_payload, now)
    if handler is firewall_set:
        rules = parse_rules(untrusted_payload, now)
        permission(rules=rules)
        return set_rules(ctx, qube, rules, now)
    permission()
    return handler(ctx, qube, untrusted_payload, now)
