"""How fast a live flow through a forward ends once its rule goes (issue 9), in the lab.

The default lab is brought up in its own state directory (root, network
namespaces; ``QUBES_LAB_NS_PREFIX``/``QUBES_LAB_DIR`` are honoured). For
each change and protocol, a LAN client keeps a flow to web through
sys-net and sys-firewall (``probe talk``: a line every 20 ms, each echo
time-stamped), then:

- change: ``qvm-firewall web del`` of the forward (the Admin API call), or
  web stopped (the lab's stop, as qubesd's);
- baseline, same run: how long that call itself takes until it returns
  (dom0 has planned and written QubesDB when it does);
- cut-off: from the call's return to the flow's last echo (at most one
  interval late), i.e. how long the flow kept passing after the change
  was made. Negative: it had already stopped when the call returned.

Figures are the median of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from admin_client_patch import qvm_firewall
from bench.common import print_table
from lab.control import Lab

UPLINK = "192.0.2.2"
INTERVAL = 0.02
RULES = {
    "tcp": ("action=forward", "forwardtype=external", "proto=tcp", "srcports=8080",
            "dstports=80"),
    "udp": ("action=forward", "forwardtype=external", "proto=udp", "srcports=5353",
            "dstports=53"),
}
SERVED = {"tcp": (80, 8080), "udp": (53, 5353)}


def _firewall(*argv: str) -> None:
    if qvm_firewall.main(list(argv)) != 0:
        raise RuntimeError(f"qvm-firewall {' '.join(argv)} failed")


def once(lab: Lab, proto: str, change: str) -> tuple[float, float]:
    """(seconds the change took, seconds the flow kept passing after it)."""
    served, port = SERVED[proto]
    _firewall("web", "add", *RULES[proto])
    try:
        with lab.echo("web", proto, served), \
                lab.talk("lan", proto, UPLINK, port, interval=INTERVAL) as talker:
            deadline = time.time() + 15
            while not talker.answers:
                if time.time() > deadline:
                    raise RuntimeError("the flow never answered")
                time.sleep(0.02)
            time.sleep(0.3)
            actions: dict[str, Callable[[], None]] = {
                "del": lambda: _firewall("web", "del", *RULES[proto]),
                "stop": lambda: lab.stop("web"),
            }
            start = time.time()
            actions[change]()
            done = time.time()
            time.sleep(1.5)
            last = max(talker.answers)
            return done - start, last - done
    finally:
        lab.start("web")
        _firewall("web", "reset")


def measure(runs: int) -> list[list[object]]:
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="qns-bench-cutoff-") as state:
        lab = Lab(Path(state))
        lab.up()
        os.environ["QUBESD_SOCKET"] = str(lab.qubesd_socket)
        try:
            for change in ("del", "stop"):
                for proto in ("tcp", "udp"):
                    results = [once(lab, proto, change) for _ in range(runs)]
                    took = statistics.median(r[0] for r in results)
                    cut = statistics.median(r[1] for r in results)
                    worst = max(r[1] for r in results)
                    rows.append([change, proto, f"{took * 1000:.0f} ms",
                                 f"{cut * 1000:.0f} ms", f"{worst * 1000:.0f} ms"])
        finally:
            lab.down()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    rows = measure(args.runs)
    print_table(
        f"live flow cut-off, web behind sys-firewall and sys-net (median of {args.runs})",
        ["change", "proto", "change takes", "flow passes after", "worst"],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
