"""qvm-firewall: manage a qube's outbound, forward and inbound rules.

Upstream's command line (``VMNAME [add|del|list|reset]``, ``--raw``,
``--reload``) with the new rule kinds. Every change is a whole-list
``admin.vm.firewall.Set``: dom0 validates all of it and either stores it
or refuses it with a one-line reason, which is printed as
``qvm-firewall: error: ...``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

from admin_client_patch.firewall import (
    FirewallEditError,
    QubeFirewall,
    delete_rule,
    delete_rule_no,
    insert_rule,
    kind_label,
    rule_from_words,
)
from admin_client_patch.qubesd_client import QubesException
from firewall_rules import Rule, RuleKind, default_rules

PROG = "qvm-firewall"

EPILOG = """\
A rule is a list of key=value words, in any order:

  outbound  action=accept|drop [dsthost=HOST] [proto=tcp|udp|icmp]
            [dstports=N[-M] | icmptype=N] [specialtarget=dns]
  forward   action=forward forwardtype=external|internal proto=tcp|udp
            srcports=N[-M] dstports=N[-M] [srchost=IP[/N] | srcqube=QUBE]
  inbound   action=accept|drop srchost=IP[/N]|srcqube=QUBE [proto=tcp|udp|icmp]
            [dstports=N[-M] | icmptype=N]

srcqube= names the source qube instead of its address (inbound rules and
internal forwards): dom0 uses that qube's current IP, so the rule follows it
when its IP changes.

Any rule may end with expire=EPOCH or expire=+SECONDS (e.g. +300 for five
minutes from now) and comment=TEXT; the comment takes all words after it.
dst4= and dst6= are accepted for dsthost=, so --raw output can be reused.
Upstream's shorthand still works for outbound rules: bare words stand for
action, dsthost, proto and dstports/icmptype in that order, e.g.
"accept 10.0.0.0/8 tcp 22".

Rules are numbered from 0, in the order they are matched.
"""


def get_parser() -> argparse.ArgumentParser:
    """The argument parser (also read by argparse-manpage for the man page)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage a qube's firewall: outbound, forward and inbound rules.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--reload", "-r", action="store_true",
        help="have dom0 apply the rules again, even when unchanged",
    )
    parser.add_argument(
        "--raw", action="store_true",
        help="list rules in Admin API syntax instead of a table",
    )
    parser.add_argument("vmname", metavar="VMNAME", help="the qube whose firewall to manage")
    actions = parser.add_subparsers(
        dest="command", metavar="ACTION", help="what to do (default: list)"
    )

    add = actions.add_parser("add", help="add a rule (at the end, or before another)")
    add.add_argument(
        "--before", type=int, metavar="N",
        help="insert the rule before rule number N instead of at the end",
    )
    add.add_argument("rule", nargs="+", metavar="RULE", help="the rule's words")

    remove = actions.add_parser("del", help="remove a rule, by number or by its words")
    remove.add_argument(
        "--rule-no", dest="rule_no", type=int, metavar="N", help="remove rule number N"
    )
    remove.add_argument(
        "rule", nargs="*", metavar="RULE", help="remove the rule with exactly these words"
    )

    listing = actions.add_parser("list", help="list the rules")
    listing.add_argument(
        "--raw", action="store_true", default=argparse.SUPPRESS,
        help="list rules in Admin API syntax instead of a table",
    )

    actions.add_parser("reset", help="remove all rules, leaving the default action=accept")
    return parser


HEADER = (
    "NO", "KIND", "ACTION", "HOST", "SOURCE", "PROTOCOL", "SRC PORT(S)", "PORT(S)",
    "FORWARD TYPE", "SPECIAL TARGET", "ICMP TYPE", "EXPIRE", "COMMENT",
)

#: API keys shown in each column after NO and KIND.
_COLUMN_KEYS = (
    ("action",), ("dsthost", "dst4", "dst6"), ("srchost", "srcqube"), ("proto",),
    ("srcports",),
    ("dstports",), ("forwardtype",), ("specialtarget",), ("icmptype",), ("expire",),
    ("comment",),
)


def _options(rule: Rule) -> dict[str, str]:
    """The rule's canonical options as a mapping, for display only."""
    words, _, comment = rule.api_rule.partition("comment=")
    options = dict(word.split("=", 1) for word in words.split())
    if comment:
        options["comment"] = comment
    return options


def _expire_cell(value: str, now: float) -> str:
    """Seconds left, as upstream shows them (``+299s``)."""
    return f"{int(value) - now:+.0f}s"


def rule_row(number: int, rule: Rule, now: float) -> list[str]:
    """One table row; '-' where the rule has no such option."""
    options = _options(rule)
    cells = [str(number), kind_label(rule)]
    for keys in _COLUMN_KEYS:
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


def _ports_cell(value: str) -> str:
    """``443`` for the canonical ``443-443``, as upstream's table shows a single port."""
    first, _, last = value.partition("-")
    return first if first == last else value


def print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Columns aligned with two spaces between them, like ``column -t``."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")


def print_paths(
    rules: Sequence[Rule], paths: Mapping[int, str] | str, out: TextIO
) -> None:
    """Under the table, one line per forward rule: where it is reachable.

    ``paths`` is dom0's answer, or why there is none (an older dom0); the
    lines are too long for a table column and read better on their own.
    """
    forwards = [n for n, rule in enumerate(rules) if rule.kind is RuleKind.FORWARD]
    if not forwards:
        return
    out.write("\nForward paths (entry point -> each hop -> the qube):\n")
    if isinstance(paths, str):
        out.write(f"  not available: {paths}\n")
        return
    for number in forwards:
        out.write(f"  rule {number}: {paths.get(number, 'path unknown')}\n")


def print_routing(rules: Sequence[Rule], routing: Sequence[str], out: TextIO) -> None:
    """Under the table, a routed qube's exposure: addresses, way in, each hop's state.

    dom0 sends nothing for a qube that is not routed (``routing-method``).
    """
    if not routing:
        return
    out.write("\nRouting exposure (routing-method forward: reached at its own address):\n")
    out.writelines(f"  {line}\n" for line in routing)
    inbound = [str(n) for n, rule in enumerate(rules) if rule.kind is RuleKind.INBOUND]
    if inbound:
        out.write(f"  admitted as inbound rules {', '.join(inbound)} say, nothing else\n")
    else:
        out.write("  no inbound rule: nothing may connect to it\n")


def list_rules(
    rules: Sequence[Rule],
    raw: bool,
    now: float,
    out: TextIO,
    paths: Mapping[int, str] | str = "",
    routing: Sequence[str] = (),
) -> None:
    """Print the rules, as a table (with forward paths and exposure) or as API lines."""
    if raw:
        out.writelines(rule.api_rule + "\n" for rule in rules)
        return
    print_table([HEADER, *(rule_row(n, rule, now) for n, rule in enumerate(rules))], out)
    print_paths(rules, paths, out)
    print_routing(rules, routing, out)


def forward_paths(firewall: QubeFirewall, rules: Sequence[Rule]) -> Mapping[int, str] | str:
    """dom0's paths, or a one-line reason; never fails the listing itself."""
    if not any(rule.kind is RuleKind.FORWARD for rule in rules):
        return {}
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
        firewall.save(insert_rule(firewall.rules(), rule, args.before))
    elif args.command == "del":
        if args.rule_no is not None and args.rule:
            raise FirewallEditError("give either --rule-no or a rule to delete, not both")
        if args.rule_no is not None:
            firewall.save(delete_rule_no(firewall.rules(), args.rule_no))
        elif args.rule:
            firewall.save(delete_rule(firewall.rules(), rule_from_words(args.rule, now)))
        else:
            raise FirewallEditError("del needs --rule-no N or the rule to delete")
    elif args.command == "reset":
        firewall.save(default_rules())
    else:
        rules = firewall.rules()
        paths = "" if args.raw else forward_paths(firewall, rules)
        routing = [] if args.raw else routing_exposure(firewall)
        list_rules(rules, args.raw, now, out, paths, routing)
    if args.reload:
        firewall.reload()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the qvm-firewall command; returns the exit code."""
    parser = get_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage error or --help, already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        run(args, time.time(), sys.stdout)
    except (QubesException, FirewallEditError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
