"""The forward worker's nft path: K steps as map elements, and what one more step costs.

In a throwaway network namespace (``qns-bench-<pid>``, always deleted)
holding the Qubes base tables (lab/base_ruleset.py), for K steps (default
10, 100 and 1000; one step per target, a mix of tcp and udp, single ports
and 3-port ranges mapped to other ports, some limited to a ``srchost``),
all through the worker's own code (``agent_worker.Forwarder``)
and its one libnftables context (``agent_worker.firewall.Nft``):

- ``first apply``: ``commit()`` of the K parsed steps into a table without
  our objects: render the elements, create our table, maps and chain,
  ``qns-forward`` and its jump, all as ONE transaction;
- ``reload``: the same from nothing through ``reload()``: read every
  ``/qns-forward/`` entry, parse it, then the same commit;
- ``unchanged``: ``reload()`` again with nothing changed, and how many
  transactions it sent (it must send none);
- ``add one``/``remove one``: dom0 writes (or removes) one more target's
  step and the worker handles the event: the median of several, and the
  transactions each sent. A removal commits its transaction first, then
  ends the flows the step admitted (one ctnetlink listing in process, the
  namespace's table holding none; the kernel walks its whole conntrack
  hash, see ``bench.conntrack``): ``removed: out of nft`` is the time until
  the transaction taking the step out returned, ``removed: flows ended``
  until the worker had ended the step's flows too;
- ``as rules`` (the baseline): the same K steps as one DNAT rule and one
  accept rule each, the layout before maps (a chain of per-step rules
  every new connection, and every packet of the accept chain, walks),
  built by this benchmark and run as one transaction;
- ``elements``: the map elements in the kernel after the first apply,
  listed back (the same count as rendered, or the table says so).

``--buckets 3584,262144`` measures at each size of the kernel's conntrack
hash (global: set for the run, then put back; see ``bench.conntrack``);
the last column says the size in force.
"""

from __future__ import annotations

import bisect
import ctypes
import ipaddress
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

from agent_worker import forward_steps
from agent_worker.entries import port_text
from agent_worker.firewall import Nft
from agent_worker.forwarder import FORWARD_DIR, Forwarder
from bench.common import buckets_option, hash_size, print_table, ratio, sizes_parser
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


def forward_entries(count: int, per_target: int = 1) -> dict[str, str]:
    """``/qns-forward/`` and ``/connected-ips`` as dom0 writes them: ``count`` steps.

    ``per_target`` steps per target (``/qns-forward/<ip>/NNNN``). A mix of
    tcp and udp, single ports and 3-port ranges mapped to other ports, some
    limited to a ``srchost`` network.
    """
    entries = {}
    targets = []
    for number in range(count):
        target = ipaddress.IPv4Address("10.137.1.0") + number // per_target
        port = 1024 + 4 * number
        proto = "udp" if number % 3 == 2 else "tcp"
        if number % 7 == 6:
            ports, toports = f"{port}-{port + 2}", "8000-8002"
        else:
            served = 443 + number % per_target
            ports, toports = f"{port}-{port}", f"{served}-{served}"
        value = (
            f"proto={proto} ports={ports} iif=upstream daddr=local to={target} toports={toports}"
        )
        if number % 5 == 4:
            value += f" srchost=192.168.{number % 256}.0/24"
        base = f"{FORWARD_DIR}{target}"
        entries[f"{base}/{number % per_target:04}"] = value
        entries[base] = ""
        if not targets or targets[-1] != target:
            targets.append(target)
    # Every target is a client of this hop, as dom0 writes it: the worker
    # renders steps only towards connected clients.
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
def inside(name: str) -> Iterator[None]:
    """This thread in namespace ``name`` for the block, back home afterwards."""
    with open("/proc/self/ns/net") as home:
        enter(name)
        try:
            yield
        finally:
            _setns(home.fileno())


@contextmanager
def throwaway_namespace(tag: str = "") -> Iterator[str]:
    """Create ``qns-bench-<pid><tag>``, move this thread into it, and always undo both."""
    name = f"qns-bench-{os.getpid()}{tag}"
    sh("ip", "netns", "add", name)
    try:
        with inside(name):
            yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


class CountingNft:
    """The worker's libnftables context, counting the transactions (everything but listings)."""

    def __init__(self) -> None:
        self.nft = Nft()
        self.transactions = 0
        #: perf_counter() when the last transaction returned
        self.sent_at = 0.0

    def run(self, commands: str, *, check: bool = False) -> str:
        output = self.nft.run(commands, check=check)
        if not check and not commands.startswith("list "):
            self.transactions += 1
            self.sent_at = time.perf_counter()
        return output


def forwarder(count: int, nft: CountingNft) -> Forwarder:
    """A Forwarder on ``count`` one-step targets, as the worker makes it."""
    return Forwarder(MemoryQubesDB(forward_entries(count)), nft.run)


def bare(half: Forwarder) -> None:
    """Table ``qubes`` as Qubes made it: our objects gone."""
    half.remove()


def first_apply(half: Forwarder, nft: CountingNft) -> float:
    """``commit()`` of the parsed steps, by a worker that just started, into a bare table."""
    bare(half)
    fresh = forwarder(0, nft)
    fresh.targets, fresh.connected = dict(half.targets), half.connected
    start = time.perf_counter()
    fresh.commit()
    return time.perf_counter() - start


def first_reload(half: Forwarder, nft: CountingNft) -> float:
    """``reload()`` by a worker that just started: read, parse, apply into a bare table."""
    bare(half)
    fresh = forwarder(0, nft)
    fresh.db = half.db
    start = time.perf_counter()
    fresh.reload()
    return time.perf_counter() - start


def timed_transactions(work: Callable[[], object], nft: CountingNft) -> tuple[float, int]:
    """Seconds ``work`` took and the transactions it sent."""
    took, _in_nft, sent = timed_change(work, nft)
    return took, sent


def timed_change(work: Callable[[], object], nft: CountingNft) -> tuple[float, float, int]:
    """Seconds ``work`` took, seconds until its last transaction returned, transactions sent."""
    before = nft.transactions
    start = time.perf_counter()
    work()
    end = time.perf_counter()
    sent = nft.transactions - before
    return end - start, (nft.sent_at - start) if sent else 0.0, sent


EXTRA = ipaddress.IPv4Address("10.137.200.1")
EXTRA_STEP = f"proto=tcp ports=60000-60000 iif=upstream daddr=local to={EXTRA} toports=80-80"


def add_one(half: Forwarder) -> None:
    """dom0 writes one more target's step (a connected client); the worker handles it."""
    base = f"{FORWARD_DIR}{EXTRA}"
    half.db.write(f"{base}/0000", EXTRA_STEP)
    half.db.write(base, "")
    half.handle(half.classify([base]))


def remove_one(half: Forwarder) -> None:
    """dom0 removes that target's entries; the worker handles it."""
    base = f"{FORWARD_DIR}{EXTRA}"
    half.db.rm(base + "/")
    half.db.rm(base)
    half.handle(half.classify([base]))


def one_step_changes(half: Forwarder, nft: CountingNft,
                     runs: int) -> tuple[float, float, float, int]:
    """Median seconds: adding one step, removing it, until its removal was in nft; transactions."""
    connected = half.db.read("/connected-ips") or b""
    half.db.write("/connected-ips", connected.decode() + f" {EXTRA}")
    half.handle(half.classify(["/connected-ips"]))
    added, removed, in_nft, sent = [], [], [], set()
    for _ in range(runs):
        took, _at, transactions = timed_change(partial(add_one, half), nft)
        added.append(took)
        sent.add(transactions)
        took, at, transactions = timed_change(partial(remove_one, half), nft)
        removed.append(took)
        in_nft.append(at)
        sent.add(transactions)
    return (statistics.median(added), statistics.median(removed), statistics.median(in_nft),
            max(sent))


#: The baseline's DNAT chain lives in a scratch table; its accepts in a chain of
#: table ``qubes`` the user's ``custom-forward`` jumps to (ahead of the vif drop).
RULES_TABLE, RULES_CHAIN = "ip qns-bench-rules", "qns-bench-accept"
RULES_DNAT = f"{RULES_TABLE} qns-bench-dnat"


def steps_as_rules(steps: Iterable[forward_steps.Step]) -> str:
    """The baseline: every step as a DNAT rule and an accept rule, as the previous release."""
    lines = [f"add table {RULES_TABLE}",
             f"add chain {RULES_DNAT} {{ type nat hook prerouting priority dstnat; }}",
             f"add chain ip qubes {RULES_CHAIN}",
             f"add rule ip qubes custom-forward jump {RULES_CHAIN}"]
    for step in steps:
        source = "" if step.srchost is None else f" ip saddr {step.srchost}"
        first, last = step.ports
        ports = port_text(step.ports)
        if first == last:
            to = f"{step.to}:{step.toports[0]}"
        else:
            shift = step.toports[0] - first
            pairs = ", ".join(f"{p} : {p + shift}" for p in range(first, last + 1))
            to = f"{step.to} : {step.proto} dport map {{ {pairs} }}"
        lines.append(f"add rule {RULES_DNAT} iifgroup != 2{source} fib daddr type local"
                     f" {step.proto} dport {ports} dnat ip to {to}")
        lines.append(f"add rule ip qubes {RULES_CHAIN} iifgroup != 2{source} ct state new"
                     f" ct status dnat ip daddr {step.to} {step.proto} dport"
                     f" {step.toports[0]}-{step.toports[1]} ct original proto-dst {ports} accept")
    return "\n".join(lines) + "\n"


#: Takes the baseline away again (the bench's own namespace: custom-forward is empty there).
RULES_REMOVAL = (f"flush chain ip qubes custom-forward\ndelete chain ip qubes {RULES_CHAIN}\n"
                 f"delete table {RULES_TABLE}\n")


def as_rules(nft: CountingNft, text: str) -> float:
    """The baseline's one transaction; seconds (taken away afterwards)."""
    start = time.perf_counter()
    nft.run(text)
    took = time.perf_counter() - start
    nft.run(RULES_REMOVAL)
    return took


def kernel_elements() -> int:
    """Map elements of our table as ``nft`` lists them back."""
    table = forward_steps.NAT_TABLE
    listing = json.loads(sh("nft", "-j", "list", "table", "ip", table))["nftables"]
    return sum(len(item["map"].get("elem", [])) for item in listing if "map" in item)


def measure(sizes: Sequence[int], runs: int = 5,
            buckets: Sequence[int | None] = (None,)) -> list[list[object]]:
    """One row per (conntrack hash size, K), in one throwaway namespace per hash size."""
    rows: list[list[object]] = []
    for size in buckets:
        with hash_size(size) as in_force, throwaway_namespace():
            sh("nft", "-f", "-", stdin=base_ruleset())
            rows += [[*measure_steps(count, runs), in_force] for count in sizes]
    return rows


def measure_steps(count: int, runs: int) -> list[object]:
    """One row: K steps in this thread's namespace, taken away afterwards."""
    nft = CountingNft()
    half = forwarder(count, nft)
    half.reload()
    rendered = sum(len(e) for f in half.desired(half._effective()).values() for e in f.values())
    apply = min(first_apply(half, nft) for _ in range(runs))
    listed = kernel_elements()
    reload = min(first_reload(half, nft) for _ in range(runs))
    half.reload(force=True)  # the kernel holds what the last fresh worker wrote
    again = [timed_transactions(half.reload, nft) for _ in range(runs)]
    unchanged, sent = min(took for took, _ in again), max(tx for _, tx in again)
    added, removed, in_nft, changes = one_step_changes(half, nft, max(runs, 7))
    rules = steps_as_rules(s for t in half.targets.values() for s in t)
    baseline = min(as_rules(nft, rules) for _ in range(max(1, runs // 2)))
    bare(half)
    return [
        count,
        rendered if listed == rendered else f"{rendered} (kernel: {listed})",
        f"{apply * 1000:.1f}",
        f"{reload * 1000:.1f}",
        f"{baseline * 1000:.1f}",
        ratio(baseline, apply),
        f"{unchanged * 1000:.1f}",
        sent,
        f"{added * 1000:.2f}",
        f"{in_nft * 1000:.2f}",
        f"{removed * 1000:.2f}",
        changes,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the nft table (needs root and ``ip netns``)."""
    parser = sizes_parser(__doc__.splitlines()[0], DEFAULT_SIZES)
    buckets_option(parser)
    args = parser.parse_args(argv)
    rows = measure(args.sizes, buckets=args.buckets)
    print_table(
        "nft: K forward steps as map elements; ms (apply, reload, baseline: best of runs;"
        " one step: median)",
        ["K steps", "elements", "first apply ms", "reload ms", "as rules ms",
         "rules/apply", "unchanged ms", "unchanged tx", "add one ms",
         "removed: out of nft ms", "removed: flows ended ms", "tx per change",
         "conntrack buckets"],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
