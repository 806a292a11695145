"""The target-side input hook as a process: QubesDB stand-in in, real nft out."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from worker_netns import (
    QUBE,
    REPO,
    SYN_GUARD_LISTED,
    MemoryQubesDB,
    NoFlows,
    chain_rules,
    make_netns,
    ns_run,
    qubesdb_server,
    wait_for,
    write_directory,
)

from agent_worker import nft_chains
from lab.base_ruleset import base_ruleset
from lab.pyshim import qubesdb

sys.modules.setdefault("qubesdb", qubesdb)  # what agent_worker.input_hook imports
from agent_worker import input_hook  # noqa: E402

# -- pure ---------------------------------------------------------------------


def test_a_family_without_the_parent_chain_is_skipped() -> None:
    """Upstream's ip6 qubes may hold only prerouting: IPv4 must still apply."""
    listings = {
        "ip": [{"table": {"name": "qubes"}}, {"chain": {"name": "input"}}],
        "ip6": [{"table": {"name": "qubes"}}, {"chain": {"name": "prerouting"}}],
    }
    sent: list[str] = []

    def runner(commands: str, *, check: bool = False) -> str:
        if commands.startswith("list table"):
            return json.dumps({"nftables": listings[commands.split()[2]]})
        sent.append(commands)
        return ""

    rules = {"ip": {"qns-input": ["tcp dport 22 accept"]},
             "ip6": {"qns-input": ["tcp dport 22 accept"]}}
    nft_chains.apply(rules, input_hook.HOOKS, runner)  # type: ignore[arg-type]
    (text,) = sent
    assert "add rule ip qubes qns-input tcp dport 22 accept" in text
    assert "ip6" not in text


def test_a_refused_fallback_is_logged_and_the_chain_removed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(_openings: object) -> None:
        raise nft_chains.NftError("Error: refused")

    removed: list[object] = []
    monkeypatch.setattr(input_hook, "_apply", refuse)
    monkeypatch.setattr(nft_chains, "remove", lambda *args: removed.append(args))
    db = MemoryQubesDB({"/qns-input/0000": "action=accept proto=tcp dstports=22-22",
                        "/qns-input": ""})
    with caplog.at_level(logging.INFO, logger=input_hook.log.name):
        assert input_hook.update(db, [], tool=NoFlows()) == []  # type: ignore[arg-type]
    assert any("refused emptying them too" in m for m in caplog.messages)
    assert len(removed) == 1


# -- the hook as a process ------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    yield from make_netns()


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[qubesdb.QubesDB]:
    with qubesdb_server(tmp_path) as directory:
        monkeypatch.setenv("QUBESDB_DIR", str(directory))
        yield qubesdb.QubesDB(QUBE)


def start_hook(ns: str, db_dir: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "QUBESDB_DIR": db_dir, "QUBESDB_QUBE": QUBE,
        "PYTHONPATH": f"{REPO / 'lab' / 'pyshim'}:{REPO}",
    }
    with log.open("ab") as handle:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "agent_worker.input_hook"],
            env=env, stdout=handle, stderr=handle, cwd="/",
        )


def openings(ns: str, family: str) -> list[str]:
    """Rules of ``qns-input`` in ``family``; none while the chain does not exist."""
    try:
        return chain_rules(ns, family, "qubes", "qns-input")
    except subprocess.CalledProcessError:
        return []


def write_openings(db: qubesdb.QubesDB, *values: str) -> None:
    write_directory(db, "/qns-input", list(values))


@pytest.mark.lab
def test_openings_follow_qubesdb_and_go_with_the_hook(
    netns: str, db: qubesdb.QubesDB, tmp_path: Path
) -> None:
    ns_run(netns, "nft", "-f", "-", stdin=base_ruleset())
    log = tmp_path / "hook.log"
    hook = start_hook(netns, os.environ["QUBESDB_DIR"], log)
    try:
        write_openings(db, "action=accept proto=tcp dstports=443-443 srchost=192.0.2.0/24",
                       "action=drop srchost=2001:db8::/64 proto=udp dstports=53-53")
        wait_for(lambda: len(openings(netns, "ip")) == 2,
                 what="IPv4 opening")
        assert openings(netns, "ip") == [
            SYN_GUARD_LISTED,
            "iifgroup != 2 ip saddr 192.0.2.0/24 tcp dport 443 ct state new accept",
        ]
        assert openings(netns, "ip6") == [
            SYN_GUARD_LISTED,
            "iifgroup != 2 ip6 saddr 2001:db8::/64 udp dport 53 ct state new drop",
        ]
        assert any("jump qns-input" in r for r in chain_rules(netns, "ip", "qubes", "input"))

        write_openings(db, "action=accept proto=tcp dstports=0x1bb-443")  # not dom0's
        wait_for(lambda: "nothing opened" in log.read_text(), what="refusal logged")
        assert openings(netns, "ip") == []
        assert hook.poll() is None

        write_openings(db, "action=accept proto=tcp dstports=22-22")
        wait_for(lambda: len(openings(netns, "ip")) == 2,
                 what="new opening")
    finally:
        hook.send_signal(signal.SIGTERM)
        hook.wait(timeout=10)
    assert "qns-input" not in ns_run(netns, "nft", "list", "ruleset")
    assert "input openings removed" in log.read_text()


@pytest.mark.lab
def test_ipv4_opens_while_ip6_qubes_lacks_input(
    netns: str, db: qubesdb.QubesDB, tmp_path: Path
) -> None:
    """As upstream's antispoof leaves ip6 qubes with IPv6 off: only prerouting."""
    ruleset = base_ruleset()
    ns_run(netns, "nft", "-f", "-", stdin=ruleset)
    ns_run(netns, "nft", "delete", "table", "ip6", "qubes")
    ns_run(netns, "nft", "-f", "-", stdin=(
        "table ip6 qubes { chain prerouting { type filter hook prerouting priority raw; }; }\n"
    ))
    log = tmp_path / "hook.log"
    hook = start_hook(netns, os.environ["QUBESDB_DIR"], log)
    try:
        write_openings(db, "action=accept proto=tcp dstports=22-22",
                       "action=accept proto=tcp dstports=443-443 srchost=2001:db8::/64")
        wait_for(lambda: len(openings(netns, "ip")) == 2 or hook.poll() is not None,
                 what="IPv4 opening")
        assert hook.poll() is None, log.read_text()
        assert openings(netns, "ip") == [
            SYN_GUARD_LISTED, "iifgroup != 2 tcp dport 22 ct state new accept"
        ]
        assert openings(netns, "ip6") == []
    finally:
        hook.send_signal(signal.SIGTERM)
        hook.wait(timeout=10)
