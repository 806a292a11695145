"""Shared timing and table printing for the benchmarks.

Timings are the best of several runs (least disturbed by the other core's
work), which is what a ratio against a baseline in the same run needs.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: the size of the kernel's conntrack hash, global (shared by every namespace)
BUCKETS = Path("/proc/sys/net/netfilter/nf_conntrack_buckets")


def best_time(
    work: Callable[[], object], *, min_total: float = 0.3, max_runs: int = 20, min_runs: int = 3
) -> float:
    """Seconds of the fastest of several calls of ``work``.

    Runs at least ``min_runs`` times, then stops once ``min_total`` seconds
    were spent or ``max_runs`` reached. The garbage collector is paused
    during each call so a collection triggered by earlier work is not
    charged to whatever happens to run next.
    """
    best = float("inf")
    spent = 0.0
    runs = 0
    while runs < min_runs or (spent < min_total and runs < max_runs):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            work()
            elapsed = time.perf_counter() - start
        finally:
            gc.enable()
        best = min(best, elapsed)
        spent += elapsed
        runs += 1
    return best


def ratio(value: float, baseline: float, digits: int = 1) -> str:
    """``value / baseline`` as ``12.3x``; a dash when the baseline is zero."""
    return f"{value / baseline:.{digits}f}x" if baseline > 0 else "-"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table, right-aligned columns, readable in a terminal and in Markdown."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for number, row in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if number == 0:
            print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")


def sizes_parser(description: str, default: Sequence[int]) -> argparse.ArgumentParser:
    """Command line shared by every benchmark: ``--sizes 10,100``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(part) for part in text.split(",") if part],
        default=list(default),
        help=f"comma-separated sizes (default {','.join(map(str, default))})",
    )
    return parser


def upstream_root() -> Path:
    """Where the read-only upstream snapshot is: ``$QUBES_UPSTREAM_DIR``, else
    ``../shared/upstream`` from the repository root (where CI has it)."""
    configured = os.environ.get("QUBES_UPSTREAM_DIR")
    return Path(configured) if configured else REPO.parent / "shared" / "upstream"


def upstream_path(part: str) -> Path | None:
    """``part`` of the upstream snapshot, or None when it is not there.

    Nothing may be written into it: import its code with
    ``sys.dont_write_bytecode`` set.
    """
    path = upstream_root() / part
    return path if path.exists() else None


def buckets_option(parser: argparse.ArgumentParser) -> None:
    """``--buckets 1024,3584``: sizes of the kernel's conntrack hash to measure at."""
    parser.add_argument(
        "--buckets",
        type=lambda text: [int(part) for part in text.split(",") if part],
        default=[None],
        help="comma-separated sizes of the kernel's conntrack hash to measure at: sets the"
             " global net.netfilter.nf_conntrack_buckets for the run, then puts it back",
    )


@contextmanager
def hash_size(buckets: int | None) -> Iterator[int]:
    """The kernel's conntrack hash at ``buckets`` (None: as it is) for the block; restored."""
    original = int(BUCKETS.read_text())
    if buckets is None or buckets == original:
        yield original
        return
    BUCKETS.write_text(str(buckets))
    try:
        yield int(BUCKETS.read_text())
    finally:
        BUCKETS.write_text(str(original))
