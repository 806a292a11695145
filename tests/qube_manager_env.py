"""Upstream Qube Manager, patched with admin_client_patch/qube-manager.patch, in this process.

The snapshot in ``$QUBES_UPSTREAM_DIR/qubes-manager`` is copied to a
temporary folder, the patch applied there, and its generated modules
built as upstream's Makefile builds them (``pyuic6`` for ``ui_*.py``, Qt's
``rcc`` for ``resources.py``). qubesadmin is imported from its snapshot
with byte code off, so nothing is written into either snapshot.

Qube Manager's qubesadmin app is upstream's own test double
(``qubesadmin.tests.mock_app.MockQubesComplete``) describing the lab's qubes, with
one change: every ``admin.vm.firewall.*`` call goes to the lab's qubesd
over its socket, framed and parsed by qubesadmin's own ``QubesLocal``
code. So the firewall tab, both halves, reads and writes the lab's real
rules, and everything else (labels, properties, devices) comes from
upstream's fixtures.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

from upstream_env import MANAGER, REPO, admin_client_paths

PATCH = REPO / "admin_client_patch" / "qube-manager.patch"
RCC = Path("/usr/lib/qt6/libexec/rcc")

#: Stand-in for qubes-linux-utils' image module, which Qube Manager's utils
#: import for icon tinting; the Settings window never tints.
_IMGCONVERTER_STUB = '"""Not used by the Settings window (icon tinting only)."""\n'


def build_manager(root: Path, dest: Path, patch: Path | None = None) -> Path:
    """A copy of qubes-manager at ``dest``, ``patch`` applied, its modules generated.

    Built as upstream's Makefile builds it (``pyuic6`` for ``ui_*.py``, Qt's
    ``rcc`` for ``resources.py``); ``dest`` goes on sys.path or PYTHONPATH.
    The snapshot is only read.
    """
    if not RCC.exists():
        raise AssertionError(
            "Qt's rcc is missing: scripts/install-deps installs qt6-base-dev-tools"
        )
    shutil.copytree(root / MANAGER, dest)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    if patch is not None:
        subprocess.run(
            ["patch", "-p1", "--forward", "--batch", "--quiet", "-i", str(patch)],
            cwd=dest, check=True,
        )
    for ui in sorted((dest / "ui").glob("*.ui")):
        subprocess.run(
            [sys.executable, "-m", "PyQt6.uic.pyuic",
             "-o", str(dest / "qubesmanager" / f"ui_{ui.stem}.py"), str(ui)],
            check=True,
        )
    resources = subprocess.run(
        [str(RCC), "-g", "python", "--compress-algo", "zlib", "resources.qrc"],
        cwd=dest, check=True, capture_output=True, text=True,
    ).stdout
    (dest / "qubesmanager" / "resources.py").write_text(
        resources.replace("PySide6", "PyQt6", 1)
    )
    return dest


def import_paths(root: Path, scratch: Path, manager: Path) -> list[Path]:
    """sys.path entries: the built manager, qubesadmin with its metadata, the stub."""
    stubs = scratch / "stubs"
    stubs.mkdir()
    (stubs / "qubesimgconverter.py").write_text(_IMGCONVERTER_STUB)
    return [manager, *admin_client_paths(root, scratch), stubs]


def load_settings_module(paths: list[Path]) -> types.ModuleType:
    """``qubesmanager.settings``, imported from ``paths`` without writing byte code."""
    sys.dont_write_bytecode = True
    for path in reversed(paths):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import qubesmanager.appmenu_select as appmenu_select
    import qubesmanager.settings as settings

    # The Applications tab lists menu entries with qvm-appmenus (a dom0
    # tool): none here, as in upstream's own tests.
    appmenu_select.subprocess = types.SimpleNamespace(
        check_output=lambda *args, **kwargs: b"",
        CalledProcessError=subprocess.CalledProcessError,
    )
    return settings


def lab_backed_app(lab_socket: Path, qubes: dict[str, dict[str, Any]]) -> Any:
    """Upstream's MockQubesComplete plus ``qubes`` (name -> MockQube arguments), firewall: lab's.

    Upstream's fixture already holds sys-net and sys-firewall, wired as in
    the lab, and the templates and disposables their properties name.
    """
    import qubesadmin.app
    import qubesadmin.config
    from qubesadmin.tests.mock_app import MockQube, MockQubesComplete

    class LabBackedQubes(MockQubesComplete):  # type: ignore[misc]
        """Every admin.vm.firewall.* call goes to the lab's qubesd."""

        def qubesd_call(
            self, dest: str | None, method: str, arg: str | None = None,
            payload: bytes | None = None, payload_stream: Any = None,
        ) -> bytes:
            if method.startswith("admin.vm.firewall."):
                qubesadmin.config.QUBESD_SOCKET = str(lab_socket)
                return bytes(qubesadmin.app.QubesLocal.qubesd_call(
                    self, dest, method, arg, payload, payload_stream
                ))
            return bytes(super().qubesd_call(dest, method, arg, payload, payload_stream))

    app = LabBackedQubes()
    for name, arguments in qubes.items():
        app._qubes[name] = MockQube(name=name, qapp=app, **arguments)
    app.update_vm_calls()
    for name in app._qubes:  # the Notes tab; upstream's fixtures add it per test
        app.expected_calls[(name, "admin.vm.notes.Get", None, None)] = b"0\x00"
    return app
