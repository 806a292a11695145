"""Run the real upstream Qubes code (snapshots in ``$QUBES_UPSTREAM_DIR``) beside ours.

The snapshots are read-only: nothing here writes into them. Byte code is
off (``PYTHONDONTWRITEBYTECODE``), qubes-core-admin's entry points come
from ``setup.py egg_info`` into a scratch folder, and anything patched or
generated lives in temporary folders.

Where the snapshots are: ``$QUBES_UPSTREAM_DIR``, else ``../shared/upstream``
beside the repository (CI's layout, which .ci/run exports). Without
either, each test says so through :func:`conftest.cannot_run` (a failure
under CI).
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from conftest import cannot_run

from bench.common import upstream_root

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"

#: The snapshot folders (see the upstream README's table).
CORE_ADMIN = "qubes-core-admin"
CORE_QREXEC = "qubes-core-qrexec"
ADMIN_CLIENT = "qubes-core-admin-client"
AGENT = "qubes-core-agent-linux"
MANAGER = "qubes-manager"

#: Upstream's unit tests refuse root in a container; they run as nobody.
NOBODY = 65534


def upstream_dir() -> Path | None:
    """The folder holding the snapshots (bench.common.upstream_root), or None if absent."""
    root = upstream_root()
    return root if root.is_dir() else None


def require_upstream(*folders: str) -> Path:
    """The snapshots folder holding ``folders``; otherwise the test cannot run."""
    root = upstream_dir()
    if root is None:
        cannot_run(
            "UPSTREAM CONFORMANCE NOT RUN: no upstream snapshots "
            "(set QUBES_UPSTREAM_DIR, or put them at ../shared/upstream)"
        )
        raise AssertionError("unreachable")
    missing = [folder for folder in folders if not (root / folder).is_dir()]
    if missing:
        cannot_run(f"UPSTREAM CONFORMANCE NOT RUN: {root} has no {', '.join(missing)}")
    return root


def discover_cases(source_root: Path, module: str, method_filter: str | None = None) -> list[str]:
    """``module.Class.test_method`` for each test method written in the module's classes.

    Read from the source (no import), so pytest can list upstream's cases
    at collection; ``method_filter`` keeps only names containing it.
    """
    source = source_root / (module.replace(".", "/") + ".py")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    cases = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if (
                isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                and item.name.startswith("test")
                and (method_filter is None or method_filter in item.name)
            ):
                cases.append(f"{module}.{node.name}.{item.name}")
    return cases


def python_env(paths: Sequence[Path], **extra: str) -> dict[str, str]:
    """This environment with ``paths`` first on PYTHONPATH and byte code off."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONPATH"] = os.pathsep.join(str(path) for path in [*paths, REPO])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def egg_info(project: Path, scratch: Path) -> Path:
    """Folder holding ``project``'s metadata (entry points, version), made once.

    setuptools' ``egg_info --egg-base`` (from setup.py, or pyproject.toml
    alone) writes only into ``scratch``; importlib.metadata then finds the
    project as if it were installed.
    """
    egg_base = scratch / f"{project.name}-egg"
    if not any(egg_base.glob("*.egg-info/PKG-INFO")):
        egg_base.mkdir(parents=True, exist_ok=True)
        script = (["setup.py"] if (project / "setup.py").exists()
                  else ["-c", "import setuptools; setuptools.setup()"])
        subprocess.run(
            [sys.executable, *script, "-q", "egg_info", "--egg-base", str(egg_base)],
            cwd=project, env=python_env([]), check=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
    return egg_base


def core_admin_paths(root: Path, scratch: Path) -> list[Path]:
    """PYTHONPATH for qubesd code: its metadata, its stubs, qrexec, the source.

    With the metadata, qubes.ext.get_extensions() finds upstream's
    extensions as in an installed dom0.
    """
    return [
        egg_info(root / CORE_ADMIN, scratch),
        root / CORE_ADMIN / "test-packages",
        root / CORE_ADMIN,
        root / CORE_QREXEC,
    ]


def admin_client_paths(root: Path, scratch: Path) -> list[Path]:
    """PYTHONPATH for qubesadmin (its tools read their own version from the metadata)."""
    return [egg_info(root / ADMIN_CLIENT, scratch), root / ADMIN_CLIENT]


def shared_scratch() -> Path:
    """A temporary folder every uid may read (upstream's tests run as nobody).

    In /var/tmp: runs as nobody get a /tmp of their own (run_as_nobody).
    """
    path = Path(tempfile.mkdtemp(prefix="qns-upstream-", dir="/var/tmp"))
    path.chmod(0o755)
    return path


def nobody_dir(parent: Path, name: str) -> Path:
    """A folder under ``parent`` owned by nobody: its HOME, TMPDIR and output."""
    path = parent / name
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    return path


def nobody_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` run as uid/gid nobody, without supplementary groups."""
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def _kept_under_tmp(env: Mapping[str, str], home: Path) -> list[Path]:
    """Folders the run needs that lie under /tmp, outermost first.

    A checkout (CI's clone, its .venv), the snapshots or the scratch home
    may live there; the private /tmp must still show them.
    """
    tmp = Path("/tmp")
    wanted = [REPO, Path(sys.executable).parent.parent, home, upstream_root()]
    wanted += [Path(entry) for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    # Both spellings: a symlinked folder is reached through its own path.
    spellings = {form for path in wanted for form in (Path(os.path.abspath(path)), path.resolve())}
    under = sorted((path for path in spellings if path.is_relative_to(tmp)),
                   key=lambda path: len(path.parts))
    kept: list[Path] = []
    for path in under:
        if not any(path.is_relative_to(outer) for outer in kept):
            kept.append(path)
    return kept


def _private_tmp_script(kept: Sequence[Path]) -> str:
    """Shell that gives the mount namespace an empty /tmp, ``kept`` folders bound back."""
    lines = ["set -e", 'stash=$(mktemp -d /run/qns-tmp-stash.XXXXXX)',
             'mount --bind /tmp "$stash"', "mount -t tmpfs -o mode=1777 qns-tmp /tmp"]
    for path in kept:
        quoted = shlex.quote(str(path))
        inside = shlex.quote(str(path.relative_to("/tmp")))
        lines += [f"mkdir -p {quoted}", f'mount --bind "$stash"/{inside} {quoted}']
    lines += ['umount "$stash"', 'rmdir "$stash"', 'exec "$@"']
    return "\n".join(lines)


def as_nobody(
    argv: Sequence[str], env: Mapping[str, str], home: Path
) -> tuple[list[str], dict[str, str]]:
    """The command and environment running ``argv`` as uid/gid nobody, ``home`` its HOME
    and TMPDIR (and the caller's cwd for it).

    In a mount namespace of its own with an empty /tmp: upstream's tests
    use fixed paths there (``/tmp/qubes-test-dir``), which another run on
    the machine could be using at the same moment. The folders it needs
    under /tmp (a checkout in ``mktemp -d``, whose 0700 folder nobody
    cannot enter) are bound back into it, below folders nobody may enter.
    """
    if os.geteuid() != 0:
        cannot_run("UPSTREAM CONFORMANCE NOT RUN: switching to uid nobody needs root")
    missing = [tool for tool in ("setpriv", "unshare") if shutil.which(tool) is None]
    if missing:
        cannot_run(f"UPSTREAM CONFORMANCE NOT RUN: {', '.join(missing)} (util-linux) missing")
    env = {**env, "HOME": str(home), "TMPDIR": str(home)}
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               _private_tmp_script(_kept_under_tmp(env, home)), "sh", *nobody_argv(argv)]
    return command, env


def run_as_nobody(
    argv: Sequence[str], env: Mapping[str, str], home: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as :func:`as_nobody` says, in ``home``, and wait for it."""
    command, env = as_nobody(argv, env, home)
    return subprocess.run(command, env=env, cwd=home, capture_output=True, text=True,
                          timeout=timeout, check=False)


def run_unittests(
    names: Sequence[str], paths: Sequence[Path], scratch: Path, label: str,
    extra_args: Sequence[str] = (), as_nobody: bool = True,
) -> dict[str, dict[str, str]]:
    """Run unittest ``names`` through tests/upstream_unittest.py; outcome per test id.

    Raises AssertionError with the runner's output when it produced no report
    (an import error, a crash): that is never a per-test result.
    """
    home = nobody_dir(scratch, label) if as_nobody else scratch / label
    home.mkdir(exist_ok=True)
    report = home / "report.json"
    argv = [
        sys.executable, str(TESTS / "upstream_unittest.py"),
        "--report", str(report), *extra_args, *names,
    ]
    env = python_env(paths, QUBES_TEST="1")
    if as_nobody:
        proc = run_as_nobody(argv, env, home)
    else:
        env = {**env, "HOME": str(home), "TMPDIR": str(home)}
        proc = subprocess.run(argv, env=env, cwd=home, capture_output=True, text=True,
                              timeout=600, check=False)
    if not report.exists():
        raise AssertionError(
            f"upstream test run {label} gave no report (exit {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    outcomes: dict[str, dict[str, str]] = json.loads(report.read_text())
    return outcomes


@pytest.fixture(scope="session")
def upstream_scratch() -> Iterator[Path]:
    """One readable temporary folder for the session's upstream runs."""
    path = shared_scratch()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
