"""Outbound worker: one client's changed rule set, upstream's worker against ours, same run.

Three throwaway network namespaces (``qns-bench-<pid>-up``/``-ours``/``-cut``,
always deleted), one per worker, each holding 20 other clients of 5 rules
and the client under test with N rules (default 1, 100 and 1000: a mix of
tcp, udp and icmp rules with networks and ports):

- upstream: ``NftablesWorker`` of ``qubesagent/firewall.py`` from the
  upstream snapshot (``$QUBES_UPSTREAM_DIR``, default ``../shared/upstream``),
  unchanged but for its conntrack lookup, stubbed to find no flow (it
  would spawn ``conntrack``); it runs ``nft`` as a process per change;
- ours: ``agent_worker.firewall.Worker`` with its one libnftables context,
  its conntrack table stubbed the same way;
- ours, flows listed: the same worker with the real table of its
  namespace (no flow in it), listed over ctnetlink in process as the agent
  does: the kernel's dump walks the whole conntrack hash table, shared by
  all namespaces and sized from the RAM (``bench.conntrack``).

Each run, dom0's write of the client's next rule set is done first (not
timed), then the worker's handling of the completed set is timed, from
reading QubesDB to the handled counter: upstream's ``handle_addr``, ours
``handle``. Two kinds of change:

- ``edit``: one rule in the middle of the list gets another port at each
  run, what adding, removing or changing one rule with ``qvm-firewall``
  asks;
- ``all``: every rule is new at each run (a list never seen before);
- ``allow``: as ``all``, but an allow-list: every rule accepts (tcp and udp
  to a network and port, or anything to a network), which is what a list
  of many rules usually is, and what folds into sets best.

Runs of the workers alternate, so a busy moment of the machine hits
all. ``--buckets 3584,262144`` measures at each size of the kernel's
conntrack hash (global: set for the run, then put back). Printed: the
median of the runs, the ratio upstream/ours, and how many commands ours
sent and how often it listed a table (never).
"""

from __future__ import annotations

import gc
import importlib
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from agent_worker import conntrack
from agent_worker.directory import Changes
from agent_worker.firewall import Nft, Worker
from bench.common import buckets_option, hash_size, print_table, sizes_parser, upstream_path
from bench.nft import MemoryQubesDB, enter, throwaway_namespace

DEFAULT_SIZES = (1, 100, 1000)
KINDS = ("edit", "all", "allow")
OTHER_CLIENTS = 20
OTHER_RULES = 5
CLIENT = "10.137.0.5"
UPSTREAM_AGENT = "qubes-core-agent-linux"


def rule(number: int, shift: int) -> str:
    """Rule ``number`` of a list; another ``shift`` gives another rule of the same shape."""
    port = 1024 + (number * 7 + shift) % 60000
    net = f"192.168.{(number + shift) % 250}.0/24"
    kind = number % 4
    if kind == 0:
        return f"action=accept proto=tcp dst4={net} dstports={port}-{port}"
    if kind == 1:
        return f"action=drop proto=udp dstports={port}-{port + 10}"
    if kind == 2:
        return f"action=accept dst4=10.{number % 250}.{(number // 250 + shift) % 250}.0/24"
    return f"action=accept proto=icmp dst4={net} icmptype={(number + shift) % 256}"


def allow_rule(number: int, shift: int) -> str:
    """Rule ``number`` of an allow-list; another ``shift`` gives another rule of the same shape."""
    port = 1024 + (number * 7 + shift) % 60000
    net = f"10.{number % 250}.{(number // 250 + shift) % 250}.0/24"
    kind = number % 3
    if kind == 0:
        return f"action=accept proto=tcp dst4={net} dstports={port}-{port}"
    if kind == 1:
        return f"action=accept proto=udp dst4={net} dstports={port}-{port + 10}"
    return f"action=accept dst4={net}"


def rule_set(count: int, kind: str, run: int) -> list[str]:
    """The client's rule set written before timed run ``run`` (run -1: the first load).

    ``edit``: the same list with one tcp rule in the middle changing its
    port at every run; ``all``: a list never seen before, every rule new;
    ``allow``: an allow-list never seen before.
    """
    if kind == "all":
        return [rule(n, run + 1) for n in range(count)]
    if kind == "allow":
        return [allow_rule(n, run + 1) for n in range(count)]
    edited = count // 2 - count // 2 % 4  # a tcp rule, whose port the shift moves
    return [rule(n, run + 1 if n == edited else 0) for n in range(count)]


def write_client(db: MemoryQubesDB, address: str, rules: list[str]) -> None:
    """As dom0: clear, write policy and rules, then the completion marker."""
    base = f"/qubes-firewall/{address}"
    db.rm(base + "/")
    db.write(f"{base}/policy", "drop")
    for number, text in enumerate(rules):
        db.write(f"{base}/{number:04d}", text)
    db.write(base, "")


def populated_db(rules: list[str]) -> MemoryQubesDB:
    """A hop's QubesDB: the other clients, and the client under test with ``rules``."""
    others = [f"10.137.1.{n}" for n in range(1, OTHER_CLIENTS + 1)]
    db = MemoryQubesDB({"/connected-ips": " ".join([CLIENT, *others])})
    for number, address in enumerate(others):
        write_client(db, address, [rule(number * OTHER_RULES + r, 3) for r in range(OTHER_RULES)])
    write_client(db, CLIENT, rules)
    return db


def upstream_firewall() -> types.ModuleType:
    """Upstream's ``qubesagent/firewall.py``, imported from the snapshot without writing to it.

    Its ``import qubesdb`` gets a module of its own, filled per worker by
    :func:`start_upstream`; the rest of this process never sees it.
    """
    agent = upstream_path(UPSTREAM_AGENT)
    if agent is None:
        raise SystemExit(f"upstream snapshot not found ({UPSTREAM_AGENT}); set QUBES_UPSTREAM_DIR")
    saved_module, saved_flag = sys.modules.get("qubesdb"), sys.dont_write_bytecode
    sys.modules["qubesdb"] = types.ModuleType("qubesdb")
    sys.dont_write_bytecode = True
    sys.path.insert(0, str(agent))
    try:
        return importlib.import_module("qubesagent.firewall")
    finally:
        sys.path.remove(str(agent))
        sys.dont_write_bytecode = saved_flag
        if saved_module is None:
            del sys.modules["qubesdb"]
        else:
            sys.modules["qubesdb"] = saved_module


class CountingNft(Nft):
    """Our context, counting the commands sent and the tables listed."""

    def __init__(self) -> None:
        super().__init__()
        self.commands = 0
        self.listings = 0

    def run(self, commands: str, *, check: bool = False) -> str:
        self.commands += commands.count("\n")
        self.listings += commands.count("list ")
        return super().run(commands, check=check)


def start_upstream(firewall: types.ModuleType, db: MemoryQubesDB) -> Any:
    """Upstream's worker on ``db``, tables created and every client loaded, as its main()."""
    firewall.qubesdb.QubesDB = lambda: db
    worker = firewall.NftablesWorker()
    worker.conntrack_get_connections = lambda family, source: set()
    worker.init()
    for address in worker.list_targets():
        worker.handle_addr(address)
    worker.update_connected_ips(4)
    worker.update_connected_ips(6)
    return worker


class NoFlows:
    """A conntrack table with no flow: ours stubbed as upstream's lookup is."""

    def list(self, version: int, match: conntrack.Match) -> list[conntrack.Flow]:
        return []

    def delete(self, flow: conntrack.Flow) -> None:
        raise AssertionError(f"{flow} deleted, yet none was listed")


def start_ours(db: MemoryQubesDB, tool: conntrack.Tool) -> Worker:
    worker = Worker(db, CountingNft(), tool=tool)  # type: ignore[arg-type]
    worker.init_tables()
    worker.reload()
    return worker


def timed(work: Callable[[], object]) -> float:
    """Seconds one call of ``work`` took, the garbage collector paused."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start
    finally:
        gc.enable()


def measure(sizes: Sequence[int], runs: int | None = None) -> list[list[object]]:
    """One row per (N, change kind); each worker in its own namespace."""
    firewall = upstream_firewall()
    rows: list[list[object]] = []
    with (throwaway_namespace("-up") as up_ns, throwaway_namespace("-ours") as ours_ns,
          throwaway_namespace("-cut") as cut_ns):
        for count in sizes:
            for kind in KINDS:
                if count == 1 and kind != "all":
                    continue  # one rule: an edit is a whole new set, an allow-list one rule
                enter(up_ns)
                up_db = populated_db(rule_set(count, kind, -1))
                upstream = start_upstream(firewall, up_db)
                enter(ours_ns)
                ours_db = populated_db(rule_set(count, kind, -1))
                ours = start_ours(ours_db, NoFlows())
                enter(cut_ns)
                cut_db = populated_db(rule_set(count, kind, -1))
                cut = start_ours(cut_db, conntrack.NETLINK)
                nft = ours.nft
                assert isinstance(nft, CountingNft)
                nft.commands = nft.listings = 0
                up_times, our_times, cut_times = [], [], []
                total = runs or (41 if count <= 10 else 31 if count <= 100 else 21)
                for number in range(total):
                    rules = rule_set(count, kind, number)
                    enter(up_ns)
                    write_client(up_db, CLIENT, rules)
                    up_times.append(timed(partial(upstream.handle_addr, CLIENT)))
                    enter(ours_ns)
                    write_client(ours_db, CLIENT, rules)
                    our_times.append(timed(partial(ours.handle, Changes(targets={CLIENT}))))
                    enter(cut_ns)
                    write_client(cut_db, CLIENT, rules)
                    cut_times.append(timed(partial(cut.handle, Changes(targets={CLIENT}))))
                for db in (up_db, ours_db, cut_db):  # each handled every change
                    assert db.read(f"/qubes-firewall-handled/{CLIENT}") == str(total + 1).encode()
                up_ms = statistics.median(up_times) * 1000
                our_ms = statistics.median(our_times) * 1000
                cut_ms = statistics.median(cut_times) * 1000
                rows.append([
                    count, kind, total, f"{up_ms:.2f}", f"{our_ms:.2f}",
                    f"{up_ms / our_ms:.1f}x", f"{cut_ms:.2f}", f"{nft.commands / total:.0f}",
                    nft.listings,
                ])
                for namespace, worker in ((up_ns, upstream), (ours_ns, ours), (cut_ns, cut)):
                    enter(namespace)
                    worker.cleanup()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Print the outbound table (needs root, ``ip netns`` and the upstream snapshot)."""
    parser = sizes_parser(__doc__.splitlines()[0], DEFAULT_SIZES)
    buckets_option(parser)
    args = parser.parse_args(argv)
    for size in args.buckets:
        with hash_size(size) as in_force:
            rows = measure(args.sizes)
        print_table(
            "outbound: ms to handle one client's changed rule set of N rules, median of runs,"
            f" {OTHER_CLIENTS} other clients of {OTHER_RULES} rules in place,"
            f" conntrack hash of {in_force} buckets",
            ["N rules", "change", "runs", "upstream ms", "ours ms", "upstream/ours",
             "ours, flows listed ms", "ours commands/change", "ours table listings"],
            rows,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

