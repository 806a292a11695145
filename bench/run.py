"""Run every benchmark in one process and print their tables (``make bench``).

Prints the machine first (CPU count, kernel, Python, nft) so a pasted
result says where it was made. The nft, outbound and routing benchmarks
need root and ``ip netns``, the outbound one also the upstream snapshot;
without them each is reported as not run instead of failing the others.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from bench import (
    conntrack,
    converge,
    cutoff,
    dataplane,
    dom0,
    nft,
    outbound,
    planner,
    routing,
    rules,
    worker,
)
from bench.common import upstream_path

BENCHMARKS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "rules": rules.main,
    "planner": planner.main,
    "dom0": dom0.main,
    "nft": nft.main,
    "conntrack": conntrack.main,
    "worker": worker.main,
    "dataplane": dataplane.main,
    "outbound": outbound.main,
    "cutoff": cutoff.main,
    "routing": routing.main,
    "converge": converge.main,
}
#: benchmarks that need root and ``ip netns``
IN_NAMESPACES = ("nft", "conntrack", "worker", "dataplane", "outbound", "cutoff", "routing",
                 "converge")


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


def unavailable(name: str) -> str | None:
    """Why benchmark ``name`` cannot run here, or None."""
    if name not in IN_NAMESPACES:
        return None
    if os.geteuid() != 0:
        return "not root"
    tools = ("ip", "nft", "iperf3") if name == "dataplane" else ("ip", "nft")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)}"
    if name == "outbound" and upstream_path(outbound.UPSTREAM_AGENT) is None:
        return "no upstream snapshot (set QUBES_UPSTREAM_DIR)"
    if name == "converge":
        return converge.unavailable()
    return None


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
        if (reason := unavailable(name)) is not None:
            print(f"\n{name}: NOT RUN ({reason})")
            status = 1
            continue
        status |= BENCHMARKS[name]([])
    print(f"\nall benchmarks: {time.perf_counter() - start:.0f} s")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
