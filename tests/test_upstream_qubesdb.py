"""Inside a real qubesd, our extension writes the QubesDB entries the lab's dom0 writes.

The lab's tests prove forwards and inbound rules with real traffic, but
against the lab's dom0. Here the same topology changes go to both: the
lab (default topology, real namespaces) and a real ``qubes.Qubes`` app
from the qubes-core-admin snapshot with our extension loaded through its
entry point (tests/upstream_qubesd.py: offline, Xen left out, every
qubesd event and handler real). After each change, every running qube's
entries in our namespaces (``/qns-forward/``, ``/qns-inbound/``,
``/qns-input``) must be the same on both sides.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from upstream_env import (
    CORE_ADMIN,
    CORE_QREXEC,
    TESTS,
    core_admin_paths,
    python_env,
    require_upstream,
    upstream_scratch,
)

from admin_client_patch.qubesd_client import qubesd_call
from lab.control import Lab

__all__ = ["upstream_scratch"]  # the fixture, used below

pytestmark = pytest.mark.lab

PREFIX = "/qns-"
#: The directories dom0 writes (the agents' ``*_handled`` counters are theirs).
DOM0_WRITES = ("qns-forward", "qns-inbound", "qns-input")

SET = "admin.vm.firewall.Set"
#: (what, step): each step is applied to the lab and to the real qubesd.
STEPS: list[tuple[str, dict[str, Any]]] = [
    ("forwards added", {"op": "api", "qube": "web", "method": SET, "arg": "forward", "payload":
        "action=forward forwardtype=external proto=tcp srcports=8080-8080 dstports=80-80\n"
        "action=forward forwardtype=internal proto=tcp srcports=2222-2222 dstports=22-22 "
        "srcqube=work\n"}),
    ("inbound added", {"op": "api", "qube": "web", "method": SET, "arg": "inbound", "payload":
        "action=accept srcqube=work proto=tcp dstports=443-443\n"}),
    ("target stopped", {"op": "stop", "qube": "web"}),
    ("target started", {"op": "start", "qube": "web"}),
    ("netvm changed", {"op": "set", "qube": "web", "prop": "netvm", "value": "sys-net"}),
    ("netvm back", {"op": "set", "qube": "web", "prop": "netvm", "value": "sys-firewall"}),
    ("ipv6 off", {"op": "feature", "qube": "sys-net", "name": "ipv6", "value": None}),
    ("ip changed", {"op": "set", "qube": "web", "prop": "ip", "value": "10.137.0.30"}),
    ("ip back", {"op": "set", "qube": "web", "prop": "ip", "value": "10.137.0.20"}),
    ("ipv6 on", {"op": "feature", "qube": "sys-net", "name": "ipv6", "value": "1"}),
    ("source qube stopped", {"op": "stop", "qube": "work"}),
    ("source qube started", {"op": "start", "qube": "work"}),
    ("forwards removed", {"op": "api", "qube": "web", "method": SET, "arg": "forward",
                          "payload": ""}),
]


class Qubesd:
    """The real qubesd subprocess, one JSON line per command."""

    def __init__(self, env: dict[str, str], home: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "upstream_qubesd.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**env, "HOME": str(home), "TMPDIR": str(home)},
        )
        ready = self._reply()
        assert ready == "ready", ready

    def _reply(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            raise AssertionError(f"real qubesd exited: {self.proc.stderr.read()[-5000:]}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AssertionError(f"real qubesd: {reply['error']}\n{reply['traceback']}")
        return reply["result"]

    def __call__(self, **request: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def real_qubesd(upstream_scratch: Path) -> Iterator[Qubesd]:
    root = require_upstream(CORE_ADMIN, CORE_QREXEC)
    env = python_env(core_admin_paths(root, upstream_scratch), QUBES_TEST="1")
    home = upstream_scratch / "real-qubesd"
    home.mkdir(exist_ok=True)
    qubesd = Qubesd(env, home)
    try:
        yield qubesd
    finally:
        qubesd.close()


def apply_to_lab(lab: Lab, step: dict[str, Any]) -> None:
    op, qube = step["op"], step["qube"]
    if op == "api":
        qubesd_call(qube, step["method"], step["arg"], step["payload"].encode())
    elif op == "start":
        lab.start(qube)
    elif op == "stop":
        lab.stop(qube)
    elif op == "set":
        lab.set(qube, step["prop"], step["value"])
    elif op == "feature":
        lab.set_feature(qube, step["name"], step["value"])
    else:
        raise AssertionError(f"unknown step {op}")


def lab_entries(lab: Lab) -> dict[str, dict[str, str]]:
    """Every running qube's entries in DOM0_WRITES, in the lab's QubesDB."""
    entries = {}
    for qube in lab.status()["qubes"]:
        if not qube["running"]:
            continue
        db = lab.qubesdb(qube["name"])
        entries[qube["name"]] = {
            key: (db.read(key) or b"").decode() for key in sorted(db.list(PREFIX))
            if key.split("/")[1] in DOM0_WRITES
        }
    return entries


def compare_through(
    lab: Lab, real_qubesd: Qubesd, steps: list[tuple[str, dict[str, Any]]]
) -> list[str]:
    """Apply each step to both; the entries must match after each. Steps that had entries."""
    assert real_qubesd(op="qubesdb", prefix=PREFIX) == lab_entries(lab)
    with_entries = []
    for what, step in steps:
        apply_to_lab(lab, step)
        real_qubesd(**step)
        real, in_lab = real_qubesd(op="qubesdb", prefix=PREFIX), lab_entries(lab)
        assert real == in_lab, f"after '{what}': real qubesd {real}\n  lab {in_lab}"
        if any(in_lab.values()):
            with_entries.append(what)
    return with_entries


def test_real_qubesd_writes_what_the_lab_writes(
    lab: Lab, real_qubesd: Qubesd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    with_entries = compare_through(lab, real_qubesd, STEPS)
    # the comparison is about something: the rules produced entries on the way
    assert {"forwards added", "inbound added", "ip changed"} <= set(with_entries)


def test_ip_change_with_ipv6_on_keeps_qubesd_ipv6_address(
    lab: Lab, real_qubesd: Qubesd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both derive IPv6 addresses from the qid, so web's stays ``::a89:14`` at 10.137.0.30.

    Runs last: it leaves web at its new ip.
    """
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    compare_through(lab, real_qubesd, [
        STEPS[0],
        ("ip changed", {"op": "set", "qube": "web", "prop": "ip", "value": "10.137.0.30"}),
    ])
    # the forwards to web name it by both addresses: the new IPv4, the qid's IPv6
    keys = [key for entries in lab_entries(lab).values() for key in entries]
    assert any("/10.137.0.30/" in key for key in keys)
    assert any("/fd09:24ef:4179::a89:14/" in key for key in keys)
