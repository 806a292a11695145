"""The worker's inbound half: /qns-inbound/ entries to chain qns-inbound.

Pure tests first (strict parsing, fuzz, rule text), then the half against
the kernel in a throwaway namespace with the Qubes base ruleset: where the
jump sits (after custom-forward and qns-forward, whichever came first),
a bad entry blocking only its target, removal leaving the table as Qubes
made it, and nft accepting every rule the parser accepts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from worker_netns import (
    GUARDS_LISTED,
    MemoryQubesDB,
    NoFlows,
    chain_rules,
    in_netns,
    load_base_ruleset,
    make_netns,
    nft_ruleset,
    ns_run,
    remove_directory,
    write_directory,
)

from agent_worker import inbound, nft_chains
from agent_worker.directory import Changes
from agent_worker.entries import EntryError
from agent_worker.firewall import Nft
from agent_worker.forwarder import Forwarder
from agent_worker.inbound import Inbound
from agent_worker.nft_chains import NftError

WEB, WORK = "10.137.0.20", "10.137.0.21"
WEB_IP = ipaddress.IPv4Address(WEB)
SSH = "action=accept srchost=10.137.0.21/32 proto=tcp dstports=22-22"
#: the netvm's clients: rules only protect them
CONNECTED = {"/connected-ips": f"{WEB} {WORK} 10.137.0.22"}


def write_inbound(db: Any, target: str, values: list[str] | list[bytes]) -> None:
    write_directory(db, f"/qns-inbound/{target}", values)


def remove_inbound(db: Any, target: str) -> None:
    remove_directory(db, f"/qns-inbound/{target}")


# -- pure -------------------------------------------------------------------


def test_rules_render_in_order_for_the_target_only() -> None:
    rules = inbound.parse_target(
        WEB_IP,
        {
            "0003": b"action=accept srchost=10.137.0.16/28",
            "0000": b"action=drop srchost=10.137.0.21/32 proto=tcp dstports=23-23",
            "0004": b"action=accept srchost=10.137.0.0/24 proto=icmp icmptype=8",
        },
    )
    assert inbound.desired_chains({WEB_IP: tuple(rules)}) == {
        "ip": {
            "qns-inbound": [
                inbound.ONLY_NEW_WALK,
                inbound.ONLY_SYN_OPENS,
                "iifgroup 2 ip daddr 10.137.0.20 ip saddr 10.137.0.21/32 meta l4proto tcp "
                "th dport 23 ct state new drop",
                "iifgroup 2 ip daddr 10.137.0.20 ip saddr 10.137.0.16/28 ct state new accept",
                "iifgroup 2 ip daddr 10.137.0.20 ip saddr 10.137.0.0/24 meta l4proto icmp "
                "icmp type 8 ct state new accept",
            ]
        },
        "ip6": {"qns-inbound": []},
    }


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ({"0000": b"action=accept proto=tcp dstports=22-22"}, "missing srchost"),
        ({"0000": b"action=accept srchost=2001:db8::/64"}, "another family"),
        ({"0000": b"action=forward srchost=10.0.0.0/8"}, "action must be"),
        ({"0000": b"action=accept srchost=10.0.0.1/8"}, "bad network"),
        ({"0000": b"action=accept srchost=10.0.0.0/8 dstports=1-2"}, "needs proto"),
        ({"0000": b"action=accept  srchost=10.0.0.0/8"}, "malformed word"),
        ({"0000": b"action=accept srchost=10.0.0.0/8 expire=1"}, "unknown key"),
        ({"0000": "action=accept srchost=10.0.0.0/8 \u00e9".encode()}, "not ASCII|codec"),
        ({"00000": SSH.encode()}, "unexpected key"),
        ({"0000": SSH.encode(), "0001": b"action=accept srchost=10.0.0.0/8 proto=tcp "
          b"dstports=22-22 dstports=23-23"}, "entry 0001: repeated key"),
    ],
)
def test_bad_entries_fail_the_target(entries: dict[str, bytes], reason: str) -> None:
    with pytest.raises(EntryError, match=reason):
        inbound.parse_target(WEB_IP, entries)


@given(st.dictionaries(st.text(max_size=8), st.binary(max_size=200), max_size=4))
def test_fuzzed_entries_raise_only_entry_errors(untrusted: dict[str, bytes]) -> None:
    with contextlib.suppress(EntryError):
        inbound.parse_target(WEB_IP, untrusted)


def test_events_are_the_inbound_directory_only() -> None:
    half = Inbound(MemoryQubesDB(CONNECTED), lambda *_a, **_k: "")
    assert half.classify([f"/qns-inbound/{WEB}/0000", f"/qns-inbound/{WEB}/"]) == Changes()
    assert half.classify([f"/qns-inbound/{WEB}"]) == Changes(targets={WEB})
    assert half.classify(["/qns-forward/10.137.0.20", "/qubes-firewall/10.137.0.20"]) == (
        Changes()
    )
    assert half.classify(["/"]).full
    assert not half.concerns("/qns-inbound_handled/10.137.0.20")


class Recorder:
    """A runner for a kernel whose ``qubes`` tables hold only a forward chain; records the rest."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def __call__(self, commands: str, *, check: bool = False) -> str:
        if commands.startswith("list chains"):
            return '{"nftables": [{"chain": {"table": "qubes", "name": "forward"}}]}'
        if commands.startswith("list "):
            return '{"nftables": []}'
        self.sent.append(commands)
        return ""


def test_a_bad_entry_blocks_its_target_only_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = MemoryQubesDB(CONNECTED)
    write_inbound(db, WEB, [SSH])
    write_inbound(db, "10.137.0.22", [SSH, "action=accept srchost=10.137.0.21"])
    db.write("/qns-inbound/010.137.0.7", "")
    db.write("/qns-inbound/10.0.0.1\nqubes-firewall: INFO: forged", "")
    runner = Recorder()
    with caplog.at_level(logging.INFO, logger="qubes.firewall"):
        Inbound(db, runner).reload()
    (text,) = runner.sent
    assert "ip daddr 10.137.0.20 ip saddr 10.137.0.21/32" in text
    assert "10.137.0.22" not in text
    assert any(
        m.startswith("no inbound rules to 10.137.0.22: entry 0001: network '10.137.0.21' not in")
        for m in caplog.messages
    )
    assert any(m.startswith("ignoring '/qns-inbound/010.137.0.7'") for m in caplog.messages)
    assert "\n" not in "".join(caplog.messages)  # untrusted path text is quoted
    assert db.read(f"/qns-inbound_handled/{WEB}") == b"1"
    assert db.read("/qns-inbound_handled/10.137.0.22") == b"1"


def test_rules_protect_connected_clients_only() -> None:
    db = MemoryQubesDB(CONNECTED)
    write_inbound(db, WEB, [SSH])
    runner = Recorder()
    half = Inbound(db, runner, tool=NoFlows())  # host namespace: not its flows
    half.reload()
    assert f"ip daddr {WEB}" in runner.sent[-1]
    db.write("/connected-ips", WORK)
    half.handle(half.classify(["/connected-ips"]))
    assert len(runner.sent) == 1  # an empty table gets nothing to remove
    assert half.desired(half._effective()) == {"ip": {"qns-inbound": []},
                                               "ip6": {"qns-inbound": []}}
    db.write("/connected-ips", f"{WORK} {WEB}")
    half.handle(half.classify(["/connected-ips"]))
    assert len(runner.sent) == 2 and f"ip daddr {WEB}" in runner.sent[-1]


def _jump(handle: int, target: str) -> dict[str, Any]:
    return {"rule": {"chain": "forward", "handle": handle, "expr": [{"jump": {"target": target}}]}}


def test_a_jump_before_its_anchors_is_moved_after_them() -> None:
    misplaced = [_jump(7, "qns-inbound"), _jump(3, "custom-forward"), _jump(9, "qns-forward")]
    text = nft_chains.build_transaction(
        "ip", {"qns-inbound": []}, inbound.HOOKS, items=misplaced
    ).splitlines()
    assert text[-2:] == [
        "delete rule ip qubes forward handle 7",
        "add rule ip qubes forward position 9 jump qns-inbound",
    ]
    in_place = [_jump(3, "custom-forward"), _jump(9, "qns-forward"), _jump(7, "qns-inbound")]
    text = nft_chains.build_transaction(
        "ip", {"qns-inbound": []}, inbound.HOOKS, items=in_place
    ).splitlines()
    assert not any(" qubes forward " in line for line in text)  # left where it is


# -- against the kernel -------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    yield from make_netns()


FORWARD_STEP = "proto=tcp ports=8080-8080 iif=upstream daddr=local to=10.137.0.20 toports=80-80"


def _jumps(ns: str) -> list[str]:
    return [r for r in chain_rules(ns, "ip", "qubes", "forward") if r.startswith("jump ")]


@pytest.mark.lab
@pytest.mark.parametrize("inbound_first", [True, False])
def test_inbound_jump_follows_custom_and_forward_jumps(netns: str, inbound_first: bool) -> None:
    load_base_ruleset(netns)
    original = nft_ruleset(netns)

    def body() -> None:
        db = MemoryQubesDB(CONNECTED)
        write_inbound(db, WEB, [SSH])
        db.write("/qns-forward/10.137.0.20/0000", FORWARD_STEP)
        db.write("/qns-forward/10.137.0.20", "")
        halves = [Inbound(db, Nft().run), Forwarder(db, Nft().run)]
        for half in halves if inbound_first else halves[::-1]:
            half.reload()
            half.reload()  # idempotent: no second jump

    in_netns(netns, body)
    assert _jumps(netns) == ["jump custom-forward", "jump qns-forward", "jump qns-inbound"]
    forward = chain_rules(netns, "ip", "qubes", "forward")
    vif_drop = "oifgroup 2 counter packets 0 bytes 0 drop"
    assert forward.index("jump qns-inbound") < forward.index(vif_drop)
    assert chain_rules(netns, "ip", "qubes", "qns-inbound") == [
        *GUARDS_LISTED,
        "iifgroup 2 ip daddr 10.137.0.20 ip saddr 10.137.0.21 tcp dport 22 ct state new accept",
    ]
    assert chain_rules(netns, "ip", "qubes", "custom-forward") == [
        "tcp dport 9999 counter packets 0 bytes 0 accept"
    ]

    def remove_all() -> None:
        db = MemoryQubesDB(CONNECTED)
        write_inbound(db, WEB, [SSH])
        half = Inbound(db, Nft().run)
        half.reload()
        remove_inbound(db, WEB)
        half.handle(half.classify([f"/qns-inbound/{WEB}/", f"/qns-inbound/{WEB}"]))
        Forwarder(MemoryQubesDB(CONNECTED), Nft().run).reload()

    in_netns(netns, remove_all)
    assert nft_ruleset(netns) == original  # user rule kept, nothing of ours left


@pytest.mark.lab
def test_a_misplaced_jump_is_put_back_after_custom_forward(netns: str) -> None:
    load_base_ruleset(netns)

    def apply() -> None:
        db = MemoryQubesDB(CONNECTED)
        write_inbound(db, WEB, [SSH])
        Inbound(db, Nft().run).reload()

    in_netns(netns, apply)
    handle = ns_run(netns, "nft", "-a", "list", "chain", "ip", "qubes", "forward")
    (line,) = [x for x in handle.splitlines() if "jump qns-inbound" in x]
    ns_run(netns, "nft", "delete", "rule", "ip", "qubes", "forward", "handle", line.split()[-1])
    ns_run(netns, "nft", "insert", "rule", "ip", "qubes", "forward", "jump", "qns-inbound")
    assert _jumps(netns) == ["jump qns-inbound", "jump custom-forward"]
    in_netns(netns, apply)
    assert _jumps(netns) == ["jump custom-forward", "jump qns-inbound"]


@pytest.mark.lab
def test_a_target_nft_refuses_is_left_out(netns: str) -> None:
    load_base_ruleset(netns)

    def body() -> None:
        real = inbound.forward_rule

        def broken(address: ipaddress.IPv4Address, rule: Any) -> str:
            if str(address) == "10.137.0.22":
                return "tcp dport 70000 accept"  # nft refuses this
            return real(address, rule)

        inbound.forward_rule = broken  # type: ignore[assignment]
        db = MemoryQubesDB(CONNECTED)
        write_inbound(db, WEB, [SSH])
        write_inbound(db, "10.137.0.22", [SSH])
        Inbound(db, Nft().run).reload()

    in_netns(netns, body)
    assert chain_rules(netns, "ip", "qubes", "qns-inbound") == [
        *GUARDS_LISTED,
        "iifgroup 2 ip daddr 10.137.0.20 ip saddr 10.137.0.21 tcp dport 22 ct state new accept",
    ]


_WORDS = st.sampled_from([
    "action=accept", "action=drop", "srchost=0.0.0.0/0", "srchost=10.137.0.21/32",
    "srchost=192.0.2.0/24", "srchost=2001:db8::/32", "proto=tcp", "proto=udp", "proto=icmp",
    "dstports=1-1", "dstports=22-22", "dstports=1-65535", "icmptype=0", "icmptype=255",
])


def _every_parsed_rule_is_accepted_by_nft() -> None:
    nft = Nft()

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(_WORDS, min_size=2, max_size=4, unique=True))
    def check(words: list[str]) -> None:
        try:
            rules = inbound.parse_target(WEB_IP, {"0000": " ".join(words).encode()})
        except EntryError:
            return
        half = Inbound(MemoryQubesDB(CONNECTED), nft.run)
        text, _held = half._commands({WEB_IP: tuple(rules)}, {})
        try:
            nft.run(text, check=True)
        except NftError as err:
            raise AssertionError(f"nft refused {words}: {err}") from None

    check()


@pytest.mark.lab
def test_fuzz_nft_accepts_every_rule_the_parser_accepts(netns: str) -> None:
    load_base_ruleset(netns)
    in_netns(netns, _every_parsed_rule_is_accepted_by_nft)
