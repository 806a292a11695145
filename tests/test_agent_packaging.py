"""The files that install the agent in a Qubes template agree with the code."""

from __future__ import annotations

import ast
import configparser
import importlib.util
import re
import subprocess
from pathlib import Path

from core_admin_patch.planner import SUPPORT_FEATURE

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "agent_worker"


def console_scripts() -> dict[str, str]:
    """``name -> module:function`` of setup.py's console scripts."""
    text = (REPO / "setup.py").read_text()
    return dict(re.findall(r'"([a-z-]+) = ([a-z_.]+:[a-z_]+)"', text))


def exec_start(unit: Path) -> str:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(unit)
    return parser["Service"]["ExecStart"]


def test_units_start_installed_entry_points() -> None:
    scripts = console_scripts()
    units = [
        AGENT / "systemd" / "qubes-firewall.service.d" / "30_qubes-network-server.conf",
        AGENT / "systemd" / "qubes-network-server-input.service",
    ]
    for unit in units:
        command = exec_start(unit)
        assert command.startswith("/usr/bin/"), unit
        module, function = scripts[command.removeprefix("/usr/bin/")].split(":")
        # Parsed, not imported: the agent imports the real qubesdb module.
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None, module
        tree = ast.parse(Path(spec.origin).read_text())
        assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_drop_in_replaces_upstreams_command() -> None:
    text = (AGENT / "systemd" / "qubes-firewall.service.d" / "30_qubes-network-server.conf")
    lines = [line for line in text.read_text().splitlines() if line.startswith("ExecStart")]
    assert lines == ["ExecStart=", "ExecStart=/usr/bin/qubes-firewall-worker"]


def test_post_install_advertises_the_feature_dom0_checks() -> None:
    script = AGENT / "post-install.d" / "50-qubes-network-server.sh"
    subprocess.run(["sh", "-n", str(script)], check=True)
    assert f"qvm-features-request {SUPPORT_FEATURE}=1" in script.read_text()
    assert script.stat().st_mode & 0o111
