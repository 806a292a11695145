"""Helpers for the firewall worker's tests: a QubesDB double, throwaway namespaces.

Namespace tests need root, ``ip`` and ``nft``. Outside CI they are skipped
with a loud reason; under CI (``CI`` set) a missing prerequisite fails them.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from conftest import cannot_run, lab_unavailable

from agent_worker.reply_route import REPLY_TABLE, RULE_PRIORITY
from lab.base_ruleset import base_ruleset, client_elements

CLONE_NEWNET = 0x40000000
REPO = Path(__file__).resolve().parent.parent
QUBE = "sys-firewall"


class NoFlows:
    """A conntrack table holding no flow, for workers run where the table is not theirs."""

    def list(self, version: int, match: object) -> list[Any]:
        return []

    def delete(self, flow: object) -> None:
        raise AssertionError(f"no flow was listed, yet {flow} is deleted")


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


def write_directory(db: Any, base: str, values: list[str] | list[bytes]) -> None:
    """Rewrite ``base``'s entries the way dom0 does: clear, write NNNN keys, then ``base``."""
    db.rm(base + "/")
    for number, value in enumerate(values):
        db.write(f"{base}/{number:04d}", value)
    db.write(base, "")


def remove_directory(db: Any, base: str) -> None:
    """Remove ``base`` as dom0 does: its keys, then the path the worker watches."""
    db.rm(base + "/")
    db.rm(base)


#: A rule of the user's own in ``custom-forward``, which our chains must keep.
USER_RULE = "tcp dport 9999 counter accept"


def load_base_ruleset(ns: str) -> None:
    """The Qubes base tables in ``ns``, with USER_RULE in ``custom-forward``."""
    ns_run(ns, "nft", "-f", "-", stdin=base_ruleset())
    ns_run(ns, "nft", "add", "rule", "ip", "qubes", "custom-forward", *USER_RULE.split())


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
    reason = lab_unavailable()
    if reason is not None:
        cannot_run(f"NETNS TEST NOT RUN: needs root, ip and nft (CI runs it as root): {reason}")


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


#: agent_worker.input_rules.ONLY_SYN_OPENS as nft lists it back
SYN_GUARD_LISTED = "ct state new tcp flags != syn / fin,syn,rst,ack return"
#: the first rules of qns-forward and qns-inbound, as nft lists them back
GUARDS_LISTED = ["ct state != new return", SYN_GUARD_LISTED]


def dnat_elements(name: str, family: str = "ip") -> set[str]:
    """Every element of the forward worker's DNAT maps in namespace ``name``, as nft prints them.

    Empty when there is no table ``qubes-network-server`` (nothing to forward).
    """
    done = subprocess.run(
        ["ip", "netns", "exec", name, "nft", "list", "table", family, "qubes-network-server"],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        return set()
    found: set[str] = set()
    for block in done.stdout.split("elements = {")[1:]:
        found |= {" ".join(e.split()) for e in block.split("}")[0].split(",")}
    return found


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


@contextmanager
def qubesdb_server(tmp_path: Path, *qubes: str) -> Iterator[Path]:
    """The lab's QubesDB stand-in for ``qubes`` (default: QUBE), serving in ``tmp_path``.

    Yields the directory of its sockets.
    """
    directory = tmp_path / "qubesdb"
    ready = tmp_path / "qubesdb.ready"
    server = subprocess.Popen([
        sys.executable, "-m", "lab.qubesdb_server", "--dir", str(directory),
        "--ready-file", str(ready), *(qubes or (QUBE,)),
    ], cwd=REPO)
    try:
        wait_for(ready.exists, what="QubesDB stand-in")
        yield directory
    finally:
        server.terminate()
        server.wait(timeout=10)


@dataclass
class WorkerProcess:
    """A firewall worker running in a namespace, its stderr in ``log``."""

    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=10)


def start_worker(
    ns: str, qdb_dir: Path, log: Path, notify: Path | None = None, qube: str = QUBE
) -> WorkerProcess:
    """Run the worker in ``ns`` as the lab does, and wait until its first load is done."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "QUBESDB_DIR": str(qdb_dir),
        "QUBESDB_QUBE": qube,
        "PYTHONPATH": f"{REPO / 'lab' / 'pyshim'}:{REPO}",
    }
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    starts = log.read_text().count("INFO: started") if log.exists() else 0
    handle = log.open("ab")
    process = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "agent_worker.firewall"],
        env=env, stderr=handle, stdout=handle, cwd="/",
    )
    worker = WorkerProcess(process, log)
    wait_for(lambda: worker.text().count("INFO: started") > starts or process.poll() is not None,
             what="worker start")
    assert process.poll() is None, worker.text()
    return worker


# -- a hop between a LAN client and its qubes, wired as Qubes does ----------

HOP_UPLINK, CLIENT_ADDRESS, HOP_GATEWAY = "192.0.2.1", "192.0.2.10", "10.137.0.1"


def ns_run(ns: str, *argv: str, stdin: str | None = None) -> str:
    """Run a command in namespace ``ns``; its stdout, or an assertion naming the failure."""
    done = subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{argv} in {ns}: {done.stderr}"
    return done.stdout


def wire_hop(client: str, hop: str, targets: dict[str, str]) -> None:
    """``client`` on the hop's uplink; each ``targets`` namespace behind a vif of ``hop``.

    The hop gets the Qubes base ruleset, forwarding, and per target what
    vif-route-qubes sets up (group 2, /32 route, proxy ARP, antispoof
    elements); a target gets its address as /32 and the hop as gateway.
    ``targets`` maps namespace to address.
    """
    subprocess.run(["ip", "link", "add", "eth0", "netns", hop, "type", "veth",
                    "peer", "name", "eth0", "netns", client], check=True)
    ns_run(client, "ip", "address", "add", f"{CLIENT_ADDRESS}/24", "dev", "eth0")
    ns_run(client, "ip", "link", "set", "eth0", "up")
    ns_run(hop, "ip", "address", "add", f"{HOP_UPLINK}/24", "dev", "eth0")
    ns_run(hop, "ip", "link", "set", "eth0", "up")
    ns_run(hop, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    ns_run(hop, "nft", "-f", "-", stdin=base_ruleset())
    for domid, (target, address) in enumerate(targets.items(), start=1):
        vif = f"vif{domid}.0"
        subprocess.run(["ip", "link", "add", vif, "netns", hop, "type", "veth",
                        "peer", "name", "eth0", "netns", target], check=True)
        ns_run(hop, "nft", "-f", "-", stdin=client_elements("add", vif, address))
        ns_run(hop, "ip", "link", "set", vif, "group", "2", "up")
        ns_run(hop, "sysctl", "-qw", f"net/ipv4/conf/{vif}/proxy_arp=1")
        ns_run(hop, "ip", "route", "add", address, "dev", vif)
        ns_run(hop, "ip", "address", "add", f"{HOP_GATEWAY}/32", "dev", vif)
        ns_run(target, "ip", "address", "add", f"{address}/32", "dev", "eth0")
        ns_run(target, "ip", "link", "set", "eth0", "up")
        ns_run(target, "ip", "route", "add", HOP_GATEWAY, "dev", "eth0", "scope", "link")
        ns_run(target, "ip", "route", "add", "default", "via", HOP_GATEWAY, "dev", "eth0",
               "onlink")


@contextmanager
def serving(ns: str, proto: str, port: int, reply: str) -> Iterator[None]:
    """``lab.probe serve`` in ``ns`` until the block ends."""
    process = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "lab.probe", "serve", proto,
         str(port), "--reply", reply],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("listening"), "probe server did not start"
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


def probe(ns: str, proto: str, host: str, port: int, timeout: float = 1.0) -> str | None:
    """The server's reply to a connection from ``ns``, or None when nothing answers."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "lab.probe", "connect", proto, host,
         str(port), "--timeout", str(timeout)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def reply_rules(ns: str, version: int = 4) -> list[dict[str, object]]:
    """The rules at agent_worker.reply_route's priority in ``ns``, as ``ip -j`` lists them."""
    return json.loads(ns_run(ns, "ip", "-j", f"-{version}", "rule", "show", "pref",
                             str(RULE_PRIORITY)) or "[]")


def reply_routes(ns: str, version: int = 4) -> list[tuple[object, object, object]]:
    """agent_worker.reply_route's table in ``ns`` as (dst, gateway, dev); none when the
    table does not exist (``ip`` fails then)."""
    shown = subprocess.run(["ip", "netns", "exec", ns, "ip", "-j", f"-{version}", "route", "show",
                            "table", str(REPLY_TABLE)], capture_output=True, text=True, check=False)
    if shown.returncode != 0:
        return []
    return [(r.get("dst"), r.get("gateway"), r.get("dev"))
            for r in json.loads(shown.stdout or "[]")]
