"""A qubesd stand-in on a real Unix socket, backed by real firewall.xml files.

The AdminContext here is a test fixture, not a mock of the protocol: the
socket, framing, admin_api and firewall_rules code under test are the real
ones; only the dom0 around them (which qubes exist, what ``check_rules``
refuses, what ``firewall_changed`` does) is a small in-memory stand-in, so
these tests run without root or network namespaces.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from core_admin_patch.errors import QubesValueError, QubesVMNotFoundError
from firewall_rules import Rule
from lab.qubesd_server import start_server

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class FileQube:
    name: str
    firewall_path: Path


@dataclass
class FileAdminContext:
    """Qubes are directories under ``root``; calls are recorded."""

    root: Path
    names: tuple[str, ...] = ("web", "work", "sys-firewall", "sys-net")
    refuse: str | None = None
    changed: list[str] = field(default_factory=list)
    checked: list[tuple[str, list[Rule]]] = field(default_factory=list)
    #: What describe_forwards answers, per qube (keys: stored rule positions);
    #: there is no topology here, so a test sets the paths it wants shown.
    paths: dict[str, dict[int, str]] = field(default_factory=dict)
    #: What describe_routing answers, per qube.
    routing: dict[str, list[str]] = field(default_factory=dict)

    def find_qube(self, untrusted_name: str) -> FileQube:
        if untrusted_name not in self.names:
            raise QubesVMNotFoundError(untrusted_name)
        directory = self.root / untrusted_name
        directory.mkdir(parents=True, exist_ok=True)
        return FileQube(untrusted_name, directory / "firewall.xml")

    def check_rules(self, qube: FileQube, rules: list[Rule]) -> None:
        self.checked.append((qube.name, rules))
        if self.refuse is not None:
            raise QubesValueError(self.refuse)

    def firewall_changed(self, qube: FileQube) -> None:
        self.changed.append(qube.name)

    def describe_forwards(self, qube: FileQube, now: float) -> dict[int, str]:
        return dict(self.paths.get(qube.name, {}))

    def describe_routing(self, qube: FileQube, now: float) -> list[str]:
        return list(self.routing.get(qube.name, []))

    def firewall_path(self, name: str) -> Path:
        return self.root / name / "firewall.xml"


@dataclass
class Dom0:
    """A running stand-in: its socket, its context, its loop thread."""

    socket_path: Path
    ctx: FileAdminContext

    def env(self) -> dict[str, str]:
        return {**os.environ, "QUBESD_SOCKET": str(self.socket_path)}

    def qvm_firewall(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run qvm-firewall as the user would, against this dom0."""
        return subprocess.run(
            [sys.executable, "-m", "admin_client_patch.qvm_firewall", *args],
            cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=60,
        )


@contextmanager
def running_dom0(tmp_path: Path) -> Iterator[Dom0]:
    """Serve the Admin API on ``tmp_path/qubesd.sock`` from a background loop."""
    socket_path = tmp_path / "qubesd.sock"
    ctx = FileAdminContext(tmp_path / "qubes")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(start_server(socket_path, ctx), loop).result(10)
    try:
        yield Dom0(socket_path, ctx)
    finally:

        async def stop() -> None:
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
