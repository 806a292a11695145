"""Helpers of the GUI lab tests: the lab's stored rules, read back with qvm-firewall."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lab.control import Lab

QVM_FIREWALL = Path(sys.executable).parent / "qvm-firewall"


def run_qvm_firewall(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """The project's qvm-firewall against the lab's qubesd."""
    return subprocess.run(
        [str(QVM_FIREWALL), *args], capture_output=True, text=True, check=False,
        env={**os.environ, "QUBESD_SOCKET": str(lab.qubesd_socket)},
    )


def qvm_firewall(lab: Lab, *args: str) -> str:
    """Run qvm-firewall, which must succeed; its output."""
    result = run_qvm_firewall(lab, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def stored(lab: Lab, qube: str = "web") -> list[str]:
    """Every rule of ``qube`` as qvm-firewall lists it (``--raw``: canonical lines)."""
    return qvm_firewall(lab, "--raw", qube, "list").splitlines()
