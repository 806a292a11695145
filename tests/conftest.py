"""Test-wide policy for tests marked ``lab`` (root, network namespaces, nft).

Outside CI such a test is skipped with a loud reason when the machine
cannot run it, and a banner at the end of the run says how many were not
run. Under CI (``CI`` set) the same situation fails the test: CI runs as
root, so a lab test that cannot run there is a broken CI, not a skip.

Also the ``lab`` fixture: the default topology, up once per test module.
Namespaces are global, so it takes over the machine's lab: whatever lab
is up is brought down first.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from admin_client_patch.qubesd_client import qubesd_call
from bench.common import upstream_root
from firewall_rules import Rule, RuleKind, RuleLists
from lab.control import Lab

# Qt widgets in tests (pytest-qt) draw offscreen: no display needed, and
# grabbed screenshots still hold real pixels.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parent.parent
LAB_MISSING = "LAB TEST NOT RUN: needs root, ip and nft (CI runs it as root)"


def lab_unavailable() -> str | None:
    """Why lab tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "not root"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)}"
    return None


def cannot_run(reason: str) -> None:
    """Skip, saying why, outside CI; fail under CI, where everything must run."""
    if os.environ.get("CI"):
        pytest.fail(f"NOT RUN UNDER CI: {reason}", pytrace=False)
    pytest.skip(reason)


def upstream_dir() -> Path:
    """The read-only upstream Qubes sources (bench.common.upstream_root), or ``cannot_run``.

    Run their code with ``PYTHONDONTWRITEBYTECODE=1``: nothing may be written there.
    """
    path = upstream_root()
    if not (path / "qubes-core-admin").is_dir():
        cannot_run(f"upstream Qubes sources not found at {path} (set QUBES_UPSTREAM_DIR)")
    return path


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("lab") is None:
        return
    reason = lab_unavailable()
    if reason is None:
        return
    if not os.environ.get("CI"):
        item.config.stash[_SKIPPED] = item.config.stash.get(_SKIPPED, 0) + 1
    cannot_run(f"{LAB_MISSING}: {reason}")


_SKIPPED = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.config.stash.get(_SKIPPED, 0)
    if skipped:
        terminalreporter.write_sep(
            "!", f"{skipped} LAB TESTS SKIPPED: {lab_unavailable()}; run as root or set CI",
            red=True, bold=True,
        )


def fresh_lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """A Lab with its own state directory, after any running lab is down."""
    Lab().down()
    return Lab(Path(tmp_path_factory.mktemp("lab")))


def lab_up(tmp_path_factory: pytest.TempPathFactory, topology: Path | None = None) -> Iterator[Lab]:
    """Body of a module-scoped lab fixture: ``topology`` (default: built-in) up, then down."""
    reason = lab_unavailable()
    if reason is not None:
        cannot_run(f"{LAB_MISSING}: {reason}")
    instance = fresh_lab(tmp_path_factory)
    instance.up(topology)
    try:
        yield instance
    finally:
        instance.down()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The default topology, up; brought down at module end."""
    yield from lab_up(tmp_path_factory)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll until ``predicate()`` holds, failing with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def set_rules(qube: str, *lines: str) -> None:
    """Replace all of ``qube``'s rules through ``$QUBESD_SOCKET``: each kind's list by its Set.

    ``lines`` may mix kinds; each goes to its own list (``Set+forward``,
    ``Set+inbound``, then ``Set``: a refused forward or inbound list leaves
    the outbound one as it was). No outbound line means no outbound rule,
    hence nothing leaves the qube: written ``action=drop``, as upstream's
    Set takes no empty list.
    """
    lists = RuleLists.sorted_out(Rule.from_api_string(line) for line in lines)
    for kind in (RuleKind.FORWARD, RuleKind.INBOUND, RuleKind.OUTBOUND):
        rules = lists.of(kind) or (
            (Rule.from_api_string("action=drop"),) if kind is RuleKind.OUTBOUND else ()
        )
        payload = "".join(f"{rule.api_rule}\n" for rule in rules).encode()
        qubesd_call(qube, "admin.vm.firewall.Set", kind.api_argument, payload)
