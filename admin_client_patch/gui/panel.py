"""The panel: a qube's forward rules (with their paths) and inbound rules.

Each table has Add / Edit / Remove beside it, as Qube Manager's firewall
tab has; the inbound table also Move up / Move down, since its first
matching rule decides (a forward's place in its list decides nothing:
dom0 refuses two forwards of one qube on the same port). Changes go to
dom0 at once, one whole-list ``Set`` per change; the tables are read
again after each, and before each edit, removal or move the rule is
looked up in a fresh read (:mod:`rule_store`), so a view left open for
minutes can never write back what it showed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from PyQt6 import QtCore, QtGui, QtWidgets

from admin_client_patch.gui.dialogs import ForwardRuleDialog, InboundRuleDialog, RuleDialog
from admin_client_patch.gui.display import (
    FORWARD_COLUMNS,
    INBOUND_COLUMNS,
    forward_row,
    inbound_row,
)
from admin_client_patch.gui.rule_store import RuleStore, StaleViewError
from admin_client_patch.qubesd_client import QubesException
from firewall_rules import Rule, RuleKind

#: Where a tree item keeps its rule and its row in the list as read.
RULE_ROLE = QtCore.Qt.ItemDataRole.UserRole

_DIALOGS: dict[RuleKind, type[RuleDialog]] = {
    RuleKind.FORWARD: ForwardRuleDialog,
    RuleKind.INBOUND: InboundRuleDialog,
}


def _rule_button(icon: str | None, text: str, tooltip: str) -> QtWidgets.QPushButton:
    """Qube Manager's icon button when its icons are loaded, else a text button."""
    button = QtWidgets.QPushButton()
    if icon is not None and QtCore.QFile.exists(f":/{icon}"):
        button.setIcon(QtGui.QIcon(f":/{icon}"))
        button.setIconSize(QtCore.QSize(24, 24))
    else:
        button.setText(text)
    button.setToolTip(tooltip)
    return button


class RuleTable(QtWidgets.QWidget):
    """One list: a tree view like Qube Manager's rule list, buttons to its right."""

    def __init__(
        self, kind: RuleKind, columns: tuple[str, ...], what: str, ordered: bool = False
    ) -> None:
        """``ordered``: the first matching rule decides, so rows can be moved."""
        super().__init__()
        self.kind = kind
        self.view = QtWidgets.QTreeWidget()
        self.view.setColumnCount(len(columns))
        self.view.setHeaderLabels(list(columns))
        self.view.setRootIsDecorated(False)
        self.view.setItemsExpandable(False)
        self.view.setAllColumnsShowFocus(True)
        self.view.setUniformRowHeights(True)
        self.view.setIndentation(0)
        self.view.header().setStretchLastSection(True)
        self.view.header().setSectionResizeMode(
            QtWidgets.QHeaderView.ResizeMode.ResizeToContents
        )
        self.add_button = _rule_button("add", "Add…", f"Add a {what}")
        self.edit_button = _rule_button("edit", "Edit…", f"Edit the selected {what}")
        self.remove_button = _rule_button("remove", "Remove", f"Remove the selected {what}")
        # Qube Manager has no icons for these: text buttons there too.
        self.up_button = _rule_button(
            None, "Move up", f"Move the selected {what} up: it is checked before the one above"
        ) if ordered else None
        self.down_button = _rule_button(
            None, "Move down", f"Move the selected {what} down: it is checked after the one below"
        ) if ordered else None
        buttons = QtWidgets.QVBoxLayout()
        for button in (self.add_button, self.edit_button, self.remove_button,
                       self.up_button, self.down_button):
            if button is not None:
                buttons.addWidget(button)
        buttons.addStretch()
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.view)
        layout.addLayout(buttons)
        self.view.itemSelectionChanged.connect(self._selection_changed)
        self._selection_changed()

    def show_rules(self, rows: list[tuple[Rule, list[str], str | None]]) -> None:
        """Replace the rows; each item remembers its rule and row number.

        A row with a note (a forward's path) gets it on a line of its own
        below, across all columns: paths are too long for a column.
        """
        self.view.clear()
        for number, (rule, cells, note) in enumerate(rows):
            item = QtWidgets.QTreeWidgetItem(cells)
            item.setData(0, RULE_ROLE, (rule, number))
            item.setToolTip(0, rule.api_rule)
            self.view.addTopLevelItem(item)
            if note is not None:
                child = QtWidgets.QTreeWidgetItem([f"    ↳ {note}"])
                child.setToolTip(0, note)
                child.setForeground(0, self.palette().placeholderText())
                item.addChild(child)
                child.setFirstColumnSpanned(True)
                item.setExpanded(True)
        self._selection_changed()

    def selected(self) -> tuple[Rule, int] | None:
        items = self.view.selectedItems()
        if not items:
            return None
        item = items[0].parent() or items[0]
        return item.data(0, RULE_ROLE)

    def rule_at(self, row: int) -> Rule:
        """The rule shown in ``row``."""
        return self.view.topLevelItem(row).data(0, RULE_ROLE)[0]

    def select_row(self, row: int) -> None:
        self.view.setCurrentItem(self.view.topLevelItem(row))

    def _selection_changed(self) -> None:
        selected = self.selected()
        self.edit_button.setEnabled(selected is not None)
        self.remove_button.setEnabled(selected is not None)
        if self.up_button is not None and self.down_button is not None:
            last = self.view.topLevelItemCount() - 1
            self.up_button.setEnabled(selected is not None and selected[1] > 0)
            self.down_button.setEnabled(selected is not None and selected[1] < last)


class NetworkServerPanel(QtWidgets.QWidget):
    """Forward and inbound rules of one qube, edited live through the Admin API."""

    def __init__(
        self, store: RuleStore, parent: QtWidgets.QWidget | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(parent)
        self.store = store
        self._clock = clock
        self.dialog: RuleDialog | None = None
        self.forwards = RuleTable(RuleKind.FORWARD, FORWARD_COLUMNS, "port forward")
        self.inbound = RuleTable(RuleKind.INBOUND, INBOUND_COLUMNS, "inbound rule", ordered=True)
        self.status_label = QtWidgets.QLabel()
        self.status_label.setWordWrap(True)
        self.status_label.setVisible(False)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for title, help_text, table in (
            ("Port forwarding",
             "Ports of this qube reachable from the LAN (external) or from other qubes on"
             " the same net qube (internal). Changes apply at once.",
             self.forwards),
            ("Inbound access",
             "Who may connect to this qube from other qubes or addresses, checked in order;"
             " without a matching Allow nothing gets in. Changes apply at once.",
             self.inbound),
        ):
            box = QtWidgets.QGroupBox(title)
            box_layout = QtWidgets.QVBoxLayout(box)
            label = QtWidgets.QLabel(help_text)
            label.setWordWrap(True)
            box_layout.addWidget(label)
            box_layout.addWidget(table)
            layout.addWidget(box)
        bottom = QtWidgets.QHBoxLayout()
        bottom.addWidget(self.status_label, 1)
        bottom.addStretch()
        self.refresh_button = QtWidgets.QPushButton("Refresh")
        self.refresh_button.setToolTip("Read the rules from dom0 again")
        bottom.addWidget(self.refresh_button, 0, QtCore.Qt.AlignmentFlag.AlignTop)
        layout.addLayout(bottom)
        for table in (self.forwards, self.inbound):
            table.add_button.clicked.connect(lambda _c, t=table: self.add_rule(t.kind))
            table.edit_button.clicked.connect(lambda _c, t=table: self.edit_rule(t.kind))
            table.remove_button.clicked.connect(lambda _c, t=table: self.remove_rule(t.kind))
            table.view.itemDoubleClicked.connect(
                lambda _item, _col, t=table: self.edit_rule(t.kind)
            )
            for step, button in ((-1, table.up_button), (1, table.down_button)):
                if button is not None:
                    button.clicked.connect(
                        lambda _c, t=table, s=step: self.move_rule(t.kind, s)
                    )
        self.refresh_button.clicked.connect(lambda _c: self.refresh())

    def table(self, kind: RuleKind) -> RuleTable:
        return self.forwards if kind is RuleKind.FORWARD else self.inbound

    # --- reading -------------------------------------------------------------

    def refresh(self, done: str = "") -> bool:
        """Read both lists (and the forwards' paths) from dom0; False if that failed.

        ``done`` names a change just stored ("Removed"): it is shown once the
        lists are read back, and ahead of the error if they cannot be, so the
        status line never claims a view it does not show nor hides the change.
        """
        try:
            forwards = self.store.rules(RuleKind.FORWARD)
            inbound = self.store.rules(RuleKind.INBOUND)
        except QubesException as err:
            self.forwards.show_rules([])
            self.inbound.show_rules([])
            self._set_enabled(False)
            failed = f"{done}, but cannot read the rules back" if done else "Cannot read the rules"
            self.show_status(f"{failed}: {err}", error=True)
            return False
        try:
            paths: dict[int, str] | None = self.store.paths() if forwards else {}
        except QubesException as err:
            paths = None
            path_error = f"(path unknown: {err})"
        now = self._clock()
        self.forwards.show_rules([
            (rule, forward_row(rule, now),
             path_error if paths is None else paths.get(number, "(no path reported)"))
            for number, rule in enumerate(forwards)
        ])
        self.inbound.show_rules([(rule, inbound_row(rule, now), None) for rule in inbound])
        self._set_enabled(True)
        if done:
            self.show_status(f"{done}.")
        return True

    def _set_enabled(self, enabled: bool) -> None:
        for table in (self.forwards, self.inbound):
            table.add_button.setEnabled(enabled)
            table.view.setEnabled(enabled)

    def show_status(self, text: str, error: bool = False) -> None:
        """One line under the tables: red for a failure, plain for news."""
        self.status_label.setStyleSheet("color: #d40000; font-weight: bold;" if error else "")
        self.status_label.setText(text)
        self.status_label.setVisible(bool(text))

    # --- editing -------------------------------------------------------------

    def _open(self, dialog: RuleDialog) -> None:
        self.dialog = dialog
        dialog.finished.connect(self._dialog_finished)
        dialog.open()

    def _dialog_finished(self, result: int) -> None:
        self.refresh("Saved" if result == QtWidgets.QDialog.DialogCode.Accepted else "")
        self.dialog = None

    def add_rule(self, kind: RuleKind) -> None:
        self.show_status("")
        self._open(_DIALOGS[kind](self.store.add, parent=self, clock=self._clock))

    def _fresh_selection(self, kind: RuleKind) -> tuple[Rule, int] | None:
        """The selected rule if dom0 still stores it as shown; else refresh and say why."""
        selected = self.table(kind).selected()
        if selected is None:
            return None
        try:
            self.store.check_current(*selected)
        except (StaleViewError, QubesException) as err:
            self.refresh()
            self.show_status(str(err), error=True)
            return None
        return selected

    def edit_rule(self, kind: RuleKind) -> None:
        selected = self._fresh_selection(kind)
        if selected is None:
            return
        rule, row = selected
        self.show_status("")

        def save(new: Rule) -> None:
            self.store.replace(rule, row, new)

        self._open(_DIALOGS[kind](save, editing=rule, parent=self, clock=self._clock))

    def remove_rule(self, kind: RuleKind) -> None:
        selected = self._fresh_selection(kind)
        if selected is None:
            return
        rule, row = selected
        try:
            self.store.remove(rule, row)
        except (StaleViewError, QubesException) as err:
            self.refresh()
            self.show_status(f"Not removed: {err}", error=True)
            return
        self.refresh("Removed")

    def move_rule(self, kind: RuleKind, step: int) -> None:
        """Swap the selected rule with the one above (-1) or below (+1); it stays selected."""
        table = self.table(kind)
        selected = table.selected()
        if selected is None:
            return
        rule, row = selected
        try:
            new_row = self.store.move(rule, row, step, table.rule_at(row + step))
        except (StaleViewError, QubesException) as err:
            self.refresh()
            self.show_status(f"Not moved: {err}", error=True)
            return
        if self.refresh("Moved up" if step < 0 else "Moved down"):
            table.select_row(new_row)
