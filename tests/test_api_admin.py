"""admin_api.handle_call as the qubesd extension will call it (no socket)."""

from __future__ import annotations

from pathlib import Path

import pytest
from admin_api_fixture import FileAdminContext

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
