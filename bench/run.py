"""Run every benchmark in one process and print their tables (``make bench``).

Prints the machine first (CPU count, kernel, Python, nft) so a pasted
result says where it was made. The nft and routing benchmarks need root
and ``ip netns``; without them they are reported as not run instead of
failing the others.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from bench import nft, planner, routing, rules

BENCHMARKS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "rules": rules.main,
    "planner": planner.main,
    "nft": nft.main,
    "routing": routing.main,
}
#: Benchmarks that need root and network namespaces.
NEEDS_ROOT = ("nft", "routing")


def machine() -> str:
    """One line naming what the figures were measured on."""
    nft_version = "nft missing"
    if shutil.which("nft"):
        nft_version = subprocess.run(
            ["nft", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    return (
        f"{os.cpu_count()} CPUs ({platform.machine()}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, {nft_version}"
    )


def nft_unavailable() -> str | None:
    """Why the nft benchmark cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)}" if missing else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run all benchmarks (or those named on the command line)."""
    names = list(argv if argv is not None else sys.argv[1:]) or list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; know {', '.join(BENCHMARKS)}")
        return 2
    print(f"machine: {machine()}")
    start = time.perf_counter()
    status = 0
    for name in names:
        if name in NEEDS_ROOT and (reason := nft_unavailable()) is not None:
            print(f"\n{name}: NOT RUN ({reason}); run as root")
            status = 1
            continue
        status |= BENCHMARKS[name]([])
    print(f"\nall benchmarks: {time.perf_counter() - start:.0f} s")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
