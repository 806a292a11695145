"""One dialog per rule kind, laid out like Qube Manager's "New Address" dialog.

A dialog turns its fields into ``(option, value)`` pairs and builds the
rule with :mod:`firewall_rules`, the code dom0 validates with, so what it
refuses is what dom0 would refuse. A valid rule is handed to ``save``
(which sends it); dom0's refusal is shown in the dialog in plain words and
the dialog stays open: nothing was stored, the user can fix and retry.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from PyQt6 import QtCore, QtWidgets

from admin_client_patch.gui.display import FORWARD_TYPES, INBOUND_ACTIONS, duration_text
from admin_client_patch.gui.rule_store import StaleViewError
from admin_client_patch.qubesd_client import QubesException
from firewall_rules import Rule, RuleError
from firewall_rules.options import Expire

#: Units the time-span expiry offers, in seconds.
SPAN_UNITS = (("minutes", 60), ("hours", 3600), ("days", 86400))

Save = Callable[[Rule], None]


class ExpiryChooser(QtWidgets.QWidget):
    """Never / for a time span / until the qube stops (/ keep the current end time)."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QtWidgets.QGridLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.never_radio = QtWidgets.QRadioButton("Never")
        self.span_radio = QtWidgets.QRadioButton("For")
        self.span_value = QtWidgets.QSpinBox()
        self.span_value.setRange(1, 9999)
        self.span_value.setValue(60)
        self.span_unit = QtWidgets.QComboBox()
        for label, _seconds in SPAN_UNITS:
            self.span_unit.addItem(label)
        self.shutdown_radio = QtWidgets.QRadioButton("Until the qube stops")
        self.shutdown_radio.setToolTip(
            "dom0 deletes the rule when the qube shuts down; it does not come back"
            " with the next start. The qube must be running."
        )
        self.keep_radio = QtWidgets.QRadioButton()
        self.keep_radio.setVisible(False)
        self._kept: int | None = None
        span = QtWidgets.QHBoxLayout()
        span.addWidget(self.span_radio)
        span.addWidget(self.span_value)
        span.addWidget(self.span_unit)
        span.addStretch()
        layout.addWidget(self.never_radio, 0, 0)
        layout.addLayout(span, 1, 0)
        layout.addWidget(self.shutdown_radio, 2, 0)
        layout.addWidget(self.keep_radio, 3, 0)
        self.never_radio.setChecked(True)
        self.span_value.valueChanged.connect(lambda _value: self.span_radio.setChecked(True))
        self.span_unit.currentIndexChanged.connect(lambda _i: self.span_radio.setChecked(True))

    def set_expire(self, expire: Expire | None, now: float) -> None:
        """Show a stored rule's expiry; an end time is kept exactly unless changed."""
        if expire is None:
            self.never_radio.setChecked(True)
        elif expire.timestamp is None:
            self.shutdown_radio.setChecked(True)
        else:
            self._kept = expire.timestamp
            end = time.strftime("%Y-%m-%d %H:%M", time.localtime(expire.timestamp))
            self.keep_radio.setText(
                f"Keep: until {end} (in {duration_text(expire.timestamp - now)})"
            )
            self.keep_radio.setVisible(True)
            self.keep_radio.setChecked(True)

    def option(self, now: float) -> str | None:
        """The ``expire=`` value chosen, or None for never."""
        if self.shutdown_radio.isChecked():
            return Expire.AT_SHUTDOWN
        if self.keep_radio.isChecked() and self._kept is not None:
            return str(self._kept)
        if self.span_radio.isChecked():
            seconds = self.span_value.value() * SPAN_UNITS[self.span_unit.currentIndex()][1]
            return str(int(now) + seconds)
        return None


def _radio_row(*labels: str) -> tuple[QtWidgets.QHBoxLayout, list[QtWidgets.QRadioButton]]:
    """A row of radio buttons in their own group, the first checked."""
    row = QtWidgets.QHBoxLayout()
    group = QtWidgets.QButtonGroup(row)
    buttons = []
    for label in labels:
        button = QtWidgets.QRadioButton(label)
        group.addButton(button)
        row.addWidget(button)
        buttons.append(button)
    row.addStretch()
    buttons[0].setChecked(True)
    return row, buttons


class RuleDialog(QtWidgets.QDialog):
    """Fields in a grid, an error line, OK/Cancel; subclasses supply the fields."""

    title_new = ""
    title_edit = ""

    def __init__(
        self, save: Save, editing: Rule | None = None,
        parent: QtWidgets.QWidget | None = None, clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(parent)
        self._save = save
        self._clock = clock
        self.setWindowTitle(self.title_edit if editing else self.title_new)
        self.grid = QtWidgets.QGridLayout()
        self._rows = 0
        self._build()
        self.expiry = ExpiryChooser()
        self.add_row("Expires", self.expiry)
        self.comment_edit = QtWidgets.QLineEdit()
        self.comment_edit.setPlaceholderText("Comment (optional)")
        self.comment_edit.setToolTip("Comments are for user reference only")
        self.add_row("Comment", self.comment_edit)
        self.error_label = QtWidgets.QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color: #d40000; font-weight: bold;")
        self.error_label.setVisible(False)
        self.button_box = QtWidgets.QDialogButtonBox(
            QtWidgets.QDialogButtonBox.StandardButton.Ok
            | QtWidgets.QDialogButtonBox.StandardButton.Cancel
        )
        self.button_box.accepted.connect(self.accept)
        self.button_box.rejected.connect(self.reject)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(self.grid)
        note = self.note()
        if note:
            note_label = QtWidgets.QLabel(note)
            note_label.setWordWrap(True)
            layout.addWidget(note_label)
        layout.addWidget(self.error_label)
        layout.addWidget(self.button_box)
        self.setMinimumWidth(520)
        if editing is not None:
            self.set_rule(editing)

    # --- for subclasses ------------------------------------------------------

    def _build(self) -> None:
        raise NotImplementedError

    def note(self) -> str:
        return ""

    def pairs(self) -> list[tuple[str, str]]:
        """The rule's options from the kind-specific fields."""
        raise NotImplementedError

    def set_rule(self, rule: Rule) -> None:
        """Fill the fields from a stored rule."""
        self.expiry.set_expire(rule.expire, self._clock())
        self.comment_edit.setText("" if rule.comment is None else str(rule.comment))

    def add_row(self, label: str, field: QtWidgets.QWidget | QtWidgets.QLayout) -> None:
        text = QtWidgets.QLabel(label)
        text.setAlignment(QtCore.Qt.AlignmentFlag.AlignLeft | QtCore.Qt.AlignmentFlag.AlignTop)
        self.grid.addWidget(text, self._rows, 0)
        if isinstance(field, QtWidgets.QLayout):
            self.grid.addLayout(field, self._rows, 1)
        else:
            self.grid.addWidget(field, self._rows, 1)
        self._rows += 1

    # --- the rule ------------------------------------------------------------

    def rule(self) -> Rule:
        """The rule the fields describe; RuleError (one line) if they describe none."""
        pairs = self.pairs()
        expire = self.expiry.option(self._clock())
        if expire is not None:
            pairs.append(("expire", expire))
        comment = self.comment_edit.text().strip()
        if comment:
            pairs.append(("comment", comment))
        return Rule.from_options(pairs)

    def show_error(self, text: str) -> None:
        self.error_label.setText(text)
        self.error_label.setVisible(True)
        self.adjustSize()

    def accept(self) -> None:
        """Validate, send; close only once dom0 stored the rule."""
        try:
            rule = self.rule()
        except RuleError as err:
            self.show_error(f"Not a valid rule: {err}")
            return
        try:
            self._save(rule)
        except StaleViewError as err:
            self.show_error(str(err))
            self.button_box.button(QtWidgets.QDialogButtonBox.StandardButton.Ok).setEnabled(False)
            return
        except QubesException as err:
            self.show_error(f"dom0 refused the rule, nothing was changed: {err}")
            return
        super().accept()


class ForwardRuleDialog(RuleDialog):
    """A forward: where it is reachable, protocol, ports, source."""

    title_new = "New port forward"
    title_edit = "Edit port forward"

    def _build(self) -> None:
        row, (self.external_radio, self.internal_radio) = _radio_row(
            FORWARD_TYPES["external"], FORWARD_TYPES["internal"]
        )
        self.add_row("Reachable", row)
        row, (self.tcp_radio, self.udp_radio) = _radio_row("TCP", "UDP")
        self.add_row("Protocol", row)
        self.srcports_edit = QtWidgets.QLineEdit()
        self.srcports_edit.setPlaceholderText("e.g. 8080 or 8000-8010")
        self.srcports_edit.setToolTip("Where others connect: on the LAN address of the"
                                      " outermost net qube (external), or on the address"
                                      " of this qube's net qube (internal)")
        self.add_row("External port(s)", self.srcports_edit)
        self.dstports_edit = QtWidgets.QLineEdit()
        self.dstports_edit.setPlaceholderText("same as the external port(s)")
        self.add_row("Port(s) in the qube", self.dstports_edit)
        source = QtWidgets.QGridLayout()
        group = QtWidgets.QButtonGroup(source)
        self.any_source_radio = QtWidgets.QRadioButton("Anyone")
        self.host_source_radio = QtWidgets.QRadioButton("Address or network:")
        self.qube_source_radio = QtWidgets.QRadioButton("Qube:")
        self.srchost_edit = QtWidgets.QLineEdit()
        self.srchost_edit.setPlaceholderText("e.g. 192.168.1.0/24")
        self.srcqube_edit = QtWidgets.QLineEdit()
        self.srcqube_edit.setPlaceholderText("internal forwards only")
        for number, (radio, edit) in enumerate((
            (self.any_source_radio, None),
            (self.host_source_radio, self.srchost_edit),
            (self.qube_source_radio, self.srcqube_edit),
        )):
            group.addButton(radio)
            source.addWidget(radio, number, 0)
            if edit is not None:
                source.addWidget(edit, number, 1)
                edit.textEdited.connect(lambda _text, radio=radio: radio.setChecked(True))
        self.any_source_radio.setChecked(True)
        self.add_row("Source", source)

    def note(self) -> str:
        return ("Changes apply at once, through every net qube on the way. The qube's"
                " outbound rules are not affected.")

    def pairs(self) -> list[tuple[str, str]]:
        srcports = self.srcports_edit.text().strip()
        dstports = self.dstports_edit.text().strip() or srcports
        pairs = [
            ("action", "forward"),
            ("forwardtype", "internal" if self.internal_radio.isChecked() else "external"),
            ("proto", "udp" if self.udp_radio.isChecked() else "tcp"),
            ("srcports", srcports),
            ("dstports", dstports),
        ]
        if self.host_source_radio.isChecked():
            pairs.append(("srchost", self.srchost_edit.text().strip()))
        elif self.qube_source_radio.isChecked():
            pairs.append(("srcqube", self.srcqube_edit.text().strip()))
        return pairs

    def set_rule(self, rule: Rule) -> None:
        (self.internal_radio if str(rule.forwardtype) == "internal"
         else self.external_radio).setChecked(True)
        (self.udp_radio if str(rule.proto) == "udp" else self.tcp_radio).setChecked(True)
        self.srcports_edit.setText(str(rule.srcports))
        self.dstports_edit.setText(str(rule.dstports))
        if rule.srchost is not None:
            self.host_source_radio.setChecked(True)
            self.srchost_edit.setText(str(rule.srchost))
        elif rule.srcqube is not None:
            self.qube_source_radio.setChecked(True)
            self.srcqube_edit.setText(str(rule.srcqube))
        super().set_rule(rule)


class InboundRuleDialog(RuleDialog):
    """An inbound rule: allow or block connections from an address or a qube."""

    title_new = "New inbound rule"
    title_edit = "Edit inbound rule"

    def _build(self) -> None:
        row, (self.accept_radio, self.drop_radio) = _radio_row(
            INBOUND_ACTIONS["accept"], INBOUND_ACTIONS["drop"]
        )
        self.add_row("Action", row)
        source = QtWidgets.QGridLayout()
        group = QtWidgets.QButtonGroup(source)
        self.qube_source_radio = QtWidgets.QRadioButton("Qube:")
        self.host_source_radio = QtWidgets.QRadioButton("Address or network:")
        self.srcqube_edit = QtWidgets.QLineEdit()
        self.srcqube_edit.setPlaceholderText("e.g. work")
        self.srchost_edit = QtWidgets.QLineEdit()
        self.srchost_edit.setPlaceholderText("e.g. 10.137.0.6")
        for number, (radio, edit) in enumerate((
            (self.qube_source_radio, self.srcqube_edit),
            (self.host_source_radio, self.srchost_edit),
        )):
            group.addButton(radio)
            source.addWidget(radio, number, 0)
            source.addWidget(edit, number, 1)
            edit.textEdited.connect(lambda _text, radio=radio: radio.setChecked(True))
        self.qube_source_radio.setChecked(True)
        self.add_row("Source", source)
        row, (self.any_radio, self.tcp_radio, self.udp_radio, self.icmp_radio) = _radio_row(
            "Any", "TCP", "UDP", "ICMP"
        )
        self.add_row("Protocol", row)
        self.ports_edit = QtWidgets.QLineEdit()
        self.ports_edit.setPlaceholderText("TCP/UDP: port or range (empty: all); ICMP: type")
        self.add_row("Port(s) / ICMP type", self.ports_edit)

    def note(self) -> str:
        return ("Rules are checked in order; the first that matches decides. Without a"
                " rule that allows it, nothing can connect to the qube.")

    def pairs(self) -> list[tuple[str, str]]:
        action = "drop" if self.drop_radio.isChecked() else "accept"
        pairs = [("action", action)]
        if self.host_source_radio.isChecked():
            pairs.append(("srchost", self.srchost_edit.text().strip()))
        else:
            pairs.append(("srcqube", self.srcqube_edit.text().strip()))
        ports = self.ports_edit.text().strip()
        for radio, proto in ((self.tcp_radio, "tcp"), (self.udp_radio, "udp"),
                             (self.icmp_radio, "icmp")):
            if radio.isChecked():
                pairs.append(("proto", proto))
                if ports:
                    pairs.append(("icmptype" if proto == "icmp" else "dstports", ports))
        if self.any_radio.isChecked() and ports:
            raise RuleError("choose TCP, UDP or ICMP to give port(s) or an ICMP type")
        return pairs

    def set_rule(self, rule: Rule) -> None:
        (self.drop_radio if str(rule.action) == "drop" else self.accept_radio).setChecked(True)
        if rule.srchost is not None:
            self.host_source_radio.setChecked(True)
            self.srchost_edit.setText(str(rule.srchost))
        else:
            self.qube_source_radio.setChecked(True)
            self.srcqube_edit.setText(str(rule.srcqube))
        proto_radios = {"tcp": self.tcp_radio, "udp": self.udp_radio, "icmp": self.icmp_radio}
        proto_radios.get(str(rule.proto), self.any_radio).setChecked(True)
        if rule.dstports is not None:
            self.ports_edit.setText(str(rule.dstports))
        elif rule.icmptype is not None:
            self.ports_edit.setText(str(rule.icmptype))
        super().set_rule(rule)
