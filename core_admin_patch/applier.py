"""The applier: write a plan into QubesDB, touching only what changed.

dom0 remembers what it last wrote into each qube's QubesDB, so a re-plan
after an event rewrites only the directories whose content differs. Each
directory is written with the upstream completion convention (its keys,
then an empty write on the directory path), which is the moment a worker
acts on it; a directory no longer planned is removed with the same signal
path, so the worker drops its rules.

How a changed directory is written depends on whether its order matters.
The ordered lists (``/qns-inbound/``, ``/qns-input``: first match wins) are
removed and written whole, so a worker reading one mid-way sees a part of
the new list, never old and new rules mixed out of order. A forward
directory is a set of steps: only the keys that changed are written,
removed ones first, so a qube holding hundreds of forwards costs a write
per step that changed, not per step it holds; mid-way a worker sees old
and new steps, never a step of neither.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Protocol

from core_admin_patch.planner import FORWARD_DIR, INBOUND_DIR, INPUT_DIR, Plan
from core_admin_patch.routing import ROUTING_DIR

log = logging.getLogger("qubes.network-server")


class EntryWriter(Protocol):
    """Write access to the QubesDB of running qubes (qubesd's ``untrusted_qdb``)."""

    def write(self, qube: str, path: str, value: str) -> None: ...

    def rm(self, qube: str, path: str) -> None: ...

    def list(self, qube: str, prefix: str) -> list[str]:
        """Paths under ``prefix`` in the qube's QubesDB; none if it is not running."""
        ...

    def read(self, qube: str, path: str) -> bytes | None:
        """One value of the qube's QubesDB (written by the qube: untrusted); None if absent."""
        ...


Directories = Mapping[str, Mapping[str, str]]

#: Content of a directory found in QubesDB but not written by this applier
#: (dom0 restarted, or a write failed): never equal to a planned directory,
#: so it is rewritten or removed.
UNKNOWN: Mapping[str, str] = MappingProxyType({"?": "found in QubesDB"})


class Applier:
    """Diffs each plan against what was written and writes the difference."""

    def __init__(self, writer: EntryWriter) -> None:
        self._writer = writer
        self._written: dict[str, Directories] = {}
        self._skipped: tuple[str, ...] = ()

    def forget(self, qube: str) -> None:
        """What the qube's QubesDB holds is no longer known: look again before the next write."""
        self._written.pop(qube, None)

    def written(self, qube: str) -> Directories:
        return self._written.get(qube, {})

    def apply(self, plan: Plan, running: Iterable[str] = ()) -> list[str]:
        """Bring every qube's entries to ``plan``; returns the directories rewritten.

        ``running`` names every qube whose QubesDB may hold entries, planned
        or not. A qube this applier has not written to since it started (or
        since ``forget``) is read first, so entries left by an earlier dom0
        or by a failed write are removed instead of pointing at an address
        their target may no longer hold. A qube whose write fails is
        forgotten, so the next apply reads it again.
        """
        changed: list[str] = []
        for qube in sorted(set(plan.entries) | set(self._written) | set(running)):
            new = plan.entries.get(qube, {})
            try:
                old = self._written[qube] if qube in self._written else self._found(qube)
                for directory in sorted(set(new) | set(old)):
                    if new.get(directory) == old.get(directory):
                        continue
                    self._rewrite(qube, directory, new.get(directory), old.get(directory))
                    changed.append(f"{qube}:{directory}")
            except Exception:
                self.forget(qube)
                raise
            self._written[qube] = {d: dict(keys) for d, keys in new.items()}
        for line in changed:
            log.info("rewrote %s", line)
        if plan.skipped != self._skipped:
            for reason in plan.skipped:
                log.warning("rule not applied: %s", reason)
            self._skipped = plan.skipped
        return changed

    def _found(self, qube: str) -> dict[str, Mapping[str, str]]:
        """Our directories present in the qube's QubesDB, content unknown.

        The paths come from the qube's own database, which the qube can
        write: only names of the exact form dom0 writes are taken, so the
        worst a qube can do is have its own entries rewritten.
        """
        found: dict[str, Mapping[str, str]] = {}
        for base in (FORWARD_DIR, INBOUND_DIR, ROUTING_DIR):
            for untrusted_path in self._writer.list(qube, base + "/"):
                untrusted_name = untrusted_path[len(base) + 1 :].split("/", 1)[0]
                try:
                    address = ipaddress.ip_address(untrusted_name)
                except ValueError:
                    continue
                if str(address) == untrusted_name:
                    found[f"{base}/{address}"] = UNKNOWN
        if any(
            path == INPUT_DIR or path.startswith(INPUT_DIR + "/")
            for path in self._writer.list(qube, INPUT_DIR)
        ):
            found[INPUT_DIR] = UNKNOWN
        return found

    def _rewrite(
        self, qube: str, directory: str, keys: Mapping[str, str] | None,
        old: Mapping[str, str] | None,
    ) -> None:
        """Bring one directory from ``old`` (None: absent, UNKNOWN) to ``keys`` (None: gone)."""
        if keys is None or old is None or old is UNKNOWN or not directory.startswith(FORWARD_DIR):
            self._writer.rm(qube, directory + "/")
            if keys is None:
                self._writer.rm(qube, directory)
                return
            old = {}
        for key in sorted(old.keys() - keys.keys()):
            self._writer.rm(qube, f"{directory}/{key}")
        for key, value in sorted(keys.items()):
            if old.get(key) != value:
                self._writer.write(qube, f"{directory}/{key}", value)
        self._writer.write(qube, directory, "")
