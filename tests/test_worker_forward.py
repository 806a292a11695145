"""The worker's forward half: /qns-forward/ entries to qns-* chains, and real traffic.

Pure tests first (event sorting, fuzzed step text), then the Forwarder
against the kernel in a throwaway namespace with the Qubes base ruleset,
then the worker as a process in a hop between a LAN client and two
qubes, with TCP and UDP going through it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from worker_netns import (
    CLIENT_ADDRESS,
    GUARDS_LISTED,
    HOP_UPLINK,
    QUBE,
    USER_RULE,
    MemoryQubesDB,
    NoFlows,
    WorkerProcess,
    chain_rules,
    dnat_elements,
    in_netns,
    load_base_ruleset,
    make_netns,
    nft_ruleset,
    ns_run,
    probe,
    qubesdb_server,
    remove_directory,
    reply_routes,
    reply_rules,
    serving,
    start_worker,
    wait_for,
    wire_hop,
    write_directory,
)

from agent_worker import forward_steps, reply_route
from agent_worker.conntrack import Flow, Match
from agent_worker.directory import Changes, classify, concerns, ours
from agent_worker.entries import EntryError
from agent_worker.firewall import Nft
from agent_worker.forwarder import FORWARD_DIR, Forwarder, nat_table_commands
from agent_worker.nft_chains import NftError
from lab.pyshim import qubesdb

WEB, WORK = "10.137.0.5", "10.137.0.6"
WEB_TCP = f"proto=tcp ports=8080-8080 iif=upstream daddr=local to={WEB} toports=80-80"
WEB_UDP = f"proto=udp ports=5353-5353 iif=upstream daddr=local to={WEB} toports=53-53"
WORK_TCP = f"proto=tcp ports=2222-2222 iif=upstream daddr=local to={WORK} toports=22-22"
#: this hop's clients: rules only point at them
CONNECTED = {"/connected-ips": f"{WEB} {WORK}", "/connected-ips6": "fd09:24ef:4179::a89:5"}


def write_forwards(db: Any, target: str, steps: list[str] | list[bytes]) -> None:
    write_directory(db, f"/qns-forward/{target}", steps)


def remove_forwards(db: Any, target: str) -> None:
    remove_directory(db, f"/qns-forward/{target}")


def handled(db: Any, target: str) -> int:
    return int(db.read(f"/qns-forward_handled/{target}") or b"0")


# -- pure -------------------------------------------------------------------


def test_events_wait_for_the_completion_path() -> None:
    assert classify([f"/qns-forward/{WEB}/0000", f"/qns-forward/{WEB}/"], FORWARD_DIR) == Changes()
    assert classify([f"/qns-forward/{WEB}", "/qns-forward/fd09::5"], FORWARD_DIR) == Changes(
        targets={WEB, "fd09::5"}
    )
    assert classify(["/qns-forward/"], FORWARD_DIR).full
    assert classify(["/"], FORWARD_DIR).full
    assert classify(["/qubes-firewall/10.137.0.5"], FORWARD_DIR) == Changes()
    assert classify(["/connected-ips", "/connected-ips6"], FORWARD_DIR) == Changes(connected=True)
    assert concerns("/connected-ips6", FORWARD_DIR) and not ours("/connected-ips6", FORWARD_DIR)
    assert not concerns("/qubes-firewall/", FORWARD_DIR)
    assert not concerns("/qns-forward_handled/10.137.0.5", FORWARD_DIR)
    assert ours("/qns-forward", FORWARD_DIR) and not ours("/", FORWARD_DIR)


def host_forwarder(db: MemoryQubesDB, runner: Any) -> Forwarder:
    """A Forwarder for tests in this process's namespace: no conntrack, no sockets of the host."""
    return Forwarder(db, runner, tool=NoFlows(), own_sockets=lambda: [])


class ListingOnly:
    """A runner for a kernel whose ``qubes`` tables hold only a forward chain; records the rest.

    Its listings: ``list chains`` (the ``qubes`` table's chains), ``list
    chain`` (no rules: the user's ``custom-input``, the parent of our jump),
    ``list tables`` (none of ours).
    """

    def __init__(self, tables: bool = True, parent: str = "forward") -> None:
        self.tables = tables
        self.parent = parent
        self.sent: list[str] = []

    def __call__(self, commands: str, *, check: bool = False) -> str:
        if commands.startswith(("list chain ", "list tables")):
            return json.dumps({"nftables": []})
        if commands.startswith("list chains"):
            if not self.tables:
                raise NftError("Error: No such file or directory")
            return json.dumps({"nftables": [
                {"chain": {"family": "ip", "table": "qubes", "name": self.parent}},
            ]})
        self.sent.append(commands)
        return ""


class OrderedTable:
    """A conntrack table holding one flow WEB_TCP made; records what nft held when it was used."""

    def __init__(self, runner: ListingOnly) -> None:
        self.runner = runner
        self.flow = Flow(4, "tcp", ipaddress.ip_address("192.0.2.10"),
                         ipaddress.ip_address("192.0.2.2"), 40000, 8080,
                         ipaddress.ip_address(WEB), 80)
        self.events: list[tuple[str, int]] = []

    def list(self, version: int, match: Match) -> list[Flow]:
        self.events.append(("list", len(self.runner.sent)))
        return [self.flow] if version == 4 else []

    def delete(self, flow: Flow) -> None:
        assert flow == self.flow
        self.events.append(("delete", len(self.runner.sent)))


def test_a_removed_step_leaves_nft_before_its_flows_are_ended() -> None:
    """New connections are refused from the transaction on; the flows go right after."""
    db = MemoryQubesDB(CONNECTED)
    write_forwards(db, WEB, [WEB_TCP])
    write_forwards(db, WORK, [WORK_TCP])  # our table stays: the removal is one element
    runner = ListingOnly()
    table = OrderedTable(runner)
    forwarder = Forwarder(db, runner, tool=table, own_sockets=lambda: [])
    forwarder.reload()
    assert table.events == [] and goes_to(runner.sent[-1], WEB, 80)
    remove_forwards(db, WEB)
    forwarder.handle(forwarder.classify([f"/qns-forward/{WEB}"]))
    removal = len(runner.sent)
    assert runner.sent[-1].startswith("delete element") and "tcp . 8080 }" in runner.sent[-1]
    assert table.events == [("list", removal), ("delete", removal)]


def goes_to(text: str, address: str, port: int) -> bool:
    """Whether nft text holds a DNAT map element sending to ``address`` port ``port``."""
    return f": {address} . {port}" in text


def test_bad_entry_fails_its_target_only_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    db = MemoryQubesDB(CONNECTED)
    write_forwards(db, WEB, [WEB_TCP])
    write_forwards(db, WORK, [WORK_TCP, "proto=tcp ports=1-1"])
    db.write("/qns-forward/010.137.0.7", "")
    db.write("/qns-forward/10.0.0.1\nqubes-firewall: INFO: forged", "")
    runner = ListingOnly()
    with caplog.at_level(logging.INFO, logger="qubes.firewall"):
        host_forwarder(db, runner).reload()
    (text,) = runner.sent
    assert goes_to(text, WEB, 80)
    assert WORK not in text
    assert f"no forwards to {WORK}: entry 0001: missing daddr, iif, to, toports" in caplog.messages
    assert any(m.startswith("ignoring '/qns-forward/010.137.0.7'") for m in caplog.messages)
    assert "\n" not in "".join(caplog.messages)  # untrusted path text is quoted
    assert handled(db, WORK) == 1 and handled(db, WEB) == 1


def test_steps_of_another_family_than_the_target_are_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = MemoryQubesDB(CONNECTED)
    write_forwards(db, "fd09:24ef:4179::a89:5", [_GOOD[2], WEB_TCP])
    runner = ListingOnly()
    with caplog.at_level(logging.INFO, logger="qubes.firewall"):
        host_forwarder(db, runner).reload()
    assert runner.sent == []
    assert (
        "no forwards to fd09:24ef:4179::a89:5: entry 0001: to of another family than the target"
        in caplog.messages
    )


def test_steps_go_to_connected_clients_only(caplog: pytest.LogCaptureFixture) -> None:
    """A stale entry (dom0 missed its removal) never reaches a qube reusing the address."""
    db = MemoryQubesDB(CONNECTED)
    write_forwards(db, WEB, [WEB_TCP, WEB_UDP])
    write_forwards(db, WORK, [WORK_TCP])
    runner = ListingOnly()
    forwarder = host_forwarder(db, runner)
    forwarder.reload()
    assert goes_to(runner.sent[-1], WEB, 80) and goes_to(runner.sent[-1], WORK, 22)

    db.write("/connected-ips", WORK)
    with caplog.at_level(logging.INFO, logger="qubes.firewall"):
        forwarder.handle(forwarder.classify(["/connected-ips"]))
        forwarder.handle(forwarder.classify(["/connected-ips6"]))  # nothing changed: nothing sent
        # the same again: nothing sent
        forwarder.handle(forwarder.classify([f"/qns-forward/{WORK}"]))
    assert len(runner.sent) == 2
    # web's elements go (deleted by key), work's stay as they are
    assert runner.sent[1].startswith("delete element ip qubes-network-server")
    assert "tcp . 8080" in runner.sent[1] and "udp . 5353" in runner.sent[1]
    assert "add element" not in runner.sent[1] and "2222" not in runner.sent[1]
    skipped = [m for m in caplog.messages if "not a connected client" in m]
    assert skipped == [f"forwards to {WEB}: leaving out what goes to {WEB}: not a connected client"]

    db.write("/connected-ips", f"{WORK} {WEB}")
    forwarder.handle(forwarder.classify(["/connected-ips"]))
    assert goes_to(runner.sent[-1], WEB, 80) and not goes_to(runner.sent[-1], WORK, 22)

    # at a hop before the last, ``to`` is the next hop: a client of this hop, not the target
    write_forwards(db, "10.137.0.99", [WEB_TCP.replace("ports=8080-8080", "ports=8081-8081")])
    forwarder.handle(forwarder.classify(["/qns-forward/10.137.0.99"]))
    assert runner.sent[-1] == (
        "add element ip qubes-network-server qns-dnat-upstream-local"
        f" {{ tcp . 8081 : {WEB} . 80 }}\n"
    )


def test_a_step_meeting_another_targets_port_fails_its_target(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Map keys must not meet: of two targets on one port, the later in address order goes."""
    db = MemoryQubesDB(CONNECTED)
    write_forwards(db, WEB, [WEB_TCP])
    write_forwards(db, WORK, [WORK_TCP, WORK_TCP.replace("ports=2222-2222", "ports=8080-8080")])
    runner = ListingOnly()
    with caplog.at_level(logging.INFO, logger="qubes.firewall"):
        host_forwarder(db, runner).reload()
    (text,) = runner.sent
    assert goes_to(text, WEB, 80) and WORK not in text
    assert (f"no forwards to {WORK}: tcp ports 8080-8080 meet those of the step to {WEB}"
            " (8080-8080)") in caplog.messages


def test_nothing_to_forward_leaves_table_qubes_alone() -> None:
    runner = ListingOnly()
    host_forwarder(MemoryQubesDB(CONNECTED), runner).reload()
    assert runner.sent == []
    missing = ListingOnly(tables=False)
    db = MemoryQubesDB(CONNECTED)
    write_forwards(db, WEB, [WEB_TCP])
    host_forwarder(db, missing).reload()
    assert missing.sent == []
    no_forward_chain = ListingOnly(parent="prerouting")  # upstream's ip6 qubes, IPv6 off
    host_forwarder(db, no_forward_chain).reload()
    assert no_forward_chain.sent == []


def step_text(step: forward_steps.Step) -> str:
    """The canonical text of a parsed step, as dom0 writes it."""
    words = [
        f"proto={step.proto}", f"ports={step.ports[0]}-{step.ports[1]}", f"iif={step.iif}",
        f"daddr={step.daddr}", f"to={step.to}",
        f"toports={step.toports[0]}-{step.toports[1]}",
    ]
    if step.srchost is not None:
        words.append(f"srchost={step.srchost}")
    return " ".join(words)


_GOOD = [
    WEB_TCP,
    f"proto=udp ports=5000-5002 iif=downstream daddr=10.137.0.1 to={WORK} toports=6000-6002 "
    "srchost=10.137.0.0/24",
    "proto=tcp ports=443-443 iif=upstream daddr=local to=fd09:24ef:4179::a89:5 toports=443-443",
]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """A good step with a few characters inserted, deleted or replaced."""
    text = draw(st.sampled_from(_GOOD))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.text(min_size=1, max_size=3))
        if kind == "insert":
            text = text[:at] + piece + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + len(piece) :]
        else:
            text = text[:at] + piece + text[at + len(piece) :]
    return text


@settings(max_examples=500, deadline=None)
@given(mutated())
def test_fuzzed_step_text_parses_exactly_or_is_refused(untrusted_text: str) -> None:
    try:
        step = forward_steps.parse_step(untrusted_text)
    except EntryError:
        return
    # Whatever passes is what dom0 would have written for it, word for word.
    assert sorted(step_text(step).split(" ")) == sorted(untrusted_text.split(" "))
    assert forward_steps.parse_step(step_text(step)) == step


@given(st.lists(st.one_of(st.sampled_from(_GOOD), mutated()), min_size=1, max_size=4))
def test_fuzzed_target_is_all_or_nothing(untrusted_steps: list[str]) -> None:
    entries = {
        f"{n:04d}": s.encode("utf-8", "surrogatepass") for n, s in enumerate(untrusted_steps)
    }
    try:
        steps = forward_steps.parse_target(entries)
    except EntryError:
        return
    assert [sorted(step_text(s).split(" ")) for s in steps] == [
        sorted(s.split(" ")) for s in untrusted_steps
    ]


# -- the Forwarder against the kernel -----------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    yield from make_netns()


@pytest.mark.lab
def test_chains_sit_after_custom_forward_and_go_with_the_last_target(netns: str) -> None:
    load_base_ruleset(netns)
    original = nft_ruleset(netns)

    def body() -> None:
        db = MemoryQubesDB(CONNECTED)
        write_forwards(db, WEB, [WEB_TCP, WEB_UDP])
        write_forwards(db, "fd09:24ef:4179::a89:5", [_GOOD[2]])
        forwarder = Forwarder(db, Nft().run)
        forwarder.reload()
        forwarder.reload(force=True)  # written whole again: no second jump

    in_netns(netns, body)
    assert chain_rules(netns, "ip", "qubes", "forward")[:3] == [
        "jump custom-forward",
        "jump qns-forward",
        "ct state invalid counter packets 0 bytes 0 drop",
    ]
    assert chain_rules(netns, "ip", "qubes", "custom-forward") == [
        "tcp dport 9999 counter packets 0 bytes 0 accept"
    ]
    # a handful of lookups, whatever the number of steps
    assert chain_rules(netns, "ip", "qubes", "qns-forward") == [
        *GUARDS_LISTED, "ct label 127 accept",
    ]
    assert chain_rules(netns, "ip", "qubes-network-server", "qns-dnat")[:2] == [
        "fib daddr type != local return", "meta l4proto != { tcp, udp } return",
    ]
    assert dnat_elements(netns) == {f"tcp . 8080 : {WEB} . 80", f"udp . 5353 : {WEB} . 53"}
    assert dnat_elements(netns, "ip6") == {"tcp . 443 : fd09:24ef:4179::a89:5 . 443"}

    def remove_all() -> None:
        db = MemoryQubesDB(CONNECTED)
        write_forwards(db, WEB, [WEB_TCP])
        forwarder = Forwarder(db, Nft().run)
        forwarder.reload()
        remove_forwards(db, WEB)
        forwarder.handle(forwarder.classify([f"/qns-forward/{WEB}/", f"/qns-forward/{WEB}"]))

    in_netns(netns, remove_all)
    assert nft_ruleset(netns) == original  # user rule kept, nothing of ours left


@pytest.mark.lab
def test_a_change_sends_only_its_elements_and_nothing_when_nothing_changed(netns: str) -> None:
    load_base_ruleset(netns)

    def body() -> list[str]:
        sent: list[str] = []
        nft = Nft()

        def runner(commands: str, *, check: bool = False) -> str:
            if not commands.startswith("list "):
                sent.append(commands)
            return nft.run(commands, check=check)

        db = MemoryQubesDB(CONNECTED)
        write_forwards(db, WEB, [WEB_TCP])
        forwarder = Forwarder(db, runner, tool=NoFlows())
        forwarder.reload()
        forwarder.reload()  # nothing changed
        write_forwards(db, WORK, [WORK_TCP])
        forwarder.handle(forwarder.classify([f"/qns-forward/{WORK}"]))
        forwarder.handle(forwarder.classify([f"/qns-forward/{WORK}"]))  # the same again
        remove_forwards(db, WORK)
        forwarder.handle(forwarder.classify([f"/qns-forward/{WORK}"]))
        return sent

    first, added, removed = in_netns(netns, body)
    assert "add table ip qubes-network-server" in first
    where = "ip qubes-network-server qns-dnat-upstream-local"
    assert added == f"add element {where} {{ tcp . 2222 : {WORK} . 22 }}\n"
    assert removed == f"delete element {where} {{ tcp . 2222 }}\n"
    assert dnat_elements(netns) == {f"tcp . 8080 : {WEB} . 80"}


@pytest.mark.lab
def test_a_named_hop_address_must_still_be_local(netns: str) -> None:
    """``daddr=X`` alone would DNAT transit traffic to X if X is stale or wrong."""
    load_base_ruleset(netns)

    def body() -> None:
        db = MemoryQubesDB(CONNECTED)
        write_forwards(db, WORK, [_GOOD[1]])
        Forwarder(db, Nft().run).reload()

    in_netns(netns, body)
    assert f"10.137.0.0/24 . 10.137.0.1 . udp . 5000 : {WORK} . 6000" in dnat_elements(netns)
    # every lookup comes after this: nothing but local destinations is ever translated
    assert chain_rules(netns, "ip", "qubes-network-server", "qns-dnat")[0] == (
        "fib daddr type != local return"
    )


@pytest.mark.lab
def test_refused_target_is_left_out_and_the_rest_applies(netns: str) -> None:
    load_base_ruleset(netns)

    def body() -> list[str]:
        lines: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("qubes.firewall").addHandler(handler)
        real = forward_steps.dnat_elements

        def broken(step: forward_steps.Step) -> tuple[tuple[str, str], ...]:
            if str(step.to) == WORK:  # nft refuses this port
                return (("qns-dnat-upstream-local", f"tcp . 70000 : {WORK} . 22"),)
            return real(step)

        forward_steps.dnat_elements = broken  # type: ignore[assignment]
        db = MemoryQubesDB(CONNECTED)
        write_forwards(db, WEB, [WEB_TCP])
        write_forwards(db, WORK, [WORK_TCP])
        forwarder = Forwarder(db, Nft().run)
        forwarder.reload()
        forwarder.handle(Changes(targets={WORK}))
        return lines

    lines = in_netns(netns, body)
    assert any(line.startswith("nft refused the forward update") for line in lines)
    assert any(line.startswith(f"no forwards to {WORK}: nft refused its rules") for line in lines)
    assert dnat_elements(netns) == {f"tcp . 8080 : {WEB} . 80"}


_WORDS = st.sampled_from([
    "proto=tcp", "proto=udp", "ports=1-1", "ports=65535-65535", "ports=100-103",
    "toports=1-1", "toports=200-203", "toports=65535-65535", "iif=upstream",
    "iif=downstream", "daddr=local", "daddr=10.137.0.1", "daddr=fd09::1", "to=10.137.0.9",
    "to=fd09::9", "srchost=0.0.0.0/0", "srchost=192.0.2.0/24", "srchost=2001:db8::/32",
    "srchost=10.1.2.3/32",
])


def _every_parsed_step_is_accepted_by_nft() -> None:
    nft = Nft()

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(_WORDS, min_size=6, max_size=7, unique=True))
    def check(words: list[str]) -> None:
        try:
            step = forward_steps.parse_step(" ".join(words))
        except EntryError:
            return
        family = "ip" if step.to.version == 4 else "ip6"
        text = nat_table_commands(family, forward_steps.family_elements([step])[family])
        try:
            nft.run(text, check=True)
        except NftError as err:
            raise AssertionError(f"nft refused {words}: {err}") from None

    check()


@pytest.mark.lab
def test_fuzz_nft_accepts_every_step_the_parser_accepts(netns: str) -> None:
    load_base_ruleset(netns)
    in_netns(netns, _every_parsed_step_is_accepted_by_nft)


# -- the worker as a process in a hop, with traffic ---------------------------


@dataclass
class Hop:
    client: str
    hop: str
    web: str
    work: str
    db: qubesdb.QubesDB
    worker: WorkerProcess

    def rewrite(self, target: str, steps: list[str] | list[bytes]) -> None:
        before = handled(self.db, target)
        write_forwards(self.db, target, steps)
        wait_for(lambda: handled(self.db, target) > before, what=f"worker handling {target}")

    def remove(self, target: str) -> None:
        before = handled(self.db, target)
        remove_forwards(self.db, target)
        wait_for(lambda: handled(self.db, target) > before, what=f"worker removing {target}")


@pytest.fixture
def hop(tmp_path: Path) -> Iterator[Hop]:
    with contextlib.ExitStack() as stack:
        client, hop_ns, web, work = (
            stack.enter_context(contextlib.contextmanager(make_netns)()) for _ in range(4)
        )
        wire_hop(client, hop_ns, {web: WEB, work: WORK})
        ns_run(hop_ns, "nft", "add", "rule", "ip", "qubes", "custom-forward", *USER_RULE.split())
        directory = stack.enter_context(qubesdb_server(tmp_path))
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("QUBESDB_DIR", str(directory))
            db = qubesdb.QubesDB(QUBE)
        db.write("/connected-ips", f"{WEB} {WORK}")
        worker = start_worker(hop_ns, directory, tmp_path / "worker.log")
        try:
            yield Hop(client, hop_ns, web, work, db, worker)
        finally:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(timeout=10)


@pytest.mark.lab
def test_tcp_and_udp_reach_the_target_until_the_entries_go(hop: Hop) -> None:
    assert probe(hop.client, "tcp", HOP_UPLINK, 8080) is None
    with serving(hop.web, "tcp", 80, "web-tcp"), serving(hop.web, "udp", 53, "web-udp"), \
            serving(hop.web, "tcp", 81, "not-forwarded"):
        hop.rewrite(WEB, [WEB_TCP, WEB_UDP])
        assert dnat_elements(hop.hop) == {f"tcp . 8080 : {WEB} . 80", f"udp . 5353 : {WEB} . 53"}

        assert probe(hop.client, "tcp", HOP_UPLINK, 8080) == "web-tcp"
        assert probe(hop.client, "udp", HOP_UPLINK, 5353) == "web-udp"
        assert probe(hop.client, "tcp", HOP_UPLINK, 8081) is None  # only what was named
        assert probe(hop.client, "tcp", WEB, 81) is None  # no route around the DNAT

        hop.worker.process.send_signal(signal.SIGHUP)
        wait_for(lambda: handled(hop.db, WEB) == 2, what="SIGHUP reload")
        assert probe(hop.client, "tcp", HOP_UPLINK, 8080) == "web-tcp"

        hop.remove(WEB)
        assert dnat_elements(hop.hop) == set()
        assert probe(hop.client, "tcp", HOP_UPLINK, 8080) is None
        assert probe(hop.client, "udp", HOP_UPLINK, 5353) is None
    assert hop.worker.process.poll() is None
    assert "INFO: forwards to 10.137.0.5 removed" in hop.worker.text()


@pytest.mark.lab
def test_forward_follows_the_connected_clients(hop: Hop) -> None:
    with serving(hop.web, "tcp", 80, "web-tcp"):
        hop.rewrite(WEB, [WEB_TCP])
        assert probe(hop.client, "tcp", HOP_UPLINK, 8080) == "web-tcp"
        hop.db.write("/connected-ips", WORK)  # web gone, its entries left behind
        wait_for(lambda: dnat_elements(hop.hop) == set(), what="stale forward removed")
        assert probe(hop.client, "tcp", HOP_UPLINK, 8080) is None
        hop.db.write("/connected-ips", f"{WEB} {WORK}")
        wait_for(lambda: len(dnat_elements(hop.hop)) == 1, what="forward back")
        assert probe(hop.client, "tcp", HOP_UPLINK, 8080) == "web-tcp"
    assert hop.worker.text().count(f"leaving out what goes to {WEB}") == 1


@pytest.mark.lab
def test_stop_removes_our_chains_and_keeps_the_users(hop: Hop) -> None:
    hop.rewrite(WEB, [WEB_TCP])
    assert "qns-forward" in str(nft_ruleset(hop.hop))
    assert hop.worker.stop() == 0
    ruleset = nft_ruleset(hop.hop)
    assert "qns-" not in str(ruleset)
    assert chain_rules(hop.hop, "ip", "qubes", "custom-forward") == [
        "tcp dport 9999 counter packets 0 bytes 0 accept"
    ]
    assert "stopping, removing the forward chains" in hop.worker.text()
    # a restart after a kill (no cleanup) rewrites, never stacks, and never keeps stale rules
    hop.worker = start_worker(hop.hop, Path(hop.db._socket_path).parent, hop.worker.log)
    hop.worker.process.kill()
    hop.worker.process.wait(timeout=10)
    remove_forwards(hop.db, WEB)
    write_forwards(hop.db, WORK, [WORK_TCP])
    hop.worker = start_worker(hop.hop, Path(hop.db._socket_path).parent, hop.worker.log)
    assert chain_rules(hop.hop, "ip", "qubes", "forward").count("jump qns-forward") == 1
    assert dnat_elements(hop.hop) == {f"tcp . 2222 : {WORK} . 22"}


@pytest.mark.lab
def test_the_reply_route_follows_the_gateway_and_goes_at_stop(hop: Hop) -> None:
    """The worker follows /qubes-gateway: our rule and route appear, move with it, and
    leave with a clean stop (agent_worker.reply_route)."""

    def ours() -> list[tuple[object, ...]]:
        return [*(("rule",) for r in reply_rules(hop.hop) if reply_route.is_ours(r)),
                *((dst, gateway) for dst, gateway, _dev in reply_routes(hop.hop))]

    assert ours() == []  # a hop without a gateway (the top of the path)
    hop.db.write("/qubes-gateway", CLIENT_ADDRESS)
    wait_for(lambda: ours() == [("rule",), ("default", CLIENT_ADDRESS)], what="our route")
    hop.db.write("/qubes-gateway", "192.0.2.20")
    wait_for(lambda: ours() == [("rule",), ("default", "192.0.2.20")], what="the new gateway")
    assert "IPv4 forward replies go back via 192.0.2.20 on eth0" in hop.worker.text()
    assert hop.worker.stop() == 0
    assert ours() == []


_GARBAGE = st.one_of(
    st.binary(min_size=1, max_size=120),
    mutated().map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.lists(_WORDS, min_size=1, max_size=8).map(lambda words: " ".join(words).encode()),
)


@pytest.mark.lab
def test_malformed_entries_block_that_target_only(hop: Hop) -> None:
    with serving(hop.web, "tcp", 80, "web-tcp"), serving(hop.work, "tcp", 22, "work-ssh"):
        hop.rewrite(WEB, [WEB_TCP])
        hop.rewrite(WORK, [WORK_TCP])
        assert probe(hop.client, "tcp", HOP_UPLINK, 2222) == "work-ssh"

        # a bad step next to a good one: the target gets nothing at all
        hop.rewrite(WORK, [WORK_TCP, WORK_TCP.replace("toports=22-22", "toports=22-23")])
        assert f"ERROR: no forwards to {WORK}: entry 0001: ports and toports differ in size" in (
            hop.worker.text()
        )
        assert probe(hop.client, "tcp", HOP_UPLINK, 2222) is None
        assert probe(hop.client, "tcp", HOP_UPLINK, 8080) == "web-tcp"

        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(_GARBAGE)
        def garbage(untrusted_value: bytes) -> None:
            hop.rewrite(WORK, [WORK_TCP])
            assert WORK in str(dnat_elements(hop.hop))
            hop.rewrite(WORK, [WORK_TCP.encode(), untrusted_value])
            assert hop.worker.process.poll() is None, hop.worker.text()
            try:
                forward_steps.parse_target({"0000": WORK_TCP.encode(), "0001": untrusted_value})
            except EntryError as err:
                assert WORK not in str(dnat_elements(hop.hop))
                assert f"ERROR: no forwards to {WORK}: {err}" in hop.worker.text()
            assert WEB in str(dnat_elements(hop.hop))

        garbage()
        hop.rewrite(WORK, [WORK_TCP, b"\xff"])
        assert probe(hop.client, "tcp", HOP_UPLINK, 2222) is None
        assert probe(hop.client, "tcp", HOP_UPLINK, 8080) == "web-tcp"
    assert hop.worker.process.poll() is None
