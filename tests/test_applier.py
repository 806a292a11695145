"""The applier: diffs plans against what it wrote and writes the difference.

Its contract is the sequence of QubesDB calls it makes, so the writer here
only records them (and keeps an in-memory QubesDB to check the end state).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytest

from core_admin_patch.applier import Applier
from core_admin_patch.planner import Plan

Call = tuple[str, str, str] | tuple[str, str, str, str]

WEB_DIR = "/qns-forward/10.137.0.10"
WORK_DIR = "/qns-forward/10.137.0.11"
STEP_A = "proto=tcp ports=443-443 iif=upstream daddr=local to=10.137.0.2 toports=443-443"
STEP_B = "proto=udp ports=53-53 iif=upstream daddr=local to=10.137.0.2 toports=53-53"
STEP_C = "proto=tcp ports=80-80 iif=upstream daddr=local to=10.137.0.2 toports=80-80"
INPUT = "action=accept proto=tcp dstports=8443-8443"


class RecordingWriter:
    """Records every call in order and keeps a QubesDB per qube (path -> value)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.db: dict[str, dict[str, str]] = {}
        self.fail_on: tuple[str, str] | None = None
        self.lists = 0

    def write(self, qube: str, path: str, value: str) -> None:
        if self.fail_on == (qube, path):
            raise OSError(f"qubesdb of {qube} gone")
        self.calls.append(("write", qube, path, value))
        self.db.setdefault(qube, {})[path] = value

    def rm(self, qube: str, path: str) -> None:
        if self.fail_on == (qube, path):
            raise OSError(f"qubesdb of {qube} gone")
        self.calls.append(("rm", qube, path))
        entries = self.db.setdefault(qube, {})
        for key in [k for k in entries if k == path or (path.endswith("/") and k.startswith(path))]:
            del entries[key]

    def list(self, qube: str, prefix: str) -> list[str]:
        self.lists += 1
        return sorted(path for path in self.db.get(qube, {}) if path.startswith(prefix))

    def take(self) -> list[Call]:
        calls, self.calls = self.calls, []
        return calls


def make_plan(
    entries: Mapping[str, Mapping[str, Mapping[str, str]]], skipped: tuple[str, ...] = ()
) -> Plan:
    return Plan(entries, skipped)


BASE = make_plan(
    {
        "sys-net": {
            WEB_DIR: {"0001": STEP_B, "0000": STEP_A},
            WORK_DIR: {"0000": STEP_C},
        },
        "web": {"/qns-input": {"0000": INPUT}},
    }
)


def test_first_apply_writes_keys_then_the_empty_marker_last_per_directory() -> None:
    writer = RecordingWriter()
    changed = Applier(writer).apply(BASE)
    assert changed == [f"sys-net:{WEB_DIR}", f"sys-net:{WORK_DIR}", "web:/qns-input"]
    assert writer.take() == [
        ("rm", "sys-net", WEB_DIR + "/"),
        ("write", "sys-net", WEB_DIR + "/0000", STEP_A),
        ("write", "sys-net", WEB_DIR + "/0001", STEP_B),
        ("write", "sys-net", WEB_DIR, ""),
        ("rm", "sys-net", WORK_DIR + "/"),
        ("write", "sys-net", WORK_DIR + "/0000", STEP_C),
        ("write", "sys-net", WORK_DIR, ""),
        ("rm", "web", "/qns-input/"),
        ("write", "web", "/qns-input/0000", INPUT),
        ("write", "web", "/qns-input", ""),
    ]
    assert writer.db["sys-net"] == {
        WEB_DIR + "/0000": STEP_A,
        WEB_DIR + "/0001": STEP_B,
        WEB_DIR: "",
        WORK_DIR + "/0000": STEP_C,
        WORK_DIR: "",
    }


def test_reapply_of_the_same_plan_writes_nothing() -> None:
    writer = RecordingWriter()
    applier = Applier(writer)
    applier.apply(BASE)
    writer.take()
    # An equal plan built anew (other dict objects, other key order) is no change.
    same = make_plan(
        {
            "web": {"/qns-input": {"0000": INPUT}},
            "sys-net": {
                WORK_DIR: {"0000": STEP_C},
                WEB_DIR: {"0000": STEP_A, "0001": STEP_B},
            },
        }
    )
    assert applier.apply(same) == []
    assert applier.apply(BASE) == []
    assert writer.take() == []


def test_a_changed_directory_is_removed_then_rewritten_alone() -> None:
    writer = RecordingWriter()
    applier = Applier(writer)
    applier.apply(BASE)
    writer.take()
    changed_plan = make_plan(
        {
            "sys-net": {WEB_DIR: {"0000": STEP_A}, WORK_DIR: {"0000": STEP_C}},
            "web": {"/qns-input": {"0000": INPUT}},
        }
    )
    assert applier.apply(changed_plan) == [f"sys-net:{WEB_DIR}"]
    assert writer.take() == [
        ("rm", "sys-net", WEB_DIR + "/"),
        ("write", "sys-net", WEB_DIR + "/0000", STEP_A),
        ("write", "sys-net", WEB_DIR, ""),
    ]
    # The key no longer planned is gone, not left behind.
    assert WEB_DIR + "/0001" not in writer.db["sys-net"]
    assert applier.written("sys-net")[WEB_DIR] == {"0000": STEP_A}


def test_a_changed_value_under_the_same_key_is_rewritten() -> None:
    writer = RecordingWriter()
    applier = Applier(writer)
    applier.apply(make_plan({"web": {"/qns-input": {"0000": INPUT}}}))
    writer.take()
    other = "action=accept proto=tcp dstports=8443-8443 srchost=192.0.2.0/24"
    assert applier.apply(make_plan({"web": {"/qns-input": {"0000": other}}})) == [
        "web:/qns-input"
    ]
    assert writer.take() == [
        ("rm", "web", "/qns-input/"),
        ("write", "web", "/qns-input/0000", other),
        ("write", "web", "/qns-input", ""),
    ]


def test_a_vanished_directory_is_removed_with_its_marker() -> None:
    writer = RecordingWriter()
    applier = Applier(writer)
    applier.apply(BASE)
    writer.take()
    smaller = make_plan(
        {"sys-net": {WEB_DIR: {"0000": STEP_A, "0001": STEP_B}}, "web": BASE.entries["web"]}
    )
    assert applier.apply(smaller) == [f"sys-net:{WORK_DIR}"]
    assert writer.take() == [
        ("rm", "sys-net", WORK_DIR + "/"),
        ("rm", "sys-net", WORK_DIR),
    ]
    assert not [k for k in writer.db["sys-net"] if k.startswith(WORK_DIR)]


def test_a_vanished_qube_has_all_its_directories_removed_and_is_dropped() -> None:
    writer = RecordingWriter()
    applier = Applier(writer)
    applier.apply(BASE)
    writer.take()
    assert applier.apply(make_plan({"web": BASE.entries["web"]})) == [
        f"sys-net:{WEB_DIR}",
        f"sys-net:{WORK_DIR}",
    ]
    assert writer.take() == [
        ("rm", "sys-net", WEB_DIR + "/"),
        ("rm", "sys-net", WEB_DIR),
        ("rm", "sys-net", WORK_DIR + "/"),
        ("rm", "sys-net", WORK_DIR),
    ]
    assert applier.written("sys-net") == {}
    assert writer.db["sys-net"] == {}
    # Nothing left to remove next time.
    assert applier.apply(make_plan({"web": BASE.entries["web"]})) == []
    assert writer.take() == []


def test_forget_makes_the_next_apply_rewrite_that_qube_only() -> None:
    writer = RecordingWriter()
    applier = Applier(writer)
    applier.apply(BASE)
    writer.take()
    applier.forget("web")
    assert applier.written("web") == {}
    assert applier.apply(BASE) == ["web:/qns-input"]
    assert writer.take() == [
        ("rm", "web", "/qns-input/"),
        ("write", "web", "/qns-input/0000", INPUT),
        ("write", "web", "/qns-input", ""),
    ]


def test_forget_of_a_stopped_qube_then_empty_plan_writes_nothing_to_it() -> None:
    """A stopped qube's QubesDB is gone: nothing to remove there."""
    writer = RecordingWriter()
    applier = Applier(writer)
    applier.apply(BASE)
    writer.take()
    applier.forget("web")
    applier.apply(make_plan({"sys-net": BASE.entries["sys-net"]}))
    assert writer.take() == []


def test_a_failed_write_forgets_the_qube_so_the_next_apply_rewrites_it() -> None:
    writer = RecordingWriter()
    applier = Applier(writer)
    writer.fail_on = ("sys-net", WORK_DIR + "/0000")
    with pytest.raises(OSError):
        applier.apply(BASE)
    assert applier.written("sys-net") == {}
    writer.fail_on = None
    writer.take()
    changed = applier.apply(BASE)
    assert f"sys-net:{WEB_DIR}" in changed
    assert f"sys-net:{WORK_DIR}" in changed
    assert writer.db["sys-net"][WORK_DIR] == ""
    assert applier.apply(BASE) == []


def test_written_is_a_copy_not_the_plan() -> None:
    keys = {"0000": INPUT}
    applier = Applier(RecordingWriter())
    applier.apply(make_plan({"web": {"/qns-input": keys}}))
    keys["0001"] = "action=accept proto=udp dstports=53-53"
    assert applier.written("web") == {"/qns-input": {"0000": INPUT}}


def test_skipped_rules_are_logged_once_until_they_change(caplog: pytest.LogCaptureFixture) -> None:
    applier = Applier(RecordingWriter())
    skipped = ("zeta rule 0: port conflict with 'alpha'",)
    with caplog.at_level(logging.WARNING, logger="qubes.network-server"):
        applier.apply(make_plan({}, skipped))
        applier.apply(make_plan({}, skipped))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["rule not applied: zeta rule 0: port conflict with 'alpha'"]


# -- entries the applier did not write: dom0 restarted, or a write failed -----

STALE = {WORK_DIR + "/0000": STEP_C, WORK_DIR: "", "/qns-input/0000": INPUT, "/qns-input": ""}


def test_entries_left_by_an_earlier_dom0_are_removed() -> None:
    writer = RecordingWriter()
    writer.db["sys-net"] = dict(STALE)
    assert Applier(writer).apply(make_plan({}), running=["sys-net"]) == [
        f"sys-net:{WORK_DIR}", "sys-net:/qns-input",
    ]
    assert writer.db["sys-net"] == {}


def test_entries_left_by_an_earlier_dom0_are_rewritten_when_still_planned() -> None:
    writer = RecordingWriter()
    writer.db["sys-net"] = {WORK_DIR + "/0000": STEP_A, WORK_DIR + "/0001": STEP_B, WORK_DIR: ""}
    applier = Applier(writer)
    applier.apply(make_plan({"sys-net": {WORK_DIR: {"0000": STEP_C}}}), running=["sys-net"])
    assert writer.db["sys-net"] == {WORK_DIR + "/0000": STEP_C, WORK_DIR: ""}


def test_a_failed_write_never_leaves_a_stale_forward_behind() -> None:
    """The review's case: a write fails, the forward is then unplanned."""
    writer = RecordingWriter()
    applier = Applier(writer)
    applier.apply(BASE, running=["sys-net", "web"])
    writer.fail_on = ("sys-net", WEB_DIR + "/")
    with pytest.raises(OSError):
        applier.apply(make_plan({"web": BASE.entries["web"]}), running=["sys-net", "web"])
    writer.fail_on = None
    applier.apply(make_plan({"web": BASE.entries["web"]}), running=["sys-net", "web"])
    assert writer.db["sys-net"] == {}


def test_the_qubesdb_is_read_once_per_qube() -> None:
    writer = RecordingWriter()
    applier = Applier(writer)
    applier.apply(BASE, running=["sys-net", "web", "work"])
    first = writer.lists
    assert first > 0
    applier.apply(BASE, running=["sys-net", "web", "work"])
    assert writer.lists == first
    applier.forget("web")
    applier.apply(BASE, running=["sys-net", "web", "work"])
    assert writer.lists > first


def test_paths_dom0_never_writes_are_left_alone() -> None:
    """A qube can write its own QubesDB: only exact dom0 names are taken for ours."""
    writer = RecordingWriter()
    junk = {"/qns-forward/010.137.0.9/0000": "x", "/qns-forward/web/0000": "x",
            "/qns-inputs": "x", "/qns-inbound/10.137.0.9x": "x"}
    writer.db["web"] = dict(junk)
    assert Applier(writer).apply(make_plan({}), running=["web"]) == []
    assert writer.db["web"] == junk
