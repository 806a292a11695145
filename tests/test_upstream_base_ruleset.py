"""The lab's base ruleset is the one a real qube boots with.

qubes-core-agent-linux loads ``qubes-ipv4.nft``, ``qubes-ipv6.nft`` and
``qubes-antispoof.nft`` at boot; lab/base_ruleset.py must give nft the same
tables, sets, chains (hooks, priorities, policies) and rules. Both are
loaded by the real nft into two fresh namespaces and read back as JSON, so
layout and spelling do not matter, only what nft holds. A rule the lab adds
and Qubes lacks (an extra drop) would let a lab test pass where a real hop
forwards the traffic.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from upstream_env import AGENT, require_upstream
from worker_netns import make_netns, ns_run

from lab.base_ruleset import base_ruleset

pytestmark = pytest.mark.lab

#: Loaded at boot, in this order (qubes-antispoof.service, then qubes-iptables).
UPSTREAM_FILES = ("qubes-antispoof.nft", "qubes-ipv4.nft", "qubes-ipv6.nft")

#: The lab's only addition: qubes-setup-dnat-to-ns's chain, made at network
#: start on a real qube (empty in the lab).
LAB_ONLY_CHAINS = {("ip", "qubes", "dnat-dns")}


def nft_state(ns: str) -> dict[str, Any]:
    """Sets, chains and each chain's rules in ``ns``, without handles (order of rules kept)."""
    listing = json.loads(ns_run(ns, "nft", "-j", "list", "ruleset"))["nftables"]
    state: dict[str, Any] = {"tables": set(), "sets": {}, "chains": {}, "rules": {}}
    for item in listing:
        kind, body = next(iter(item.items()))
        if kind == "metainfo":
            continue
        key = (body.get("family"), body.get("table", body.get("name")))
        if kind == "table":
            state["tables"].add(key)
        elif kind == "set":
            state["sets"][(*key, body["name"])] = (body["type"], body.get("flags"))
        elif kind == "chain":
            chain = (*key, body["name"])
            props = {k: body.get(k) for k in ("type", "hook", "prio", "policy")}
            state["chains"][chain] = props
            state["rules"].setdefault(chain, [])
        elif kind == "rule":
            state["rules"].setdefault((*key, body["chain"]), []).append(body["expr"])
    return state


@pytest.fixture
def two_namespaces() -> Iterator[tuple[str, str]]:
    upstream_ns = make_netns()
    lab_ns = make_netns()
    try:
        yield next(upstream_ns), next(lab_ns)
    finally:
        for generator in (upstream_ns, lab_ns):
            generator.close()


def test_lab_base_ruleset_equals_upstream_boot_ruleset(two_namespaces: tuple[str, str]) -> None:
    network = require_upstream(AGENT) / AGENT / "network"
    upstream_ns, lab_ns = two_namespaces
    for name in UPSTREAM_FILES:
        ns_run(upstream_ns, "nft", "-f", str(network / name))
    ns_run(lab_ns, "nft", "-f", "-", stdin=base_ruleset())
    upstream, lab = nft_state(upstream_ns), nft_state(lab_ns)
    for chain in LAB_ONLY_CHAINS:
        assert chain in lab["chains"] and lab["rules"][chain] == []
        del lab["chains"][chain], lab["rules"][chain]
    assert lab["tables"] == upstream["tables"]
    assert lab["sets"] == upstream["sets"]
    assert lab["chains"] == upstream["chains"]
    for chain, rules in upstream["rules"].items():
        assert lab["rules"][chain] == rules, f"chain {chain} differs"
    assert lab["rules"].keys() == upstream["rules"].keys()
