"""The applier: write a plan into QubesDB, touching only what changed.

dom0 remembers what it last wrote into each qube's QubesDB, so a re-plan
after an event rewrites only the directories whose content differs. Each
directory is rewritten with the upstream completion convention (remove it,
write every key, then an empty write on the directory path), which is the
moment a worker acts on it; a directory no longer planned is removed with
the same signal path, so the worker drops its rules.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from core_admin_patch.planner import Plan

log = logging.getLogger("qubes.network-server")


class EntryWriter(Protocol):
    """Write access to the QubesDB of running qubes (qubesd's ``untrusted_qdb``)."""

    def write(self, qube: str, path: str, value: str) -> None: ...

    def rm(self, qube: str, path: str) -> None: ...


Directories = Mapping[str, Mapping[str, str]]


class Applier:
    """Diffs each plan against what was written and writes the difference."""

    def __init__(self, writer: EntryWriter) -> None:
        self._writer = writer
        self._written: dict[str, Directories] = {}
        self._skipped: tuple[str, ...] = ()

    def forget(self, qube: str) -> None:
        """The qube's QubesDB was reset (it stopped or started): assume it empty."""
        self._written.pop(qube, None)

    def written(self, qube: str) -> Directories:
        return self._written.get(qube, {})

    def apply(self, plan: Plan) -> list[str]:
        """Bring every qube's entries to ``plan``; returns the directories rewritten.

        A qube whose write fails is forgotten, so the next apply rewrites
        all of it instead of trusting a half-written state.
        """
        changed: list[str] = []
        for qube in sorted(set(plan.entries) | set(self._written)):
            new = plan.entries.get(qube, {})
            old = self._written.get(qube, {})
            try:
                for directory in sorted(set(new) | set(old)):
                    if new.get(directory) == old.get(directory):
                        continue
                    self._rewrite(qube, directory, new.get(directory))
                    changed.append(f"{qube}:{directory}")
            except Exception:
                self.forget(qube)
                raise
            if new:
                self._written[qube] = {d: dict(keys) for d, keys in new.items()}
            else:
                self._written.pop(qube, None)
        for line in changed:
            log.info("rewrote %s", line)
        if plan.skipped != self._skipped:
            for reason in plan.skipped:
                log.warning("forward rule not applied: %s", reason)
            self._skipped = plan.skipped
        return changed

    def _rewrite(self, qube: str, directory: str, keys: Mapping[str, str] | None) -> None:
        self._writer.rm(qube, directory + "/")
        if keys is None:
            self._writer.rm(qube, directory)
            return
        for key, value in sorted(keys.items()):
            self._writer.write(qube, f"{directory}/{key}", value)
        self._writer.write(qube, directory, "")
