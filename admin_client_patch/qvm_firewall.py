"""qvm-firewall: manage a qube's outbound, forward and inbound rules.

Upstream's command line (``VMNAME [add|del|list|reset]``, ``--raw``,
``--reload``) with the new rule kinds. A qube has one list per kind; a
rule goes to the list of its kind, and every change replaces that one list
(``admin.vm.firewall.Set``, ``Set+forward`` or ``Set+inbound``): dom0
validates all of it and either stores it or refuses it with a one-line
reason, printed as ``qvm-firewall: error: ...``. For a qube with outbound
rules only, ``list`` prints upstream's table, and the calls made are
upstream's plus one ``Get`` per other list.

This module imports only argparse: ``--help`` and usage errors answer at
once, and what a command needs (:mod:`admin_client_patch.qvm_firewall_run`,
the rule language, the Admin API client) is imported once it is parsed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from admin_client_patch.firewall import RuleNumber

#: The command's name when it is not run under a name of its own (``python -m``).
PROG = "qvm-firewall"


def invoked_name() -> str:
    """The name the command was run as: ``qvm-firewall-ns`` in dom0, ``qvm-firewall`` in the lab.

    Usage lines, error messages and the man page (argparse-manpage sets
    ``sys.argv[0]`` to its ``--prog``) then name the command the user typed.
    A module run as ``python -m`` or ``python FILE.py`` is called :data:`PROG`.
    """
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return PROG if not name or name.endswith(".py") or name.startswith("-") else name

EPILOG = """\
A rule is a list of key=value words, in any order:

  outbound  action=accept|drop [dsthost=HOST] [proto=tcp|udp|icmp]
            [dstports=N[-M] | icmptype=N] [specialtarget=dns]
  forward   action=forward proto=tcp|udp dstports=N[-M]
            [forwardtype=external|internal] [srcports=N[-M]]
            [srchost=IP[/N] | srcqube=QUBE]
  inbound   action=accept|drop srchost=IP[/N]|srcqube=QUBE [proto=tcp|udp|icmp]
            [dstports=N[-M] | icmptype=N]

A forward rule is reachable from outside the qube's netvm (forwardtype=external,
the default) or from the qubes connected to that netvm (internal), on srcports
(default: dstports) mapped to dstports in the qube, e.g.
"qvm-firewall web add action=forward proto=tcp dstports=443".

srcqube= names the source qube instead of its address (inbound rules and
internal forwards): dom0 uses that qube's current IP, so the rule follows it
when its IP changes.

Any rule may end with expire=EPOCH or expire=+SECONDS (e.g. +300 for five
minutes from now) and comment=TEXT; the comment takes all words after it.
Forward and inbound rules also take expire=shutdown: the rule lasts until
the qube stops (dom0 then deletes it); the qube must be running.
dst4= and dst6= are accepted for dsthost=, so --raw output can be reused.
Upstream's shorthand still works for outbound rules: bare words stand for
action, dsthost, proto and dstports/icmptype in that order, e.g.
"accept 10.0.0.0/8 tcp 22".

Each kind has its own list, matched in order and numbered from 0 as list
shows it: outbound rules 0, 1, ... (as in upstream's qvm-firewall), forward
rules forward:0, forward:1, ..., inbound rules inbound:0, ... A rule number
is given the same way to --rule-no (del --rule-no 2, del --rule-no forward:0)
and to --before, which places the added rule in the list of its own kind
(add --before 1 ..., add --before forward:0 action=forward ...).

reset restores upstream's default: a single outbound action=accept rule,
no forward and no inbound rules.
"""


def get_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser (also read by argparse-manpage for the man page).

    ``prog`` defaults to the name the command was run as.
    """
    parser = argparse.ArgumentParser(
        prog=prog or invoked_name(),
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
        help="list rules in Admin API syntax instead of tables",
    )
    parser.add_argument("vmname", metavar="VMNAME", help="the qube whose firewall to manage")
    actions = parser.add_subparsers(
        dest="command", metavar="ACTION", help="what to do (default: list)"
    )

    add = actions.add_parser("add", help="add a rule (at the end of its list, or before another)")
    add.add_argument(
        "--before", type=rule_number, metavar="N",
        help="insert the rule before rule number N (N, forward:N or inbound:N, as list"
        " shows them) instead of at the end of its list",
    )
    add.add_argument("rule", nargs="+", metavar="RULE", help="the rule's words")

    remove = actions.add_parser("del", help="remove a rule, by number or by its words")
    remove.add_argument(
        "--rule-no", dest="rule_no", type=rule_number, metavar="N",
        help="remove rule number N (N, forward:N or inbound:N, as list shows them)",
    )
    remove.add_argument(
        "rule", nargs="*", metavar="RULE", help="remove the rule with exactly these words"
    )

    listing = actions.add_parser("list", help="list the rules")
    listing.add_argument(
        "--raw", action="store_true", default=argparse.SUPPRESS,
        help="list rules in Admin API syntax instead of tables",
    )

    actions.add_parser(
        "reset", help="remove all rules, leaving the default: one outbound action=accept"
    )
    return parser


def rule_number(text: str) -> RuleNumber:
    """argparse type of --before and --rule-no."""
    from admin_client_patch.firewall import parse_rule_number

    try:
        return parse_rule_number(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid rule number {text!r}: use N, forward:N or inbound:N"
        ) from None



def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    """Usage, then ``PROG: error: MESSAGE``, as argparse prints it; exit code 2."""
    try:
        parser.error(" ".join(message.split()))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the qvm-firewall command; returns the exit code.

    As upstream's: 2 for a usage error or a qube that does not exist
    (``no such domain``), 1 for what dom0 refused or the qube's rules do
    not allow (no such rule), 0 otherwise.
    """
    parser = get_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage error or --help, already printed
        return exc.code if isinstance(exc.code, int) else 2
    from admin_client_patch.firewall import FirewallEditError, UsageError
    from admin_client_patch.qubesd_client import QubesException, QubesVMNotFoundError
    from admin_client_patch.qvm_firewall_run import run
    from firewall_rules.options import qube_name_problem

    no_such_domain = f"no such domain: {args.vmname!r}"
    if qube_name_problem(args.vmname) is not None:
        return _usage_error(parser, no_such_domain)
    try:
        run(args, time.time(), sys.stdout)
    except QubesVMNotFoundError:
        return _usage_error(parser, no_such_domain)
    except UsageError as err:
        return _usage_error(parser, str(err))
    except (QubesException, FirewallEditError) as err:
        print(f"{parser.prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
