"""Admin API ``admin.vm.firewall.Get``, ``.Set``, ``.Reload``, ``.GetPaths`` and ``.GetRouting``.

One function, :func:`handle_call`, takes a request exactly as it comes off
the qubesd socket (method, argument, destination, payload, all untrusted)
and returns the reply data or raises an exception from
:mod:`core_admin_patch.errors`. It talks to the rest of dom0 only through
a :class:`~core_admin_patch.network_server.NetworkServer`, so the lab's
qubesd stand-in and the real qubesd extension run the very same
validation; nothing here imports ``qubes``.

The argument names the list a call is about:

- none: the outbound rules, exactly upstream's calls (a forward or inbound
  rule in such a ``Set`` is refused, naming the call to use);
- ``forward``, ``inbound``: ``Get`` and ``Set`` of those lists, so a qrexec
  policy can let a qube edit outbound rules without exposing services.

In qubesd, ``Get``/``Set`` without argument and ``Reload`` are upstream's
own handlers (:mod:`core_admin_patch.extension`); :func:`parse_set_payload`
is the one step ours adds in front of upstream's ``Set``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from core_admin_patch.errors import ProtocolError, QubesValueError
from core_admin_patch.network_server import NetworkServer, QubeRef
from firewall_rules import Rule, RuleError, RuleKind, parse_api_payload
from firewall_rules.options import qube_name_problem

GET = "admin.vm.firewall.Get"
SET = "admin.vm.firewall.Set"
RELOAD = "admin.vm.firewall.Reload"
GET_PATHS = "admin.vm.firewall.GetPaths"
GET_ROUTING = "admin.vm.firewall.GetRouting"

#: Argument of Get/Set -> the list it reads or replaces.
LIST_ARGUMENTS: dict[str, RuleKind] = {kind.api_argument: kind for kind in RuleKind}


def call_name(method: str, kind: RuleKind) -> str:
    """How a user names the call for one list: ``admin.vm.firewall.Set+forward``."""
    return f"{method}+{kind.api_argument}" if kind.api_argument else method


def validate_qube_name(untrusted_name: str) -> str:
    """Check a destination name the way qubesd does before any lookup.

    A name that could never belong to a qube is refused early, so it never
    reaches a path join or a log line unchecked.
    """
    problem = qube_name_problem(untrusted_name)
    if problem is not None:
        raise QubesValueError(problem)
    return untrusted_name


def parse_set_payload(kind: RuleKind, untrusted_payload: bytes, now: float) -> list[Rule]:
    """A Set payload's rules, all of ``kind``; any bad line refuses all of it.

    As upstream's Set, an empty outbound payload and non-ASCII text are
    ProtocolErrors (an empty forward or inbound list is fine: it removes
    them all). Everything else the user can get wrong is a one-line
    QubesValueError, where upstream's own parser would crash on a forward
    rule or a typo; a rule of another kind is refused naming the call that
    takes it. In qubesd this runs in front of upstream's Set, which then
    parses the payload again with upstream's parser.
    """
    if kind is RuleKind.OUTBOUND and not untrusted_payload:
        raise ProtocolError(f"{SET} needs at least one rule")
    if not untrusted_payload.isascii():
        raise ProtocolError("firewall rules must be ASCII text")
    try:
        rules = parse_api_payload(untrusted_payload, now)
    except RuleError as err:
        raise QubesValueError(str(err)) from None
    for number, rule in enumerate(rules):
        if rule.kind is not kind:
            raise QubesValueError(
                f"rule {number} ({rule.api_rule}) is a {rule.kind.value} rule:"
                f" {call_name(SET, kind)} takes {kind.value} rules only,"
                f" use {call_name(SET, rule.kind)}"
            )
    return rules


def _listing(rules: tuple[Rule, ...], now: float) -> bytes:
    """Canonical API line of every rule still in force, one per line (as upstream's Get)."""
    return "".join(rule.api_rule + "\n" for rule in rules if not rule.is_expired(now)).encode(
        "ascii"
    )


#: A path description as it may appear in a GetPaths reply line.
_PATH_TEXT_RE = re.compile(r"\A[\x21-\x7e][\x20-\x7e]*\Z")


def _path_text(text: str) -> str:
    """One printable ASCII line: the reply is line-based and shown in a terminal."""
    flat = " ".join(text.split()).encode("ascii", "replace").decode("ascii")
    return flat if _PATH_TEXT_RE.match(flat) else "path unknown"


def firewall_get_paths(server: NetworkServer, qube: QubeRef, now: float) -> bytes:
    """``<rule number> <path>`` per forward rule in force, numbered as ``Get+forward`` lists them.

    The planner numbers forward rules by their place in the stored list,
    where expired rules still sit; ``Get+forward`` (hence qvm-firewall)
    leaves those out. The numbers are translated here so "forward rule 2"
    means the same rule in both replies.
    """
    listed: dict[int, int] = {}
    for stored, rule in enumerate(server.rules(qube).forward):
        if not rule.is_expired(now):
            listed[stored] = len(listed)
    lines = []
    for stored, text in sorted(server.describe_forwards(qube, now).items()):
        number = listed.get(stored)
        if number is None:  # expired between the two reads, or not a stored rule
            continue
        lines.append(f"{number} {_path_text(text)}\n")
    return "".join(lines).encode("ascii")


def firewall_get_routing(server: NetworkServer, qube: QubeRef, now: float) -> bytes:
    """The qube's exposure on the LAN (``routing-method forward``), one line each.

    Its addresses and the way in, then (indented by two spaces) what each
    hop reported; empty when the qube is not routed.
    """
    lines = []
    for line in server.describe_routing(qube, now):
        indent = "  " if line.startswith("  ") else ""
        lines.append(f"{indent}{_path_text(line)}\n")
    return "".join(lines).encode("ascii")


#: method -> (arguments it takes, takes a payload)
METHODS: dict[str, tuple[tuple[str, ...], bool]] = {
    GET: (tuple(LIST_ARGUMENTS), False),
    SET: (tuple(LIST_ARGUMENTS), True),
    RELOAD: (("",), False),
    GET_PATHS: (("",), False),
    GET_ROUTING: (("",), False),
}


def handle_call(
    server: NetworkServer,
    untrusted_method: str,
    untrusted_arg: str,
    untrusted_dest: str,
    untrusted_payload: bytes,
    now: float,
    permission: Callable[..., object] | None = None,
) -> bytes:
    """Run one Admin API call; the reply data, or a Qubes exception.

    Malformed requests (unknown method, argument or payload where none is
    taken, an empty ``Set`` without argument) raise ProtocolError as in
    qubesd; everything the user can get wrong raises a QubesException whose
    message is meant for them.

    ``permission`` is qubesd's ``fire_event_for_permission``: called once
    the request is well formed, as upstream's methods do, and for Set after
    parsing, with ``rules=`` (the parsed list, parsed only once).
    """
    try:
        arguments, takes_payload = METHODS[untrusted_method]
    except KeyError:
        raise ProtocolError(f"no such method: {untrusted_method!r}") from None
    if untrusted_arg not in arguments:
        raise ProtocolError(
            f"{untrusted_method} takes no argument {untrusted_arg!r}"
            if untrusted_arg else f"{untrusted_method} needs an argument"
        )
    method, kind = untrusted_method, LIST_ARGUMENTS.get(untrusted_arg, RuleKind.OUTBOUND)
    if untrusted_payload and not takes_payload:
        raise ProtocolError(f"{method} takes no payload")
    qube = server.find_qube(validate_qube_name(untrusted_dest))
    check = permission if permission is not None else (lambda **kwargs: None)
    if method == SET:
        rules = parse_set_payload(kind, untrusted_payload, now)
        check(rules=rules)
        server.set_rules(qube, kind, rules, now)
        return b""
    check()
    if method == GET:
        return _listing(server.rules(qube).of(kind), now)
    if method == RELOAD:
        server.reload(qube)
        return b""
    if method == GET_PATHS:
        return firewall_get_paths(server, qube, now)
    return firewall_get_routing(server, qube, now)
