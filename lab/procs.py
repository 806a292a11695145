"""Processes the lab starts, found again by pid file even after dom0 died.

Every lab process gets ``QUBES_LAB_DIR`` in its environment and a pid file
``pids/<name>.pid``. Before signalling a pid read from such a file we check
that the process still carries our ``QUBES_LAB_DIR``, so a recycled pid is
never killed by mistake.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYSHIM = REPO / "lab" / "pyshim"


def lab_env(state_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of every lab process: ours, plus where the lab lives."""
    env = dict(os.environ)
    env["QUBES_LAB_DIR"] = str(state_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def qube_env(state_dir: Path, qube: str) -> dict[str, str]:
    """Environment of a process inside qube ``qube``: its QubesDB, the qubesdb shim."""
    return lab_env(state_dir, {
        "QUBESDB_DIR": str(state_dir / "qubesdb"),
        "QUBESDB_QUBE": qube,
        "PYTHONPATH": f"{PYSHIM}:{REPO}",
    })


def spawn(
    state_dir: Path,
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    netns: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start a daemon in its own session, logging to ``logs/<name>.log``."""
    command = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    (state_dir / "pids").mkdir(parents=True, exist_ok=True)
    with open(state_dir / "logs" / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            command, env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
        )
    (state_dir / "pids" / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc


def python_argv(module: str, *args: str) -> list[str]:
    """``python -m module args`` with the interpreter running the lab."""
    return [sys.executable, "-m", module, *args]


def is_ours(state_dir: Path, pid: int) -> bool:
    """The process exists, is not a zombie, and belongs to this lab."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[0] == "Z":
        return False
    return f"QUBES_LAB_DIR={state_dir}".encode() in environ.split(b"\0")


def read_pid(state_dir: Path, name: str) -> int | None:
    """The pid recorded for ``name`` if that process is alive and ours."""
    try:
        pid = int((state_dir / "pids" / f"{name}.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if is_ours(state_dir, pid) else None


def terminate(pids: Sequence[int], timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after ``timeout``."""
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [pid for pid in pids if _alive(pid)]:
            return
        time.sleep(0.02)
    _signal_all([pid for pid in pids if _alive(pid)], signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.02)


def stop_named(state_dir: Path, name: str, timeout: float = 3.0) -> None:
    """Stop the lab process recorded as ``name`` (if alive) and drop its pid file."""
    pid = read_pid(state_dir, name)
    if pid is not None:
        terminate([pid], timeout)
    (state_dir / "pids" / f"{name}.pid").unlink(missing_ok=True)


def _signal_all(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _alive(pid: int) -> bool:
    """Running and not a zombie (a zombie child is reaped here)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
