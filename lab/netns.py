"""Thin, checked wrappers around ``ip``, ``nft`` and ``sysctl`` for lab namespaces.

Every command that fails raises :class:`CommandError` naming the command
and what it printed, so a broken lab says which step broke it.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence


def _prefix() -> str:
    """``$QUBES_LAB_NS_PREFIX`` or ``qlab-``: two labs with different prefixes
    (and state directories) can run side by side, e.g. for parallel test runs."""
    untrusted_prefix = os.environ.get("QUBES_LAB_NS_PREFIX", "qlab-")
    if not re.fullmatch(r"[a-z][a-z0-9]{0,7}-", untrusted_prefix):
        raise SystemExit(
            f"QUBES_LAB_NS_PREFIX={untrusted_prefix!r}: use 1-8 lower case letters or"
            " digits and a final '-'"
        )
    return untrusted_prefix


#: Every lab namespace starts with this; ``down`` removes all of them.
PREFIX = _prefix()
SWITCH = "lan-switch"


class CommandError(Exception):
    """A command of the lab's plumbing failed."""


def namespace(name: str) -> str:
    """Namespace of a qube or LAN host (names are validated by the topology)."""
    return PREFIX + name


def run(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run a command, return its stdout; CommandError with its stderr if it fails."""
    try:
        result = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, check=False
        )
    except OSError as err:
        raise CommandError(f"cannot run {' '.join(argv)}: {err}") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise CommandError(f"command failed (exit {result.returncode}): {' '.join(argv)}: {detail}")
    return result.stdout


def ip_batch(ns: str, commands: Sequence[str]) -> None:
    """Run ``ip`` commands in namespace ``ns`` with one process."""
    if commands:
        run(["ip", "-n", ns, "-batch", "-"], stdin="\n".join(commands) + "\n")


def nft(ns: str, script: str) -> None:
    """Load an nft script into namespace ``ns`` as one transaction."""
    run(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=script)


def sysctl(ns: str, settings: dict[str, str]) -> None:
    """Set sysctls inside ``ns`` (keys in slash form, so interface names may hold dots)."""
    if settings:
        run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
             *(f"{key}={value}" for key, value in settings.items())])


def exists(ns: str) -> bool:
    return ns in list_namespaces()


def list_namespaces() -> list[str]:
    """All namespaces known to ``ip netns`` (names only)."""
    return [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line]


def lab_namespaces() -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(PREFIX)]


def create(ns: str) -> None:
    """A fresh namespace with loopback up."""
    run(["ip", "netns", "add", ns])
    ip_batch(ns, ["link set lo up"])


def pids(ns: str) -> list[int]:
    """Processes living in ``ns``."""
    return [int(word) for word in run(["ip", "netns", "pids", ns]).split()]


def delete(ns: str) -> None:
    run(["ip", "netns", "delete", ns])


def link_exists(ns: str, interface: str) -> bool:
    try:
        run(["ip", "-n", ns, "link", "show", "dev", interface])
    except CommandError:
        return False
    return True
