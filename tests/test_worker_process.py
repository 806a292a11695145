"""The worker as a process: QubesDB stand-in in, nft in its namespace out, signals."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from worker_netns import (
    QUBE,
    chain_rules,
    make_netns,
    nft_ruleset,
    qubesdb_server,
    start_worker,
    wait_for,
    write_rules,
)

from agent_worker.qdb_parse import Blocked, parse_source
from lab.pyshim import qubesdb

pytestmark = pytest.mark.lab

WEB, WORK = "10.137.0.5", "10.137.0.6"
REJECT = "reject with icmp admin-prohibited"


@pytest.fixture
def netns() -> Iterator[str]:
    yield from make_netns()


@pytest.fixture
def qdb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with qubesdb_server(tmp_path) as directory:
        monkeypatch.setenv("QUBESDB_DIR", str(directory))
        yield directory


def handled(db: qubesdb.QubesDB, address: str) -> int:
    return int(db.read(f"/qubes-firewall-handled/{address}") or b"0")


def rewrite(db: qubesdb.QubesDB, address: str, policy: str, rules: list[str]) -> None:
    """Write like dom0 and wait until the worker handled it."""
    before = handled(db, address)
    write_rules(db, address, policy, rules)
    wait_for(lambda: handled(db, address) > before, what=f"worker handling {address}")


def test_worker_follows_qubesdb_and_signals(netns: str, qdb_dir: Path, tmp_path: Path) -> None:
    db = qubesdb.QubesDB(QUBE)
    db.write("/connected-ips", f"{WEB} {WORK}")
    write_rules(db, WEB, "drop", ["action=accept proto=tcp dstports=443-443",
                                  "action=accept specialtarget=dns"])
    notify = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(10)
    worker = start_worker(netns, qdb_dir, tmp_path / "worker.log", notify)
    assert sock.recv(64) == b"READY=1"
    assert handled(db, WEB) == 1
    assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-5")[0] == (
        "tcp dport 443 accept"
    )
    assert "qbs-10-137-0-6" not in str(nft_ruleset(netns))  # no rules yet: policy drop

    rewrite(db, WORK, "accept", ["action=drop proto=udp"])
    rewrite(db, WEB, "drop", ["action=accept proto=tcp dstports=8000-8080"])
    assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-5") == [
        "tcp dport 8000-8080 accept",
        REJECT,
    ]
    assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-6") == [
        f"meta l4proto udp {REJECT}",
        "accept",
    ]

    before = nft_ruleset(netns)
    worker.process.send_signal(signal.SIGHUP)
    # Type=notify-reload, as upstream's unit: RELOADING=1 with the clock, then READY=1
    reloading = sock.recv(128).decode().split("\n")
    assert reloading[0] == "RELOADING=1"
    assert reloading[1].startswith("MONOTONIC_USEC=") and int(reloading[1].split("=")[1]) > 0
    assert sock.recv(64) == b"READY=1"
    sock.close()
    assert handled(db, WEB) == 3 and handled(db, WORK) == 2  # READY=1 came after the reload
    assert nft_ruleset(netns) == before
    assert "SIGHUP: reloading" in worker.text()

    db.write("/connected-ips", WEB)
    wait_for(lambda: "qbs-10-137-0-6" not in str(nft_ruleset(netns)), what="disconnect")

    assert worker.stop() == 0
    assert nft_ruleset(netns) == []
    assert "stopping, removing the qubes-firewall tables" in worker.text()


def test_restart_restores_the_same_ruleset(netns: str, qdb_dir: Path, tmp_path: Path) -> None:
    db = qubesdb.QubesDB(QUBE)
    db.write("/connected-ips", f"{WEB} {WORK}")
    db.write("/connected-ips6", "fd09:24ef:4179::a89:5")
    write_rules(db, WEB, "drop", ["action=accept proto=tcp dst4=192.168.0.0/16",
                                  "action=accept dsthost=localhost"])
    write_rules(db, WORK, "accept", [])
    write_rules(db, "fd09:24ef:4179::a89:5", "drop", ["action=accept proto=icmp"])
    log = tmp_path / "worker.log"
    first = start_worker(netns, qdb_dir, log)
    ruleset = nft_ruleset(netns)
    assert first.stop() == 0
    second = start_worker(netns, qdb_dir, log)
    assert nft_ruleset(netns) == ruleset
    assert db.read("/dns/10.137.0.5/localhost") == b"{'127.0.0.1/32'}"
    assert second.stop() == 0


_WORDS = st.sampled_from([
    "action=accept", "action=drop", "proto=tcp", "proto=icmp", "dstports=1-2",
    "dst4=10.0.0.0/8", "dst6=::/0", "icmptype=300", "expire=1", "specialtarget=dns",
])
_GARBAGE = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.lists(st.one_of(_WORDS, st.text(min_size=1, max_size=8)), min_size=1, max_size=5)
    .map(lambda words: " ".join(words).encode()),
)


def test_garbage_blocks_only_that_source(netns: str, qdb_dir: Path, tmp_path: Path) -> None:
    db = qubesdb.QubesDB(QUBE)
    db.write("/connected-ips", f"{WEB} {WORK}")
    write_rules(db, WEB, "drop", ["action=accept proto=tcp dstports=443-443"])
    write_rules(db, WORK, "accept", [])
    worker = start_worker(netns, qdb_dir, tmp_path / "worker.log")
    web_chain = chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-5")

    # garbage next to the sources and in /connected-ips: logged, nothing else changes
    db.write("/qubes-firewall/not-an-ip/policy", "accept")
    db.write("/qubes-firewall/not-an-ip", "")
    db.write("/connected-ips", f"{WEB} {WORK} 999.1.1.1")
    wait_for(lambda: "999.1.1.1" in worker.text(), what="log of the bad connected-ips entry")
    assert "ignoring '/qubes-firewall/not-an-ip': not an address" in worker.text()

    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(_GARBAGE)
    def garbage_in_one_rule(untrusted_value: bytes) -> None:
        rewrite(db, WORK, "accept", ["action=accept proto=udp"])
        before = handled(db, WORK)
        reasons = worker.text().count("ERROR: blocking all traffic from 10.137.0.6: ")
        db.rm(f"/qubes-firewall/{WORK}/")
        db.write(f"/qubes-firewall/{WORK}/policy", "accept")
        db.write(f"/qubes-firewall/{WORK}/0000", untrusted_value)
        db.write(f"/qubes-firewall/{WORK}", "")
        wait_for(lambda: handled(db, WORK) > before, what="worker handling garbage")
        assert worker.process.poll() is None, worker.text()
        expected = parse_source({"0000": untrusted_value, "policy": b"accept"}, 4)
        if isinstance(expected, Blocked):
            assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-6") == [REJECT]
            line = f"ERROR: blocking all traffic from 10.137.0.6: {expected.reason}"
            assert worker.text().count("ERROR: blocking all traffic from 10.137.0.6: ") == (
                reasons + 1
            )
            assert line in worker.text()
        assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-5") == web_chain

    garbage_in_one_rule()
    assert worker.stop() == 0
