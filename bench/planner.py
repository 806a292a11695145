"""The dom0 planner and applier on Qubes-shaped topologies of 10, 100 and 500 qubes.

Topology: ``sys-net`` (edge) <- ``sys-firewall`` <- most qubes; every
fourth qube sits behind ``sys-vpn`` (a ProxyVM behind ``sys-firewall``),
so its external forwards cross three hops. Each qube has 1 to 5 forward
rules (external and internal, tcp and udp, some with ``srchost``) on ports
that never clash, plus two outbound rules the planner must skip.

Measured: building the snapshot (parsing each rule with
``Rule.from_api_string`` and freezing ``QubeState`` objects: the baseline,
what dom0 pays before any planning), ``plan()``, ``check_rules()`` for one
qube (what ``Set`` pays), the first ``Applier.apply`` into an in-memory
QubesDB writer, and a re-plan of an unchanged topology through the same
applier, which must write nothing (the write count is printed).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from functools import partial

from bench.common import best_time, print_table, ratio, sizes_parser
from core_admin_patch import planner
from core_admin_patch.applier import Applier
from firewall_rules import Rule, RuleLists
from firewall_rules.rule import forget_parsed_lines

DEFAULT_SIZES = (10, 100, 500)
SUPPORT = {planner.SUPPORT_FEATURE: "1"}
INFRA = {
    "sys-net": (None, "10.137.0.1"),
    "sys-firewall": ("sys-net", "10.138.0.1"),
    "sys-vpn": ("sys-firewall", "10.139.0.1"),
}


class CountingWriter:
    """An in-memory QubesDB of every qube, counting the writes and removals the applier makes.

    Entries are kept per directory so a recursive ``rm`` costs O(1): the
    benchmark should time the applier, not its stand-in.
    """

    def __init__(self) -> None:
        self.db: dict[str, dict[str, dict[str, str]]] = {}
        self.calls = 0

    def write(self, qube: str, path: str, value: str) -> None:
        self.calls += 1
        directory, _, key = path.rpartition("/")
        self.db.setdefault(qube, {}).setdefault(directory, {})[key] = value

    def list(self, qube: str, prefix: str) -> list[str]:
        """Not counted: the applier lists a qube only before its first write."""
        return [
            f"{directory}/{key}"
            for directory, keys in self.db.get(qube, {}).items()
            for key in keys
            if f"{directory}/{key}".startswith(prefix)
        ]

    def rm(self, qube: str, path: str) -> None:
        self.calls += 1
        directories = self.db.setdefault(qube, {})
        if path.endswith("/"):
            directories.pop(path[:-1], None)
        else:
            directory, _, key = path.rpartition("/")
            directories.get(directory, {}).pop(key, None)


Spec = dict[str, tuple[str | None, str, list[str]]]


def first_apply(plan: planner.Plan) -> int:
    """Apply ``plan`` to empty QubesDBs (all qubes just started); returns the call count."""
    writer = CountingWriter()
    Applier(writer).apply(plan)
    return writer.calls


def rule_lines(count: int) -> Spec:
    """``{name: (netvm, ip, rule lines)}`` for ``count`` app qubes and the three hops.

    Ports come from one counter, so no two rules ever claim the same port
    on a hop and ``plan()`` does its full work for every rule.
    """
    qubes: Spec = {
        name: (netvm, ip, []) for name, (netvm, ip) in INFRA.items()
    }
    port = 1024
    for number in range(count):
        netvm = "sys-vpn" if number % 4 == 3 else "sys-firewall"
        lines = ["action=accept specialtarget=dns", "action=accept proto=tcp dstports=443"]
        for rule in range(number % 5 + 1):
            kind = "internal" if rule == 2 else "external"
            proto = "udp" if rule == 4 else "tcp"
            srchost = f" srchost=192.168.{rule}.0/24" if rule == 3 else ""
            lines.append(
                f"action=forward forwardtype={kind} proto={proto} srcports={port} "
                f"dstports={8000 + rule}{srchost} comment=service {rule} of app{number}"
            )
            port += 1
        address = ipaddress.IPv4Address("10.137.1.0") + number
        qubes[f"app{number:03}"] = (netvm, str(address), lines)
    return qubes


def build_snapshot(spec: Spec, now: float) -> planner.Snapshot:
    """Parse every rule and freeze every qube, as dom0 does before planning.

    Every line is parsed in full (dom0 remembers parsed lines; the baseline
    is the work before that memory helps).
    """
    forget_parsed_lines()
    return planner.Snapshot(
        {
            name: planner.QubeState(
                name=name,
                netvm=netvm,
                ip=ipaddress.IPv4Address(ip),
                provides_network=name in INFRA,
                running=True,
                features=SUPPORT,
                rules=RuleLists.sorted_out(Rule.from_api_string(line) for line in lines),
            )
            for name, (netvm, ip, lines) in spec.items()
        },
        now,
    )


def replan_unchanged(snapshot: planner.Snapshot, applier: Applier) -> list[str]:
    """What dom0 does on an event that changed nothing: plan again, apply the diff."""
    return applier.apply(planner.plan(snapshot))


def measure(sizes: Sequence[int]) -> list[list[object]]:
    """One row per topology size."""
    now = time.time()
    rows: list[list[object]] = []
    for count in sizes:
        spec = rule_lines(count)
        snapshot = build_snapshot(spec, now)
        forwards = sum(len(q.rules.forward) for q in snapshot.qubes.values())
        plan = planner.plan(snapshot)
        assert not plan.skipped, plan.skipped
        build = best_time(partial(build_snapshot, spec, now))
        planning = best_time(partial(planner.plan, snapshot))
        last = f"app{count - 1:03}"
        check = best_time(
            partial(planner.check_rules, snapshot, last, snapshot.qubes[last].rules)
        )

        first_calls = first_apply(plan)
        first = best_time(partial(first_apply, plan))
        writer = CountingWriter()
        applier = Applier(writer)
        applier.apply(plan)
        writer.calls = 0
        changed = replan_unchanged(snapshot, applier)
        unchanged_calls = writer.calls
        if changed or unchanged_calls:
            print(f"WARNING: unchanged re-plan of {count} qubes rewrote {changed}")
        noop = best_time(partial(applier.apply, plan))
        replan = best_time(partial(replan_unchanged, snapshot, applier))
        unchanged_calls += writer.calls
        rows.append([
            count,
            forwards,
            f"{build * 1000:.2f}",
            f"{planning * 1000:.2f}",
            ratio(planning, build),
            f"{check * 1000:.2f}",
            f"{first * 1000:.2f}",
            first_calls,
            f"{noop * 1000:.2f}",
            f"{replan * 1000:.2f}",
            ratio(replan, build),
            unchanged_calls,
        ])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Print the planner table."""
    args = sizes_parser(__doc__.splitlines()[0], DEFAULT_SIZES).parse_args(argv)
    rows = measure(args.sizes)
    print_table(
        "planner: milliseconds (best of runs); ratios against building the snapshot",
        ["qubes", "forwards", "snapshot ms", "plan ms", "plan/snapshot", "check_rules ms",
         "1st apply ms", "1st apply calls", "no-op apply ms", "re-plan ms", "re-plan/snapshot",
         "re-plan calls"],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
