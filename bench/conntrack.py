"""The conntrack cut's own cost: listing and ending flows in process, against the conntrack tool.

In a throwaway network namespace (``qns-bench-<pid>-ct``, always deleted)
whose loopback traffic is tracked, holding F UDP flows to 127.0.0.2
(default 0, 100 and 1000), all through ``agent_worker.conntrack`` as the
worker calls it:

- ``list``: one listing filtered as the workers filter (here
  ``--orig-dst 127.0.0.2``: every flow present matches, the worst case),
  over ctnetlink in this process; best of runs;
- ``list, tool``: the baseline, what the agent ran before, the same
  listing as a ``conntrack -L -f ipv4 --orig-dst 127.0.0.2`` process;
- ``end, per flow``: F more flows (at least 20) opened, then each
  deleted by its exact tuple (``conntrack.end``), per flow; ``end, tool,
  per flow``: one ``conntrack -D`` process per flow, as before (20 timed).

The kernel answers a listing by walking its whole conntrack hash, shared
by all namespaces and sized from the RAM at boot (262144 buckets from
4 GiB up, 65536 from 1 GiB, RAM/16384/8 below, at least 1024: a Qubes
netvm of 400 MiB gets 3200). ``--buckets 1024,3200,262144`` measures the
same at each size: it sets the global ``net.netfilter.nf_conntrack_buckets``
(root, in the initial namespace) and always puts the original size back.
Without that option the machine's own size is measured and nothing global
is changed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence

from agent_worker import conntrack
from bench.common import best_time, buckets_option, hash_size, print_table, ratio, sizes_parser
from bench.nft import sh, throwaway_namespace

DEFAULT_SIZES = (0, 100, 1000)
SOURCE, DESTINATION = "127.0.0.1", "127.0.0.2"
FILTERS = ["--orig-dst", DESTINATION]
TRACKING = """table inet qns-bench-tracking {
    chain out {
        type filter hook output priority 0; ct state new counter
    }
}
"""
#: flows ended at least (and by the tool: a process each), to time per flow
DELETIONS = 20


def open_flows(count: int, first_port: int = 10000) -> None:
    """``count`` UDP flows to DESTINATION, one per port (unanswered: 30 s in the table)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((SOURCE, 0))
        for port in range(first_port, first_port + count):
            sock.sendto(b"x", (DESTINATION, port))


def tool(*args: str) -> None:
    subprocess.run(["conntrack", *args], capture_output=True, check=False)


def tool_delete_args(flow: conntrack.Flow) -> list[str]:
    """The ``conntrack -D`` the agent ran per flow before (the baseline)."""
    return ["-D", "-f", "ipv4", "-p", flow.proto, "--orig-src", str(flow.src), "--orig-dst",
            str(flow.dst), "--sport", str(flow.sport), "--dport", str(flow.dport)]


def per_flow(work: Callable[[list[conntrack.Flow]], object], count: int) -> float:
    """Seconds per flow of ``work`` ending ``count`` freshly opened flows."""
    open_flows(count, first_port=20000)
    flows = [f for f in conntrack.list_flows(4, FILTERS) if f.dport and f.dport >= 20000]
    assert len(flows) == count, f"{len(flows)} flows listed, {count} opened"
    start = time.perf_counter()
    work(flows)
    took = time.perf_counter() - start
    left = [f for f in conntrack.list_flows(4, FILTERS) if f.dport and f.dport >= 20000]
    assert not left, f"{len(left)} flows left"
    return took / count


def end_with_tool(flows: list[conntrack.Flow]) -> None:
    for flow in flows:
        tool(*tool_delete_args(flow))


def measure_here(buckets: int, flows: int, has_tool: bool) -> list[object]:
    """One row, in the namespace, at the hash size in force."""
    open_flows(flows)
    listed = len(conntrack.list_flows(4, FILTERS))
    assert listed == flows, f"{listed} flows listed, {flows} opened"
    in_process = best_time(lambda: conntrack.list_flows(4, FILTERS), min_runs=5)
    by_tool = (best_time(lambda: tool("-L", "-f", "ipv4", *FILTERS), min_runs=5)
               if has_tool else 0.0)
    ending = per_flow(lambda fs: conntrack.end(fs, "bench"), max(flows, DELETIONS))
    ending_by_tool = per_flow(end_with_tool, DELETIONS) if has_tool else 0.0
    return [
        buckets, flows, f"{in_process * 1000:.2f}",
        f"{by_tool * 1000:.2f}" if has_tool else "-",
        ratio(by_tool, in_process) if has_tool else "-",
        f"{ending * 1e6:.0f}", f"{ending_by_tool * 1e6:.0f}" if has_tool else "-",
    ]


def measure(sizes: Sequence[int], buckets: Sequence[int | None] = (None,)) -> list[list[object]]:
    """One row per (hash size, flows present); a fresh namespace per hash size."""
    has_tool = shutil.which("conntrack") is not None
    rows: list[list[object]] = []
    for size in buckets:
        with hash_size(size) as in_force, throwaway_namespace("-ct"):
            sh("ip", "link", "set", "lo", "up")
            sh("nft", "-f", "-", stdin=TRACKING)
            for flows in sizes:
                rows.append(measure_here(in_force, flows, has_tool))
                conntrack.end(conntrack.list_flows(4, FILTERS), "bench")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Print the conntrack table (needs root and ``ip netns``; the tool for the baseline)."""
    parser = sizes_parser(__doc__.splitlines()[0], DEFAULT_SIZES)
    buckets_option(parser)
    args = parser.parse_args(argv)
    rows = measure(args.sizes, args.buckets)
    print_table(
        f"conntrack: listing F flows to {DESTINATION} (all of them match) and ending them;"
        " ms best of runs, per flow µs",
        ["hash buckets", "F flows", "list ms", "list, tool ms", "tool/list",
         "end, per flow µs", "end, tool, per flow µs"],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
