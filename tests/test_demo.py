"""``make demo`` keeps working: the demo as a process, in its own lab state directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab.control import Lab

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_every_step(tmp_path: Path) -> None:
    Lab().down()  # namespaces are global: whatever lab is up goes first
    env = {**os.environ, "QUBES_LAB_DIR": str(tmp_path / "lab")}
    result = subprocess.run(
        [sys.executable, "-m", "lab.demo"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "page reachable with the rule: yes" in out
    assert "page reachable after removal: no" in out
    assert "open TCP ports at 192.0.2.2: [8080]" in out
    assert "Demo done" in out
    assert not Lab(tmp_path / "lab").is_up()
