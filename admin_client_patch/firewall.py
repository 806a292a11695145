"""Client side of a qube's firewall: fetch, edit and store its rule list.

Rules are parsed and printed by :mod:`firewall_rules`, the same code dom0
uses, so what qvm-firewall accepts is exactly what ``Set`` accepts and
``list`` shows the canonical form dom0 stores. This module only turns
command-line words into an API line and edits the ordered list.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from admin_client_patch.qubesd_client import QubesDaemonCommunicationError, qubesd_call
from firewall_rules import Rule, RuleError


class FirewallEditError(ValueError):
    """A user mistake caught on the client side; the message is one line."""


#: Keys a bare word (no ``=``) stands for, in upstream's order.
_POSITIONAL_KEYS = ("action", "dsthost", "proto", "dstports", "icmptype")


def _expire_value(value: str, now: float) -> str:
    """``+SECONDS`` becomes an absolute epoch; anything else is left to dom0."""
    if not value.startswith("+"):
        return value
    if not value[1:].isdigit():
        raise FirewallEditError(f"invalid expire={value}: use EPOCH or +SECONDS")
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
                raise FirewallEditError(f"surplus argument: {word!r}")
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
        raise FirewallEditError("a rule must be ASCII text")
    try:
        return Rule.from_api_string(line)
    except RuleError as err:
        raise FirewallEditError(str(err)) from None


def insert_rule(rules: Sequence[Rule], rule: Rule, before: int | None) -> list[Rule]:
    """``rules`` with ``rule`` at the end, or before rule number ``before``."""
    if before is None:
        return [*rules, rule]
    if not 0 <= before <= len(rules):
        raise FirewallEditError(
            f"--before {before}: no such rule number (the rules are numbered 0 to {len(rules) - 1})"
        )
    return [*rules[:before], rule, *rules[before:]]


def delete_rule_no(rules: Sequence[Rule], rule_no: int) -> list[Rule]:
    """``rules`` without rule number ``rule_no`` (numbered from 0, as listed)."""
    if not 0 <= rule_no < len(rules):
        if not rules:
            raise FirewallEditError(f"--rule-no {rule_no}: the qube has no rules")
        raise FirewallEditError(
            f"--rule-no {rule_no}: no such rule (the rules are numbered 0 to {len(rules) - 1})"
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
    """Rule number -> path text from a GetPaths reply; refuses anything else.

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


def kind_label(rule: Rule) -> str:
    """Short word for the KIND column."""
    return rule.kind.name.lower()


class QubeFirewall:
    """The firewall of one qube, as reached through the Admin API."""

    def __init__(self, qube: str) -> None:
        self.qube = qube

    def rules(self) -> list[Rule]:
        """The qube's rules in force, in order (``admin.vm.firewall.Get``)."""
        reply = qubesd_call(self.qube, "admin.vm.firewall.Get")
        rules = []
        for line in reply.decode("ascii", "replace").splitlines():
            try:
                rules.append(Rule.from_api_string(line))
            except RuleError as err:
                raise QubesDaemonCommunicationError(
                    f"qubesd sent a rule this qvm-firewall cannot read: {err}"
                ) from None
        return rules

    def save(self, rules: Sequence[Rule]) -> None:
        """Replace all rules at once (``admin.vm.firewall.Set``)."""
        payload = "".join(rule.api_rule + "\n" for rule in rules).encode("ascii")
        qubesd_call(self.qube, "admin.vm.firewall.Set", payload=payload)

    def paths(self) -> dict[int, str]:
        """Where each forward rule is reachable (``admin.vm.firewall.GetPaths``).

        Numbered as :meth:`rules` lists them. A dom0 without this method
        refuses the call; the caller decides how to show that.
        """
        return parse_paths(qubesd_call(self.qube, "admin.vm.firewall.GetPaths"))

    def routing(self) -> list[str]:
        """The qube's exposure on the LAN, if routed (``admin.vm.firewall.GetRouting``)."""
        return parse_routing(qubesd_call(self.qube, "admin.vm.firewall.GetRouting"))

    def reload(self) -> None:
        """Have dom0 apply the stored rules again (``admin.vm.firewall.Reload``)."""
        qubesd_call(self.qube, "admin.vm.firewall.Reload")
