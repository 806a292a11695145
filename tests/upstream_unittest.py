"""Run upstream unittest cases by id and write each one's outcome as JSON.

Started by tests/upstream_env.run_unittests in a subprocess (as uid nobody
for qubesd's tests), with the snapshots on PYTHONPATH. Options:

--report PATH          where to write ``{test id: {"outcome": .., "detail": ..}}``
--hide-extension NAME  qubes.ext entry point NAME is not installed for this run
                       (importlib.metadata no longer lists it): "without it"
--require-extension NAME  fail the run unless qubes.ext.get_extensions() would
                       load entry point NAME: "with it", as a real qubesd would load it
--preload MODULE       import MODULE first (e.g. a shim replacing an upstream
                       module with ours)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import sys
import traceback
import unittest
from pathlib import Path
from typing import Any


def hide_entry_point(name: str) -> None:
    """Make importlib.metadata forget the ``qubes.ext`` entry point ``name``."""
    original = importlib.metadata.entry_points

    def entry_points(**params: Any) -> Any:
        found = original(**params)
        if params.get("group") != "qubes.ext":
            return found
        return importlib.metadata.EntryPoints(ep for ep in found if ep.name != name)

    importlib.metadata.entry_points = entry_points  # type: ignore[assignment]


def extension_visible(name: str) -> bool:
    """Whether qubes.ext.get_extensions() would load entry point ``name``.

    It loads every ``qubes.ext`` entry point and instantiates the class;
    the class is only loaded here, since instantiating upstream's
    extensions starts watchers on the event loop upstream's tests check.
    """
    import qubes.ext

    return any(
        ep.name == name and issubclass(ep.load(), qubes.ext.Extension)
        for ep in importlib.metadata.entry_points(group="qubes.ext")
    )


class RecordingResult(unittest.TestResult):
    """Keeps one outcome per test id: pass, fail, error, skip, xfail, xpass."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: dict[str, dict[str, str]] = {}

    def _record(self, test: unittest.TestCase, outcome: str, detail: str = "") -> None:
        self.outcomes[test.id()] = {"outcome": outcome, "detail": detail[-4000:]}

    def addSuccess(self, test: unittest.TestCase) -> None:
        self._record(test, "pass")

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        self._record(test, "fail", "".join(traceback.format_exception(*err)))

    def addError(self, test: Any, err: Any) -> None:
        self._record(test, "error", "".join(traceback.format_exception(*err)))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        self._record(test, "skip", reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:
        self._record(test, "xfail")

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        self._record(test, "xpass")


def load(name: str) -> unittest.TestSuite:
    """Tests of a module, a class, or one ``module.Class.test_method``.

    unittest's own loader cannot make a single test of QubesTestCase (its
    instances wrap test methods in plain functions), so a method is built
    here from its class.
    """
    loader = unittest.TestLoader()
    owner, _, attribute = name.rpartition(".")
    if attribute.startswith("test"):
        module_name, _, class_name = owner.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError):
            return loader.loadTestsFromName(name)  # reports the error as a test
        if isinstance(cls, type) and issubclass(cls, unittest.TestCase):
            return unittest.TestSuite([cls(attribute)])
    return loader.loadTestsFromName(name)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--hide-extension")
    parser.add_argument("--require-extension")
    parser.add_argument("--preload", action="append", default=[])
    parser.add_argument("names", nargs="+")
    args = parser.parse_args()
    if args.hide_extension:
        hide_entry_point(args.hide_extension)
    if args.require_extension and not extension_visible(args.require_extension):
        print(f"qubes.ext.get_extensions() did not load {args.require_extension}",
              file=sys.stderr)
        return 3
    for module in args.preload:
        importlib.import_module(module)
    suite = unittest.TestSuite(load(name) for name in args.names)
    result = RecordingResult()
    suite.run(result)
    for name in args.names:  # a name that ran nothing must not pass silently
        if not any(test_id == name or test_id.startswith(name + ".")
                   for test_id in result.outcomes):
            result.outcomes[name] = {"outcome": "missing", "detail": "no such test ran"}
    args.report.write_text(json.dumps(result.outcomes, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
