"""``up`` and ``down``: idempotent, leave the host as they found it, survive a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fresh_lab

from lab import netns, procs
from lab.control import Lab, LabError

pytestmark = pytest.mark.lab


def _host_state() -> dict[str, str]:
    """What the lab must not change in the root namespace."""
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    links = out("ip", "-o", "link", "show")
    # Peer ifindex/netns annotations of unrelated veths are stable; counters are not shown.
    return {
        "netns": out("ip", "netns", "list"),
        "links": "\n".join(sorted(line.split(":")[1] for line in links.splitlines())),
        "nft": out("nft", "list", "ruleset"),
    }


@pytest.fixture
def empty_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    instance = fresh_lab(tmp_path_factory)
    yield instance
    instance.down()


def _lab_pids(lab: Lab) -> list[int]:
    pids = []
    for pid_file in (lab.state_dir / "pids").glob("*.pid"):
        pid = procs.read_pid(lab.state_dir, pid_file.stem)
        if pid is not None:
            pids.append(pid)
    return pids


def test_up_down_leaves_the_host_unchanged(empty_lab: Lab) -> None:
    before = _host_state()
    started = time.monotonic()
    empty_lab.up()
    took = time.monotonic() - started
    assert took < 10, f"up took {took:.1f}s"
    assert {netns.namespace(n) for n in ("web", "lan", "lan-switch")} <= set(netns.lab_namespaces())
    pids = _lab_pids(empty_lab)
    assert len(pids) >= 8  # qubesdb, dom0, 2 workers, 4 input hooks
    empty_lab.down()
    assert _host_state() == before
    assert netns.lab_namespaces() == []
    assert not [pid for pid in pids if procs.is_ours(empty_lab.state_dir, pid)]
    assert sorted(p.name for p in empty_lab.state_dir.iterdir()) == ["logs"]


def test_up_twice_is_a_no_op(empty_lab: Lab) -> None:
    empty_lab.up()
    before = empty_lab.status()
    empty_lab.up()
    after = empty_lab.status()
    assert after["dom0_pid"] == before["dom0_pid"]
    assert after["qubes"] == before["qubes"]


def test_up_with_another_topology_is_refused(empty_lab: Lab, tmp_path: Path) -> None:
    empty_lab.up()
    other = tmp_path / "other.toml"
    other.write_text('[[qubes]]\nname = "net"\nip = "10.137.0.2"\nprovides_network = true\n')
    with pytest.raises(LabError, match="already up"):
        empty_lab.up(other)


def test_down_after_a_dom0_crash_still_cleans(empty_lab: Lab) -> None:
    before = _host_state()
    empty_lab.up()
    pids = _lab_pids(empty_lab)
    dom0 = procs.read_pid(empty_lab.state_dir, "dom0")
    assert dom0 is not None
    os.kill(dom0, signal.SIGKILL)
    while procs.is_ours(empty_lab.state_dir, dom0):
        time.sleep(0.01)
    status = empty_lab.status()
    assert status["daemons"]["dom0"] is None
    assert netns.namespace("web") in status["namespaces"]
    assert Lab(empty_lab.state_dir).is_up() is False
    empty_lab.down()
    assert _host_state() == before
    assert not [pid for pid in pids if procs.is_ours(empty_lab.state_dir, pid)]


def test_up_after_a_crash_cleans_first(empty_lab: Lab) -> None:
    empty_lab.up()
    dom0 = procs.read_pid(empty_lab.state_dir, "dom0")
    assert dom0 is not None
    os.kill(dom0, signal.SIGKILL)
    empty_lab.up()
    assert empty_lab.is_up()
    assert empty_lab.qube_info("web")["domid"] == 3


def test_bad_topology_is_refused_before_anything_starts(empty_lab: Lab, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[qubes]]\nname = "web"\nnetvm = "nope"\nip = "10.137.0.2"\n')
    with pytest.raises(LabError, match="netvm 'nope' does not exist"):
        empty_lab.up(bad)
    assert netns.lab_namespaces() == []


def test_failed_up_tears_down_and_quotes_the_log(tmp_path: Path) -> None:
    # Unix socket paths are limited to 108 bytes: the QubesDB daemon cannot start.
    lab = Lab(tmp_path / ("x" * 100))
    with pytest.raises(LabError, match="qubesdb exited") as info:
        lab.up()
    assert "too long" in str(info.value)
    assert netns.lab_namespaces() == []
    assert not (lab.state_dir / "pids").exists()


def test_cli_round_trip(empty_lab: Lab) -> None:
    env = dict(os.environ, QUBES_LAB_DIR=str(empty_lab.state_dir))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lab.cli", *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    up = cli("up")
    assert up.returncode == 0, up.stderr
    assert "QUBESD_SOCKET" in up.stdout
    status = cli("status")
    assert status.returncode == 0
    assert "sys-firewall" in status.stdout and "vif" in status.stdout
    hostname = cli("exec", "web", "--", "ip", "-4", "-o", "addr", "show", "eth0")
    assert "10.137.0.20/32" in hostname.stdout
    failing = cli("exec", "web", "--", "sh", "-c", "exit 7")
    assert failing.returncode == 7
    assert cli("restart", "web").returncode == 0
    refused = cli("stop", "sys-firewall")
    assert refused.returncode == 1
    assert "qubes-lab: there are other qubes connected" in refused.stderr
    assert cli("set", "work", "netvm", "none").returncode == 0
    assert cli("down").returncode == 0
    assert netns.lab_namespaces() == []
    missing = cli("exec", "web", "--", "true")
    assert missing.returncode == 1 and "not running" in missing.stderr
