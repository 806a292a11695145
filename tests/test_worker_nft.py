"""The worker against the real kernel: its transactions in a throwaway namespace."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from worker_netns import (
    MemoryQubesDB,
    chain_rules,
    in_netns,
    make_netns,
    nft_ruleset,
    write_rules,
)

from agent_worker import ruleset
from agent_worker.firewall import Changes, Nft, NftError, Worker
from agent_worker.qdb_parse import Blocked, IPAddress, parse_source
from agent_worker.ruleset import Resolved, chain_check_commands, source_chain

pytestmark = pytest.mark.lab

WEB, WORK, WEB6 = "10.137.0.5", "10.137.0.6", "fd09:24ef:4179::a89:5"
REJECT = "reject with icmp admin-prohibited"


@pytest.fixture
def netns() -> Iterator[str]:
    yield from make_netns()


def fake_resolve(name: str, version: int) -> frozenset[IPAddress]:
    if name == "www.example.com":
        text = ("192.0.2.10", "192.0.2.7") if version == 4 else ("2001:db8::7",)
        return frozenset(ipaddress.ip_address(a) for a in text)
    raise OSError("Name or service not known")


def base_db() -> MemoryQubesDB:
    db = MemoryQubesDB({
        "/connected-ips": f"{WEB} {WORK}",
        "/connected-ips6": WEB6,
    })
    write_rules(db, WEB, "drop", [
        "action=accept proto=tcp dst4=192.168.1.0/24 dstports=443-443",
        "action=accept proto=tcp dsthost=www.example.com dstports=80-81",
        "action=accept specialtarget=dns",
        "action=drop proto=icmp icmptype=8",
        "action=accept proto=icmp",
    ])
    write_rules(db, WORK, "accept", ["action=drop dst4=10.0.0.0/8"])
    write_rules(db, WEB6, "drop", ["action=accept proto=udp dst6=2001:db8::/32"])
    return db


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def make_worker(db: MemoryQubesDB, tmp: Path) -> Worker:
    resolv = tmp / "resolv.conf"
    resolv.write_text("nameserver 10.139.1.1\nnameserver 10.139.1.2\nnameserver 127.0.0.53\n")
    return Worker(db, Nft(), resolver=fake_resolve, resolv_conf=resolv)  # type: ignore[arg-type]


def start(db: MemoryQubesDB, tmp: Path) -> Worker:
    worker = make_worker(db, tmp)
    worker.init_tables()
    worker.reload()
    return worker


def test_initial_load_builds_upstream_layout(netns: str, tmp_path: Path) -> None:
    def body() -> dict[str, bytes]:
        db = base_db()
        start(db, tmp_path)
        return db.entries

    entries = in_netns(netns, body)
    assert chain_rules(netns, "ip", "qubes-firewall", "forward") == [
        "ct state established,related accept",
        'iifname != "vif*" accept',
        "ip saddr 10.137.0.5 jump qbs-10-137-0-5",
        "ip saddr 10.137.0.6 jump qbs-10-137-0-6",
    ]
    assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-5") == [
        "ip daddr 192.168.1.0/24 tcp dport 443 accept",
        "ip daddr { 192.0.2.7, 192.0.2.10 } tcp dport 80-81 accept",
        "meta l4proto { tcp, udp } ip daddr { 10.139.1.1, 10.139.1.2 } th dport 53 accept",
        f"icmp type echo-request {REJECT}",
        "meta l4proto icmp accept",
        REJECT,
    ]
    assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-6") == [
        f"ip daddr 10.0.0.0/8 {REJECT}",
        "accept",
    ]
    assert chain_rules(netns, "ip", "qubes-firewall", "prerouting") == [
        'iifname != "vif*" ip saddr { 10.137.0.5, 10.137.0.6 } drop',
    ]
    assert chain_rules(netns, "ip6", "qubes-firewall", "forward")[-1] == (
        "ip6 saddr fd09:24ef:4179::a89:5 jump qbs-fd09-24ef-4179--a89-5"
    )
    assert chain_rules(netns, "ip6", "qubes-firewall", "qbs-fd09-24ef-4179--a89-5") == [
        "meta l4proto udp ip6 daddr 2001:db8::/32 accept",
        "reject with icmpv6 admin-prohibited",
    ]
    chains = {i["chain"]["name"]: i["chain"] for i in nft_ruleset(netns) if "chain" in i}
    assert chains["forward"]["policy"] == "drop"
    assert entries["/dns/10.137.0.5/www.example.com"] == b"{'192.0.2.7/32', '192.0.2.10/32'}"
    assert entries["/qubes-firewall-handled/10.137.0.5"] == b"1"
    assert entries["/qubes-firewall-handled/fd09:24ef:4179::a89:5"] == b"1"


def _handles(worker: Worker, chain: str) -> list[int]:
    listing = worker.nft.list_table("ip") or {}
    return [
        item["rule"]["handle"]
        for item in listing.get("nftables", [])
        if "rule" in item and item["rule"]["chain"] == chain
    ]


def test_changes_touch_only_their_chain_and_keep_user_rules(netns: str, tmp_path: Path) -> None:
    def body() -> list[Any]:
        db = base_db()
        start(db, tmp_path)
        worker = make_worker(db, tmp_path)
        worker.nft.run("add rule ip qubes-firewall forward tcp dport 9999 accept")
        worker.reload()  # a fresh worker on the live table sends only differences
        work_before = _handles(worker, "qbs-10-137-0-6")
        write_rules(db, WEB, "accept", ["action=drop proto=tcp dstports=25-25"])
        worker.handle(Changes(sources={WEB}))
        work_after = _handles(worker, "qbs-10-137-0-6")
        db.write("/connected-ips", WEB)
        worker.handle(Changes(connected=True))
        return [work_before == work_after, db.entries["/qubes-firewall-handled/10.137.0.5"]]

    assert in_netns(netns, body) == [True, b"3"]
    assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-5") == [
        f"tcp dport 25 {REJECT}",
        "accept",
    ]
    assert chain_rules(netns, "ip", "qubes-firewall", "forward") == [
        "ct state established,related accept",
        'iifname != "vif*" accept',
        "ip saddr 10.137.0.5 jump qbs-10-137-0-5",
        "tcp dport 9999 accept",
    ]
    chains = {i["chain"]["name"] for i in nft_ruleset(netns) if "chain" in i}
    assert "qbs-10-137-0-6" not in chains
    assert chain_rules(netns, "ip", "qubes-firewall", "prerouting") == [
        'iifname != "vif*" ip saddr 10.137.0.5 drop',
    ]


def test_restart_restores_the_same_ruleset(netns: str, tmp_path: Path) -> None:
    in_netns(netns, lambda: start(base_db(), tmp_path) and None)
    first = nft_ruleset(netns)
    in_netns(netns, lambda: start(base_db(), tmp_path) and None)
    assert nft_ruleset(netns) == first


def test_deleted_table_heals_and_cleanup_removes_both(netns: str, tmp_path: Path) -> None:
    def body() -> list[str]:
        db = base_db()
        worker = start(db, tmp_path)
        worker.nft.run("delete table ip qubes-firewall")
        worker.handle(Changes(connected=True))
        healed = worker.nft.list_table("ip") is not None
        worker.cleanup()
        return [str(healed), str(worker.nft.list_table("ip")), str(worker.nft.list_table("ip6"))]

    assert in_netns(netns, body) == ["True", "None", "None"]


def test_refused_transaction_keeps_previous_ruleset_and_blocks_source(
    netns: str, tmp_path: Path
) -> None:
    def body() -> list[str]:
        captured = Captured()
        logging.getLogger("qubes.firewall").addHandler(captured)
        db = base_db()
        worker = start(db, tmp_path)
        real = ruleset.rule_text

        def broken(rule: Any, *args: Any) -> str | None:
            if rule.dstports == (666, 666):
                return "tcp dport 70000 accept"  # nft refuses this
            return real(rule, *args)

        ruleset.rule_text = broken
        write_rules(db, WORK, "drop", ["action=accept proto=tcp dstports=666-666"])
        worker.handle(Changes(sources={WORK}))
        return captured.lines

    lines = in_netns(netns, body)
    assert any("nft refused the update, the previous ruleset stays" in line for line in lines)
    assert any(
        line.startswith("blocking all traffic from 10.137.0.6: nft refused its rules")
        for line in lines
    )
    assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-6") == [REJECT]
    assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-5")[-1] == REJECT


def test_unresolvable_name_blocks_the_source(netns: str, tmp_path: Path) -> None:
    def body() -> dict[str, bytes]:
        db = base_db()
        write_rules(db, WORK, "accept", ["action=accept dsthost=nowhere.invalid"])
        start(db, tmp_path)
        return db.entries

    entries = in_netns(netns, body)
    assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-6") == [REJECT]
    assert not any(k.startswith("/dns/10.137.0.6/") for k in entries)


_WORDS = st.sampled_from([
    "proto=tcp", "proto=udp", "proto=icmp", "dst4=10.1.2.3/16", "dst4=0.0.0.0/0",
    "dst6=fd00::1/64", "dst6=::/0", "dsthost=www.example.com", "dstports=0-65535",
    "dstports=53-53", "dstports=1-1", "icmptype=0", "icmptype=255", "specialtarget=dns",
])
_RULE = st.builds(
    lambda action, words: " ".join([action, *dict.fromkeys(words)]),
    st.sampled_from(["action=accept", "action=drop"]),
    st.lists(_WORDS, max_size=4),
)
_SERVERS = frozenset(ipaddress.ip_address(a) for a in ("10.139.1.1", "2001:db8::53"))


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(_RULE, max_size=5), st.sampled_from([4, 6]), st.sampled_from(["accept", "drop"]))
def _every_parsed_rule_set_is_accepted_by_nft(rules: list[str], version: int, policy: str) -> None:
    entries = {f"{n:04d}": r.encode() for n, r in enumerate(rules)} | {"policy": policy.encode()}
    parsed = parse_source(entries, version)  # type: ignore[arg-type]
    if isinstance(parsed, Blocked):
        return
    names = {"www.example.com": fake_resolve("www.example.com", version)}
    family = "ip" if version == 4 else "ip6"
    chain = source_chain(Resolved(parsed, names), family, _SERVERS)  # type: ignore[arg-type]
    try:
        Nft().run(chain_check_commands(family, "qbs-check", chain), check=True)  # type: ignore[arg-type]
    except NftError as err:
        raise AssertionError(f"nft refused {entries}: {err}") from None


def test_fuzz_nft_accepts_every_rule_set_the_parser_accepts(netns: str) -> None:
    in_netns(netns, _every_parsed_rule_set_is_accepted_by_nft)
