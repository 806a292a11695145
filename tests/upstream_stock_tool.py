"""Run one stock qubesadmin tool (unmodified upstream code) against a qubesd socket.

``python upstream_stock_tool.py SOCKET TOOL [ARGS...]`` runs
``qubesadmin.tools.TOOL.main(ARGS)`` with a dom0 ``QubesLocal`` app whose
``qubesadmin.config.QUBESD_SOCKET`` is SOCKET (the lab's qubesd), and exits
with the tool's exit code. An exception escaping the tool is printed and
exits 70, so a crash is never mistaken for a refusal.
"""

from __future__ import annotations

import importlib
import sys
import traceback

import qubesadmin.app
import qubesadmin.config


def main(argv: list[str]) -> int:
    socket_path, tool, *args = argv
    qubesadmin.config.QUBESD_SOCKET = socket_path
    app = qubesadmin.app.QubesLocal()
    module = importlib.import_module(f"qubesadmin.tools.{tool}")
    try:
        return int(module.main(args, app=app) or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    except Exception:
        traceback.print_exc()
        return 70


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
