"""The worker shell without a kernel: events, QubesDB write-back, hooks, systemd."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from pathlib import Path

import pytest
from worker_netns import MemoryQubesDB, NoFlows, write_rules

from agent_worker.directory import Changes, classify
from agent_worker.firewall import (
    FIREWALL_DIR,
    NftError,
    Worker,
    dns_info_value,
    reloading_state,
    resolve,
    run_hooks,
    sd_notify,
)
from agent_worker.ruleset import TableState


class RecordingNft:
    """Records transactions; refuses texts containing ``bad``."""

    def __init__(self, bad: str | None = None) -> None:
        self.bad = bad
        self.transactions: list[str] = []

    def run(self, commands: str, *, check: bool = False) -> str:
        if self.bad is not None and self.bad in commands:
            raise NftError(f"Error: refused {self.bad}")
        if not check:
            self.transactions.append(commands)
        return ""


def test_events_wait_for_the_completion_marker() -> None:
    assert classify([
        "/qubes-firewall/10.137.0.5/0000",
        "/qubes-firewall/10.137.0.5/",
        "/qubes-firewall/10.137.0.5/policy",
    ], FIREWALL_DIR) == Changes()
    assert classify(
        ["/qubes-firewall/10.137.0.5", "/qubes-firewall/fd09::5"], FIREWALL_DIR
    ) == Changes(targets={"10.137.0.5", "fd09::5"})
    assert classify(["/connected-ips6"], FIREWALL_DIR) == Changes(connected=True)
    assert classify(["/qubes-firewall/"], FIREWALL_DIR).full
    assert classify(["/"], FIREWALL_DIR).full


def test_dns_info_is_upstreams_set_literal() -> None:
    addresses = frozenset(ipaddress.ip_address(a) for a in ("192.0.2.10", "192.0.2.7"))
    assert dns_info_value(addresses) == "{'192.0.2.7/32', '192.0.2.10/32'}"
    assert dns_info_value(frozenset({ipaddress.ip_address("2001:db8::1")})) == (
        "{'2001:db8::1/128'}"
    )


def test_resolve_localhost_and_refuse_nonsense() -> None:
    assert ipaddress.ip_address("127.0.0.1") in resolve("localhost", 4)
    with pytest.raises((OSError, UnicodeError)):
        resolve("no-such-host.invalid", 4)


def _worker(db: MemoryQubesDB, nft: RecordingNft, tmp_path: Path) -> Worker:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.139.1.1\n")
    # no conntrack here: this process is not in a qube's namespace
    return Worker(db, nft, resolver=lambda name, version: frozenset(),  # type: ignore[arg-type]
                  resolv_conf=resolv, tool=NoFlows())


def test_garbage_paths_and_values_are_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = MemoryQubesDB({"/connected-ips": "10.137.0.5 bogus"})
    db.write("/qubes-firewall/10.137.0.05/policy", "accept")
    db.write("/qubes-firewall/10.137.0.05", "")
    db.write("/qubes-firewall/10.0.0.1\nqubes-firewall: INFO: forged", "")
    write_rules(db, "10.137.0.5", "drop", ["action=accept dst4=10.0.0.0/8 dst4=1.0.0.0/8"])
    nft = RecordingNft()
    with caplog.at_level(logging.INFO, logger="qubes.firewall"):
        _worker(db, nft, tmp_path).reload()
    messages = caplog.messages
    assert "ignoring '/qubes-firewall/10.137.0.05': not an address: '10.137.0.05'" in messages
    assert "blocking all traffic from 10.137.0.5: rule 0000: repeated option 'dst4'" in messages
    assert "\n" not in "".join(messages)  # untrusted path text is quoted: no forged lines
    assert any(m.startswith("/connected-ips: ignoring an entry") for m in messages)
    (transaction,) = nft.transactions
    assert (
        "add rule ip qubes-firewall qbs-10-137-0-5 reject with icmp type admin-prohibited"
        in transaction.splitlines()
    )
    assert db.read("/qubes-firewall-handled/10.137.0.5") == b"1"


def test_dns_servers_come_from_resolv_conf_only(tmp_path: Path) -> None:
    """As upstream: /qubes-primary-dns is what clients ask, DNATed to resolv.conf's servers."""
    db = MemoryQubesDB({
        "/connected-ips": "10.137.0.5",
        "/qubes-primary-dns": "10.139.1.1",
        "/qubes-secondary-dns": "10.139.1.2",
    })
    write_rules(db, "10.137.0.5", "drop", ["action=accept specialtarget=dns"])
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    nft = RecordingNft()
    Worker(db, nft, resolv_conf=resolv).reload()  # type: ignore[arg-type]
    (transaction,) = nft.transactions
    assert "192.0.2.53" in transaction
    assert "10.139.1" not in transaction


def test_removed_rules_drop_the_chain_and_the_dns_record(tmp_path: Path) -> None:
    db = MemoryQubesDB({"/connected-ips": "10.137.0.5", "/dns/10.137.0.5/a": "{}"})
    write_rules(db, "10.137.0.5", "accept", [])
    nft = RecordingNft()
    worker = _worker(db, nft, tmp_path)
    worker.reload()
    db.rm("/qubes-firewall/10.137.0.5/")
    db.rm("/qubes-firewall/10.137.0.5")
    worker.handle(worker.classify(["/qubes-firewall/10.137.0.5/", "/qubes-firewall/10.137.0.5"]))
    assert not worker.targets
    assert db.list("/dns/") == []
    assert nft.transactions[-1].splitlines() == [
        "delete element ip qubes-firewall clients { 10.137.0.5 }",
        "flush chain ip qubes-firewall qbs-10-137-0-5",
        "delete chain ip qubes-firewall qbs-10-137-0-5",
    ]
    assert db.read("/qubes-firewall-handled/10.137.0.5") == b"2"


def test_apply_names_the_clients_whose_chains_changed(tmp_path: Path) -> None:
    """The seam for whatever must follow a client's new rules (conntrack cleanup)."""
    db = MemoryQubesDB({"/connected-ips": "10.137.0.5 10.137.0.6"})
    write_rules(db, "10.137.0.5", "accept", [])
    write_rules(db, "10.137.0.6", "drop", [])
    nft = RecordingNft()
    worker = _worker(db, nft, tmp_path)
    worker.init_tables()
    worker.reload()
    web, work = ipaddress.ip_address("10.137.0.5"), ipaddress.ip_address("10.137.0.6")
    assert worker.apply({web, work}) == set()
    write_rules(db, "10.137.0.5", "drop", [])
    worker.handle(worker.classify(["/qubes-firewall/10.137.0.5"]))
    assert worker.apply({web, work}) == set()  # already applied by handle()
    db.write("/connected-ips", "10.137.0.5")
    worker.handle(worker.classify(["/connected-ips"]))
    assert work not in worker.kernel.clients
    write_rules(db, "10.137.0.5", "accept", ["action=drop proto=udp"])
    worker._load_target(web)
    assert worker.apply({web, work}) == {web}


def test_refused_update_without_a_culprit_keeps_everything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = MemoryQubesDB({"/connected-ips": "10.137.0.5"})
    write_rules(db, "10.137.0.5", "accept", [])
    nft = RecordingNft(bad="prerouting")
    worker = _worker(db, nft, tmp_path)
    worker.reload()
    assert nft.transactions == []
    assert worker.kernel == TableState() and not worker.synced
    assert "nft refused the update: Error: refused prerouting" in caplog.messages
    assert "nft refused the update again, the previous ruleset stays" in caplog.messages
    assert db.read("/qubes-firewall-handled/10.137.0.5") == b"1"


def test_hooks_run_in_upstream_order(tmp_path: Path) -> None:
    log = tmp_path / "ran"
    etc, rw = tmp_path / "etc.d", tmp_path / "rw.d"
    etc.mkdir()
    rw.mkdir()

    def script(path: Path, mode: int = 0o755) -> None:
        path.write_text(f"#!/bin/sh\necho {path.name} >> {log}\nexit 3\n")
        path.chmod(mode)

    script(etc / "20-b")
    script(etc / "10-a")
    script(etc / "30-not-executable", 0o644)
    script(rw / "05-c")
    user = tmp_path / "qubes-firewall-user-script"
    script(user)
    persist = tmp_path / "custom-persist"
    run_hooks(etc, rw, user, persist)
    assert log.read_text().split() == ["10-a", "20-b", "05-c", "qubes-firewall-user-script"]

    # custom-persist: /rw/config is not the user's, only /etc's hooks run (upstream's rule)
    log.unlink()
    persist.touch()
    run_hooks(etc, rw, user, persist)
    assert log.read_text().split() == ["10-a", "20-b"]
    run_hooks(tmp_path / "missing", rw, user, tmp_path / "missing-too")
    assert log.read_text().split() == ["10-a", "20-b", "05-c", "qubes-firewall-user-script"]


def test_reloading_state_names_the_monotonic_clock() -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = reloading_state().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_sd_notify_sends_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        sd_notify("READY=1")
        assert sock.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    sd_notify("READY=1")  # no systemd: nothing happens
    assert not os.environ.get("NOTIFY_SOCKET")
