"""The target-side input hook as a process: QubesDB stand-in in, real nft out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from worker_netns import QUBE, REPO, chain_rules, make_netns, ns_run, qubesdb_server, wait_for

from lab.base_ruleset import base_ruleset
from lab.pyshim import qubesdb

pytestmark = pytest.mark.lab


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
    """As dom0 does: remove, write every key, then the completion marker."""
    db.rm("/qns-input/")
    for number, value in enumerate(values):
        db.write(f"/qns-input/{number:04}", value)
    db.write("/qns-input", "")


def test_openings_follow_qubesdb_and_go_with_the_hook(
    netns: str, db: qubesdb.QubesDB, tmp_path: Path
) -> None:
    ns_run(netns, "nft", "-f", "-", stdin=base_ruleset())
    log = tmp_path / "hook.log"
    hook = start_hook(netns, os.environ["QUBESDB_DIR"], log)
    try:
        write_openings(db, "action=accept proto=tcp dstports=443-443 srchost=192.0.2.0/24",
                       "action=drop srchost=2001:db8::/64 proto=udp dstports=53-53")
        wait_for(lambda: len(openings(netns, "ip")) == 1,
                 what="IPv4 opening")
        assert openings(netns, "ip") == ["ip saddr 192.0.2.0/24 tcp dport 443 ct state new accept"]
        assert openings(netns, "ip6") == ["ip6 saddr 2001:db8::/64 udp dport 53 ct state new drop"]
        assert any("jump qns-input" in r for r in chain_rules(netns, "ip", "qubes", "input"))

        write_openings(db, "action=accept proto=tcp dstports=0x1bb-443")  # not dom0's
        wait_for(lambda: "nothing opened" in log.read_text(), what="refusal logged")
        assert openings(netns, "ip") == []
        assert hook.poll() is None

        write_openings(db, "action=accept proto=tcp dstports=22-22")
        wait_for(lambda: len(openings(netns, "ip")) == 1,
                 what="new opening")
    finally:
        hook.send_signal(signal.SIGTERM)
        hook.wait(timeout=10)
    assert "qns-input" not in ns_run(netns, "nft", "list", "ruleset")
    assert "input openings removed" in log.read_text()
