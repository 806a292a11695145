"""The worker against the real kernel: its transactions in a throwaway namespace."""

from __future__ import annotations

import ipaddress
import json
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
from agent_worker.directory import Changes
from agent_worker.firewall import Nft, NftError, Worker
from agent_worker.qdb_parse import Blocked, IPAddress, parse_source
from agent_worker.ruleset import Resolved, chain_check_commands, client_chains

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
        "ip saddr vmap @clients",
    ]
    assert elements(netns, "ip", "clients") == [
        ["10.137.0.5", {"jump": {"target": "qbs-10-137-0-5"}}],
        ["10.137.0.6", {"jump": {"target": "qbs-10-137-0-6"}}],
    ]
    assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-5") == [
        "ip daddr 192.168.1.0/24 tcp dport 443 accept",
        "ip daddr { 192.0.2.7, 192.0.2.10 } tcp dport 80-81 accept",
        "meta l4proto { tcp, udp } ip daddr @dns-addr th dport 53 accept",
        f"icmp type echo-request {REJECT}",
        "meta l4proto icmp accept",
        REJECT,
    ]
    assert elements(netns, "ip", "dns-addr") == ["10.139.1.1", "10.139.1.2"]  # no 127.0.0.53
    assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-6") == [
        f"ip daddr 10.0.0.0/8 {REJECT}",
        "accept",
    ]
    assert chain_rules(netns, "ip", "qubes-firewall", "prerouting") == [
        'iifname != "vif*" ip saddr @connected drop',
    ]
    assert elements(netns, "ip", "connected") == ["10.137.0.5", "10.137.0.6"]
    assert elements(netns, "ip6", "clients") == [
        ["fd09:24ef:4179::a89:5", {"jump": {"target": "qbs-fd09-24ef-4179--a89-5"}}],
    ]
    assert chain_rules(netns, "ip6", "qubes-firewall", "qbs-fd09-24ef-4179--a89-5") == [
        "meta l4proto udp ip6 daddr 2001:db8::/32 accept",
        "reject with icmpv6 admin-prohibited",
    ]
    chains = {i["chain"]["name"]: i["chain"] for i in nft_ruleset(netns) if "chain" in i}
    assert chains["forward"]["policy"] == "drop"
    assert entries["/dns/10.137.0.5/www.example.com"] == b"{'192.0.2.7/32', '192.0.2.10/32'}"
    assert entries["/qubes-firewall-handled/10.137.0.5"] == b"1"
    assert entries["/qubes-firewall-handled/fd09:24ef:4179::a89:5"] == b"1"


def elements(netns: str, family: str, name: str) -> list[Any]:
    """The elements of a set or map of the namespace's ``qubes-firewall`` table."""
    for item in nft_ruleset(netns):
        body = item.get("set") or item.get("map")
        if body and body["family"] == family and body["name"] == name:
            return sorted(body.get("elem", []), key=str)
    raise AssertionError(f"no {family} {name}")


def _handles(chain: str) -> list[int]:
    listing = json.loads(Nft().run("list table ip qubes-firewall"))
    return [
        item["rule"]["handle"]
        for item in listing["nftables"]
        if "rule" in item and item["rule"]["chain"] == chain
    ]


class CountingNft(Nft):
    """Our context, keeping the text of every transaction it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    def run(self, commands: str, *, check: bool = False) -> str:
        self.sent.append(commands)
        return super().run(commands, check=check)


def test_changes_touch_only_their_chain_and_keep_user_rules(netns: str, tmp_path: Path) -> None:
    def body() -> list[Any]:
        db = base_db()
        worker = start(db, tmp_path)
        worker.nft = nft = CountingNft()
        nft.run("add rule ip qubes-firewall forward tcp dport 9999 accept")
        work_before = _handles("qbs-10-137-0-6")
        write_rules(db, WEB, "accept", ["action=drop proto=tcp dstports=25-25"])
        worker.handle(Changes(targets={WEB}))
        work_after = _handles("qbs-10-137-0-6")
        db.write("/connected-ips", WEB)
        worker.handle(Changes(connected=True))
        return [work_before == work_after, db.entries["/qubes-firewall-handled/10.137.0.5"],
                nft.sent[1:]]

    same, handled, sent = in_netns(netns, body)
    assert same and handled == b"2"
    # one transaction per change, naming only what changed, and no listing of the table
    assert sent == [
        "flush chain ip qubes-firewall qbs-10-137-0-5\n"
        "add rule ip qubes-firewall qbs-10-137-0-5 meta l4proto tcp th dport 25"
        " reject with icmp type admin-prohibited\n"
        "add rule ip qubes-firewall qbs-10-137-0-5 accept\n",
        "delete element ip qubes-firewall connected { 10.137.0.6 }\n"
        "delete element ip qubes-firewall clients { 10.137.0.6 }\n"
        "flush chain ip qubes-firewall qbs-10-137-0-6\n"
        "delete chain ip qubes-firewall qbs-10-137-0-6\n",
    ]
    assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-5") == [
        f"tcp dport 25 {REJECT}",
        "accept",
    ]
    assert chain_rules(netns, "ip", "qubes-firewall", "forward")[-1] == "tcp dport 9999 accept"
    chains = {i["chain"]["name"] for i in nft_ruleset(netns) if "chain" in i}
    assert "qbs-10-137-0-6" not in chains
    assert elements(netns, "ip", "connected") == ["10.137.0.5"]


def test_an_edit_in_a_long_list_rewrites_one_block(netns: str, tmp_path: Path) -> None:
    rules = [f"action=accept proto=tcp dst4=192.168.{n % 250}.0/24 dstports={n}-{n}"
             for n in range(1000, 1300)]

    def body() -> list[Any]:
        db = base_db()
        write_rules(db, WEB, "drop", rules)
        worker = start(db, tmp_path)
        blocks = {c: _handles(c) for c in worker.kernel.clients[ipaddress.ip_address(WEB)]}
        worker.nft = nft = CountingNft()
        write_rules(db, WEB, "drop", [*rules[:150], "action=drop proto=udp", *rules[150:]])
        worker.handle(Changes(targets={WEB}))
        after = {c: _handles(c) for c in worker.kernel.clients[ipaddress.ip_address(WEB)]}
        kept = [c for c in blocks if c in after and c != "qbs-10-137-0-5"]
        return [len(blocks), len(kept), all(blocks[c] == after[c] for c in kept), nft.sent]

    count, kept, untouched, sent = in_netns(netns, body)
    assert count > 4 and kept >= count - 3 and untouched
    (transaction,) = sent
    assert transaction.count("add rule") < 100  # not the 301 rules of the list
    packet_order = []
    for rule in chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-5")[:-1]:
        packet_order += chain_rules(netns, "ip", "qubes-firewall", rule.split()[-1])
    assert len(packet_order) == 301
    assert packet_order[150] == f"meta l4proto udp {REJECT}"
    assert packet_order[151] == "ip daddr 192.168.150.0/24 tcp dport 1150 accept"


def test_restart_restores_the_same_ruleset(netns: str, tmp_path: Path) -> None:
    in_netns(netns, lambda: start(base_db(), tmp_path) and None)
    first = nft_ruleset(netns)
    in_netns(netns, lambda: start(base_db(), tmp_path) and None)
    assert nft_ruleset(netns) == first


def test_sighup_rewrite_heals_our_chains_and_keeps_user_rules(netns: str, tmp_path: Path) -> None:
    def body() -> None:
        worker = start(base_db(), tmp_path)
        worker.nft.run("add rule ip qubes-firewall forward tcp dport 9999 accept\n"
                       "flush chain ip qubes-firewall qbs-10-137-0-6\n"
                       "flush set ip qubes-firewall dns-addr\n")
        worker.reload(force=True)

    in_netns(netns, lambda: start(base_db(), tmp_path) and None)
    expected = nft_ruleset(netns)
    in_netns(netns, body)
    healed = nft_ruleset(netns)
    user_rule = next(i for i in healed if "rule" in i and i["rule"]["expr"][-1] == {"accept": None}
                     and i["rule"]["chain"] == "forward" and "9999" in json.dumps(i))
    healed.remove(user_rule)
    assert healed == expected


def test_deleted_table_heals_and_cleanup_removes_both(netns: str, tmp_path: Path) -> None:
    def body() -> list[str]:
        captured = Captured()
        logging.getLogger("qubes.firewall").addHandler(captured)
        db = base_db()
        worker = start(db, tmp_path)
        worker.nft.run("delete table ip qubes-firewall")
        write_rules(db, WORK, "drop", [])
        worker.handle(Changes(targets={WORK}))
        healed = chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-6")
        worker.cleanup()
        return [healed, captured.lines, Nft().run("list tables")]

    healed, lines, tables = in_netns(netns, body)
    assert healed == [REJECT]
    assert "no client's rules explain it: rebuilding the qubes-firewall tables" in lines
    assert json.loads(tables)["nftables"][1:] == []


def test_refused_transaction_blocks_only_the_refused_source(
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
        write_rules(db, WEB, "accept", [])
        worker.handle(Changes(targets={WORK, WEB}))
        return captured.lines

    lines = in_netns(netns, body)
    assert any(line.startswith("nft refused the update: ") for line in lines)
    assert any(
        line.startswith("blocking all traffic from 10.137.0.6: nft refused its rules")
        for line in lines
    )
    assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-6") == [REJECT]
    assert chain_rules(netns, "ip", "qubes-firewall", "qbs-10-137-0-5") == ["accept"]


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

@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(_RULE, max_size=5), st.sampled_from([4, 6]), st.sampled_from(["accept", "drop"]))
def _every_parsed_rule_set_is_accepted_by_nft(rules: list[str], version: int, policy: str) -> None:
    entries = {f"{n:04d}": r.encode() for n, r in enumerate(rules)} | {"policy": policy.encode()}
    parsed = parse_source(entries, version)  # type: ignore[arg-type]
    if isinstance(parsed, Blocked):
        return
    names = {"www.example.com": fake_resolve("www.example.com", version)}
    address = ipaddress.ip_address(WEB if version == 4 else WEB6)
    chains = client_chains(address, Resolved(parsed, names))
    try:
        Nft().run(chain_check_commands(address, chains), check=True)
    except NftError as err:
        raise AssertionError(f"nft refused {entries}: {err}") from None


def test_fuzz_nft_accepts_every_rule_set_the_parser_accepts(netns: str) -> None:
    in_netns(netns, _every_parsed_rule_set_is_accepted_by_nft)
