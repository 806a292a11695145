"""The real upstream qubesd code (qubes-core-admin snapshot) in this test process.

Found through ``conftest.upstream_dir`` (``QUBES_UPSTREAM_DIR``, else
``../shared/upstream`` from the repository root). Nothing is written into the
snapshot: its entry points (``qubes.ext``, ``qubes.storage``) come from an
``egg_info`` run into a temporary folder, bytecode is not written, and the
app's files live in a temporary base directory.

An app here is a real ``qubes.Qubes`` in offline mode: qubesd's own
classes, properties, events and Admin API, with every extension upstream
loads, ours among them (through its installed ``qubes.ext`` entry point).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import sys
import types
import unittest.mock
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import upstream_dir
from upstream_env import core_admin_paths

#: Modules of the snapshot (and its test stand-ins) that a test process drops afterwards.
_SNAPSHOT_MODULES = ("qubes", "qrexec", "libvirt", "libvirtaio", "qubesdb", "dbus", "pydbus")


@contextlib.contextmanager
def upstream_qubes(scratch: Path) -> Iterator[types.ModuleType]:
    """Upstream's ``qubes`` package importable for the duration; the module is yielded.

    Leaves no trace: sys.path and every snapshot module (and our extension
    module, which imports them) are restored afterwards.
    """
    paths = [str(path) for path in core_admin_paths(upstream_dir(), scratch)]
    saved_path, saved_bytecode = list(sys.path), sys.dont_write_bytecode
    sys.path[:0] = paths
    sys.dont_write_bytecode = True
    importlib.invalidate_caches()
    try:
        yield importlib.import_module("qubes")
    finally:
        sys.path[:] = saved_path
        sys.dont_write_bytecode = saved_bytecode
        for name in list(sys.modules):
            root = name.split(".", 1)[0]
            if root in _SNAPSHOT_MODULES or name == "core_admin_patch.extension":
                del sys.modules[name]
        importlib.invalidate_caches()


@contextlib.contextmanager
def offline_app(base: Path) -> Iterator[Any]:
    """A real ``qubes.Qubes`` in offline mode under ``base``, with a template ``tpl``.

    As upstream's own Admin API tests make theirs: its pool and base
    directory point into ``base``, kernels are not checked.
    """
    import qubes.app
    import qubes.config

    patches = [
        unittest.mock.patch.dict(qubes.config.system_path, {"qubes_base_dir": str(base)}),
        unittest.mock.patch("qubes.config.qubes_base_dir", str(base)),
        unittest.mock.patch.dict(
            qubes.config.defaults["pool_configs"]["varlibqubes"], {"dir_path": str(base)}
        ),
        unittest.mock.patch("qubes.app.validate_kernel", lambda obj, key, value: None),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = qubes.app.Qubes(str(base / "qubes.xml"), load=False, offline_mode=True)
        try:
            app.load_initial_values()
            loop.run_until_complete(app.setup_pools())
            app.default_kernel = "1.0"
            app.default_netvm = None
            app.add_new_vm("TemplateVM", label="black", name="tpl")
            app.default_template = "tpl"
            yield app
        finally:
            app.close()
            asyncio.set_event_loop(None)
            loop.close()


def add_qube(app: Any, name: str, **properties: Any) -> Any:
    """An AppVM with its directory made (``create_on_disk`` is not run offline)."""
    vm = app.add_new_vm("AppVM", label="red", name=name, **properties)
    Path(vm.dir_path).mkdir(parents=True, exist_ok=True)
    return vm


def call_api(app: Any, method: str, dest: str, arg: str = "", payload: bytes = b"") -> Any:
    """One Admin API call from dom0, as qubesd runs it (upstream's call_mgmt_func)."""
    import qubes.api.admin

    api = qubes.api.admin.QubesAdminAPI(
        app, b"dom0", method.encode(), dest.encode(), arg.encode()
    )
    return asyncio.get_event_loop().run_until_complete(api.execute(untrusted_payload=payload))
