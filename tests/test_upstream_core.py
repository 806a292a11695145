"""Upstream qubes-core-admin's own tests pass with our extension installed, as without it.

qubesd loads every ``qubes.ext`` entry point into every ``qubes.Qubes``
app, so once the package is installed our extension takes part in
everything upstream's tests do: their apps, their firewall objects,
their Admin API calls. The selected upstream suites (the firewall, the
network mixin, DispVMs, and the Admin API's firewall methods) run twice as
uid nobody: once with our entry point hidden from importlib.metadata,
once with it visible, and each case must end the same way both times.

Cases are found by reading upstream's test files (no import), so a case
added upstream is checked without a change here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from upstream_env import (
    CORE_ADMIN,
    CORE_QREXEC,
    core_admin_paths,
    discover_cases,
    require_upstream,
    run_unittests,
    upstream_dir,
    upstream_scratch,
)

__all__ = ["upstream_scratch"]  # the fixture, used below

EXTENSION = "qubes_network_server"

#: upstream module -> only cases whose method name contains this (None: all)
SUITES: dict[str, str | None] = {
    "qubes.tests.firewall": None,
    "qubes.tests.vm.mix.net": None,
    "qubes.tests.vm.dispvm": None,
    "qubes.tests.api_admin": "firewall",
}

#: Outcomes that are upstream's own verdict, not a failure of the code.
CLEAN = ("pass", "skip", "xfail")


def all_cases() -> list[str]:
    """Every selected case, or one placeholder when there are no snapshots."""
    root = upstream_dir()
    if root is None or not (root / CORE_ADMIN).is_dir():
        return ["<no upstream snapshots>"]
    return [
        case
        for module, only in SUITES.items()
        for case in discover_cases(root / CORE_ADMIN, module, only)
    ]


@pytest.fixture(scope="module")
def outcomes(upstream_scratch: Path) -> dict[str, dict[str, dict[str, str]]]:
    """Each case's outcome without and with our extension (two runs, as nobody)."""
    root = require_upstream(CORE_ADMIN, CORE_QREXEC)
    paths = core_admin_paths(root, upstream_scratch)
    cases = all_cases()
    return {
        "without": run_unittests(cases, paths, upstream_scratch, "core-without",
                                 ["--hide-extension", EXTENSION]),
        "with": run_unittests(cases, paths, upstream_scratch, "core-with",
                              ["--require-extension", EXTENSION]),
    }


@pytest.mark.parametrize("case", all_cases())
def test_upstream_case_unchanged_by_extension(
    outcomes: dict[str, dict[str, dict[str, str]]], case: str
) -> None:
    """Upstream's verdict on this case is the same with our extension loaded."""
    without, with_ = outcomes["without"][case], outcomes["with"][case]
    assert without["outcome"] in CLEAN, (
        f"upstream's own case fails here even without our extension:\n{without['detail']}"
    )
    assert with_["outcome"] == without["outcome"], (
        f"{without['outcome']} without our extension, {with_['outcome']} with it:\n"
        f"{with_['detail']}"
    )
