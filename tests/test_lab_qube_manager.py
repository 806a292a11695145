"""Upstream Qube Manager with admin_client_patch/qube-manager.patch, against the lab.

The Settings window of a qube holding outbound, forward and inbound rules
opens with the Firewall tab split: upstream's outbound half on top, the
panel below. Saving an outbound change through upstream's own code keeps
the forward and inbound rules, read back with qvm-firewall.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from gui_lab import stored
from gui_shots import screenshot
from PyQt6 import QtWidgets
from pytestqt.qtbot import QtBot
from qube_manager_env import PATCH, build_manager, import_paths, lab_backed_app
from qube_manager_env import load_settings_module as load_settings
from upstream_env import MANAGER, require_upstream

from admin_client_patch.qubesd_client import qubesd_call
from firewall_rules import Rule, RuleKind
from lab.control import Lab

pytestmark = pytest.mark.lab

#: The lab's qubes as Qube Manager's qubesadmin app describes them.
LAB_QUBES: dict[str, dict[str, Any]] = {
    "web": {"netvm": "sys-firewall", "running": True, "template": "fedora-36",
            "label": "green"},
    "work": {"netvm": "sys-firewall", "running": True, "template": "fedora-36",
             "label": "blue"},
}

OUTBOUND = [
    "action=accept dsthost=192.0.2.10/32 proto=tcp dstports=443",
    "action=accept specialtarget=dns",
    "action=accept proto=icmp",
    "action=drop",
]
FORWARD = ["action=forward forwardtype=external proto=tcp srcports=8080 dstports=80"
           " comment=web site"]
INBOUND = ["action=accept srcqube=work proto=tcp dstports=22"]


def canonical(lines: list[str]) -> list[str]:
    return [Rule.from_api_string(line).api_rule for line in lines]


def set_list(qube: str, kind: str, lines: list[str]) -> None:
    payload = "".join(f"{line}\n" for line in lines).encode()
    qubesd_call(qube, "admin.vm.firewall.Set", kind, payload)


@pytest.fixture(scope="module")
def settings_module(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    root = require_upstream(MANAGER, "qubes-core-admin-client")
    scratch = tmp_path_factory.mktemp("qube-manager")
    manager = build_manager(root, scratch / "qubes-manager", PATCH)
    return load_settings(import_paths(root, scratch, manager))


@pytest.fixture
def web_rules(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """web holds all three kinds; reset after the test."""
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    set_list("web", "", OUTBOUND)
    set_list("web", "forward", FORWARD)
    set_list("web", "inbound", INBOUND)
    yield lab
    set_list("web", "forward", [])
    set_list("web", "inbound", [])
    set_list("web", "", ["action=accept"])


def open_settings(qtbot: QtBot, settings: ModuleType, lab: Lab) -> Any:
    app = lab_backed_app(lab.qubesd_socket, LAB_QUBES)
    window = settings.VMSettingsWindow(
        "web", "firewall", qapp=QtWidgets.QApplication.instance(), qubesapp=app
    )
    qtbot.addWidget(window)
    window.show()
    return window


def test_settings_shows_outbound_forward_and_inbound_rules(
    qtbot: QtBot, settings_module: ModuleType, web_rules: Lab, tmp_path: Path
) -> None:
    window = open_settings(qtbot, settings_module, web_rules)
    assert window.tabWidget.currentWidget() is window.firewall_tab
    # upstream's half: the simple "limit outgoing connections" form, filled
    assert not window.firewall_modified_outside_label.isVisible()
    assert window.policy_deny_radio_button.isChecked()
    model = window.rulesTreeView.model()
    assert model.rowCount() == 1
    assert model.data(model.index(0, 0)) == "192.0.2.10/32"  # as upstream shows it
    assert model.data(model.index(0, 1)).startswith("443")
    # the lower half: the panel, below the outbound rules in one splitter
    panel = window.network_server_panel
    assert window.firewall_splitter.indexOf(window.outbound_rules_widget) == 0
    assert window.firewall_splitter.indexOf(window.network_server_widget) == 1
    assert panel.forwards.view.topLevelItem(0).text(2) == "8080 → 80"
    assert "sys-net" in panel.forwards.view.topLevelItem(0).child(0).text(0)
    assert panel.inbound.view.topLevelItem(0).text(1) == "qube work"
    window.resize(1100, 900)
    screenshot(window, "qube-manager-settings", tmp_path)


def test_an_outbound_change_saved_by_qube_manager_keeps_forward_and_inbound_rules(
    qtbot: QtBot, settings_module: ModuleType, web_rules: Lab
) -> None:
    window = open_settings(qtbot, settings_module, web_rules)
    window.policy_allow_radio_button.click()  # "Allow all outgoing connections"
    window.save_changes()
    rules = stored(web_rules)
    outbound = qubesd_call("web", "admin.vm.firewall.Get").decode().splitlines()
    # upstream keeps the listed addresses and ends with accept-all instead of
    # dns, icmp, drop
    assert outbound == canonical([OUTBOUND[0], "action=accept"])
    for line in canonical(FORWARD + INBOUND):
        assert line in rules


def test_an_outbound_rule_removed_in_qube_manager_keeps_the_others(
    qtbot: QtBot, settings_module: ModuleType, web_rules: Lab
) -> None:
    window = open_settings(qtbot, settings_module, web_rules)
    view = window.rulesTreeView
    view.setCurrentIndex(view.model().index(0, 0))  # the rule to 192.0.2.10
    assert view.selectedIndexes()
    assert window.delete_rule_button.isEnabled()
    window.delete_rule_button.click()
    assert window.fw_model.rowCount() == 0
    window.save_changes()
    outbound = qubesd_call("web", "admin.vm.firewall.Get").decode().splitlines()
    assert outbound == canonical(OUTBOUND[1:])
    rules = stored(web_rules)
    for line in canonical(FORWARD + INBOUND):
        assert line in rules


def test_the_panel_in_qube_manager_edits_through_qubesadmin_and_shows_refusals(
    qtbot: QtBot, settings_module: ModuleType, web_rules: Lab
) -> None:
    """Its calls go through Qube Manager's qubesadmin app; a refusal is qubesadmin's exception."""
    window = open_settings(qtbot, settings_module, web_rules)
    panel = window.network_server_panel
    panel.add_rule(RuleKind.INBOUND)
    panel.dialog.srcqube_edit.setText("direct")
    panel.dialog.accept()
    assert canonical(["action=accept srcqube=direct"])[0] in stored(web_rules)
    panel.add_rule(RuleKind.FORWARD)
    dialog = panel.dialog
    dialog.srcports_edit.setText("8080")  # web's own first forward has it
    dialog.accept()
    assert dialog.isVisible()
    assert dialog.error_label.text().startswith("dom0 refused the rule, nothing was changed:")
    assert "is wanted by both 'web'" in dialog.error_label.text()
    assert [x for x in stored(web_rules) if "action=forward" in x] == canonical(FORWARD)
