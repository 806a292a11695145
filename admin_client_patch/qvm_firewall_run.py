"""What qvm-firewall does once its command line is parsed: the edits and the tables.

Kept apart from :mod:`admin_client_patch.qvm_firewall` so ``--help`` and a
usage error cost only argparse: this module brings in the rule language
and the Admin API client, which a command that talks to dom0 needs anyway.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import TextIO

from admin_client_patch.firewall import (
    QubeFirewall,
    UsageError,
    delete_rule,
    delete_rule_no,
    insert_rule,
    rule_from_words,
    rule_label,
)
from admin_client_patch.qubesd_client import QubesException
from firewall_rules import Rule, RuleKind, default_rules

#: Upstream's table of outbound rules, column for column.
HEADER = (
    "NO", "ACTION", "HOST", "PROTOCOL", "PORT(S)", "SPECIAL TARGET", "ICMP TYPE", "EXPIRE",
    "COMMENT",
)
FORWARD_HEADER = (
    "NO", "TYPE", "PROTOCOL", "SRC PORT(S)", "PORT(S)", "SOURCE", "EXPIRE", "COMMENT",
)
INBOUND_HEADER = (
    "NO", "ACTION", "SOURCE", "PROTOCOL", "PORT(S)", "ICMP TYPE", "EXPIRE", "COMMENT",
)

#: API keys shown in each column after NO, per kind.
_COLUMN_KEYS: dict[RuleKind, tuple[tuple[str, ...], ...]] = {
    RuleKind.OUTBOUND: (
        ("action",), ("dst4", "dst6", "dsthost"), ("proto",), ("dstports",),
        ("specialtarget",), ("icmptype",), ("expire",), ("comment",),
    ),
    RuleKind.FORWARD: (
        ("forwardtype",), ("proto",), ("srcports",), ("dstports",), ("srchost", "srcqube"),
        ("expire",), ("comment",),
    ),
    RuleKind.INBOUND: (
        ("action",), ("srchost", "srcqube"), ("proto",), ("dstports",), ("icmptype",),
        ("expire",), ("comment",),
    ),
}
_HEADERS = {
    RuleKind.OUTBOUND: HEADER, RuleKind.FORWARD: FORWARD_HEADER,
    RuleKind.INBOUND: INBOUND_HEADER,
}
_TITLES = {RuleKind.FORWARD: "Forward rules:", RuleKind.INBOUND: "Inbound rules:"}


def _options(rule: Rule) -> dict[str, str]:
    """The rule's canonical options as a mapping, for display only."""
    words, _, comment = rule.api_rule.partition("comment=")
    options = dict(word.split("=", 1) for word in words.split())
    if comment:
        options["comment"] = comment
    return options


def _expire_cell(value: str, now: float) -> str:
    """Seconds left, as upstream shows them (``+299s``); ``shutdown`` as it is."""
    if not value.isdigit():
        return value
    return f"{int(value) - now:+.0f}s"


def _ports_cell(value: str) -> str:
    """``443`` for the canonical ``443-443``, as upstream's table shows a single port."""
    first, _, last = value.partition("-")
    return first if first == last else value


def rule_row(kind: RuleKind, number: int, rule: Rule, now: float) -> list[str]:
    """One table row; '-' where the rule has no such option."""
    options = _options(rule)
    cells = [rule_label(kind, number)]
    for keys in _COLUMN_KEYS[kind]:
        value = next((options[key] for key in keys if key in options), None)
        if value is None:
            cells.append("-")
        elif keys == ("expire",):
            cells.append(_expire_cell(value, now))
        elif keys in (("srcports",), ("dstports",)):
            cells.append(_ports_cell(value))
        else:
            cells.append(value)
    return cells


def print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Columns aligned with two spaces between them, as upstream's ``column -t``."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")


def print_paths(forwards: int, paths: Mapping[int, str] | str, out: TextIO) -> None:
    """Under the forward table, one line per forward rule: where it is reachable.

    ``paths`` is dom0's answer, or why there is none (an older dom0); the
    lines are too long for a table column and read better on their own.
    """
    out.write("\nForward paths (entry point -> each hop -> the qube):\n")
    if isinstance(paths, str):
        out.write(f"  not available: {paths}\n")
        return
    for number in range(forwards):
        label = rule_label(RuleKind.FORWARD, number)
        out.write(f"  {label}: {paths.get(number, 'path unknown')}\n")


def print_routing(inbound: Sequence[Rule] | str, routing: Sequence[str], out: TextIO) -> None:
    """Last, a routed qube's exposure: addresses, way in, each hop's state.

    dom0 sends nothing for a qube that is not routed (``routing-method``).
    """
    if not routing:
        return
    out.write("\nRouting exposure (routing-method forward: reached at its own address):\n")
    out.writelines(f"  {line}\n" for line in routing)
    if isinstance(inbound, str):
        return  # its section above says why it is not listed
    if inbound:
        labels = ", ".join(rule_label(RuleKind.INBOUND, n) for n in range(len(inbound)))
        out.write(f"  admitted as inbound rules {labels} say, nothing else\n")
    else:
        out.write("  no inbound rule: nothing may connect to it\n")


def list_rules(
    lists: Mapping[RuleKind, Sequence[Rule] | str],
    now: float,
    out: TextIO,
    paths: Mapping[int, str] | str = "",
    routing: Sequence[str] = (),
) -> None:
    """Upstream's outbound table, a section per other kind in use, then a routed exposure.

    A list given as text could not be read (an older dom0): its section
    says so instead of failing the listing.
    """
    for kind in RuleKind:
        rules = lists[kind]
        if kind is not RuleKind.OUTBOUND:
            if not rules:
                continue
            out.write(f"\n{_TITLES[kind]}\n")
        if isinstance(rules, str):
            out.write(f"  not available: {rules}\n")
            continue
        rows = [rule_row(kind, n, rule, now) for n, rule in enumerate(rules)]
        print_table([_HEADERS[kind], *rows], out)
        if kind is RuleKind.FORWARD:
            print_paths(len(rules), paths, out)
    print_routing(lists[RuleKind.INBOUND], routing, out)


def _readable(firewall: QubeFirewall, kind: RuleKind) -> list[Rule] | str:
    """The list, or why dom0 did not give it (an older dom0 knows no argument)."""
    try:
        return firewall.rules(kind)
    except QubesException as err:
        return f"dom0 did not list them ({' '.join(str(err).split())})"


def forward_paths(firewall: QubeFirewall) -> Mapping[int, str] | str:
    """dom0's paths, or a one-line reason; never fails the listing itself."""
    try:
        return firewall.paths()
    except QubesException as err:
        return f"dom0 did not describe them ({' '.join(str(err).split())})"


def routing_exposure(firewall: QubeFirewall) -> list[str]:
    """dom0's description of the qube's exposure; none from a dom0 without routing."""
    try:
        return firewall.routing()
    except QubesException:
        return []


def run(args: argparse.Namespace, now: float, out: TextIO) -> None:
    """Carry out one parsed command line."""
    firewall = QubeFirewall(args.vmname)
    if args.command == "add":
        rule = rule_from_words(args.rule, now)
        rules = firewall.rules(rule.kind)
        firewall.save(rule.kind, insert_rule(rules, rule, args.before))
    elif args.command == "del":
        if args.rule_no is not None and args.rule:
            raise UsageError("give either --rule-no or a rule to delete, not both")
        if args.rule_no is not None:
            kind = args.rule_no.kind or RuleKind.OUTBOUND
            rules = firewall.rules(kind)
            firewall.save(kind, delete_rule_no(kind, rules, args.rule_no.number))
        elif args.rule:
            rule = rule_from_words(args.rule, now)
            firewall.save(rule.kind, delete_rule(firewall.rules(rule.kind), rule))
        else:
            raise UsageError("del needs --rule-no N or the rule to delete")
    elif args.command == "reset":
        emptied = [kind for kind in (RuleKind.FORWARD, RuleKind.INBOUND) if firewall.rules(kind)]
        firewall.save(RuleKind.OUTBOUND, default_rules())
        for kind in emptied:
            firewall.save(kind, [])
    elif args.raw:  # for scripts: every list, each line says its kind; all or an error
        for kind in RuleKind:
            out.writelines(rule.api_rule + "\n" for rule in firewall.rules(kind))
    else:
        lists: dict[RuleKind, Sequence[Rule] | str] = {
            RuleKind.OUTBOUND: firewall.rules(RuleKind.OUTBOUND)
        }
        for kind in (RuleKind.FORWARD, RuleKind.INBOUND):
            lists[kind] = _readable(firewall, kind)
        forwards = lists[RuleKind.FORWARD]
        paths = forward_paths(firewall) if forwards and not isinstance(forwards, str) else ""
        list_rules(lists, now, out, paths, routing_exposure(firewall))
    if args.reload:
        firewall.reload()
