"""Memory of the firewall worker process holding K forward steps.

The real worker (``python -m agent_worker.firewall``, as the lab and the
package start it) in a throwaway network namespace (``qns-bench-<pid>-w``,
always deleted) with the Qubes base tables, reading the lab's QubesDB
stand-in where K steps are written first (``bench.nft``'s mix, ten steps
per target: a hop's ``/connected-ips`` must fit in one QubesDB value, which
no thousand clients do). Once it has handled every target, its
resident set (``VmRSS``) and peak (``VmHWM``) are read from /proc.

Baselines, same run: the interpreter with a libnftables context and
nothing else (what any worker costs), and the worker with no step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.common import REPO, print_table, ratio, sizes_parser
from bench.nft import forward_entries, sh, throwaway_namespace
from lab.base_ruleset import base_ruleset
from lab.pyshim import qubesdb

DEFAULT_SIZES = (0, 100, 1000)
QUBE = "sys-firewall"
HANDLED = "/qns-forward_handled/"
PYSHIM = REPO / "lab" / "pyshim"
#: the interpreter and one libnftables context, waiting
BARE = "import nftables, sys; nftables.Nftables(); print('ready', flush=True); sys.stdin.read()"


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return tuple(int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def bare_interpreter(namespace: str) -> tuple[float, float]:
    """Memory of the interpreter holding a libnftables context and nothing else."""
    process = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c", BARE],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        process.stdout.readline()
        return memory_mib(process.pid)
    finally:
        process.kill()
        process.wait(timeout=10)


def worker_memory(namespace: str, count: int, directory: Path) -> tuple[float, float]:
    """Memory of the worker once it handled ``count`` one-step targets."""
    os.environ["QUBESDB_DIR"] = str(directory / "qubesdb")
    ready = directory / f"qubesdb-{count}.ready"
    server = subprocess.Popen([sys.executable, "-m", "lab.qubesdb_server", "--dir",
                               str(directory / "qubesdb"), "--ready-file", str(ready), QUBE],
                              cwd=REPO)
    log = directory / f"worker-{count}.log"
    worker = None
    try:
        wait_for(ready.exists, "the QubesDB stand-in")
        db = qubesdb.QubesDB(QUBE)
        entries = forward_entries(count, per_target=10)
        for path, value in entries.items():
            if path.count("/") == 3 or not path.startswith("/qns-forward/"):
                db.write(path, value)
        for path, value in entries.items():  # completion paths last, as dom0
            if path.startswith("/qns-forward/") and path.count("/") == 2:
                db.write(path, value)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "QUBESDB_DIR": str(directory / "qubesdb"), "QUBESDB_QUBE": QUBE,
               "PYTHONPATH": f"{PYSHIM}:{REPO}"}
        with log.open("wb") as output:
            worker = subprocess.Popen(
                ["ip", "netns", "exec", namespace, sys.executable, "-m", "agent_worker.firewall"],
                env=env, stdout=output, stderr=output, cwd="/")
        targets = sum(1 for path in entries if path.count("/") == 2 and "forward" in path)
        wait_for(lambda: "INFO: started" in log.read_text()
                 and len(db.list(HANDLED)) >= targets, f"the worker handling {count} steps")
        return memory_mib(worker.pid)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=10)
        server.terminate()
        server.wait(timeout=10)


def measure(sizes: Sequence[int]) -> list[list[object]]:
    """One row per K, and the bare interpreter."""
    with tempfile.TemporaryDirectory(prefix="qns-bench-worker.") as tmp, \
            throwaway_namespace("-w") as namespace:
        sh("nft", "-f", "-", stdin=base_ruleset())
        bare = bare_interpreter(namespace)
        rows: list[list[object]] = [["python + libnftables", "-", f"{bare[0]:.1f}",
                                     f"{bare[1]:.1f}", "1.0x"]]
        for count in sizes:
            rss, peak = worker_memory(namespace, count, Path(tmp))
            rows.append(["worker", count, f"{rss:.1f}", f"{peak:.1f}", ratio(rss, bare[0])])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Print the worker memory table (needs root and ``ip netns``)."""
    args = sizes_parser(__doc__.splitlines()[0], DEFAULT_SIZES).parse_args(argv)
    print_table(
        "worker: memory of the process holding K forward steps (MiB)",
        ["process", "K steps", "RSS MiB", "peak MiB", "RSS/bare"],
        measure(args.sizes),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
