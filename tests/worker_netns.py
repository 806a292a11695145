"""Helpers for the firewall worker's tests: a QubesDB double, throwaway namespaces.

Namespace tests need root, ``ip`` and ``nft``. Outside CI they are skipped
with a loud reason; under CI (``CI`` set) a missing prerequisite fails them.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import shutil
import subprocess
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest

CLONE_NEWNET = 0x40000000


class MemoryQubesDB:
    """The qubesdb API calls the worker makes, on a dict (no daemon, no watches)."""

    def __init__(self, entries: dict[str, str] | None = None) -> None:
        self.entries: dict[str, bytes] = {}
        for path, value in (entries or {}).items():
            self.write(path, value)

    def read(self, path: str) -> bytes | None:
        return self.entries.get(path)

    def write(self, path: str, value: str | bytes) -> None:
        self.entries[path] = value.encode() if isinstance(value, str) else value

    def rm(self, path: str) -> None:
        if path.endswith("/"):
            for key in [k for k in self.entries if k.startswith(path)]:
                del self.entries[key]
        else:
            self.entries.pop(path, None)

    def multiread(self, path: str) -> dict[str, bytes]:
        return {k: v for k, v in sorted(self.entries.items()) if k.startswith(path)}

    def list(self, path: str) -> list[str]:
        return sorted(k for k in self.entries if k.startswith(path))


def write_rules(db: Any, address: str, policy: str, rules: list[str]) -> None:
    """Rewrite one client's rules the way dom0 does: clear, write, then the marker."""
    base = f"/qubes-firewall/{address}"
    db.rm(base + "/")
    db.write(base + "/policy", policy)
    for number, rule in enumerate(rules):
        db.write(f"{base}/{number:04d}", rule)
    db.write(base, "")


def require_root() -> None:
    """Skip loudly outside CI, fail under CI, when namespaces cannot be used."""
    if os.geteuid() == 0 and shutil.which("ip") and shutil.which("nft"):
        return
    message = "NETNS TEST NOT RUN: needs root, ip and nft (CI runs it as root)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def make_netns() -> Iterator[str]:
    """Body of a ``netns`` fixture: a fresh namespace, deleted afterwards."""
    require_root()
    name = f"qns-w-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _enter_and_call(conn: Connection, name: str, func: Callable[..., Any], args: tuple) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/run/netns/{name}") as handle:
            if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
        conn.send(("ok", func(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def in_netns(name: str, func: Callable[..., Any], *args: Any) -> Any:
    """Run ``func(*args)`` in a forked child inside namespace ``name``; return its result."""
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    process = context.Process(target=_enter_and_call, args=(child, name, func, args))
    process.start()
    child.close()
    try:
        status, value = parent.recv()
    finally:
        process.join()
    if status != "ok":
        pytest.fail(f"in namespace {name}:\n{value}", pytrace=False)
    return value


def nft_ruleset(name: str) -> list[dict[str, Any]]:
    """``nft -j list ruleset`` of a namespace, without handles and metainfo."""
    output = subprocess.run(
        ["ip", "netns", "exec", name, "nft", "-j", "list", "ruleset"],
        check=True, capture_output=True, text=True,
    ).stdout
    items = [i for i in json.loads(output)["nftables"] if "metainfo" not in i]
    for item in items:
        for body in item.values():
            body.pop("handle", None)
    return items


def chain_rules(name: str, family: str, table: str, chain: str) -> list[str]:
    """Rule lines of one chain as ``nft list chain`` prints them."""
    output = subprocess.run(
        ["ip", "netns", "exec", name, "nft", "list", "chain", family, table, chain],
        check=True, capture_output=True, text=True,
    ).stdout
    lines = [line.strip() for line in output.splitlines()]
    body = lines[lines.index(next(x for x in lines if x.startswith("chain"))) + 1 :]
    return [line for line in body if line and line != "}" and not line.startswith("type ")]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll until ``predicate()`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)
