"""Upstream qubesadmin's qvm-firewall test cases, run against our qvm-firewall.

``qubesadmin/tests/tools/qvm_firewall.py`` runs unchanged; the shim
(tests/upstream_qvm_firewall_shim.py) puts our client where it imports
upstream's tool and answers our Admin API calls from each case's table
of expected calls. The cases hold outbound rules only: for those our
command line, table, ``--raw`` output and the Set payloads it sends must
be upstream's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from upstream_env import (
    ADMIN_CLIENT,
    TESTS,
    discover_cases,
    require_upstream,
    run_unittests,
    upstream_dir,
    upstream_scratch,
)

__all__ = ["upstream_scratch"]  # the fixture, used below

MODULE = "qubesadmin.tests.tools.qvm_firewall"

#: Cases where ours deliberately differs: case -> the text our refusal must
#: contain. Upstream's tool takes dst4= and dst6= as plain synonyms of
#: dsthost=, so ``dst6=127.0.0.1`` is stored as an IPv4 rule; ours refuses
#: an address of the other family (the case still runs and must fail so).
DIVERGENCES = {
    f"{MODULE}.TC_00_RuleAction.test_006_dsthost_aliases":
        "dst6='127.0.0.1': not an IPv6 address or network",
}


def all_cases() -> list[str]:
    root = upstream_dir()
    if root is None or not (root / ADMIN_CLIENT).is_dir():
        return ["<no upstream snapshots>"]
    return discover_cases(root / ADMIN_CLIENT, MODULE)


@pytest.fixture(scope="module")
def outcomes(upstream_scratch: Path) -> dict[str, dict[str, str]]:
    root = require_upstream(ADMIN_CLIENT)
    return run_unittests(
        all_cases(), [root / ADMIN_CLIENT, TESTS], upstream_scratch, "qvm-firewall-cases",
        ["--preload", "upstream_qvm_firewall_shim"], as_nobody=False,
    )


@pytest.mark.parametrize("case", all_cases())
def test_upstream_qvm_firewall_case_passes_with_our_client(
    outcomes: dict[str, dict[str, str]], case: str
) -> None:
    result = outcomes[case]
    if case in DIVERGENCES:
        assert result["outcome"] == "error" and DIVERGENCES[case] in result["detail"], result
        return
    assert result["outcome"] == "pass", result["detail"]
