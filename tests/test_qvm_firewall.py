"""qvm-firewall end to end: the command as a process, qubesd on a real socket."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from admin_api_fixture import REPO, Dom0, running_dom0
from conftest import cannot_run

from admin_client_patch.firewall import parse_routing, parse_rule_number
from admin_client_patch.qubesd_client import QubesDaemonCommunicationError
from admin_client_patch.qvm_firewall import get_parser
from admin_client_patch.qvm_firewall_run import FORWARD_HEADER, HEADER, INBOUND_HEADER, list_rules
from core_admin_patch import admin_api
from firewall_rules import Rule, RuleKind, RuleLists, save_firewall_xml


@pytest.fixture
def dom0(tmp_path: Path) -> Iterator[Dom0]:
    with running_dom0(tmp_path) as running:
        yield running


def canonical(line: str) -> str:
    return Rule.from_api_string(line).api_rule


def ok(dom0: Dom0, *args: str) -> str:
    result = dom0.qvm_firewall(*args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def fails(dom0: Dom0, *args: str, code: int = 1) -> str:
    """Run a command that must fail; its one-line message (no traceback)."""
    result = dom0.qvm_firewall(*args)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    if code == 1:
        assert result.stderr.startswith("qvm-firewall: error: ")
        assert result.stderr.count("\n") == 1, result.stderr
    else:  # argparse: usage line(s), then "qvm-firewall[ VMNAME ACTION]: error: ..."
        assert result.stderr.startswith("usage: qvm-firewall")
        assert result.stderr.splitlines()[-1].startswith("qvm-firewall")
    return result.stderr.splitlines()[-1].partition(": error: ")[2]


def raw(dom0: Dom0, qube: str = "web") -> list[str]:
    return ok(dom0, "--raw", qube, "list").splitlines()


def rows(lines: Sequence[str], header: Sequence[str]) -> list[dict[str, str]]:
    """Rows of one table, split on its header's column starts."""
    starts: list[int] = []
    for previous, title in zip(("", *header), header, strict=False):
        starts.append(lines[0].index(title, starts[-1] + len(previous) if starts else 0))
    ends = [*starts[1:], None]
    assert [lines[0][a:b].strip() for a, b in zip(starts, ends, strict=True)] == list(header)
    return [
        dict(zip(header, (line[a:b].strip() for a, b in zip(starts, ends, strict=True)),
                 strict=True))
        for line in lines[1:]
    ]


def sections(dom0: Dom0, qube: str = "web") -> dict[str, list[str]]:
    """The listing cut at its blank lines: ``outbound`` first, then each section by its title."""
    blocks = ok(dom0, qube).split("\n\n")
    found = {"outbound": blocks[0].splitlines()}
    for block in blocks[1:]:
        title, *lines = block.splitlines()
        found[title] = lines
    return found


def table(dom0: Dom0, qube: str = "web") -> list[dict[str, str]]:
    return rows(sections(dom0, qube)["outbound"], HEADER)


# --- outbound rules: upstream's command, upstream's table -----------------------


def test_an_outbound_only_listing_is_upstreams_table(dom0: Dom0) -> None:
    """The rules and expected lines of upstream's own test_001_list_default."""
    for words in (
        ("action=accept", "dsthost=qubes-os.org", "proto=tcp", "dstports=443"),
        ("action=drop", "proto=icmp", "icmptype=8"),
        ("action=accept", "specialtarget=dns", "comment=Allow", "DNS"),
    ):
        ok(dom0, "web", "add", *words)
    ok(dom0, "web", "del", "--rule-no", "0")  # the default accept-all
    assert [line.strip() for line in ok(dom0, "web", "list").splitlines()] == [
        "NO  ACTION  HOST          PROTOCOL  PORT(S)  SPECIAL TARGET  ICMP TYPE  EXPIRE  COMMENT",
        "0   accept  qubes-os.org  tcp       443      -               -          -       -",
        "1   drop    -             icmp      -        -               8          -       -",
        "2   accept  -             -         -        dns             -          -       Allow DNS",
    ]
    assert ok(dom0, "web") == ok(dom0, "web", "list")


def test_default_list_is_one_accept_rule(dom0: Dom0) -> None:
    assert sections(dom0) == {"outbound": [
        "NO  ACTION  HOST  PROTOCOL  PORT(S)  SPECIAL TARGET  ICMP TYPE  EXPIRE  COMMENT",
        "0   accept  -     -         -        -               -          -       -",
    ]}
    assert raw(dom0) == ["action=accept"]


def test_add_outbound_then_list(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "action=accept", "dsthost=1.2.3.4", "proto=tcp", "dstports=443")
    assert raw(dom0) == [
        "action=accept",
        canonical("action=accept dsthost=1.2.3.4 proto=tcp dstports=443"),
    ]
    row = table(dom0)[1]
    assert (row["ACTION"], row["HOST"], row["PROTOCOL"], row["PORT(S)"]) == (
        "accept", "1.2.3.4/32", "tcp", "443"
    )
    assert dom0.host.reloaded == ["web"]


def test_upstream_shorthand_and_raw_reuse(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "drop", "10.0.0.0/8", "tcp", "22")
    added = raw(dom0)[-1]
    assert added == canonical("action=drop dsthost=10.0.0.0/8 proto=tcp dstports=22")
    # --raw output (dst4=...) can be fed back, e.g. to delete the rule.
    ok(dom0, "web", "del", *added.split())
    assert raw(dom0) == ["action=accept"]


def test_add_before_and_delete_by_number(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "action=drop", "proto=icmp")
    ok(dom0, "web", "add", "--before", "0", "action=accept", "specialtarget=dns")
    assert raw(dom0) == [
        canonical("action=accept specialtarget=dns"),
        "action=accept",
        canonical("action=drop proto=icmp"),
    ]
    ok(dom0, "web", "del", "--rule-no", "1")
    assert raw(dom0) == [
        canonical("action=accept specialtarget=dns"),
        canonical("action=drop proto=icmp"),
    ]


def test_delete_by_rule_words(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "action=drop", "proto=udp", "dstports=53")
    ok(dom0, "web", "del", "action=drop", "proto=udp", "dstports=53")
    assert raw(dom0) == ["action=accept"]


def test_the_last_outbound_rule_cannot_go(dom0: Dom0) -> None:
    """upstream's Set refuses an empty list; say what to do instead."""
    assert "add action=drop to block" in fails(dom0, "web", "del", "--rule-no", "0")
    assert raw(dom0) == ["action=accept"]


def test_reload(dom0: Dom0) -> None:
    out = ok(dom0, "--reload", "web")
    assert out.startswith("NO ")
    assert dom0.host.reloaded == ["web"]
    ok(dom0, "-r", "web", "list", "--raw")
    assert dom0.host.reloaded == ["web", "web"]


def test_expire_relative_becomes_epoch(dom0: Dom0) -> None:
    before = int(time.time())
    ok(dom0, "web", "add", "action=accept", "proto=tcp", "dstports=22", "expire=+300")
    after = int(time.time())
    added = raw(dom0)[-1].split()
    expire = int(next(w for w in added if w.startswith("expire=")).removeprefix("expire="))
    assert before + 300 <= expire <= after + 300
    row = table(dom0)[1]
    assert row["EXPIRE"].startswith("+") and row["EXPIRE"].endswith("s")
    assert 250 <= int(row["EXPIRE"][1:-1]) <= 300


def test_expire_shutdown_is_listed_as_such_and_refused_for_a_stopped_qube(dom0: Dom0) -> None:
    """Every qube of this stand-in is stopped: the rule is written as if web ran."""
    rule = "action=accept expire=shutdown srchost=10.137.0.6/32"
    message = fails(dom0, "web", "add", "action=accept", "srchost=10.137.0.6", "expire=shutdown")
    assert message == (
        "expire=shutdown: 'web' is not running (such a rule lasts until the qube stops;"
        " start it first)"
    )
    path = dom0.host.firewall_path("web")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_firewall_xml(path, RuleLists(
        outbound=(Rule.from_api_string("action=accept"),),
        inbound=(Rule.from_api_string(rule),),
    ), time.time())
    assert rule in raw(dom0)
    (inbound,) = rows(sections(dom0)["Inbound rules:"], INBOUND_HEADER)
    assert inbound["EXPIRE"] == "shutdown"


def test_comment_with_spaces(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "action=drop", "proto=tcp", "comment=no", "more", "telnet")
    assert raw(dom0)[-1].endswith("comment=no more telnet")
    assert table(dom0)[1]["COMMENT"] == "no more telnet"


# --- forward and inbound rules: their own lists, their own sections -------------

FORWARD = ("action=forward", "forwardtype=external", "proto=tcp", "srcports=8443",
           "dstports=443")
PATH = "sys-net uplink addresses tcp/8443 -> sys-firewall (10.137.0.6) tcp/8443 -> " \
    "web (10.137.0.20) tcp/443"


def test_the_design_cards_forward_works_as_written(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "action=forward", "proto=tcp", "dstports=443")
    found = sections(dom0)
    (forward,) = rows(found["Forward rules:"], FORWARD_HEADER)
    assert forward == {
        "NO": "forward:0", "TYPE": "external", "PROTOCOL": "tcp", "SRC PORT(S)": "443",
        "PORT(S)": "443", "SOURCE": "-", "EXPIRE": "-", "COMMENT": "-",
    }
    assert found["Forward paths (entry point -> each hop -> the qube):"] == [
        "  forward:0: sys-net uplink addresses tcp/443 -> sys-firewall (10.137.0.6) tcp/443"
        " -> web (10.137.0.20) tcp/443"
    ]
    assert raw(dom0) == [
        "action=accept",
        "action=forward forwardtype=external proto=tcp srcports=443-443 dstports=443-443",
    ]


def test_each_kind_goes_to_its_own_list_and_section(dom0: Dom0) -> None:
    ok(dom0, "web", "add", *FORWARD, "srchost=192.168.1.0/24", "comment=web", "server")
    ok(dom0, "web", "add", "action=accept", "srchost=10.137.0.6", "proto=tcp", "dstports=22")
    ok(dom0, "web", "add", "--before", "0", "action=drop", "proto=icmp")
    found = sections(dom0)
    assert [row["NO"] for row in rows(found["outbound"], HEADER)] == ["0", "1"]
    (forward,) = rows(found["Forward rules:"], FORWARD_HEADER)
    assert (forward["NO"], forward["SOURCE"], forward["SRC PORT(S)"], forward["PORT(S)"],
            forward["COMMENT"]) == ("forward:0", "192.168.1.0/24", "8443", "443", "web server")
    (inbound,) = rows(found["Inbound rules:"], INBOUND_HEADER)
    assert (inbound["NO"], inbound["ACTION"], inbound["SOURCE"], inbound["PORT(S)"]) == (
        "inbound:0", "accept", "10.137.0.6/32", "22"
    )
    assert list(found) == ["outbound", "Forward rules:",
                           "Forward paths (entry point -> each hop -> the qube):",
                           "Inbound rules:"]
    # What dom0 stored is what --raw shows (outbound, forward, inbound), and it reads back.
    lines = raw(dom0)
    assert [Rule.from_api_string(line).kind for line in lines] == [
        RuleKind.OUTBOUND, RuleKind.OUTBOUND, RuleKind.FORWARD, RuleKind.INBOUND
    ]
    assert all(canonical(line) == line for line in lines)


def test_numbers_name_one_rule_of_one_list(dom0: Dom0) -> None:
    ok(dom0, "web", "add", *FORWARD)
    ok(dom0, "web", "add", "--before", "forward:0", *FORWARD[:3], "srcports=8080",
       "dstports=80")
    ok(dom0, "web", "add", "--before", "0", "action=forward", "proto=udp", "dstports=53")
    assert [line.split()[3] for line in raw(dom0)[1:]] == [
        "srcports=53-53", "srcports=8080-8080", "srcports=8443-8443"
    ]
    ok(dom0, "web", "del", "--rule-no", "forward:1")
    assert len(raw(dom0)) == 3 and "8080" not in ok(dom0, "web")
    # A bare number is an outbound rule, as upstream's: forward rules are left alone.
    ok(dom0, "web", "add", "action=drop", "proto=icmp")
    ok(dom0, "web", "del", "--rule-no", "0")
    assert raw(dom0)[0] == "action=drop proto=icmp" and len(raw(dom0)) == 3
    message = fails(dom0, "web", "add", "--before", "forward:0", "action=drop", code=2)
    assert message == "--before forward:0: this outbound rule goes in the outbound list" \
        " (--before 0)"
    assert "no such rule (the forward rules are numbered forward:0 to forward:1)" in fails(
        dom0, "web", "del", "--rule-no", "forward:2")
    assert "invalid rule number 'fwd:1'" in fails(dom0, "web", "del", "--rule-no", "fwd:1",
                                                  code=2)


def test_srcqube_rules_show_the_qube_as_source(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "action=accept", "srcqube=work", "proto=tcp", "dstports=22")
    ok(dom0, "web", "add", "action=forward", "forwardtype=internal", "proto=tcp",
       "srcports=2222", "dstports=22", "srcqube=work")
    found = sections(dom0)
    (inbound,) = rows(found["Inbound rules:"], INBOUND_HEADER)
    (forward,) = rows(found["Forward rules:"], FORWARD_HEADER)
    assert (inbound["SOURCE"], inbound["PORT(S)"], forward["SOURCE"]) == ("work", "22", "work")
    assert raw(dom0)[1:] == [
        "action=forward forwardtype=internal srcqube=work proto=tcp srcports=2222-2222"
        " dstports=22-22",
        "action=accept srcqube=work proto=tcp dstports=22-22",
    ]
    message = fails(dom0, "web", "add", "action=forward", "forwardtype=external", "proto=tcp",
                    "srcports=80", "dstports=80", "srcqube=work", code=2)
    assert "needs forwardtype=internal" in message
    assert "srcqube=QUBE" in ok(dom0, "--help")


def test_reset_leaves_upstreams_default_and_no_other_rule(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "action=drop")
    ok(dom0, "web", "add", *FORWARD)
    ok(dom0, "web", "add", "action=accept", "srchost=10.137.0.6")
    ok(dom0, "web", "reset")
    assert raw(dom0) == ["action=accept"]
    assert dom0.host.firewall_path("web").read_text().count("<rule>") == 1


def test_forward_without_a_described_path(dom0: Dom0) -> None:
    dom0.host.qubes["web"].netvm = None  # nothing can reach it now
    ok(dom0, "work", "add", *FORWARD)
    dom0.host.qubes["work"].netvm = None
    assert sections(dom0, "work")["Forward paths (entry point -> each hop -> the qube):"] == [
        "  forward:0: not reachable: 'work' has no netvm: nothing can forward to it"
    ]


def test_path_numbers_follow_the_listing_when_a_rule_expired(dom0: Dom0) -> None:
    """dom0 numbers by firewall.xml position; qvm-firewall shows the listed number."""
    soon = int(time.time()) + 2
    ok(dom0, "web", "add", *FORWARD[:3], "srcports=9000", "dstports=9000", f"expire={soon}")
    ok(dom0, "web", "add", *FORWARD)
    title = "Forward paths (entry point -> each hop -> the qube):"
    assert sections(dom0)[title][1] == f"  forward:1: {PATH}"
    time.sleep(max(0.0, soon - time.time()) + 0.2)
    assert sections(dom0)[title] == [f"  forward:0: {PATH}"]  # listed first now


def test_older_dom0_without_our_calls_still_lists(
    dom0: Dom0, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(dom0, "web", "add", *FORWARD)
    monkeypatch.setitem(admin_api.METHODS, "admin.vm.firewall.Get", (("",), False))
    monkeypatch.delitem(admin_api.METHODS, "admin.vm.firewall.GetPaths")
    found = sections(dom0)
    assert len(rows(found["outbound"], HEADER)) == 1
    note = found["Forward rules:"]
    assert len(note) == 1 and note[0].startswith("  not available: dom0 did not list them (")
    # --raw is for scripts: a list it cannot read is an error, not a note
    assert "takes no argument 'forward'" in fails(dom0, "--raw", "web")


def test_port_ranges_in_the_table(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "--before", "0", "action=accept", "proto=tcp", "dstports=8000-8100")
    assert table(dom0)[0]["PORT(S)"] == "8000-8100"
    assert raw(dom0)[0].endswith("dstports=8000-8100")


# --- errors: upstream's exit codes, clean messages where upstream crashes -------


def test_bad_host(dom0: Dom0) -> None:
    assert "10.0.0.0/33" in fails(dom0, "web", "add", "action=accept", "dsthost=10.0.0.0/33",
                                  code=2)
    assert raw(dom0) == ["action=accept"]


def test_forward_srchost_must_not_be_a_name(dom0: Dom0) -> None:
    fails(dom0, "web", "add", *FORWARD, "srchost=example.com", code=2)
    assert raw(dom0) == ["action=accept"]


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (("accept", "1.2.3.4", "tcp", "80", "extra"), "surplus argument: 'extra'"),
        (("action=accept", "colour=blue"), "unknown option 'colour'"),
        (("action=accept", "expire=+soon"), "invalid expire=+soon: use EPOCH or +SECONDS"),
        (("action=accept", "comment=café"), "a rule must be ASCII text"),
    ],
)
def test_a_rule_that_does_not_parse_is_a_usage_error(
    dom0: Dom0, words: tuple[str, ...], message: str
) -> None:
    assert message in fails(dom0, "web", "add", *words, code=2)
    assert raw(dom0) == ["action=accept"]
    assert dom0.host.reloaded == []


def test_usage_errors(dom0: Dom0) -> None:
    assert "unrecognized arguments" in fails(dom0, "web", "list", "extra", code=2)
    assert "del needs --rule-no N" in fails(dom0, "web", "del", code=2)
    assert "not both" in fails(dom0, "web", "del", "--rule-no", "0", "action=accept", code=2)
    assert raw(dom0) == ["action=accept"]


def test_missing_rule_to_delete(dom0: Dom0) -> None:
    assert fails(dom0, "web", "del", "action=drop", "proto=tcp").startswith("no such rule: ")
    assert dom0.host.reloaded == []


@pytest.mark.parametrize("number", ["1", "-1", "99", "inbound:0"])
def test_rule_number_out_of_range(dom0: Dom0, number: str) -> None:
    assert "no such rule" in fails(dom0, "web", "del", "--rule-no", number)
    assert raw(dom0) == ["action=accept"]


@pytest.mark.parametrize("number", ["2", "-1", "99"])
def test_before_out_of_range(dom0: Dom0, number: str) -> None:
    assert "no such rule number" in fails(dom0, "web", "add", "--before", number, "action=drop")
    assert raw(dom0) == ["action=accept"]


@pytest.mark.parametrize("qube", ["nosuch", "../etc", "wéb", "web-dm"])
def test_unknown_qube_is_no_such_domain_exit_2(dom0: Dom0, qube: str) -> None:
    assert fails(dom0, qube, code=2) == f"no such domain: {qube!r}"
    assert fails(dom0, qube, "add", "action=drop", code=2) == f"no such domain: {qube!r}"


def test_daemon_refusal(dom0: Dom0) -> None:
    ok(dom0, "work", "add", *FORWARD)
    message = fails(dom0, "web", "add", *FORWARD)
    assert message == ("tcp port 8443 on 'sys-firewall' is wanted by both 'work'"
                       " (forward rule 0) and 'web' (forward rule 0)")
    assert not dom0.host.firewall_path("web").exists()


def test_corrupt_firewall_xml(dom0: Dom0) -> None:
    path = dom0.host.firewall_path("web")
    path.parent.mkdir(parents=True)
    path.write_text("not xml at all")
    assert fails(dom0, "web").startswith("web: firewall rules cannot be loaded")


def test_daemon_unreachable(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sock"
    result = subprocess.run(
        [sys.executable, "-m", "admin_client_patch.qvm_firewall", "web"],
        cwd=REPO, env={**os.environ, "QUBESD_SOCKET": str(missing)},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"qvm-firewall: error: failed to connect to qubesd at {missing}: "
        "No such file or directory\n"
    )


def test_console_script(dom0: Dom0) -> None:
    script = REPO / ".venv" / "bin" / "qvm-firewall"
    if not script.exists():
        cannot_run("qvm-firewall console script not installed (run make deps)")
    result = subprocess.run(
        [str(script), "--raw", "web"], env=dom0.env(), capture_output=True, text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "action=accept\n")


def test_parser_takes_the_name_the_command_was_run_as(monkeypatch: pytest.MonkeyPatch) -> None:
    for argv0, name in (("/usr/bin/qvm-firewall-ns", "qvm-firewall-ns"),
                        (".venv/bin/qvm-firewall", "qvm-firewall"),
                        (str(REPO / "admin_client_patch" / "qvm_firewall.py"), "qvm-firewall"),
                        ("-c", "qvm-firewall"), ("", "qvm-firewall")):
        monkeypatch.setattr(sys, "argv", [argv0])
        assert get_parser().prog == name, argv0


def test_parser_shape_for_man_page() -> None:
    parser = get_parser("qvm-firewall")
    assert parser.prog == "qvm-firewall"
    args = parser.parse_args(["web", "add", "--before", "forward:2", "action=drop"])
    assert (args.vmname, args.command, args.rule) == ("web", "add", ["action=drop"])
    assert args.before == parse_rule_number("forward:2") == (RuleKind.FORWARD, 2)
    assert parser.parse_args(["web", "del", "--rule-no", "3"]).rule_no == (None, 3)
    assert parser.parse_args(["web"]).command is None


# --- routing exposure -----------------------------------------------------------

EXPOSURE_TITLE = "Routing exposure (routing-method forward: reached at its own address):"


def test_a_routed_qube_gets_its_exposure_listed_last(dom0: Dom0) -> None:
    dom0.host.qubes["web"].features["routing-method"] = "forward"
    assert sections(dom0)[EXPOSURE_TITLE] == [
        "  not exposed: 'web' is not running",  # nothing runs in this dom0
        "  no inbound rule: nothing may connect to it",
    ]
    ok(dom0, "web", "add", "action=accept", "srchost=192.0.2.0/24", "proto=tcp", "dstports=22")
    ok(dom0, "web", "add", "action=drop", "srchost=192.0.2.66")
    assert sections(dom0)[EXPOSURE_TITLE][-1] == (
        "  admitted as inbound rules inbound:0, inbound:1 say, nothing else"
    )
    assert not any("Routing" in line for line in raw(dom0))


def test_no_exposure_section_for_a_qube_not_routed_or_an_older_dom0(
    dom0: Dom0, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert EXPOSURE_TITLE not in sections(dom0)
    dom0.host.qubes["web"].features["routing-method"] = "forward"
    monkeypatch.delitem(admin_api.METHODS, "admin.vm.firewall.GetRouting")
    assert EXPOSURE_TITLE not in sections(dom0)


def test_each_hops_state_is_shown_under_its_address() -> None:
    out = io.StringIO()
    exposure = [
        "192.0.2.25: LAN -> sys-net -> sys-firewall -> web",
        "  sys-net: exposed on eth0, answering for the address",
        "  sys-firewall: applied",
    ]
    lists = {RuleKind.OUTBOUND: [Rule.from_api_string("action=accept")], RuleKind.FORWARD: [],
             RuleKind.INBOUND: "dom0 did not list them (...)"}
    list_rules(lists, time.time(), out, routing=exposure)
    assert out.getvalue().split("\n\n")[-1].splitlines() == [
        EXPOSURE_TITLE,
        "  192.0.2.25: LAN -> sys-net -> sys-firewall -> web",
        "    sys-net: exposed on eth0, answering for the address",
        "    sys-firewall: applied",
    ]  # the inbound list could not be read: its own section says so


@pytest.mark.parametrize("reply", [b"a", b"a\x1b[2J\n", b" a\n", b"   a\n", b"caf\xc3\xa9\n",
                                   b"\n"])
def test_client_refuses_a_malformed_exposure(reply: bytes) -> None:
    with pytest.raises(QubesDaemonCommunicationError):
        parse_routing(reply)
    assert parse_routing(b"a: b\n  c: d\n") == ["a: b", "  c: d"]
