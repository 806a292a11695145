"""dom0 with many forwards in place: what one more rule costs, and the client's start-up.

- ``add``: ``qvm-firewall QUBE add action=forward ...`` run as a process,
  as a user runs it, against the Admin API served on a Unix socket
  (:func:`lab.qubesd_server.start_server`) by the qubesd extension's core
  (:class:`core_admin_patch.extension_core.ExtensionCore`): the rules are
  held in memory as qubesd holds them, ``Set`` checks the list against the
  whole system, saves firewall.xml (fsync), and ``firewall-changed``
  re-plans every qube and writes the differences into their QubesDBs
  (in-memory ones here; no agent, so no wait for one). Measured on ``big``,
  which holds K forwards, and on ``empty``, which holds none, in the same
  system; runs alternate and each is undone (``del``) before the next; the
  figure is the median. ``add big/empty`` is the ratio issue 10 bounds at 2x
  for K=700.
- ``Set``: the same ``Set+forward`` in process (``handle_call``): dom0's
  share, without the client's start-up, its ``Get`` and its parsing.
- ``--help``: ``qvm-firewall --help`` against ``python -c pass`` (the
  interpreter's own start-up) and ``python -c "import argparse"``, medians.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO, print_table, ratio, sizes_parser
from core_admin_patch.admin_api import SET, handle_call
from core_admin_patch.extension_core import ExtensionCore, save_lists
from core_admin_patch.planner import SUPPORT_FEATURE
from firewall_rules import Rule, RuleLists
from lab.qubesd_server import start_server

DEFAULT_SIZES = (0, 100, 700)
#: Alternating runs of ``add`` per size; the figure is their median.
ADD_RUNS = 9
#: Runs of each start-up command.
STARTUP_RUNS = 15
FIRST_PORT = 20000


class MemoryQubesDB:
    """A running qube's QubesDB as ``vm.untrusted_qdb``: a dict, recursive ``rm`` on ``dir/``.

    ``calls`` counts writes and removals: on Qubes each is a round trip to
    the qube's QubesDB daemon.
    """

    calls = 0  # across every qube

    def __init__(self) -> None:
        self.entries: dict[str, str] = {}

    def write(self, path: str, value: str) -> None:
        MemoryQubesDB.calls += 1
        self.entries[path] = value

    def rm(self, path: str) -> None:
        MemoryQubesDB.calls += 1
        if path.endswith("/"):
            for key in [k for k in self.entries if k.startswith(path)]:
                del self.entries[key]
        else:
            self.entries.pop(path, None)

    def list(self, prefix: str) -> list[str]:
        return [key for key in self.entries if key.startswith(prefix)]


class Firewall:
    """``vm.firewall`` as the extension makes it: three lists; ``save()`` fires firewall-changed."""

    def __init__(self, vm: VM, lists: RuleLists) -> None:
        self.vm = vm
        self.rules: list[Any] = list(lists.outbound)
        self.forward_rules = list(lists.forward)
        self.inbound_rules = list(lists.inbound)

    def save(self) -> None:
        save_lists(self.vm, self, time.time())  # type: ignore[arg-type]
        self.vm.fire_event("firewall-changed")


@dataclass(eq=False)
class VM:
    """A running qubesd VM, as much of one as the extension's core reads."""

    name: str
    dir_path: str
    ip: ipaddress.IPv4Address
    netvm: VM | None = None
    provides_network: bool = False
    ip6: None = None
    klass: str = "AppVM"
    features: dict[str, str] = field(default_factory=lambda: {SUPPORT_FEATURE: "1"})
    untrusted_qdb: MemoryQubesDB = field(default_factory=MemoryQubesDB)
    on_event: Callable[[VM, str], None] = lambda vm, event: None
    firewall: Firewall = field(init=False)

    def is_running(self) -> bool:
        return True

    def fire_event(self, event: str, **kwargs: object) -> None:
        self.on_event(self, event)


def forward_lines(count: int) -> list[str]:
    """``count`` external tcp forwards on ports no other rule of the system uses."""
    return [
        f"action=forward forwardtype=external proto=tcp srcports={port} dstports={port}"
        for port in range(FIRST_PORT, FIRST_PORT + count)
    ]


def system(root: Path, forwards: int) -> ExtensionCore:
    """sys-net <- sys-firewall <- big (``forwards`` forwards), empty (none); planned and written."""
    vms: dict[str, VM] = {}
    core = ExtensionCore(domains=lambda: list(vms.values()), lookup=vms.__getitem__)

    def add(name: str, ip: str, netvm: VM | None, lines: Sequence[str], **kwargs: Any) -> VM:
        (root / name).mkdir()
        vm = VM(name, str(root / name), ipaddress.IPv4Address(ip), netvm,
                on_event=core.on_domain_event, **kwargs)
        outbound = (Rule.from_api_string("action=accept"),)
        vm.firewall = Firewall(vm, RuleLists(outbound, tuple(map(Rule.from_api_string, lines))))
        vms[name] = vm
        return vm

    net = add("sys-net", "10.137.0.5", None, (), provides_network=True)
    firewall = add("sys-firewall", "10.137.0.6", net, (), provides_network=True)
    add("big", "10.137.0.20", firewall, forward_lines(forwards))
    add("empty", "10.137.0.21", firewall, ())
    core.refresh()
    return core


@contextmanager
def serving(core: ExtensionCore, socket_path: Path) -> Iterator[None]:
    """The Admin API on ``socket_path`` from a loop in a thread, as qubesd serves it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(
        start_server(socket_path, core.server), loop
    ).result(10)
    try:
        yield
    finally:

        async def stop() -> None:
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def client_argv() -> list[str]:
    """qvm-firewall as installed beside this interpreter (the console script), else ``-m``."""
    script = Path(sys.executable).parent / "qvm-firewall"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "admin_client_patch.qvm_firewall"]


def wall_time(argv: Sequence[str], env: dict[str, str] | None = None) -> float:
    """Seconds one process takes from start to exit; it must succeed."""
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    return time.perf_counter() - start


def add_times(forwards: int, runs: int) -> dict[str, float]:
    """Median seconds of ``qvm-firewall QUBE add`` on big and on empty, alternating."""
    times: dict[str, list[float]] = {"big": [], "empty": []}
    with tempfile.TemporaryDirectory(prefix="qns-bench-dom0.") as tmp:
        core = system(Path(tmp), forwards)
        socket_path = Path(tmp) / "qubesd.sock"
        env = {**os.environ, "QUBESD_SOCKET": str(socket_path)}
        client = client_argv()
        with serving(core, socket_path):
            for run in range(runs):
                for qube, rules in (("empty", 0), ("big", forwards)):
                    port = 40000 + run
                    rule = ["action=forward", "proto=tcp", f"dstports={port}"]
                    times[qube].append(wall_time([*client, qube, "add", *rule], env))
                    wall_time([*client, qube, "del", "--rule-no", f"forward:{rules}"], env)
    return {qube: statistics.median(values) for qube, values in times.items()}


def set_time(forwards: int) -> dict[str, float]:
    """Best seconds of dom0's ``Set+forward`` adding one rule, on big and on empty.

    Also, under ``calls big``, the QubesDB writes and removals adding the
    rule to big made.
    """
    with tempfile.TemporaryDirectory(prefix="qns-bench-dom0.") as tmp:
        core = system(Path(tmp), forwards)
        result = {}
        lines = forward_lines(forwards)
        before = "".join(line + "\n" for line in lines).encode()
        calls = MemoryQubesDB.calls
        handle_call(core.server, SET, "forward", "big",
                    before + b"action=forward proto=tcp dstports=40000\n", time.time())
        result["calls big"] = MemoryQubesDB.calls - calls
        handle_call(core.server, SET, "forward", "big", before, time.time())
        for qube, rules in (("big", forwards), ("empty", 0)):
            lines = forward_lines(rules)
            before = "".join(line + "\n" for line in lines).encode()
            after = before + b"action=forward proto=tcp dstports=40000\n"

            def set_and_undo(after: bytes = after, before: bytes = before,
                             qube: str = qube) -> float:
                start = time.perf_counter()
                handle_call(core.server, SET, "forward", qube, after, time.time())
                elapsed = time.perf_counter() - start
                handle_call(core.server, SET, "forward", qube, before, time.time())
                return elapsed

            result[qube] = min(set_and_undo() for _ in range(7))
    return result


def measure_add(sizes: Sequence[int], runs: int = ADD_RUNS) -> list[list[object]]:
    """One row per number of forwards ``big`` holds."""
    rows: list[list[object]] = []
    for forwards in sizes:
        added = add_times(forwards, runs)
        dom0 = set_time(forwards)
        rows.append([
            forwards,
            f"{added['empty'] * 1000:.1f}",
            f"{added['big'] * 1000:.1f}",
            ratio(added["big"], added["empty"]),
            f"{dom0['empty'] * 1000:.2f}",
            f"{dom0['big'] * 1000:.2f}",
            ratio(dom0["big"], dom0["empty"]),
            int(dom0["calls big"]),
        ])
    return rows


def measure_startup(runs: int = STARTUP_RUNS) -> list[list[object]]:
    """``qvm-firewall --help`` and its baselines, medians of interleaved runs."""
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import argparse'": [sys.executable, "-c", "import argparse"],
        "qvm-firewall --help": [*client_argv(), "--help"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            times[name].append(wall_time(argv))
    baseline = statistics.median(times["python -c pass"])
    return [
        [name, f"{statistics.median(values) * 1000:.1f}",
         ratio(statistics.median(values), baseline)]
        for name, values in times.items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the add and start-up tables."""
    args = sizes_parser(__doc__.splitlines()[0], DEFAULT_SIZES).parse_args(argv)
    print_table(
        "dom0: one forward added with K forwards in place (qvm-firewall: median ms of runs;"
        " Set: best ms)",
        ["K forwards", "add empty ms", "add big ms", "add big/empty", "Set empty ms",
         "Set big ms", "Set big/empty", "QubesDB calls (Set big)"],
        measure_add(args.sizes),
    )
    print_table(
        "client start-up: median ms of runs; ratio against python -c pass",
        ["command", "ms", "ratio"],
        measure_startup(),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
