"""Unmodified upstream clients beside a qube holding forward and inbound rules.

Everything here is upstream's own code from the snapshots, run through
tests/upstream_drivers.py against the lab's qubesd (real socket protocol,
our Admin API) and the firewall.xml our dom0 writes:

- stock ``qvm-firewall`` (qubesadmin) lists, adds, deletes and resets the
  outbound rules of ``web`` while its forward and inbound rules stay;
- Qube Manager's firewall tab opens ``web``, takes a rule from its dialog
  and saves, with a cache gone stale meanwhile, without losing a forward;
- backup restore's firewall.xml handler restores ``web``'s outbound rules;
- qubesd's own ``Firewall.load()`` reads ``web``'s firewall.xml;
- stock ``qvm-clone`` clones ``web`` (against a real qubesd, which it needs
  for everything but the firewall: tests/upstream_qubesd.py ``--serve``).

The forward and inbound lists are read and written with
``admin.vm.firewall.Get+forward``/``Set+forward`` and ``+inbound``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from qube_manager_env import build_manager
from upstream_env import (
    ADMIN_CLIENT,
    CORE_ADMIN,
    CORE_QREXEC,
    MANAGER,
    TESTS,
    admin_client_paths,
    as_nobody,
    core_admin_paths,
    nobody_dir,
    python_env,
    require_upstream,
    run_as_nobody,
    upstream_scratch,
)

from admin_client_patch.qubesd_client import qubesd_call
from lab.control import Lab

__all__ = ["upstream_scratch"]  # the fixture, used below

pytestmark = pytest.mark.lab

QUBE = "web"
#: Outbound rules in the shape Qube Manager's tab edits (accepts, then DNS, ICMP, drop).
OUTBOUND = [
    "action=accept dst4=198.51.100.0/24 proto=tcp dstports=443-443",
    "action=accept dst4=203.0.113.0/24 proto=tcp dstports=80-80",
    "action=accept specialtarget=dns",
    "action=accept proto=icmp",
    "action=drop",
]
FORWARD = ["action=forward forwardtype=external proto=tcp srcports=8080-8080 dstports=80-80"]
INBOUND = ["action=accept srcqube=work proto=tcp dstports=22-22"]
KINDS = ("", "forward", "inbound")


def words(lines: list[str]) -> list[list[str]]:
    """Each rule line as its sorted words: qubesadmin writes the options in its own order."""
    return [sorted(line.split()) for line in lines]


def get_rules(qube: str) -> dict[str, list[str]]:
    """Each list as the Admin API returns it: outbound (no argument), forward, inbound."""
    return {
        kind: qubesd_call(qube, "admin.vm.firewall.Get", kind).decode().splitlines()
        for kind in KINDS
    }


def set_rules(qube: str, outbound: list[str], forward: list[str], inbound: list[str]) -> None:
    for kind, lines in zip(KINDS, (outbound, forward, inbound), strict=True):
        payload = "".join(line + "\n" for line in lines).encode()
        qubesd_call(qube, "admin.vm.firewall.Set", kind, payload)


#: The session's scratch folder, for the helpers (set by lab_socket).
SCRATCH: list[Path] = []


@pytest.fixture(scope="module")
def lab_socket(lab: Lab, upstream_scratch: Path) -> Iterator[str]:
    """The lab's qubesd socket, exported for our own client's calls."""
    SCRATCH[:] = [upstream_scratch]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
        yield str(lab.qubesd_socket)


@pytest.fixture
def holding(lab_socket: str) -> dict[str, list[str]]:
    """``web`` with outbound, forward and inbound rules; what Get returns for each."""
    set_rules(QUBE, OUTBOUND, FORWARD, INBOUND)
    stored = get_rules(QUBE)
    assert len(stored[""]) == len(OUTBOUND) and stored["forward"] and stored["inbound"]
    return stored


def client_env(root: Path, scratch: Path, *extra_paths: Path) -> dict[str, str]:
    return python_env([*extra_paths, *admin_client_paths(root, scratch)])


def drive(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TESTS / "upstream_drivers.py"), *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def stock_qvm_firewall(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    root = require_upstream(ADMIN_CLIENT)
    return drive(client_env(root, SCRATCH[0]), "tool", socket, "qvm_firewall", *args)


def result_of(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


# --- stock qvm-firewall ---------------------------------------------------------


def test_stock_list_shows_outbound_rules(lab_socket: str, holding: dict[str, list[str]]) -> None:
    table = stock_qvm_firewall(lab_socket, QUBE, "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["NO", "ACTION", "HOST", "PROTOCOL"]
    assert [line.split()[0] for line in lines[1:]] == [str(n) for n in range(len(OUTBOUND))]
    raw = stock_qvm_firewall(lab_socket, QUBE, "--raw", "--reload", "list")
    assert raw.returncode == 0, raw.stderr
    assert words(raw.stdout.splitlines()) == words(holding[""])
    assert get_rules(QUBE) == holding


def test_stock_add_del_reset_keep_forward_and_inbound(
    lab_socket: str, holding: dict[str, list[str]]
) -> None:
    kept = {"forward": holding["forward"], "inbound": holding["inbound"]}

    def others() -> dict[str, list[str]]:
        rules = get_rules(QUBE)
        return {kind: rules[kind] for kind in kept}

    added = stock_qvm_firewall(lab_socket, QUBE, "add", "--before", "0", "accept",
                               "203.0.113.5", "udp", "53")
    assert added.returncode == 0, added.stdout + added.stderr
    assert get_rules(QUBE)[""] == ["action=accept dst4=203.0.113.5/32 proto=udp dstports=53-53",
                                   *holding[""]]
    assert others() == kept
    by_number = stock_qvm_firewall(lab_socket, QUBE, "del", "--rule-no", "1")
    assert by_number.returncode == 0, by_number.stdout + by_number.stderr
    by_words = stock_qvm_firewall(lab_socket, QUBE, "del", "accept", "203.0.113.5", "udp", "53")
    assert by_words.returncode == 0, by_words.stdout + by_words.stderr
    assert get_rules(QUBE)[""] == holding[""][1:]
    assert others() == kept
    reset = stock_qvm_firewall(lab_socket, QUBE, "reset")
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert get_rules(QUBE)[""] == ["action=accept"]
    assert others() == kept


def test_stock_unknown_qube_is_no_such_domain(lab_socket: str) -> None:
    proc = stock_qvm_firewall(lab_socket, "no-such-qube", "list")
    assert proc.returncode == 2
    assert "no such domain" in proc.stderr


# --- Qube Manager's firewall tab ---------------------------------------------------


@pytest.fixture(scope="module")
def manager_copy(upstream_scratch: Path) -> Path:
    """qubes-manager's package with its generated modules (UI forms, Qt resources).

    Built as upstream's Makefile does (pyuic6, Qt's rcc) into a copy in a
    temporary folder: the snapshot stays untouched.
    """
    root = require_upstream(MANAGER, ADMIN_CLIENT)
    copy = upstream_scratch / "qubes-manager"
    return copy if copy.exists() else build_manager(root, copy)


@pytest.mark.parametrize("held", ["forward and inbound", "outbound only"])
def test_qube_manager_firewall_tab_edits_and_saves_with_a_stale_cache(
    lab_socket: str, manager_copy: Path, held: str
) -> None:
    """Opens, edits, saves; a forward added meanwhile (stale cache) survives the save.

    "outbound only" is the case that opens on any version: there, a save
    from a stale cache used to drop the forward added meanwhile.
    """
    root = require_upstream(MANAGER, ADMIN_CLIENT)
    if held == "outbound only":
        set_rules(QUBE, OUTBOUND, [], [])
    else:
        set_rules(QUBE, OUTBOUND, FORWARD, INBOUND)
    before = get_rules(QUBE)
    extra = "action=forward forwardtype=external proto=udp srcports=5353-5353 dstports=53-53"
    env = {**client_env(root, SCRATCH[0], manager_copy), "QT_QPA_PLATFORM": "offscreen"}
    result = result_of(drive(env, "manager", lab_socket, QUBE, "192.0.2.50", "8443", extra))
    assert words(result["opened"]) == words(before[""][:2])  # the tab lists the accepts
    after = get_rules(QUBE)
    assert after[""] == [
        before[""][1],
        "action=accept dst4=192.0.2.50/32 proto=tcp dstports=8443-8443",
        *before[""][2:],
    ]
    assert after["forward"][:-1] == before["forward"]
    assert words(after["forward"][-1:]) == words([extra])
    assert after["inbound"] == before["inbound"]


# --- backup restore, and qubesd's own reader -------------------------------------


def test_backup_restore_keeps_outbound_rules(
    lab: Lab, lab_socket: str, holding: dict[str, list[str]], upstream_scratch: Path
) -> None:
    root = require_upstream(ADMIN_CLIENT)
    backup = upstream_scratch / "backup-firewall.xml"
    shutil.copyfile(lab.state_dir / "qubes" / QUBE / "firewall.xml", backup)
    set_rules("work", ["action=accept"], [], [])
    try:
        result = result_of(drive(client_env(root, upstream_scratch), "restore", lab_socket,
                                 "work", str(backup)))
        assert result["errors"] == []
        assert get_rules("work")[""] == holding[""]
    finally:
        set_rules("work", ["action=accept"], [], [])


def test_upstream_firewall_load_reads_our_file(
    lab: Lab, holding: dict[str, list[str]], upstream_scratch: Path
) -> None:
    root = require_upstream(CORE_ADMIN, CORE_QREXEC)
    copy = upstream_scratch / "load" / "firewall.xml"
    copy.parent.mkdir(exist_ok=True)
    shutil.copyfile(lab.state_dir / "qubes" / QUBE / "firewall.xml", copy)
    env = python_env(core_admin_paths(root, upstream_scratch), QUBES_TEST="1")
    result = result_of(drive(env, "load", str(copy)))
    assert result["rules"] == holding[""]


# --- qvm-clone, against a real qubesd ----------------------------------------------


@pytest.fixture(scope="module")
def real_qubesd_socket(upstream_scratch: Path) -> Iterator[str]:
    """A real qubesd (offline, our extension loaded) serving the Admin API, as nobody."""
    root = require_upstream(CORE_ADMIN, CORE_QREXEC)
    env = python_env(core_admin_paths(root, upstream_scratch), QUBES_TEST="1")
    home = nobody_dir(upstream_scratch, "real-qubesd-serve")
    socket = home / "qubesd.sock"
    command, env = as_nobody(
        [sys.executable, str(TESTS / "upstream_qubesd.py"), "--serve", str(socket)], env, home)
    server = subprocess.Popen(command, env=env, cwd=home, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stderr is not None
        ready = server.stdout.readline()
        assert '"ready"' in ready, server.stderr.read()[-5000:]
        yield str(socket)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_stock_qvm_clone_clones_a_qube_holding_forwards(
    real_qubesd_socket: str, upstream_scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = require_upstream(ADMIN_CLIENT)
    monkeypatch.setenv("QUBESD_SOCKET", real_qubesd_socket)
    set_rules(QUBE, OUTBOUND, FORWARD, INBOUND)
    source = get_rules(QUBE)
    home = nobody_dir(upstream_scratch, "qvm-clone")
    tools = home / "bin"  # dom0's menu tool, called by qvm-clone: nothing to do here
    tools.mkdir()
    (tools / "qvm-appmenus").write_text("#!/bin/sh\nexit 0\n")
    (tools / "qvm-appmenus").chmod(0o755)
    env = {**client_env(root, upstream_scratch), "PATH": f"{tools}:/usr/bin:/bin"}
    clone = run_as_nobody(
        [sys.executable, str(TESTS / "upstream_drivers.py"), "tool", real_qubesd_socket,
         "qvm_clone", QUBE, "web-clone"], env, home, timeout=120,
    )
    assert clone.returncode == 0, clone.stdout + clone.stderr
    assert get_rules("web-clone")[""] == source[""]
    assert get_rules(QUBE) == source
