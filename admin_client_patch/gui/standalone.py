"""``qubes-network-server-settings VM``: the panel alone, in its own window."""

from __future__ import annotations

import argparse
import sys

from PyQt6 import QtWidgets

from admin_client_patch.gui.panel import NetworkServerPanel
from admin_client_patch.gui.rule_store import RuleStore
from admin_client_patch.gui.transport import default_call
from admin_client_patch.qubesd_client import Call, QubesException
from firewall_rules import RuleKind

PROG = "qubes-network-server-settings"


class SettingsWindow(QtWidgets.QDialog):
    """The panel with a title naming the qube and a Close button."""

    def __init__(self, store: RuleStore, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(f"Port forwarding and inbound access: {store.qube}")
        self.panel = NetworkServerPanel(store, self)
        buttons = QtWidgets.QDialogButtonBox(QtWidgets.QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addWidget(self.panel)
        layout.addWidget(buttons)
        self.resize(1060, 620)
        self.panel.refresh()


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Edit a qube's port forwards and inbound rules in a window.",
    )
    parser.add_argument("vmname", metavar="VMNAME", help="the qube whose rules to edit")
    return parser


def main(argv: list[str] | None = None, call: Call | None = None) -> int:
    args = get_parser().parse_args(argv)
    store = RuleStore(args.vmname, call or default_call())
    try:
        store.rules(RuleKind.FORWARD)  # a wrong name or no dom0: say so here, not in a window
    except QubesException as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    window = SettingsWindow(store)
    window.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
