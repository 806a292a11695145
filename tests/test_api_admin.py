"""admin_api.handle_call with the real NetworkServer over firewall.xml files (no socket)."""

from __future__ import annotations

from pathlib import Path

import pytest
from admin_api_fixture import REPO, FileHost, file_server
from test_rules import version_3_file

from core_admin_patch.admin_api import _path_text, handle_call, validate_qube_name
from core_admin_patch.errors import (
    ProtocolError,
    QubesValueError,
    QubesVMError,
    QubesVMNotFoundError,
)
from core_admin_patch.network_server import NetworkServer
from firewall_rules import Rule, RuleLists, load_firewall_xml, save_firewall_xml

#: Later than the real clock, which the hosts' saves use (expired rules are left out).
NOW = 4_000_000_000.0
GET, SET = "admin.vm.firewall.Get", "admin.vm.firewall.Set"
FORWARD = "action=forward forwardtype=external proto=tcp srcports=8443-8443 dstports=443-443"
INBOUND = "action=accept srcqube=work proto=tcp dstports=22-22"


@pytest.fixture
def api(tmp_path: Path) -> tuple[NetworkServer, FileHost]:
    return file_server(tmp_path)


def call(
    api: tuple[NetworkServer, FileHost], method: str, arg: str = "", payload: str = "",
    qube: str = "web", now: float = NOW,
) -> str:
    return handle_call(api[0], method, arg, qube, payload.encode(), now).decode()


def test_get_and_set_without_argument_are_the_outbound_list(
    api: tuple[NetworkServer, FileHost],
) -> None:
    assert call(api, GET) == "action=accept\n"  # never set: upstream's default
    assert call(api, SET, payload="action=drop proto=icmp\naction=accept\n") == ""
    assert call(api, GET) == "action=drop proto=icmp\naction=accept\n"
    assert call(api, GET, "forward") == call(api, GET, "inbound") == ""
    assert api[1].reloaded == ["web"]


def test_each_argument_reads_and_replaces_its_own_list(
    api: tuple[NetworkServer, FileHost],
) -> None:
    call(api, SET, payload="action=drop\n")
    call(api, SET, "forward", f"{FORWARD}\n")
    call(api, SET, "inbound", f"{INBOUND}\n")
    assert (call(api, GET), call(api, GET, "forward"), call(api, GET, "inbound")) == (
        "action=drop\n", f"{FORWARD}\n", f"{INBOUND}\n"
    )
    # A Set without argument never touches the other lists, and the reverse.
    call(api, SET, payload="action=accept proto=tcp\n")
    call(api, SET, "inbound", "")
    assert load_firewall_xml(api[1].firewall_path("web")) == RuleLists(
        (Rule.from_api_string("action=accept proto=tcp"),), (Rule.from_api_string(FORWARD),)
    )


@pytest.mark.parametrize(
    ("arg", "line", "kind", "use"),
    [
        ("", FORWARD, "forward", "admin.vm.firewall.Set+forward"),
        ("", INBOUND, "inbound", "admin.vm.firewall.Set+inbound"),
        ("forward", "action=drop", "outbound", "admin.vm.firewall.Set"),
        ("inbound", FORWARD, "forward", "admin.vm.firewall.Set+forward"),
    ],
)
def test_a_rule_of_another_kind_is_refused_naming_the_call_to_use(
    api: tuple[NetworkServer, FileHost], arg: str, line: str, kind: str, use: str,
) -> None:
    before = (call(api, GET), call(api, GET, "forward"), call(api, GET, "inbound"))
    with pytest.raises(QubesValueError) as info:
        call(api, SET, arg, f"{line}\n" if arg else f"action=drop proto=icmp\n{line}\n")
    message = str(info.value)
    assert "\n" not in message and f"is a {kind} rule" in message
    assert message.endswith(f"use {use}")
    assert (call(api, GET), call(api, GET, "forward"), call(api, GET, "inbound")) == before
    assert api[1].reloaded == []


def test_the_design_cards_forward_is_stored_in_full(api: tuple[NetworkServer, FileHost]) -> None:
    call(api, SET, "forward", "action=forward proto=tcp dstports=443\n")
    assert call(api, GET, "forward") == (
        "action=forward forwardtype=external proto=tcp srcports=443-443 dstports=443-443\n"
    )


def test_get_leaves_out_expired_rules(api: tuple[NetworkServer, FileHost]) -> None:
    soon = f"expire={int(NOW) + 100}"
    call(api, SET, payload=f"action=accept proto=tcp dstports=22 {soon}\naction=drop\n")
    call(api, SET, "forward", f"{FORWARD} {soon}\n")
    assert len(call(api, GET).splitlines()) == 2 and call(api, GET, "forward")
    assert call(api, GET, now=NOW + 200) == "action=drop\n"
    assert call(api, GET, "forward", now=NOW + 200) == ""


def test_set_is_refused_whole_by_the_system_check(api: tuple[NetworkServer, FileHost]) -> None:
    call(api, SET, "forward", f"{FORWARD}\n", qube="work")
    path = api[1].firewall_path("web")
    call(api, SET, payload="action=drop\n")
    before = path.read_bytes()
    with pytest.raises(QubesValueError, match=r"wanted by both 'work' \(forward rule 0\)"):
        call(api, SET, "forward", f"{FORWARD}\n")
    assert path.read_bytes() == before
    assert api[1].reloaded == ["work", "web"]


def test_an_unsupported_hop_is_named(api: tuple[NetworkServer, FileHost]) -> None:
    api[1].qubes["sys-firewall"].features.clear()
    with pytest.raises(QubesValueError, match=r"'sys-firewall'.*does not advertise"):
        call(api, SET, "inbound", f"{INBOUND}\n")


def test_rule_error_is_a_one_line_value_error(api: tuple[NetworkServer, FileHost]) -> None:
    with pytest.raises(QubesValueError) as info:
        call(api, SET, payload="action=accept\nproto=tcp\n")
    assert "\n" not in str(info.value)
    assert not api[1].firewall_path("web").exists()


def test_protocol_errors_as_upstream(api: tuple[NetworkServer, FileHost]) -> None:
    # Upstream's Set wants a payload and refuses non-ASCII with ProtocolError.
    with pytest.raises(ProtocolError):
        call(api, SET, payload="")
    with pytest.raises(ProtocolError):
        call(api, SET, payload="action=accept comment=caf\u00e9\n")
    with pytest.raises(ProtocolError):
        call(api, SET, "forward", "action=forward proto=tcp dstports=80 comment=\u00e9\n")
    for method, arg, payload in [
        ("admin.vm.List", "", ""), (GET, "outbound", ""), (GET, "", "x"),
        (SET, "all", "action=drop\n"), ("admin.vm.firewall.Reload", "forward", ""),
        ("admin.vm.firewall.GetPaths", "forward", ""), ("admin.vm.firewall.GetPaths", "", "x"),
    ]:
        with pytest.raises(ProtocolError):
            call(api, method, arg, payload)
    assert not api[1].firewall_path("web").exists()


def test_an_empty_forward_or_inbound_set_clears_that_list(
    api: tuple[NetworkServer, FileHost],
) -> None:
    call(api, SET, "forward", f"{FORWARD}\n")
    call(api, SET, "forward", "")
    assert call(api, GET, "forward") == ""
    assert load_firewall_xml(api[1].firewall_path("web")) == RuleLists.default()


def test_reload(api: tuple[NetworkServer, FileHost]) -> None:
    assert call(api, "admin.vm.firewall.Reload", qube="work") == ""
    assert api[1].reloaded == ["work"]


def test_errors(api: tuple[NetworkServer, FileHost]) -> None:
    with pytest.raises(QubesVMNotFoundError, match="No such domain: 'gone'"):
        call(api, GET, qube="gone")
    path = api[1].firewall_path("web")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage")
    for arg in ("", "forward"):
        with pytest.raises(QubesVMError, match=r"^web: firewall rules cannot be loaded"):
            call(api, GET, arg)


def test_permission_fires_once_the_request_is_parsed(api: tuple[NetworkServer, FileHost]) -> None:
    fired: list[dict[str, object]] = []
    handle_call(api[0], SET, "forward", "web", f"{FORWARD}\n".encode(), NOW,
                permission=lambda **kwargs: fired.append(kwargs))
    assert fired == [{"rules": [Rule.from_api_string(FORWARD)]}]
    handle_call(api[0], GET, "inbound", "web", b"", NOW,
                permission=lambda **kwargs: fired.append(kwargs))
    assert fired[1:] == [{}]
    with pytest.raises(QubesValueError):
        handle_call(api[0], SET, "forward", "web", b"action=bogus\n", NOW,
                    permission=lambda **kwargs: fired.append(kwargs))
    assert len(fired) == 2  # a payload that does not parse fires nothing


def test_a_version_3_file_is_served_by_kind_and_saved_as_version_2(
    api: tuple[NetworkServer, FileHost],
) -> None:
    path = api[1].firewall_path("web")
    path.parent.mkdir(parents=True)
    path.write_text(version_3_file(FORWARD, "action=drop proto=icmp", INBOUND, "action=accept"))
    assert call(api, GET) == "action=drop proto=icmp\naction=accept\n"
    assert call(api, GET, "forward") == f"{FORWARD}\n"
    call(api, SET, payload="action=accept\n")
    assert '<firewall version="2">' in path.read_text()
    assert call(api, GET, "forward") == f"{FORWARD}\n"
    assert call(api, GET, "inbound") == f"{INBOUND}\n"


@pytest.mark.parametrize("name", ["web", "sys-net", "a", "A_1-b", "x" * 31])
def test_valid_names(name: str) -> None:
    assert validate_qube_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "1web", "-web", "web/..", "web net", "x" * 32, "none", "web-dm", "wéb"]
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(QubesValueError):
        validate_qube_name(name)


PATH = "0 sys-net uplink addresses tcp/8443 -> sys-firewall (10.137.0.6) tcp/8443 -> web"


def test_get_paths_one_line_per_forward_numbered_as_get_forward(
    api: tuple[NetworkServer, FileHost],
) -> None:
    assert call(api, "admin.vm.firewall.GetPaths") == ""
    call(api, SET, payload="action=drop\n")
    call(api, SET, "forward", f"{FORWARD}\n{FORWARD.replace('8443', '8080')}\n")
    lines = call(api, "admin.vm.firewall.GetPaths").splitlines()
    assert lines[0] == f"{PATH} (10.137.0.20) tcp/443"
    assert lines[1].startswith("1 sys-net uplink addresses tcp/8080")


def test_get_paths_numbers_as_get_forward_lists_them(api: tuple[NetworkServer, FileHost]) -> None:
    """An expired rule still in firewall.xml shifts the planner's numbers, not Get's."""
    path = api[1].firewall_path("web")
    path.parent.mkdir(parents=True)
    expiring = Rule.from_api_string(f"{FORWARD.replace('8443', '9000')} expire={int(NOW) + 100}")
    save_firewall_xml(path, RuleLists(forward=(expiring, Rule.from_api_string(FORWARD))), NOW)
    assert call(api, "admin.vm.firewall.GetPaths").splitlines()[1].startswith("1 sys-net")
    later = call(api, "admin.vm.firewall.GetPaths", now=NOW + 200).splitlines()
    assert len(later) == 1 and later[0].startswith(PATH)
    assert call(api, GET, "forward", now=NOW + 200) == f"{FORWARD}\n"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("a\nb", "a b"),
        ("  spaced \t out ", "spaced out"),
        ("caf\u00e9", "caf?"),
        ("\x1b[31mred", "path unknown"),
        ("", "path unknown"),
    ],
)
def test_path_text_is_one_printable_line(text: str, shown: str) -> None:
    assert _path_text(text) == shown


def test_get_paths_through_the_lab_dom0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lab's Dom0 answers GetPaths from its topology (no qube started, no root)."""
    from lab.dom0 import Dom0
    from lab.topology import load_topology

    monkeypatch.setenv("QUBESDB_DIR", "")  # Dom0 sets it; restored after the test
    dom0 = Dom0(tmp_path, load_topology(REPO / "lab" / "topologies" / "default.toml"))
    dom0.firewall_path("web").parent.mkdir(parents=True)
    server = dom0.network_server
    handle_call(server, SET, "forward", "web", f"{FORWARD}\n".encode(), NOW)
    assert handle_call(server, "admin.vm.firewall.GetPaths", "", "web", b"", NOW) == (
        b"0 sys-net uplink addresses tcp/8443 -> sys-firewall (10.137.0.6) tcp/8443"
        b" -> web (10.137.0.20) tcp/443 (IPv6: fd09:24ef:4179::a89:14 too)\n"
    )
    assert handle_call(server, GET, "", "web", b"", NOW) == b"action=accept\n"
