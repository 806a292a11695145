"""A qubesd stand-in on a real Unix socket: the real NetworkServer over real firewall.xml files.

The socket, framing, admin_api, NetworkServer, planner and firewall_rules
code under test are the real ones; only the dom0 host around them is a
small stand-in (:class:`FileHost`): a fixed topology of stopped qubes,
whose rules are firewall.xml files under a temporary directory. Nothing
runs, so nothing is written to any QubesDB, and these tests need neither
root nor network namespaces.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from core_admin_patch.errors import QubesValueError
from core_admin_patch.network_server import DomainLike, NetworkServer
from core_admin_patch.planner import SUPPORT_FEATURE
from firewall_rules import Rule, RuleFiles, RuleKind, RuleLists
from lab.qubesd_server import start_server

REPO = Path(__file__).resolve().parent.parent


@dataclass
class StoppedQube:
    """A qube as NetworkServer sees a qubesd VM; none of them runs here."""

    name: str
    netvm: StoppedQube | None = None
    ip: ipaddress.IPv4Address | None = None
    provides_network: bool = False
    ip6: ipaddress.IPv6Address | None = None
    features: dict[str, str] = field(default_factory=lambda: {SUPPORT_FEATURE: "1"})

    def is_running(self) -> bool:
        return False


def default_qubes() -> dict[str, StoppedQube]:
    """sys-net <- sys-firewall <- web, work: the lab's default topology, stopped."""
    net = StoppedQube("sys-net", ip=ipaddress.IPv4Address("10.137.0.5"), provides_network=True)
    fw = StoppedQube("sys-firewall", net, ipaddress.IPv4Address("10.137.0.6"),
                     provides_network=True)
    web = StoppedQube("web", fw, ipaddress.IPv4Address("10.137.0.20"))
    work = StoppedQube("work", fw, ipaddress.IPv4Address("10.137.0.21"))
    return {q.name: q for q in (net, fw, web, work)}


class NoQubesDB:
    """The EntryWriter of a dom0 where nothing runs: nothing may be written."""

    def write(self, qube: str, path: str, value: str) -> None:
        raise AssertionError(f"write into the QubesDB of stopped {qube}")

    def rm(self, qube: str, path: str) -> None:
        raise AssertionError(f"rm in the QubesDB of stopped {qube}")

    def list(self, qube: str, prefix: str) -> list[str]:
        return []

    def read(self, qube: str, path: str) -> bytes | None:
        raise AssertionError(f"read from the QubesDB of stopped {qube}")


@dataclass
class FileHost:
    """DomHost whose qubes' rules are files under ``root``; reloads are recorded.

    ``refuse`` makes the next stores fail as a host may (a save error).
    """

    root: Path
    qubes: dict[str, StoppedQube] = field(default_factory=default_qubes)
    reloaded: list[str] = field(default_factory=list)
    refuse: str | None = None
    files: RuleFiles = field(default_factory=RuleFiles)

    def domains(self) -> list[StoppedQube]:
        return list(self.qubes.values())

    def domain(self, name: str) -> StoppedQube:
        return self.qubes[name]

    def firewall_path(self, name: str) -> Path:
        return self.root / name / "firewall.xml"

    def read_rules(self, domain: DomainLike) -> RuleLists:
        return self.files.read(self.firewall_path(domain.name))

    def store_rules(self, domain: DomainLike, kind: RuleKind, rules: list[Rule]) -> None:
        if self.refuse is not None:
            raise QubesValueError(self.refuse)
        lists = self.read_rules(domain).replaced(kind, rules)
        path = self.firewall_path(domain.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files.save(path, lists, time.time())
        self.reload(domain)

    def reload(self, domain: DomainLike) -> None:
        self.reloaded.append(domain.name)


def file_server(root: Path) -> tuple[NetworkServer, FileHost]:
    host = FileHost(root)
    return NetworkServer(host, NoQubesDB()), host


@dataclass
class Dom0:
    """A running stand-in: its socket, its server and host, its loop thread."""

    socket_path: Path
    server: NetworkServer
    host: FileHost

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
    network_server, host = file_server(tmp_path / "qubes")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(
        start_server(socket_path, network_server), loop
    ).result(10)
    try:
        yield Dom0(socket_path, network_server, host)
    finally:

        async def stop() -> None:
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
