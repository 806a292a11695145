"""Routing exposure: TCP throughput and connections per second, routed vs direct.

Boots the lab (every agent running, Qubes' base tables, our chains), with
``direct`` exposed at 192.0.2.26 (one hop, behind sys-net) and ``web`` at
192.0.2.25 (two hops, behind sys-firewall), and drives the same TCP load
from the LAN host ``lan`` to:

- ``direct LAN``: ``lan2``, another LAN host on the same switch: no Qubes
  hop at all, the baseline;
- ``routed 1 hop``: ``direct`` at its own address;
- ``routed 2 hops``: ``web`` at its own address;
- ``forwarded 2 hops``: ``work`` through a forward rule (DNAT at both
  hops), the other way to expose a service, for comparison.

Each figure is the best of ``--runs`` runs of ``--seconds`` each; ratios
are against ``direct LAN`` of the same run. The lab is brought up in its
own state directory (root, network namespaces; ``QUBES_LAB_NS_PREFIX`` is
honoured), as bench.cutoff's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import print_table, ratio
from lab.control import Lab

PORT = 5001
#: (label, server qube or LAN host, address the LAN host connects to, port)
PATHS = (
    ("direct LAN", "lan2", "192.0.2.11", PORT),
    ("routed 1 hop", "direct", "192.0.2.26", PORT),
    ("routed 2 hops", "web", "192.0.2.25", PORT),
    ("forwarded 2 hops", "work", "192.0.2.2", 8080),
)
ROUTED = {"direct": "192.0.2.26", "web": "192.0.2.25"}


def _setup(lab: Lab) -> None:
    """The exposures and the forward, through the Admin API as a user would."""
    from admin_client_patch.qubesd_client import qubesd_call

    os.environ["QUBESD_SOCKET"] = str(lab.qubesd_socket)
    set_call = "admin.vm.firewall.Set"
    for qube, address in ROUTED.items():
        lab.set_ip(qube, address)
        rule = f"action=accept srchost=192.0.2.10 proto=tcp dstports={PORT}\n"
        qubesd_call(qube, set_call, "inbound", rule.encode())
        lab.set_feature(qube, "routing-method", "forward")
    forward = f"action=forward forwardtype=external proto=tcp srcports=8080 dstports={PORT}\n"
    qubesd_call("work", set_call, "forward", forward.encode())
    deadline = time.monotonic() + 30
    while not all(
        (lab.qubesdb("sys-net").read(f"/qns-routing_status/{a}") or b"").startswith(
            b"state=exposed"
        )
        for a in ROUTED.values()
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("the routed qubes were not exposed within 30 s")
        time.sleep(0.1)


def _load(lab: Lab, kind: str, address: str, port: int, seconds: float) -> float:
    argv = [sys.executable, "-m", "bench.traffic", kind, address, str(port), str(seconds)]
    result = lab.exec("lan", argv, check=True, timeout=seconds + 30)
    return float(result.stdout)


def measure(seconds: float, runs: int) -> list[list[object]]:
    """One row per path, in a lab of its own.

    The paths take turns within each run, so a burst of load from the rest
    of the machine hits them alike rather than one path's whole series.
    """
    with tempfile.TemporaryDirectory(prefix="qns-bench-routing-") as state:
        lab = Lab(Path(state))
        lab.up()
        try:
            return _measure(lab, seconds, runs)
        finally:
            lab.down()


def _measure(lab: Lab, seconds: float, runs: int) -> list[list[object]]:
    sinks = []
    try:
        _setup(lab)
        for server in dict.fromkeys(server for _, server, _, _ in PATHS):
            sink = subprocess.Popen(
                lab.command(server, [sys.executable, "-m", "bench.traffic", "serve", str(PORT)]),
                env=lab.env(server), stdout=subprocess.PIPE, text=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
            sinks.append(sink)
            assert sink.stdout is not None and sink.stdout.readline().startswith("listening")
        for _, _, address, port in PATHS:
            _load(lab, "connect", address, port, 0.2)  # neighbour discovery, caches
        throughput = dict.fromkeys((label for label, *_ in PATHS), 0.0)
        rate = dict(throughput)
        for _ in range(runs):
            for label, _, address, port in PATHS:
                throughput[label] = max(throughput[label],
                                        _load(lab, "send", address, port, seconds))
                rate[label] = max(rate[label], _load(lab, "connect", address, port, seconds))
    finally:
        for sink in sinks:
            sink.terminate()
            sink.wait(timeout=10)
    base = PATHS[0][0]
    return [
        [label, f"{throughput[label] / 1e6:.0f}", ratio(throughput[label], throughput[base], 2),
         f"{rate[label]:.0f}", ratio(rate[label], rate[base], 2)]
        for label, *_ in PATHS
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table (needs root and network namespaces)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one run")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (best kept)")
    args = parser.parse_args(argv)
    print_table(
        "routing: LAN host -> qube over TCP (best of runs; ratios against direct LAN)",
        ["path", "MB/s", "MB/s vs direct", "connections/s", "conn/s vs direct"],
        measure(args.seconds, args.runs),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
