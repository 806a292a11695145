"""The forward worker's nft path: K DNAT steps in one transaction vs one per command.

In a throwaway network namespace (``qns-bench-<pid>``, always deleted)
holding the Qubes base tables (lab/base_ruleset.py), for K steps (default
10, 100 and 1000; each step is a DNAT rule in ``qns-dnat`` and an accept in
``qns-forward``):

- project: ``Forwarder.reload()`` from an in-memory QubesDB holding K
  ``/qns-forward/<ip>/`` targets: parse every entry, list table ``qubes``,
  build the text, run it as ONE libnftables transaction (what the worker
  does when dom0 writes);
- unchanged: the same ``reload()`` again with nothing changed (the worker
  flushes and refills its chains in one transaction);
- scripted (baseline): the very same commands, one ``nft`` process each,
  the way a hand-written ``qubes-firewall-user-script`` adds rules;
- per-command libnftables: the same commands as separate transactions in
  this process, which separates nft's per-transaction cost from the cost
  of starting a process.

Both ways must leave the same ruleset; the table says so.
"""

from __future__ import annotations

import bisect
import ctypes
import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import nftables

from agent_worker import forwarding, nft_chains
from bench.common import print_table, ratio, sizes_parser
from lab.base_ruleset import base_ruleset

DEFAULT_SIZES = (10, 100, 1000)
CLONE_NEWNET = 0x40000000


class MemoryQubesDB:
    """The qubesdb calls the workers make, on a dict with sorted keys.

    Prefix reads use bisection, so reading K targets costs O(K log K) and
    the benchmark times the worker, not its QubesDB stand-in.
    """

    def __init__(self, entries: dict[str, str]) -> None:
        self.entries = {path: value.encode() for path, value in entries.items()}
        self.keys = sorted(self.entries)

    def read(self, path: str) -> bytes | None:
        return self.entries.get(path)

    def write(self, path: str, value: str | bytes) -> None:
        if path not in self.entries:
            bisect.insort(self.keys, path)
        self.entries[path] = value.encode() if isinstance(value, str) else value

    def rm(self, path: str) -> None:
        """Remove ``path``, or everything below it when it ends with ``/``."""
        for key in self.list(path) if path.endswith("/") else [path]:
            if self.entries.pop(key, None) is not None:
                del self.keys[bisect.bisect_left(self.keys, key)]

    def list(self, path: str) -> list[str]:
        start = bisect.bisect_left(self.keys, path)
        found = []
        for key in self.keys[start:]:
            if not key.startswith(path):
                break
            found.append(key)
        return found

    def multiread(self, path: str) -> dict[str, bytes]:
        return {key: self.entries[key] for key in self.list(path)}


def forward_entries(count: int) -> dict[str, str]:
    """``/qns-forward/`` and ``/connected-ips`` as dom0 writes them, ``count`` one-step targets.

    A mix of tcp and udp, single ports and 3-port ranges mapped to other
    ports (an nft map), some limited to a ``srchost`` network.
    """
    entries = {}
    for number in range(count):
        target = ipaddress.IPv4Address("10.137.1.0") + number
        port = 1024 + 4 * number
        proto = "udp" if number % 3 == 2 else "tcp"
        if number % 7 == 6:
            ports, toports = f"{port}-{port + 2}", "8000-8002"
        else:
            ports, toports = f"{port}-{port}", "443-443"
        value = (
            f"proto={proto} ports={ports} iif=upstream daddr=local to={target} toports={toports}"
        )
        if number % 5 == 4:
            value += f" srchost=192.168.{number % 256}.0/24"
        base = f"{forwarding.FORWARD_DIR}{target}"
        entries[f"{base}/0000"] = value
        entries[base] = ""
    # Every target is a client of this hop, as dom0 writes it: the worker
    # renders steps only towards connected clients.
    targets = (ipaddress.IPv4Address("10.137.1.0") + number for number in range(count))
    entries["/connected-ips"] = " ".join(str(target) for target in targets)
    return entries


def sh(*argv: str, stdin: str | None = None) -> str:
    """Run a command in this thread's namespace; its stdout, or an error with stderr."""
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)[:200]}: {result.stderr.strip()}")
    return result.stdout


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def enter(name: str) -> None:
    """Move this thread into namespace ``name``."""
    with open(f"/run/netns/{name}") as namespace:
        _setns(namespace.fileno())


@contextmanager
def throwaway_namespace(tag: str = "") -> Iterator[str]:
    """Create ``qns-bench-<pid><tag>``, move this thread into it, and always undo both."""
    name = f"qns-bench-{os.getpid()}{tag}"
    sh("ip", "netns", "add", name)
    try:
        with open("/proc/self/ns/net") as home:
            enter(name)
            try:
                yield name
            finally:
                _setns(home.fileno())
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def ruleset() -> list[Any]:
    """The namespace's ruleset as JSON, without handles, to compare two ways of loading it."""
    items = json.loads(sh("nft", "-j", "list", "ruleset"))["nftables"]
    for item in items:
        for body in item.values():
            if isinstance(body, dict):
                body.pop("handle", None)
    return [item for item in items if "metainfo" not in item]


def reset(forwarder: forwarding.Forwarder) -> None:
    """Take table ``qubes`` back to how Qubes made it (our chains and jumps gone)."""
    forwarder.remove()
    forwarder.targets = {}


def first_reload(forwarder: forwarding.Forwarder) -> float:
    """The project's path from a table without our chains (one transaction); seconds."""
    reset(forwarder)
    start = time.perf_counter()
    forwarder.reload()
    return time.perf_counter() - start


def unchanged_reload(forwarder: forwarding.Forwarder) -> float:
    """The project's path when nothing changed; seconds."""
    start = time.perf_counter()
    forwarder.reload()
    return time.perf_counter() - start


def commands(forwarder: forwarding.Forwarder) -> list[str]:
    """The worker's transaction for its targets from a bare table, one command per line.

    Built after removing our chains, so it holds the jump into
    ``qns-forward`` too, exactly as a first apply does.
    """
    forwarder.remove()
    chains = forwarding.desired_chains(forwarder.targets)
    return forwarding.transaction(chains, nft_chains.run).splitlines()


def scripted(forwarder: forwarding.Forwarder, lines: list[str]) -> float:
    """Baseline: every command in its own ``nft`` process; seconds spent."""
    reset(forwarder)
    start = time.perf_counter()
    for line in lines:
        sh("nft", line)
    return time.perf_counter() - start


def per_command(forwarder: forwarding.Forwarder, lines: list[str]) -> float:
    """Every command its own libnftables transaction in this process; seconds spent."""
    reset(forwarder)
    nft = nftables.Nftables()
    start = time.perf_counter()
    for line in lines:
        rc, _, error = nft.cmd(line)
        if rc != 0:
            raise RuntimeError(f"{line}: {error.strip()}")
    return time.perf_counter() - start


def timed_best(work: Callable[[], float], runs: int) -> float:
    """Best of ``runs`` calls of a function that times itself (its set-up is not counted)."""
    return min(work() for _ in range(runs))


def measure(sizes: Sequence[int]) -> list[list[object]]:
    """One row per K, all inside one throwaway namespace."""
    rows: list[list[object]] = []
    with throwaway_namespace():
        sh("nft", "-f", "-", stdin=base_ruleset())
        for count in sizes:
            forwarder = forwarding.Forwarder(MemoryQubesDB(forward_entries(count)), nft_chains.run)
            forwarder.reload()
            lines = commands(forwarder)
            rules = sum(1 for line in lines if line.startswith("add rule"))
            runs = 5 if count <= 100 else 3
            project = timed_best(partial(first_reload, forwarder), runs)
            project_ruleset = ruleset()
            unchanged = timed_best(partial(unchanged_reload, forwarder), runs)
            same = ruleset() == project_ruleset
            runs = 3 if count <= 100 else 1
            library = timed_best(partial(per_command, forwarder, lines), runs)
            same = same and ruleset() == project_ruleset
            script = timed_best(partial(scripted, forwarder, lines), runs)
            same = same and ruleset() == project_ruleset
            rows.append([
                count,
                rules,
                len(lines),
                f"{project * 1000:.1f}",
                f"{unchanged * 1000:.1f}",
                ratio(unchanged, project),
                f"{library * 1000:.1f}",
                ratio(library, project),
                f"{script * 1000:.0f}",
                ratio(script, project),
                "yes" if same else "NO",
            ])
            reset(forwarder)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Print the nft table (needs root and ``ip netns``)."""
    args = sizes_parser(__doc__.splitlines()[0], DEFAULT_SIZES).parse_args(argv)
    rows = measure(args.sizes)
    print_table(
        "nft: milliseconds for K forward steps (project best of runs; ratios against it)",
        ["K steps", "rules added", "commands", "project 1 tx ms", "unchanged re-apply ms",
         "unchanged/project", "per-command libnft ms", "libnft/project", "scripted nft ms",
         "scripted/project",
         "same ruleset"],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
