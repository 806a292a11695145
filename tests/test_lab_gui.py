"""The panel against the lab's qubesd: what a user clicks is what dom0 stores.

Each test drives the panel with pytest-qt (offscreen), then reads the
stored rules back with qvm-firewall, and for forwards sends real traffic
from the LAN. Screenshots of the panel and its dialogs are taken on the way
(doc/gui/ with ``make screenshots``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from gui_lab import stored
from gui_shots import screenshot
from PyQt6 import QtCore, QtWidgets
from pytestqt.qtbot import QtBot

from admin_client_patch.gui.dialogs import ForwardRuleDialog, InboundRuleDialog, RuleDialog
from admin_client_patch.gui.panel import NetworkServerPanel, RuleTable
from admin_client_patch.gui.rule_store import RuleStore
from admin_client_patch.gui.standalone import SettingsWindow
from admin_client_patch.qubesd_client import qubesd_call
from firewall_rules import Rule
from lab.control import Lab

pytestmark = pytest.mark.lab

UPLINK = "192.0.2.2"  # sys-net on the LAN
QUBES = ("web", "work")


def canonical(line: str) -> str:
    return Rule.from_api_string(line).api_rule


def set_list(qube: str, kind: str, *lines: str) -> None:
    payload = "".join(f"{line}\n" for line in lines).encode()
    qubesd_call(qube, "admin.vm.firewall.Set", kind, payload)


@pytest.fixture
def api(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """The lab's qubesd for the panel and qvm-firewall; web and work reset after."""
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    yield lab
    for qube in QUBES:
        lab.start(qube)
        set_list(qube, "forward")
        set_list(qube, "inbound")
        qubesd_call(qube, "admin.vm.firewall.Set", "", b"action=accept\n")


@pytest.fixture
def panel(qtbot: QtBot, api: Lab) -> NetworkServerPanel:
    widget = NetworkServerPanel(RuleStore("web"))
    qtbot.addWidget(widget)
    widget.resize(1100, 560)
    widget.show()
    assert widget.refresh()
    return widget


def click(qtbot: QtBot, button: QtWidgets.QAbstractButton) -> None:
    assert button.isEnabled(), button.text() or button.toolTip()
    qtbot.mouseClick(button, QtCore.Qt.MouseButton.LeftButton)


def select(table: RuleTable, row: int) -> None:
    table.view.setCurrentItem(table.view.topLevelItem(row))


def opened(panel: NetworkServerPanel, kind: type[RuleDialog]) -> RuleDialog:
    dialog = panel.dialog
    assert isinstance(dialog, kind) and dialog.isVisible()
    return dialog


def press_ok(qtbot: QtBot, dialog: RuleDialog) -> None:
    click(qtbot, dialog.button_box.button(QtWidgets.QDialogButtonBox.StandardButton.Ok))


def cells(table: RuleTable, row: int) -> list[str]:
    item = table.view.topLevelItem(row)
    assert item is not None
    return [item.text(column) for column in range(table.view.columnCount())]


def path_of(table: RuleTable, row: int) -> str:
    item = table.view.topLevelItem(row)
    assert item is not None and item.childCount() == 1
    return item.child(0).text(0)


def reaches_web(lab: Lab, port: int, served: int) -> bool:
    with lab.serve("web", "tcp", served, reply=f"web-{served}"):
        return lab.connect("lan", "tcp", UPLINK, port, timeout=0.5) == f"web-{served}"


# --- forward rules -------------------------------------------------------------


def test_add_edit_remove_a_forward(
    qtbot: QtBot, api: Lab, panel: NetworkServerPanel, tmp_path: Path
) -> None:
    click(qtbot, panel.forwards.add_button)
    dialog = opened(panel, ForwardRuleDialog)
    dialog.srcports_edit.setText("8080")
    dialog.dstports_edit.setText("80")
    dialog.comment_edit.setText("web site")
    screenshot(dialog, "forward-dialog", tmp_path)
    press_ok(qtbot, dialog)
    added = canonical("action=forward forwardtype=external proto=tcp srcports=8080"
                      " dstports=80 comment=web site")
    assert added in stored(api)
    assert panel.dialog is None
    assert cells(panel.forwards, 0)[:4] == ["External (from the LAN)", "TCP", "8080 → 80", "any"]
    assert "sys-net" in path_of(panel.forwards, 0)
    assert reaches_web(api, 8080, 80)
    screenshot(panel, "panel", tmp_path)

    select(panel.forwards, 0)
    click(qtbot, panel.forwards.edit_button)
    dialog = opened(panel, ForwardRuleDialog)
    assert dialog.srcports_edit.text() == "8080" and dialog.comment_edit.text() == "web site"
    dialog.srcports_edit.setText("8081")
    press_ok(qtbot, dialog)
    edited = canonical("action=forward forwardtype=external proto=tcp srcports=8081"
                       " dstports=80 comment=web site")
    assert edited in stored(api) and added not in stored(api)
    assert cells(panel.forwards, 0)[2] == "8081 → 80"
    assert reaches_web(api, 8081, 80)
    assert not reaches_web(api, 8080, 80)

    select(panel.forwards, 0)
    click(qtbot, panel.forwards.remove_button)
    assert not any("action=forward" in line for line in stored(api))
    assert panel.forwards.view.topLevelItemCount() == 0
    assert not reaches_web(api, 8081, 80)


def test_a_port_conflict_is_refused_shown_and_changes_nothing(
    qtbot: QtBot, api: Lab, panel: NetworkServerPanel, tmp_path: Path
) -> None:
    taken = "action=forward forwardtype=external proto=tcp srcports=8080 dstports=8080"
    set_list("work", "forward", taken)
    before = stored(api)
    click(qtbot, panel.forwards.add_button)
    dialog = opened(panel, ForwardRuleDialog)
    dialog.srcports_edit.setText("8080")
    dialog.dstports_edit.setText("80")
    press_ok(qtbot, dialog)
    assert dialog.isVisible()  # still open: the user can pick another port
    message = dialog.error_label.text()
    assert message.startswith("dom0 refused the rule, nothing was changed: ")
    assert "8080" in message and "'work'" in message and "'web'" in message
    screenshot(dialog, "forward-conflict", tmp_path)
    assert stored(api) == before
    assert canonical(taken) in stored(api, "work")
    dialog.srcports_edit.setText("8082")  # fixed: now it goes through
    press_ok(qtbot, dialog)
    assert any("srcports=8082-8082" in line for line in stored(api))


def test_invalid_input_never_reaches_dom0(
    qtbot: QtBot, api: Lab, panel: NetworkServerPanel
) -> None:
    before = stored(api)
    click(qtbot, panel.forwards.add_button)
    dialog = opened(panel, ForwardRuleDialog)
    dialog.srcports_edit.setText("8080-8090")
    dialog.dstports_edit.setText("80")
    press_ok(qtbot, dialog)
    assert "must hold the same number of ports" in dialog.error_label.text()
    assert stored(api) == before


# --- inbound rules -------------------------------------------------------------


def test_add_edit_remove_an_inbound_rule(
    qtbot: QtBot, api: Lab, panel: NetworkServerPanel, tmp_path: Path
) -> None:
    click(qtbot, panel.inbound.add_button)
    dialog = opened(panel, InboundRuleDialog)
    dialog.srcqube_edit.setText("work")
    dialog.tcp_radio.setChecked(True)
    dialog.ports_edit.setText("22")
    screenshot(dialog, "inbound-dialog", tmp_path)
    press_ok(qtbot, dialog)
    added = canonical("action=accept srcqube=work proto=tcp dstports=22")
    assert added in stored(api)
    assert cells(panel.inbound, 0)[:4] == ["Allow", "qube work", "TCP", "22"]

    select(panel.inbound, 0)
    click(qtbot, panel.inbound.edit_button)
    dialog = opened(panel, InboundRuleDialog)
    assert dialog.srcqube_edit.text() == "work" and dialog.tcp_radio.isChecked()
    dialog.drop_radio.setChecked(True)
    dialog.host_source_radio.setChecked(True)
    dialog.srchost_edit.setText("10.137.0.0/16")
    press_ok(qtbot, dialog)
    edited = canonical("action=drop srchost=10.137.0.0/16 proto=tcp dstports=22")
    assert edited in stored(api) and added not in stored(api)
    assert cells(panel.inbound, 0)[:2] == ["Block", "10.137.0.0/16"]

    select(panel.inbound, 0)
    click(qtbot, panel.inbound.remove_button)
    assert edited not in stored(api)
    assert panel.inbound.view.topLevelItemCount() == 0


# --- order of inbound rules ----------------------------------------------------

WEB = "10.137.0.20"
SSH_FROM_WORK = "action=accept srcqube=work proto=tcp dstports=22"
NO_SSH_FROM_WORK = "action=drop srcqube=work proto=tcp dstports=22"
FROM_DIRECT = "action=accept srcqube=direct"


def stored_inbound(lab: Lab) -> list[str]:
    return [line for line in stored(lab) if "srcqube=" in line]


def work_reaches_ssh(lab: Lab) -> bool:
    with lab.serve("web", "tcp", 22, reply="web-22"):
        return lab.connect("work", "tcp", WEB, 22, timeout=0.5) == "web-22"


def move_buttons(table: RuleTable) -> tuple[bool, bool]:
    """Whether Move up and Move down can be pressed."""
    assert table.up_button is not None and table.down_button is not None
    return table.up_button.isEnabled(), table.down_button.isEnabled()


def test_moving_an_inbound_rule_changes_which_rule_decides(
    qtbot: QtBot, api: Lab, panel: NetworkServerPanel, tmp_path: Path
) -> None:
    set_list("web", "inbound", SSH_FROM_WORK, NO_SSH_FROM_WORK, FROM_DIRECT)
    panel.refresh()
    wait_for(lambda: work_reaches_ssh(api), "the accept, first, to let work in")
    select(panel.inbound, 1)
    assert move_buttons(panel.inbound) == (True, True)

    click(qtbot, panel.inbound.up_button)
    assert stored_inbound(api) == [
        canonical(x) for x in (NO_SSH_FROM_WORK, SSH_FROM_WORK, FROM_DIRECT)]
    assert panel.status_label.text() == "Moved up."
    assert panel.inbound.selected() == (Rule.from_api_string(NO_SSH_FROM_WORK), 0)
    assert cells(panel.inbound, 0)[:2] == ["Block", "qube work"]
    assert move_buttons(panel.inbound) == (False, True)  # first row: only down
    screenshot(panel, "panel-move", tmp_path)
    wait_for(lambda: not work_reaches_ssh(api), "the drop, now first, to keep work out")

    click(qtbot, panel.inbound.down_button)
    click(qtbot, panel.inbound.down_button)
    assert stored_inbound(api) == [
        canonical(x) for x in (SSH_FROM_WORK, FROM_DIRECT, NO_SSH_FROM_WORK)]
    assert panel.status_label.text() == "Moved down."
    assert panel.inbound.selected() == (Rule.from_api_string(NO_SSH_FROM_WORK), 2)
    assert move_buttons(panel.inbound) == (True, False)  # last row: only up
    wait_for(lambda: work_reaches_ssh(api), "the accept, first again, to let work in")


def test_move_buttons_are_off_where_no_move_is_possible(
    api: Lab, panel: NetworkServerPanel
) -> None:
    assert move_buttons(panel.inbound) == (False, False)  # an empty list
    set_list("web", "inbound", SSH_FROM_WORK, FROM_DIRECT)
    panel.refresh()
    assert move_buttons(panel.inbound) == (False, False)  # nothing selected
    select(panel.inbound, 0)
    assert move_buttons(panel.inbound) == (False, True)
    panel.inbound.view.clearSelection()
    assert move_buttons(panel.inbound) == (False, False)
    set_list("web", "inbound", SSH_FROM_WORK)
    panel.refresh()
    select(panel.inbound, 0)
    assert move_buttons(panel.inbound) == (False, False)  # the only rule
    # A forward's place in its list decides nothing: no move buttons there.
    assert panel.forwards.up_button is None and panel.forwards.down_button is None


def test_a_move_from_a_stale_view_moves_nothing(
    qtbot: QtBot, api: Lab, panel: NetworkServerPanel
) -> None:
    set_list("web", "inbound", SSH_FROM_WORK, NO_SSH_FROM_WORK)
    panel.refresh()
    # Meanwhile a rule is put between the two: moving the drop "up" from the
    # old view would no longer put it before the accept.
    set_list("web", "inbound", SSH_FROM_WORK, FROM_DIRECT, NO_SSH_FROM_WORK)
    select(panel.inbound, 1)
    click(qtbot, panel.inbound.up_button)
    assert stored_inbound(api) == [
        canonical(x) for x in (SSH_FROM_WORK, FROM_DIRECT, NO_SSH_FROM_WORK)]
    assert panel.status_label.text().startswith(
        "Not moved: The order of the rules was changed elsewhere")
    assert panel.inbound.view.topLevelItemCount() == 3  # the view was read again

    # The rule itself gone: nothing moved either.
    set_list("web", "inbound", SSH_FROM_WORK, FROM_DIRECT)
    select(panel.inbound, 2)  # shows the drop, which is gone
    click(qtbot, panel.inbound.up_button)
    assert stored_inbound(api) == [canonical(x) for x in (SSH_FROM_WORK, FROM_DIRECT)]
    assert "changed or removed elsewhere" in panel.status_label.text()
    assert panel.inbound.view.topLevelItemCount() == 2


# --- expiry --------------------------------------------------------------------


def test_a_removal_whose_read_back_fails_says_both(
    qtbot: QtBot, api: Lab, panel: NetworkServerPanel, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """qubesd gone right after the removal: the line says it was removed and that
    the lists shown are not dom0's, never a bare "Removed." over an empty view."""
    set_list("web", "inbound", SSH_FROM_WORK, FROM_DIRECT)
    panel.refresh()
    remove = panel.store.remove

    def remove_then_lose_qubesd(rule: Rule, row: int) -> None:
        remove(rule, row)
        monkeypatch.setenv("QUBESD_SOCKET", str(tmp_path / "no-qubesd.sock"))

    monkeypatch.setattr(panel.store, "remove", remove_then_lose_qubesd)
    select(panel.inbound, 0)
    try:
        click(qtbot, panel.inbound.remove_button)
    finally:
        monkeypatch.setenv("QUBESD_SOCKET", str(api.qubesd_socket))
    assert panel.status_label.text().startswith("Removed, but cannot read the rules back: ")
    assert not panel.inbound.add_button.isEnabled()
    assert stored_inbound(api) == [canonical(FROM_DIRECT)]
    assert panel.refresh()
    assert panel.inbound.view.topLevelItemCount() == 1
    assert panel.inbound.rule_at(0) == Rule.from_api_string(FROM_DIRECT)


def test_a_time_span_expires_in_dom0_and_leaves_the_view_on_refresh(
    qtbot: QtBot, api: Lab
) -> None:
    """A one-minute span, with the panel's clock 58 s behind: it ends 2 s from now."""
    skewed = NetworkServerPanel(RuleStore("web"), clock=lambda: time.time() - 58)
    qtbot.addWidget(skewed)
    skewed.show()
    skewed.refresh()
    click(qtbot, skewed.inbound.add_button)
    dialog = opened(skewed, InboundRuleDialog)
    dialog.srcqube_edit.setText("work")
    dialog.expiry.span_value.setValue(1)
    dialog.expiry.span_unit.setCurrentIndex(0)  # minutes
    press_ok(qtbot, dialog)
    [line] = [line for line in stored(api) if "srcqube=work" in line]
    expire = int(line.split("expire=")[1].split()[0])
    assert abs(expire - (time.time() + 2)) < 3
    assert skewed.inbound.view.topLevelItemCount() == 1
    wait_for(lambda: not any("srcqube=work" in x for x in stored(api)), "the rule to expire")
    skewed.refresh()
    assert skewed.inbound.view.topLevelItemCount() == 0


def test_expiry_choices_are_stored_and_shown(
    qtbot: QtBot, api: Lab, panel: NetworkServerPanel, tmp_path: Path
) -> None:
    click(qtbot, panel.forwards.add_button)
    dialog = opened(panel, ForwardRuleDialog)
    dialog.srcports_edit.setText("2222")
    dialog.dstports_edit.setText("22")
    dialog.expiry.span_value.setValue(2)
    dialog.expiry.span_unit.setCurrentIndex(1)  # hours
    press_ok(qtbot, dialog)
    click(qtbot, panel.forwards.add_button)
    dialog = opened(panel, ForwardRuleDialog)
    dialog.internal_radio.setChecked(True)
    dialog.srcports_edit.setText("8443")
    dialog.qube_source_radio.setChecked(True)
    dialog.srcqube_edit.setText("work")
    dialog.expiry.shutdown_radio.setChecked(True)
    press_ok(qtbot, dialog)
    lines = [line for line in stored(api) if "action=forward" in line]
    assert "expire=shutdown" in lines[1] and "srcqube=work" in lines[1]
    expire = int(lines[0].split("expire=")[1].split()[0])
    assert abs(expire - (time.time() + 7200)) < 10
    assert cells(panel.forwards, 0)[4].startswith("in 2 h") or cells(
        panel.forwards, 0)[4].startswith("in 1 h 59 min")
    assert cells(panel.forwards, 1)[4] == "when the qube stops"
    screenshot(panel, "panel-expiry", tmp_path)


# --- stale views ---------------------------------------------------------------


def test_a_stale_view_is_refreshed_not_written_back(
    qtbot: QtBot, api: Lab, panel: NetworkServerPanel, tmp_path: Path
) -> None:
    first = "action=forward forwardtype=external proto=tcp srcports=8080 dstports=80"
    set_list("web", "forward", first)
    panel.refresh()
    assert panel.forwards.view.topLevelItemCount() == 1
    # Meanwhile, outside the panel (qvm-firewall, another window):
    other = "action=forward forwardtype=external proto=tcp srcports=9090 dstports=90"
    set_list("web", "forward", other)
    select(panel.forwards, 0)  # still shows the first rule
    click(qtbot, panel.forwards.edit_button)
    assert panel.dialog is None  # no dialog on a rule that is gone
    assert "changed or removed elsewhere" in panel.status_label.text()
    assert cells(panel.forwards, 0)[2] == "9090 → 90"  # the view was read again
    screenshot(panel, "panel-stale", tmp_path)
    assert [x for x in stored(api) if "action=forward" in x] == [canonical(other)]

    # Removing from a stale view removes nothing either.
    set_list("web", "forward", first)
    select(panel.forwards, 0)  # shows the 9090 rule, which is gone again
    click(qtbot, panel.forwards.remove_button)
    assert [x for x in stored(api) if "action=forward" in x] == [canonical(first)]


def test_an_add_from_an_old_view_keeps_rules_added_meanwhile(
    qtbot: QtBot, api: Lab, panel: NetworkServerPanel
) -> None:
    """Qube Manager's stale-cache deletion cannot happen: every edit starts from a fresh read."""
    meanwhile = "action=accept srcqube=work proto=tcp dstports=22"
    set_list("web", "inbound", meanwhile)  # the panel still shows no inbound rule
    click(qtbot, panel.inbound.add_button)
    dialog = opened(panel, InboundRuleDialog)
    dialog.srcqube_edit.setText("direct")
    press_ok(qtbot, dialog)
    inbound = [x for x in stored(api) if "srcqube=" in x]
    assert inbound == [canonical(meanwhile), canonical("action=accept srcqube=direct")]
    assert panel.inbound.view.topLevelItemCount() == 2


def test_the_outbound_rules_are_never_touched(
    qtbot: QtBot, api: Lab, panel: NetworkServerPanel
) -> None:
    outbound = ["action=accept specialtarget=dns", "action=accept proto=icmp", "action=drop"]
    qubesd_call("web", "admin.vm.firewall.Set", "",
                "".join(f"{x}\n" for x in outbound).encode())
    click(qtbot, panel.forwards.add_button)
    dialog = opened(panel, ForwardRuleDialog)
    dialog.srcports_edit.setText("8080")
    press_ok(qtbot, dialog)
    got = qubesd_call("web", "admin.vm.firewall.Get").decode().splitlines()
    assert got == [canonical(x) for x in outbound]


# --- qubes-network-server-settings ----------------------------------------------


def test_the_settings_window_holds_the_panel_for_the_qube(
    qtbot: QtBot, api: Lab, tmp_path: Path
) -> None:
    set_list("web", "forward",
             "action=forward forwardtype=external proto=tcp srcports=8080 dstports=80")
    set_list("web", "inbound", "action=accept srcqube=work proto=tcp dstports=22")
    window = SettingsWindow(RuleStore("web"))
    qtbot.addWidget(window)
    window.show()
    assert window.windowTitle() == "Port forwarding and inbound access: web"
    assert window.panel.forwards.view.topLevelItemCount() == 1
    assert window.panel.inbound.view.topLevelItemCount() == 1
    screenshot(window, "settings-window", tmp_path)


def test_the_settings_command_refuses_an_unknown_qube_in_one_line(api: Lab) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "qubes-network-server-settings"), "nosuchqube"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "QUBESD_SOCKET": str(api.qubesd_socket)},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("qubes-network-server-settings: error: ")
    assert "nosuchqube" in result.stderr and result.stderr.count("\n") == 1
