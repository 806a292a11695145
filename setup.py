"""Qubes network server: forward and inbound rules for Qubes OS firewalls."""

from pathlib import Path

from setuptools import find_packages, setup

#: The one place the version is written; packaging/ reads it too.
VERSION = (Path(__file__).resolve().parent / "VERSION").read_text().strip()

setup(
    name="qubes-network-server",
    version=VERSION,
    description="Expose services in Qubes OS qubes to the LAN and to other qubes",
    license="GPL-2.0-or-later",
    python_requires=">=3.11",
    packages=find_packages(include=[
        "firewall_rules*", "core_admin_patch*", "admin_client_patch*",
        "agent_worker*", "lab*",
    ]),
    install_requires=["lxml"],
    extras_require={
        # docutils, jinja2, pyinotify: what upstream's qubesd code imports when
        # tests run it (QUBES_UPSTREAM_DIR: the extension inside upstream's
        # qubesd, tests/test_packages.py generating upstream's default policy)
        "test": ["pytest", "hypothesis", "ruff", "docutils", "jinja2", "pyinotify"],
        "man": ["argparse-manpage"],
        # PyQt6 for the GUI panel (qubes-network-server-settings, Qube Manager).
        "gui": ["PyQt6"],
        # The rest of the upstream code the conformance and GUI tests run
        # (tests/test_upstream_*.py, tests/test_lab_qube_manager.py): Qube
        # Manager's GUI toolkit and imports (qasync, pyxdg), pytest's Qt
        # plugin, qubesadmin's YAML.
        "conformance": ["pyyaml", "PyQt6", "pytest-qt", "qasync", "pyxdg"],
    },
    entry_points={
        "console_scripts": [
            "qvm-firewall = admin_client_patch.qvm_firewall:main",
            "qubes-lab = lab.cli:main",
            "qubes-firewall-worker = agent_worker.firewall:main",
            "qubes-network-server-input = agent_worker.input_hook:main",
            "qubes-network-server-settings = admin_client_patch.gui.standalone:main",
        ],
        "qubes.ext": [
            "qubes_network_server = core_admin_patch.extension:NetworkServerExtension",
        ],
    },
)
