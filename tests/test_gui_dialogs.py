"""The rule dialogs and the panel's texts, without dom0.

A dialog's ``save`` is its contract with the panel: here it records what
it is given, or raises what dom0 would raise. Against the lab's qubesd the
panel is driven in tests/test_lab_gui.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gui_shots import screenshot
from pytestqt.qtbot import QtBot

from admin_client_patch.gui.dialogs import ForwardRuleDialog, InboundRuleDialog, RuleDialog
from admin_client_patch.gui.display import (
    duration_text,
    expiry_text,
    forward_row,
    inbound_row,
)
from admin_client_patch.qubesd_client import QubesValueError
from firewall_rules import Rule

NOW = 1_800_000_000.0


def clock() -> float:
    return NOW


class Recorder:
    """A save that stores what it gets, or refuses with ``refusal``."""

    def __init__(self, refusal: Exception | None = None) -> None:
        self.saved: list[Rule] = []
        self.refusal = refusal

    def __call__(self, rule: Rule) -> None:
        if self.refusal is not None:
            raise self.refusal
        self.saved.append(rule)


def forward_dialog(qtbot: QtBot, save: Recorder, editing: Rule | None = None) -> ForwardRuleDialog:
    dialog = ForwardRuleDialog(save, editing=editing, clock=clock)
    qtbot.addWidget(dialog)
    dialog.show()
    return dialog


def inbound_dialog(qtbot: QtBot, save: Recorder, editing: Rule | None = None) -> InboundRuleDialog:
    dialog = InboundRuleDialog(save, editing=editing, clock=clock)
    qtbot.addWidget(dialog)
    dialog.show()
    return dialog


def ok(dialog: RuleDialog) -> None:
    dialog.accept()


def test_forward_fields_become_the_canonical_rule(qtbot: QtBot) -> None:
    save = Recorder()
    dialog = forward_dialog(qtbot, save)
    dialog.srcports_edit.setText("8080")
    dialog.dstports_edit.setText("80")
    dialog.host_source_radio.setChecked(True)
    dialog.srchost_edit.setText("192.168.1.0/24")
    dialog.comment_edit.setText("web site")
    ok(dialog)
    assert [r.api_rule for r in save.saved] == [
        "action=forward forwardtype=external srchost=192.168.1.0/24 proto=tcp"
        " srcports=8080-8080 dstports=80-80 comment=web site"
    ]
    assert dialog.result() == dialog.DialogCode.Accepted


def test_forward_qube_port_defaults_to_the_external_port(qtbot: QtBot) -> None:
    save = Recorder()
    dialog = forward_dialog(qtbot, save)
    dialog.internal_radio.setChecked(True)
    dialog.udp_radio.setChecked(True)
    dialog.srcports_edit.setText(" 5000-5002 ")
    ok(dialog)
    assert save.saved[0].api_rule == (
        "action=forward forwardtype=internal proto=udp srcports=5000-5002 dstports=5000-5002"
    )


@pytest.mark.parametrize(("fill", "message"), [
    ({"srcports_edit": "70000"}, "srcports='70000': ports go up to 65535"),
    ({"srcports_edit": ""}, "srcports='': use PORT or FIRST-LAST"),
    ({"srcports_edit": "80-82", "dstports_edit": "80"}, "must hold the same number of ports"),
    ({"srcports_edit": "80", "srcqube_edit": "work"}, "srcqube= needs forwardtype=internal"),
    ({"srcports_edit": "80", "srchost_edit": "example.com"}, "must be an IP address"),
    ({"srcports_edit": "80", "comment_edit": "<b>"}, "comment: only letters"),
])
def test_forward_refuses_what_dom0_would_refuse(
    qtbot: QtBot, fill: dict[str, str], message: str
) -> None:
    save = Recorder()
    dialog = forward_dialog(qtbot, save)
    for field, text in fill.items():
        getattr(dialog, field).setText(text)
        getattr(dialog, field).textEdited.emit(text)  # as typing does: picks its source radio
    ok(dialog)
    assert save.saved == []
    assert dialog.isVisible()
    assert dialog.error_label.isVisible()
    assert dialog.error_label.text().startswith("Not a valid rule: ")
    assert message in dialog.error_label.text()


def test_dom0_refusal_is_shown_and_the_dialog_stays_open(qtbot: QtBot) -> None:
    refusal = QubesValueError("tcp port 8080 on 'sys-net' is wanted by both 'work' (rule 0)"
                              " and 'web' (rule 1)")
    dialog = forward_dialog(qtbot, Recorder(refusal))
    dialog.srcports_edit.setText("8080")
    ok(dialog)
    assert dialog.isVisible()
    assert dialog.error_label.text() == (
        "dom0 refused the rule, nothing was changed: tcp port 8080 on 'sys-net' is wanted"
        " by both 'work' (rule 0) and 'web' (rule 1)"
    )


@pytest.mark.parametrize("line", [
    "action=forward forwardtype=external proto=tcp srcports=8080-8080 dstports=80-80",
    "action=forward forwardtype=internal srcqube=work proto=udp srcports=53-53 dstports=53-53"
    " comment=dns",
    f"action=forward expire={int(NOW) + 3600} forwardtype=external srchost=10.0.0.0/8"
    " proto=tcp srcports=2000-2010 dstports=3000-3010",
    "action=forward expire=shutdown forwardtype=external proto=tcp srcports=22-22"
    " dstports=22-22",
])
def test_forward_dialog_shows_a_stored_rule_and_gives_it_back_unchanged(
    qtbot: QtBot, line: str
) -> None:
    rule = Rule.from_api_string(line)
    assert rule.api_rule == line
    dialog = forward_dialog(qtbot, Recorder(), editing=rule)
    assert dialog.windowTitle() == "Edit port forward"
    assert dialog.rule() == rule


@pytest.mark.parametrize("line", [
    "action=accept srcqube=work proto=tcp dstports=22-22",
    "action=drop srchost=10.137.0.0/16",
    "action=accept srchost=10.137.0.6/32 proto=icmp icmptype=8 comment=ping",
    f"action=accept expire={int(NOW) + 60} srcqube=work proto=udp",
    "action=accept expire=shutdown srcqube=work",
])
def test_inbound_dialog_shows_a_stored_rule_and_gives_it_back_unchanged(
    qtbot: QtBot, line: str
) -> None:
    rule = Rule.from_api_string(line)
    assert rule.api_rule == line
    dialog = inbound_dialog(qtbot, Recorder(), editing=rule)
    assert dialog.rule() == rule


def test_inbound_fields_become_the_canonical_rule(qtbot: QtBot) -> None:
    save = Recorder()
    dialog = inbound_dialog(qtbot, save)
    dialog.srcqube_edit.setText("work")
    dialog.tcp_radio.setChecked(True)
    dialog.ports_edit.setText("22")
    ok(dialog)
    assert save.saved[0].api_rule == "action=accept srcqube=work proto=tcp dstports=22-22"


def test_inbound_needs_a_source_and_a_protocol_for_ports(qtbot: QtBot, tmp_path: Path) -> None:
    save = Recorder()
    dialog = inbound_dialog(qtbot, save)
    ok(dialog)
    assert "srcqube='': not a qube name" in dialog.error_label.text()
    dialog.srcqube_edit.setText("work")
    dialog.ports_edit.setText("22")
    ok(dialog)
    assert "choose TCP, UDP or ICMP" in dialog.error_label.text()
    assert save.saved == []
    dialog.srcqube_edit.setText("my work")
    dialog.tcp_radio.setChecked(True)
    ok(dialog)
    screenshot(dialog, "inbound-invalid", tmp_path)


@pytest.mark.parametrize(("value", "unit", "seconds"), [
    (90, 0, 90 * 60), (2, 1, 2 * 3600), (3, 2, 3 * 86400),
])
def test_expiry_for_a_time_span(qtbot: QtBot, value: int, unit: int, seconds: int) -> None:
    save = Recorder()
    dialog = inbound_dialog(qtbot, save)
    dialog.srcqube_edit.setText("work")
    dialog.expiry.span_value.setValue(value)
    dialog.expiry.span_unit.setCurrentIndex(unit)
    assert dialog.expiry.span_radio.isChecked()  # touching the span picks it
    ok(dialog)
    assert save.saved[0].expire is not None
    assert save.saved[0].expire.timestamp == int(NOW) + seconds


def test_expiry_until_the_qube_stops(qtbot: QtBot) -> None:
    save = Recorder()
    dialog = forward_dialog(qtbot, save)
    dialog.srcports_edit.setText("80")
    dialog.expiry.shutdown_radio.setChecked(True)
    ok(dialog)
    assert save.saved[0].expires_at_shutdown


def test_a_kept_end_time_can_be_changed_to_never(qtbot: QtBot) -> None:
    rule = Rule.from_api_string(f"action=accept srcqube=work expire={int(NOW) + 600}")
    save = Recorder()
    dialog = inbound_dialog(qtbot, save, editing=rule)
    assert dialog.expiry.keep_radio.isChecked()
    assert dialog.expiry.keep_radio.text().endswith("(in 10 min)")
    dialog.expiry.never_radio.setChecked(True)
    ok(dialog)
    assert save.saved[0].expire is None


# --- texts ------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 s"), (59.2, "1 min"), (58.5, "59 s"), (61, "2 min"), (3600, "1 h"), (3660, "1 h 1 min"),
    (86400, "1 day"), (2 * 86400 + 3 * 3600, "2 days 3 h"),
])
def test_duration_text(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


def test_rows_read_as_plain_words() -> None:
    forward = Rule.from_api_string(
        "action=forward forwardtype=external srchost=192.168.1.7 proto=tcp srcports=8080"
        " dstports=80 expire=shutdown comment=site"
    )
    assert forward_row(forward, NOW) == [
        "External (from the LAN)", "TCP", "8080 → 80", "192.168.1.7", "when the qube stops",
        "site",
    ]
    inbound = Rule.from_api_string(
        f"action=drop srcqube=work proto=icmp icmptype=8 expire={int(NOW) + 7200}"
    )
    end = time.strftime("%Y-%m-%d %H:%M", time.localtime(NOW + 7200))
    assert inbound_row(inbound, NOW) == [
        "Block", "qube work", "ICMP", "ICMP type 8", f"in 2 h ({end})", "",
    ]
    assert expiry_text(Rule.from_api_string("action=accept srcqube=w"), NOW) == "never"
