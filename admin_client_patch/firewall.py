"""Client side of a qube's firewall: fetch, edit and store its rule lists.

A qube has one list per rule kind, each read and replaced by its own Admin
API call (``admin.vm.firewall.Get``/``Set`` for outbound rules, exactly as
upstream; ``+forward`` and ``+inbound`` for the others). Rules are parsed
and printed by :mod:`firewall_rules`, the same code dom0 uses, so what
qvm-firewall accepts is exactly what ``Set`` accepts and ``list`` shows the
canonical form dom0 stores. This module turns command-line words into a
rule, rule numbers into a list and position, and edits one ordered list.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from admin_client_patch.qubesd_client import Call, QubesDaemonCommunicationError, qubesd_call
from firewall_rules import Rule, RuleError, RuleKind


class FirewallEditError(ValueError):
    """A user mistake caught on the client side; the message is one line."""


class UsageError(FirewallEditError):
    """The command line itself is wrong (a rule's words, a misplaced number): exit 2."""


#: Keys a bare word (no ``=``) stands for, in upstream's order.
_POSITIONAL_KEYS = ("action", "dsthost", "proto", "dstports", "icmptype")


def _expire_value(value: str, now: float) -> str:
    """``+SECONDS`` becomes an absolute epoch; anything else is left to dom0."""
    if not value.startswith("+"):
        return value
    if not value[1:].isdigit():
        raise UsageError(f"invalid expire={value}: use EPOCH or +SECONDS")
    return str(int(now) + int(value[1:]))


def rule_from_words(words: Sequence[str], now: float) -> Rule:
    """Build a rule from qvm-firewall words.

    Words are ``key=value``; a bare word stands for the next of action,
    dsthost, proto, dstports/icmptype not given yet (upstream's shorthand,
    e.g. ``accept 10.0.0.0/8 tcp 22``). ``comment=`` takes every word after
    it, so a comment may contain spaces.
    """
    positional = list(_POSITIONAL_KEYS)
    options: list[str] = []
    comment = None
    for index, word in enumerate(words):
        if word.startswith("comment="):
            comment = " ".join([word, *words[index + 1 :]])
            break
        key, sep, value = word.partition("=")
        if not sep:
            if not positional:
                raise UsageError(f"surplus argument: {word!r}")
            key, value = positional[0], word
        if key in ("dst4", "dst6"):
            positional = [k for k in positional if k != "dsthost"]
        positional = [k for k in positional if k != key]
        if key == "proto":
            dropped = "icmptype" if value in ("tcp", "udp") else "dstports"
            positional = [k for k in positional if k != dropped]
        if key == "expire":
            value = _expire_value(value, now)
        options.append(f"{key}={value}")
    if comment is not None:
        options.append(comment)
    line = " ".join(options)
    if not line.isascii():
        raise UsageError("a rule must be ASCII text")
    try:
        return Rule.from_api_string(line)
    except RuleError as err:
        raise UsageError(str(err)) from None


class RuleNumber(NamedTuple):
    """A rule's number as ``list`` shows it: ``N`` (outbound), ``forward:N``, ``inbound:N``.

    Each kind's list is numbered from 0 on its own; a bare number is an
    outbound rule, as in upstream's qvm-firewall. ``kind`` is None when the
    kind was not written (``--before N``: the list of the rule added).
    """

    kind: RuleKind | None
    number: int

    def __str__(self) -> str:
        return rule_label(self.kind or RuleKind.OUTBOUND, self.number)


_RULE_NUMBER_RE = re.compile(r"\A(?:(outbound|forward|inbound):)?(-?[0-9]{1,6})\Z")


def parse_rule_number(untrusted_text: str) -> RuleNumber:
    """``N``, ``forward:N``, ``inbound:N`` (or ``outbound:N``); ValueError otherwise."""
    match = _RULE_NUMBER_RE.match(untrusted_text)
    if match is None:
        raise ValueError(untrusted_text)
    kind = RuleKind(match.group(1)) if match.group(1) else None
    return RuleNumber(kind, int(match.group(2)))


def rule_label(kind: RuleKind, number: int) -> str:
    """How ``list`` numbers a rule: ``3`` for outbound (as upstream), ``forward:3`` otherwise."""
    return str(number) if kind is RuleKind.OUTBOUND else f"{kind.value}:{number}"


def _numbered(kind: RuleKind, rules: Sequence[Rule]) -> str:
    if not rules:
        return f"the qube has no {kind.value} rules"
    return (
        f"the {kind.value} rules are numbered {rule_label(kind, 0)}"
        f" to {rule_label(kind, len(rules) - 1)}"
    )


def insert_rule(rules: Sequence[Rule], rule: Rule, before: RuleNumber | None) -> list[Rule]:
    """``rules`` (the list of ``rule``'s kind) with ``rule`` at the end, or before ``before``."""
    if before is None:
        return [*rules, rule]
    if before.kind not in (None, rule.kind):
        raise UsageError(
            f"--before {before}: this {rule.kind.value} rule goes in the {rule.kind.value}"
            f" list (--before {rule_label(rule.kind, max(before.number, 0))})"
        )
    if not 0 <= before.number <= len(rules):
        raise FirewallEditError(
            f"--before {rule_label(rule.kind, before.number)}: no such rule number"
            f" ({_numbered(rule.kind, rules)})"
        )
    return [*rules[: before.number], rule, *rules[before.number :]]


def delete_rule_no(kind: RuleKind, rules: Sequence[Rule], rule_no: int) -> list[Rule]:
    """``rules`` (the ``kind`` list) without rule number ``rule_no``."""
    if not 0 <= rule_no < len(rules):
        raise FirewallEditError(
            f"--rule-no {rule_label(kind, rule_no)}: no such rule ({_numbered(kind, rules)})"
        )
    return [*rules[:rule_no], *rules[rule_no + 1 :]]


def delete_rule(rules: Sequence[Rule], rule: Rule) -> list[Rule]:
    """``rules`` without the first rule equal (in canonical form) to ``rule``."""
    for index, candidate in enumerate(rules):
        if candidate.api_rule == rule.api_rule:
            return [*rules[:index], *rules[index + 1 :]]
    raise FirewallEditError(f"no such rule: {rule.api_rule}")


#: One line of an ``admin.vm.firewall.GetPaths`` reply: rule number, path.
_PATH_LINE_RE = re.compile(r"\A(0|[1-9][0-9]{0,5}) ([\x21-\x7e][\x20-\x7e]*)\Z")


def parse_paths(untrusted_reply: bytes) -> dict[int, str]:
    """Forward rule number -> path text from a GetPaths reply; refuses anything else.

    The text ends up on the user's terminal, so only printable ASCII lines
    of the documented shape are taken.
    """
    if untrusted_reply and not untrusted_reply.endswith(b"\n"):
        raise QubesDaemonCommunicationError("qubesd sent a truncated list of forward paths")
    paths: dict[int, str] = {}
    for untrusted_line in untrusted_reply.splitlines():
        match = _PATH_LINE_RE.match(untrusted_line.decode("ascii", "replace"))
        if match is None:
            raise QubesDaemonCommunicationError(
                "qubesd sent a forward path this qvm-firewall cannot read"
            )
        paths[int(match.group(1))] = match.group(2)
    return paths


#: One line of an ``admin.vm.firewall.GetRouting`` reply: printable ASCII, maybe indented.
_ROUTING_LINE_RE = re.compile(r"\A(  )?[\x21-\x7e][\x20-\x7e]*\Z")


def parse_routing(untrusted_reply: bytes) -> list[str]:
    """The lines of a GetRouting reply; refuses anything but printable ASCII lines."""
    if untrusted_reply and not untrusted_reply.endswith(b"\n"):
        raise QubesDaemonCommunicationError("qubesd sent a truncated routing exposure")
    lines = []
    for untrusted_line in untrusted_reply.splitlines():
        line = untrusted_line.decode("ascii", "replace")
        if _ROUTING_LINE_RE.match(line) is None:
            raise QubesDaemonCommunicationError(
                "qubesd sent a routing exposure this qvm-firewall cannot read"
            )
        lines.append(line)
    return lines


class QubeFirewall:
    """The firewall of one qube, as reached through the Admin API (``call``)."""

    def __init__(self, qube: str, call: Call | None = None) -> None:
        """``call`` carries the Admin API calls; None: dom0's qubesd socket."""
        self.qube = qube
        self._transport = call

    def _call(self, dest: str, method: str, arg: str, payload: bytes) -> bytes:
        return (self._transport or qubesd_call)(dest, method, arg, payload)

    def rules(self, kind: RuleKind) -> list[Rule]:
        """The qube's ``kind`` rules in force, in order (``admin.vm.firewall.Get[+kind]``)."""
        reply = self._call(self.qube, "admin.vm.firewall.Get", kind.api_argument, b"")
        rules = []
        for line in reply.decode("ascii", "replace").splitlines():
            try:
                rule = Rule.from_api_string(line)
            except RuleError as err:
                raise QubesDaemonCommunicationError(
                    f"qubesd sent a rule this qvm-firewall cannot read: {err}"
                ) from None
            if rule.kind is not kind:
                raise QubesDaemonCommunicationError(
                    f"qubesd sent a {rule.kind.value} rule as a {kind.value} rule"
                )
            rules.append(rule)
        return rules

    def save(self, kind: RuleKind, rules: Sequence[Rule]) -> None:
        """Replace the ``kind`` list at once (``admin.vm.firewall.Set[+kind]``).

        qubesd refuses an empty outbound list (upstream's Set needs a
        rule): the user is told what to write instead.
        """
        if kind is RuleKind.OUTBOUND and not rules:
            raise FirewallEditError(
                "the outbound list cannot be empty: add action=drop to block all outbound"
                " traffic, or reset to accept it all"
            )
        payload = "".join(rule.api_rule + "\n" for rule in rules).encode("ascii")
        self._call(self.qube, "admin.vm.firewall.Set", kind.api_argument, payload)

    def paths(self) -> dict[int, str]:
        """Where each forward rule is reachable (``admin.vm.firewall.GetPaths``).

        Numbered as :meth:`rules` lists the forward rules. A dom0 without
        this method refuses the call; the caller decides how to show that.
        """
        return parse_paths(self._call(self.qube, "admin.vm.firewall.GetPaths", "", b""))

    def routing(self) -> list[str]:
        """The qube's exposure on the LAN, if routed (``admin.vm.firewall.GetRouting``)."""
        return parse_routing(self._call(self.qube, "admin.vm.firewall.GetRouting", "", b""))

    def reload(self) -> None:
        """Have dom0 apply the stored rules again (``admin.vm.firewall.Reload``)."""
        self._call(self.qube, "admin.vm.firewall.Reload", "", b"")
