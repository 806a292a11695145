"""admin_api.handle_call as the qubesd extension will call it (no socket)."""

from __future__ import annotations

from pathlib import Path

import pytest
from admin_api_fixture import REPO, FileAdminContext

from core_admin_patch.admin_api import handle_call, validate_qube_name
from core_admin_patch.errors import (
    ProtocolError,
    QubesValueError,
    QubesVMError,
    QubesVMNotFoundError,
)
from firewall_rules import Rule, save_firewall_xml

NOW = 1_700_000_000.0


@pytest.fixture
def ctx(tmp_path: Path) -> FileAdminContext:
    return FileAdminContext(tmp_path)


def get(ctx: FileAdminContext, qube: str = "web", now: float = NOW) -> bytes:
    return handle_call(ctx, "admin.vm.firewall.Get", "", qube, b"", now)


def test_get_leaves_out_expired_rules(ctx: FileAdminContext) -> None:
    payload = f"action=accept proto=tcp dstports=22 expire={int(NOW) + 100}\naction=drop\n"
    assert handle_call(ctx, "admin.vm.firewall.Set", "", "web", payload.encode(), NOW) == b""
    assert len(get(ctx).splitlines()) == 2
    assert get(ctx, now=NOW + 200) == b"action=drop\n"


def test_set_checks_the_parsed_list_before_saving(ctx: FileAdminContext) -> None:
    handle_call(ctx, "admin.vm.firewall.Set", "", "web", b"action=drop proto=icmp\n", NOW)
    ((name, rules),) = ctx.checked
    assert name == "web"
    assert [rule.api_rule for rule in rules] == [
        Rule.from_api_string("action=drop proto=icmp").api_rule
    ]
    assert ctx.changed == ["web"]
    assert ctx.firewall_path("web").exists()


def test_set_refused_by_system_check_changes_nothing(ctx: FileAdminContext) -> None:
    ctx.firewall_path("web").parent.mkdir(parents=True)
    save_firewall_xml(ctx.firewall_path("web"), [Rule.from_api_string("action=drop")], NOW)
    before = ctx.firewall_path("web").read_bytes()
    ctx.refuse = "no"
    with pytest.raises(QubesValueError, match=r"^no$"):
        handle_call(ctx, "admin.vm.firewall.Set", "", "web", b"action=accept\n", NOW)
    assert ctx.firewall_path("web").read_bytes() == before
    assert ctx.changed == []


def test_rule_error_is_a_one_line_value_error(ctx: FileAdminContext) -> None:
    with pytest.raises(QubesValueError) as info:
        handle_call(ctx, "admin.vm.firewall.Set", "", "web", b"action=accept\nproto=tcp\n", NOW)
    assert "\n" not in str(info.value)
    assert ctx.checked == []


def test_empty_set_stores_an_empty_list(ctx: FileAdminContext) -> None:
    handle_call(ctx, "admin.vm.firewall.Set", "", "web", b"", NOW)
    assert get(ctx) == b""


def test_reload(ctx: FileAdminContext) -> None:
    assert handle_call(ctx, "admin.vm.firewall.Reload", "", "work", b"", NOW) == b""
    assert ctx.changed == ["work"]


def test_errors(ctx: FileAdminContext) -> None:
    with pytest.raises(ProtocolError):
        handle_call(ctx, "admin.vm.List", "", "web", b"", NOW)
    with pytest.raises(QubesVMNotFoundError, match="No such domain: 'gone'"):
        get(ctx, "gone")
    path = ctx.firewall_path("web")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(QubesVMError, match=r"^web: firewall\.xml cannot be loaded"):
        get(ctx)


@pytest.mark.parametrize("name", ["web", "sys-net", "a", "A_1-b", "x" * 31])
def test_valid_names(name: str) -> None:
    assert validate_qube_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "1web", "-web", "web/..", "web net", "x" * 32, "none", "web-dm", "wéb"]
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(QubesValueError):
        validate_qube_name(name)


def get_paths(ctx: FileAdminContext, qube: str = "web", now: float = NOW) -> bytes:
    return handle_call(ctx, "admin.vm.firewall.GetPaths", "", qube, b"", now)


FORWARD = "action=forward forwardtype=external proto=tcp srcports=8443 dstports=443"


def test_get_paths_one_line_per_described_rule(ctx: FileAdminContext) -> None:
    handle_call(ctx, "admin.vm.firewall.Set", "", "web",
                f"{FORWARD}\naction=accept\n{FORWARD.replace('8443', '8080')}\n".encode(), NOW)
    ctx.paths["web"] = {2: "b -> c", 0: "sys-net uplink addresses tcp/8443 -> web"}
    assert get_paths(ctx) == b"0 sys-net uplink addresses tcp/8443 -> web\n2 b -> c\n"


def test_get_paths_numbers_as_get_lists_them(ctx: FileAdminContext) -> None:
    """An expired rule still in firewall.xml shifts the planner's numbers, not Get's."""
    payload = f"action=drop proto=icmp expire={int(NOW) + 100}\n{FORWARD}\n"
    handle_call(ctx, "admin.vm.firewall.Set", "", "web", payload.encode(), NOW)
    ctx.paths["web"] = {1: "path"}
    assert get_paths(ctx) == b"1 path\n"
    assert get_paths(ctx, now=NOW + 200) == b"0 path\n"
    assert get(ctx, now=NOW + 200).decode().startswith("action=forward")


def test_get_paths_drops_numbers_of_no_rule_in_force(ctx: FileAdminContext) -> None:
    handle_call(ctx, "admin.vm.firewall.Set", "", "web", f"{FORWARD}\n".encode(), NOW)
    ctx.paths["web"] = {0: "ok", 5: "stale"}
    assert get_paths(ctx) == b"0 ok\n"


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
def test_get_paths_text_is_one_printable_line(
    ctx: FileAdminContext, text: str, shown: str
) -> None:
    handle_call(ctx, "admin.vm.firewall.Set", "", "web", f"{FORWARD}\n".encode(), NOW)
    ctx.paths["web"] = {0: text}
    assert get_paths(ctx) == f"0 {shown}\n".encode()


def test_get_paths_without_forward_rules_is_empty(ctx: FileAdminContext) -> None:
    assert get_paths(ctx) == b""


def test_get_paths_takes_no_payload_or_argument(ctx: FileAdminContext) -> None:
    with pytest.raises(ProtocolError):
        handle_call(ctx, "admin.vm.firewall.GetPaths", "", "web", b"x", NOW)
    with pytest.raises(ProtocolError):
        handle_call(ctx, "admin.vm.firewall.GetPaths", "x", "web", b"", NOW)
    with pytest.raises(QubesVMNotFoundError):
        get_paths(ctx, "gone")


def test_get_paths_through_the_lab_dom0_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lab's Dom0 answers GetPaths from its topology (no qube started, no root)."""
    from lab.dom0 import Dom0
    from lab.topology import load_topology

    monkeypatch.setenv("QUBESDB_DIR", "")  # Dom0 sets it; restored after the test
    dom0 = Dom0(tmp_path, load_topology(REPO / "lab" / "topologies" / "default.toml"))
    dom0.firewall_path("web").parent.mkdir(parents=True)
    handle_call(dom0, "admin.vm.firewall.Set", "", "web",
                f"action=accept\n{FORWARD}\n".encode(), NOW)
    assert get_paths(dom0) == (  # type: ignore[arg-type]
        b"1 sys-net uplink addresses tcp/8443 -> sys-firewall (10.137.0.6) tcp/8443"
        b" -> web (10.137.0.20) tcp/443 (IPv6: fd09:24ef:4179::a89:14 too)\n"
    )
