"""qvm-firewall end to end: the command as a process, qubesd on a real socket."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_api_fixture import REPO, Dom0, running_dom0
from conftest import cannot_run

from admin_client_patch import qubesd_client
from admin_client_patch.firewall import parse_routing
from admin_client_patch.qvm_firewall import HEADER, get_parser
from core_admin_patch import admin_api
from firewall_rules import Rule


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
    else:  # argparse: usage line(s), then "qvm-firewall: error: ..."
        assert result.stderr.splitlines()[-1].startswith("qvm-firewall: error: ")
    return result.stderr.splitlines()[-1].removeprefix("qvm-firewall: error: ")


def raw(dom0: Dom0, qube: str = "web") -> list[str]:
    return ok(dom0, "--raw", qube, "list").splitlines()


def table(dom0: Dom0, qube: str = "web") -> list[list[str]]:
    """Rows of the table, split on the header's column starts (paths left out)."""
    lines = ok(dom0, qube).split("\n\n")[0].splitlines()
    starts: list[int] = []
    for previous, title in zip(("", *HEADER), HEADER, strict=False):
        starts.append(lines[0].index(title, starts[-1] + len(previous) if starts else 0))
    ends = [*starts[1:], None]
    return [[line[a:b].strip() for a, b in zip(starts, ends, strict=True)] for line in lines]


def test_default_list_is_one_accept_rule(dom0: Dom0) -> None:
    rows = table(dom0)
    assert rows[0] == list(HEADER)
    assert rows[1][:3] == ["0", "outbound", "accept"]
    assert set(rows[1][3:]) == {"-"}
    assert raw(dom0) == ["action=accept"]


def test_add_outbound_then_list(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "action=accept", "dsthost=1.2.3.4", "proto=tcp", "dstports=443")
    assert raw(dom0) == [
        "action=accept",
        canonical("action=accept dsthost=1.2.3.4 proto=tcp dstports=443"),
    ]
    row = dict(zip(HEADER, table(dom0)[2], strict=True))
    assert row["ACTION"] == "accept"
    assert row["HOST"].startswith("1.2.3.4")
    assert row["PROTOCOL"] == "tcp"
    assert "443" in row["PORT(S)"]
    assert dom0.ctx.changed == ["web"]


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


def test_reset_leaves_single_accept(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "action=drop")
    ok(dom0, "web", "add", "--before", "0", "action=accept", "proto=tcp", "dstports=80")
    ok(dom0, "web", "reset")
    assert raw(dom0) == ["action=accept"]


def test_reload(dom0: Dom0) -> None:
    out = ok(dom0, "--reload", "web")
    assert out.startswith("NO ")
    assert dom0.ctx.changed == ["web"]
    ok(dom0, "-r", "web", "list", "--raw")
    assert dom0.ctx.changed == ["web", "web"]


def test_expire_relative_becomes_epoch(dom0: Dom0) -> None:
    before = int(time.time())
    ok(dom0, "web", "add", "action=accept", "proto=tcp", "dstports=22", "expire=+300")
    after = int(time.time())
    added = raw(dom0)[-1].split()
    expire = int(next(w for w in added if w.startswith("expire=")).removeprefix("expire="))
    assert before + 300 <= expire <= after + 300
    row = dict(zip(HEADER, table(dom0)[2], strict=True))
    assert row["EXPIRE"].startswith("+") and row["EXPIRE"].endswith("s")
    assert 250 <= int(row["EXPIRE"][1:-1]) <= 300


def test_comment_with_spaces(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "action=drop", "proto=tcp", "comment=no", "more", "telnet")
    assert raw(dom0)[-1].endswith("comment=no more telnet")
    assert table(dom0)[2][-1] == "no more telnet"


def test_forward_and_inbound_rules_are_readable(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "--before", "0", "action=forward", "forwardtype=external",
       "proto=tcp", "srcports=8080", "dstports=80", "srchost=192.168.1.0/24",
       "comment=web", "server")
    ok(dom0, "web", "add", "--before", "1", "action=accept", "srchost=10.137.0.6",
       "proto=tcp", "dstports=22")
    rows = [dict(zip(HEADER, row, strict=True)) for row in table(dom0)[1:]]
    forward, inbound, outbound = rows
    assert forward["KIND"] == "forward"
    assert forward["FORWARD TYPE"] == "external"
    assert forward["SOURCE"].startswith("192.168.1.0/24")
    assert (forward["SRC PORT(S)"], forward["PORT(S)"]) == ("8080", "80")
    assert inbound["PORT(S)"] == "22"
    assert forward["COMMENT"] == "web server"
    assert inbound["KIND"] == "inbound"
    assert inbound["SOURCE"].startswith("10.137.0.6")
    assert inbound["HOST"] == "-"
    assert outbound["KIND"] == "outbound"
    # What dom0 stored is what --raw shows, and it reads back the same.
    for line in raw(dom0):
        assert canonical(line) == line


def test_srcqube_rules_show_the_qube_as_source(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "--before", "0", "action=accept", "srcqube=work", "proto=tcp",
       "dstports=22")
    ok(dom0, "web", "add", "--before", "1", "action=forward", "forwardtype=internal",
       "proto=tcp", "srcports=2222", "dstports=22", "srcqube=work")
    inbound, forward, _ = (dict(zip(HEADER, row, strict=True)) for row in table(dom0)[1:])
    assert (inbound["KIND"], inbound["SOURCE"], inbound["PORT(S)"]) == ("inbound", "work", "22")
    assert (forward["KIND"], forward["SOURCE"]) == ("forward", "work")
    assert raw(dom0)[:2] == [
        "action=accept srcqube=work proto=tcp dstports=22-22",
        "action=forward forwardtype=internal srcqube=work proto=tcp srcports=2222-2222"
        " dstports=22-22",
    ]
    message = fails(dom0, "web", "add", "action=forward", "forwardtype=external", "proto=tcp",
                    "srcports=80", "dstports=80", "srcqube=work")
    assert "needs forwardtype=internal" in message
    assert "srcqube=QUBE" in ok(dom0, "--help")


def test_bad_host(dom0: Dom0) -> None:
    message = fails(dom0, "web", "add", "action=accept", "dsthost=10.0.0.0/33")
    assert "10.0.0.0/33" in message
    assert raw(dom0) == ["action=accept"]


def test_forward_srchost_must_not_be_a_name(dom0: Dom0) -> None:
    fails(dom0, "web", "add", "action=forward", "forwardtype=external", "proto=tcp",
          "srcports=80", "dstports=80", "srchost=example.com")
    assert raw(dom0) == ["action=accept"]


def test_surplus_argument(dom0: Dom0) -> None:
    message = fails(dom0, "web", "add", "accept", "1.2.3.4", "tcp", "80", "extra")
    assert message == "surplus argument: 'extra'"
    assert "unrecognized arguments" in fails(dom0, "web", "list", "extra", code=2)


def test_unknown_option_key(dom0: Dom0) -> None:
    fails(dom0, "web", "add", "action=accept", "colour=blue")


def test_bad_expire(dom0: Dom0) -> None:
    assert "expire=+soon" in fails(dom0, "web", "add", "action=accept", "expire=+soon")


def test_non_ascii_rule(dom0: Dom0) -> None:
    fails(dom0, "web", "add", "action=accept", "comment=café")
    assert raw(dom0) == ["action=accept"]


def test_missing_rule_to_delete(dom0: Dom0) -> None:
    message = fails(dom0, "web", "del", "action=drop", "proto=tcp")
    assert message.startswith("no such rule: ")
    assert dom0.ctx.changed == []


@pytest.mark.parametrize("number", ["1", "-1", "99"])
def test_rule_number_out_of_range(dom0: Dom0, number: str) -> None:
    assert "no such rule" in fails(dom0, "web", "del", "--rule-no", number)
    assert raw(dom0) == ["action=accept"]


@pytest.mark.parametrize("number", ["2", "-1", "99"])
def test_before_out_of_range(dom0: Dom0, number: str) -> None:
    assert "no such rule number" in fails(dom0, "web", "add", "--before", number, "action=drop")
    assert raw(dom0) == ["action=accept"]


def test_del_needs_exactly_one_selector(dom0: Dom0) -> None:
    fails(dom0, "web", "del")
    fails(dom0, "web", "del", "--rule-no", "0", "action=accept")
    assert raw(dom0) == ["action=accept"]


def test_unknown_qube(dom0: Dom0) -> None:
    assert fails(dom0, "nosuch") == "No such domain: 'nosuch'"
    assert fails(dom0, "nosuch", "add", "action=drop") == "No such domain: 'nosuch'"


def test_invalid_qube_name(dom0: Dom0) -> None:
    assert fails(dom0, "../etc", "list") == "VM name contains illegal characters"
    fails(dom0, "wéb", "list")


def test_daemon_refusal(dom0: Dom0) -> None:
    dom0.ctx.refuse = "sys-net: port 8080/tcp is already forwarded to work"
    message = fails(dom0, "web", "add", "action=forward", "forwardtype=external",
                    "proto=tcp", "srcports=8080", "dstports=80")
    assert message == "sys-net: port 8080/tcp is already forwarded to work"
    assert not dom0.ctx.firewall_path("web").exists()


def test_corrupt_firewall_xml(dom0: Dom0) -> None:
    path = dom0.ctx.firewall_path("web")
    path.parent.mkdir(parents=True)
    path.write_text("not xml at all")
    assert fails(dom0, "web").startswith("web: firewall.xml cannot be loaded")


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


def test_parser_shape_for_man_page() -> None:
    parser = get_parser()
    assert parser.prog == "qvm-firewall"
    args = parser.parse_args(["web", "add", "--before", "2", "action=drop"])
    assert (args.vmname, args.command, args.before, args.rule) == ("web", "add", 2, ["action=drop"])
    assert parser.parse_args(["web"]).command is None


FORWARD = ("action=forward", "forwardtype=external", "proto=tcp", "srcports=8443",
           "dstports=443")
PATH = "sys-net uplink addresses tcp/8443 -> sys-firewall (10.137.0.5) tcp/8443 -> " \
    "web (10.137.0.20) tcp/443"


def paths_section(dom0: Dom0, *args: str) -> list[str]:
    """The lines under the table (after its blank line), or [] if none."""
    _, sep, below = ok(dom0, *args).partition("\n\n")
    return below.splitlines() if sep else []


def test_forward_path_shown_under_the_table(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "--before", "0", *FORWARD)
    ok(dom0, "web", "add", "action=accept", "srchost=10.137.0.6")
    dom0.ctx.paths["web"] = {0: PATH}
    assert paths_section(dom0, "web") == [
        "Forward paths (entry point -> each hop -> the qube):",
        f"  rule 0: {PATH}",
    ]
    assert len(table(dom0)) == 4  # header and three rules, the paths apart
    assert raw(dom0) == [canonical(" ".join(FORWARD)), "action=accept",
                         canonical("action=accept srchost=10.137.0.6")]


def test_path_numbers_follow_the_listing_when_a_rule_expired(dom0: Dom0) -> None:
    """dom0 numbers by firewall.xml position; qvm-firewall shows the listed number."""
    soon = int(time.time()) + 2
    ok(dom0, "web", "add", "--before", "0", "action=drop", "proto=icmp", f"expire={soon}")
    ok(dom0, "web", "add", "--before", "1", *FORWARD)
    dom0.ctx.paths["web"] = {1: PATH}  # stored position 1
    assert paths_section(dom0, "web")[1] == f"  rule 1: {PATH}"
    time.sleep(max(0.0, soon - time.time()) + 0.2)
    assert paths_section(dom0, "web")[1] == f"  rule 0: {PATH}"  # listed first now


def test_no_paths_section_without_forward_rules(dom0: Dom0) -> None:
    dom0.ctx.paths["web"] = {0: PATH}
    assert paths_section(dom0, "web") == []


def test_raw_listing_has_no_paths(dom0: Dom0) -> None:
    ok(dom0, "web", "add", *FORWARD)
    dom0.ctx.paths["web"] = {1: PATH}
    assert raw(dom0) == ["action=accept", canonical(" ".join(FORWARD))]


def test_forward_without_a_described_path(dom0: Dom0) -> None:
    ok(dom0, "web", "add", *FORWARD)
    assert paths_section(dom0, "web")[1] == "  rule 1: path unknown"


def test_older_dom0_without_getpaths_still_lists(
    dom0: Dom0, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(dom0, "web", "add", *FORWARD)
    monkeypatch.delitem(admin_api.METHODS, "admin.vm.firewall.GetPaths")
    below = paths_section(dom0, "web")
    assert below[1].startswith("  not available: dom0 did not describe them (")
    assert "admin.vm.firewall.GetPaths" in below[1]
    assert len(table(dom0)) == 3


def test_port_ranges_in_the_table(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "--before", "0", "action=accept", "proto=tcp", "dstports=8000-8100")
    row = dict(zip(HEADER, table(dom0)[1], strict=True))
    assert row["PORT(S)"] == "8000-8100"
    assert raw(dom0)[0].endswith("dstports=8000-8100")


EXPOSURE = [
    "192.0.2.25: LAN -> sys-net -> sys-firewall -> web",
    "  sys-net: exposed on eth0, answering for the address",
    "  sys-firewall: applied",
]


def test_routing_exposure_shown_under_the_table(dom0: Dom0) -> None:
    ok(dom0, "web", "add", "--before", "0", "action=accept", "srchost=192.0.2.0/24",
       "proto=tcp", "dstports=22")
    dom0.ctx.routing["web"] = EXPOSURE
    assert paths_section(dom0, "web") == [
        "Routing exposure (routing-method forward: reached at its own address):",
        "  192.0.2.25: LAN -> sys-net -> sys-firewall -> web",
        "    sys-net: exposed on eth0, answering for the address",
        "    sys-firewall: applied",
        "  admitted as inbound rules 0 say, nothing else",
    ]
    ok(dom0, "web", "reset")
    assert paths_section(dom0, "web")[-1] == "  no inbound rule: nothing may connect to it"
    assert raw(dom0) == ["action=accept"]  # --raw: the rules only


def test_no_routing_section_for_a_qube_not_routed_or_an_older_dom0(
    dom0: Dom0, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert paths_section(dom0, "web") == []
    dom0.ctx.routing["web"] = EXPOSURE
    monkeypatch.delitem(admin_api.METHODS, "admin.vm.firewall.GetRouting")
    assert paths_section(dom0, "web") == []


@pytest.mark.parametrize("reply", [b"a", b"a\x1b[2J\n", b" a\n", b"   a\n", b"caf\xc3\xa9\n",
                                   b"\n"])
def test_client_refuses_a_malformed_exposure(reply: bytes) -> None:
    with pytest.raises(qubesd_client.QubesDaemonCommunicationError):
        parse_routing(reply)
    assert parse_routing(b"a: b\n  c: d\n") == ["a: b", "  c: d"]
