"""Drive unmodified upstream Qubes code against our files and the lab's qubesd.

Run in a subprocess by tests/test_upstream_clients.py, with the snapshots
on PYTHONPATH; prints a JSON result on its last line (or exits non-zero).
Each subcommand is one thing a Qubes user does with upstream code:

tool SOCKET TOOL [ARGS...]
    ``qubesadmin.tools.TOOL.main(ARGS)`` (stock qvm-firewall, ...) as dom0,
    talking to the qubesd at SOCKET; exits with the tool's code (70 if it
    raised: a crash is never mistaken for a refusal).
restore SOCKET QUBE FILE
    Backup restore's handler for a Qubes 4 firewall.xml
    (``qubesadmin.backup.core3.Core3VM.handle_firewall_xml``) restoring
    FILE into QUBE.
manager SOCKET QUBE ADDRESS PORT EXTRA_FORWARD
    Qube Manager's firewall tab (``qubesmanager.firewall``, PyQt6, run
    offscreen): opens QUBE's rules, has another client add EXTRA_FORWARD
    meanwhile (its cache goes stale), adds an accept rule for
    ADDRESS:PORT/tcp through the rule dialog, removes the first rule, and
    saves as the tab's OK does.
load FILE
    qubesd's own reader, ``qubes.firewall.Firewall(vm).load()``, on FILE.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
import traceback
import types
from pathlib import Path
from typing import Any


def _app(socket_path: str) -> Any:
    """A dom0 qubesadmin app talking to ``socket_path``."""
    import qubesadmin.app
    import qubesadmin.config

    qubesadmin.config.QUBESD_SOCKET = socket_path
    return qubesadmin.app.QubesLocal()


def run_tool(socket_path: str, tool: str, *args: str) -> int:
    module = importlib.import_module(f"qubesadmin.tools.{tool}")
    try:
        return int(module.main(list(args), app=_app(socket_path)) or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    except Exception:
        traceback.print_exc()
        return 70


def restore(socket_path: str, qube: str, path: str) -> dict[str, Any]:
    import qubesadmin.backup.core3

    vm = _app(socket_path).domains[qube]
    errors: list[str] = []
    vm.log = types.SimpleNamespace(exception=lambda msg, *a: errors.append(
        msg % a + ": " + traceback.format_exc().strip().splitlines()[-1]))
    backup_vm = qubesadmin.backup.core3.Core3VM()
    backup_vm.handle_firewall_xml(vm, io.BytesIO(Path(path).read_bytes()))
    return {"errors": errors}


def manager(socket_path: str, qube: str, address: str, port: str, extra_forward: str) -> dict:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PyQt6 import QtWidgets

    application = QtWidgets.QApplication([])
    from qubesmanager import firewall

    from admin_client_patch.qubesd_client import qubesd_call

    vm = _app(socket_path).domains[qube]
    model = firewall.QubesFirewallRulesModel()
    model.set_vm(vm)  # what the Settings window does when it opens
    opened = [rule.rule for rule in model.children]
    # meanwhile, another client adds a forward: the tab's cache is stale now
    forwards = qubesd_call(qube, "admin.vm.firewall.Get", "forward").decode()
    qubesd_call(qube, "admin.vm.firewall.Set", "forward",
                (forwards + extra_forward + "\n").encode())
    dialog = firewall.NewFwRuleDlg()
    model.run_rule_dialog(dialog)
    dialog.addressComboBox.setEditText(address)
    dialog.tcp_radio.setChecked(True)
    dialog.serviceComboBox.setEditText(port)
    dialog.accept()
    model.remove_child(0)
    model.apply_rules(allow=model.allow)  # the Settings window's OK
    application.processEvents()
    return {"opened": opened, "saved": [rule.rule for rule in model.children]}


def load(path: str) -> dict[str, Any]:
    import qubes.firewall

    vm = types.SimpleNamespace(
        name="loaded", dir_path=str(Path(path).parent), firewall_conf=Path(path).name
    )
    firewall = qubes.firewall.Firewall(vm, load=True)
    return {"rules": [rule.api_rule for rule in firewall.rules]}


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "tool":
        return run_tool(*args)
    result = {"restore": restore, "manager": manager, "load": load}[command](*args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
