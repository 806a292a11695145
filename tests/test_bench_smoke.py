"""Every benchmark runs at its smallest size and prints its table.

Proves the benchmarks still work after a change to the code they drive;
no figure is checked (speed is measured by ``make bench``, never asserted
in tests). What is checked are facts the benchmarks rely on: an unchanged
re-plan writes nothing, and one transaction leaves the same ruleset as the
command-per-rule baseline.
"""

from __future__ import annotations

import pytest
from conftest import upstream_dir

from bench import (
    conntrack,
    converge,
    cutoff,
    dataplane,
    dom0,
    nft,
    outbound,
    planner,
    routing,
    rules,
    worker,
)
from lab.control import Lab


def test_rules_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert rules.main(["--sizes", "5"]) == 0
    output = capsys.readouterr().out
    for operation in ("parse_api_payload", "save_firewall_xml", "load_firewall_xml"):
        assert operation in output


def test_planner_benchmark_runs_and_unchanged_replan_writes_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    (row,) = planner.measure([3])
    assert row[0] == 3
    assert row[-1] == 0  # QubesDB calls of a re-plan with nothing changed
    assert planner.main(["--sizes", "2"]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_dom0_benchmark_adds_through_the_client_and_times_its_start_up() -> None:
    (row,) = dom0.measure_add([3], runs=1)
    assert row[0] == 3
    startup = dom0.measure_startup(runs=1)
    assert [line[0] for line in startup] == [
        "python -c pass", "python -c 'import argparse'", "qvm-firewall --help"]


@pytest.mark.lab
def test_nft_benchmark_runs_in_a_throwaway_namespace() -> None:
    (row,) = nft.measure([2], runs=1)
    assert row[:2] == [2, 2]  # two map elements, listed back from the kernel as rendered
    unchanged_transactions, per_change = row[7], row[11]
    assert (unchanged_transactions, per_change) == (0, 1)


@pytest.mark.lab
def test_conntrack_benchmark_lists_and_ends_real_flows_without_resizing_the_hash() -> None:
    with open("/proc/sys/net/netfilter/nf_conntrack_buckets") as buckets:
        size = int(buckets.read())
    (row,) = conntrack.measure([3])
    assert row[:2] == [size, 3]  # the machine's own hash size, three flows listed


@pytest.mark.lab
def test_dataplane_benchmark_sends_traffic_through_both_layouts() -> None:
    rows = dataplane.measure([3], rounds=1)
    assert [row[:2] for row in rows] == [["maps", 3], ["rules", 3]]
    assert all(float(row[2]) > 0 and float(row[4]) > 0 for row in rows)


@pytest.mark.lab
def test_worker_benchmark_reads_the_memory_of_a_running_worker() -> None:
    rows = worker.measure([10])
    assert [row[:2] for row in rows] == [["python + libnftables", "-"], ["worker", 10]]


@pytest.mark.lab
def test_outbound_benchmark_runs_both_workers_without_listing() -> None:
    upstream_dir()
    rows = outbound.measure([2], runs=2)
    assert [row[:3] for row in rows] == [[2, "edit", 2], [2, "all", 2], [2, "allow", 2]]
    assert all(row[-1] == 0 for row in rows)  # ours never listed a table


@pytest.mark.lab
def test_converge_benchmark_sets_forwards_in_a_lab_of_its_own() -> None:
    Lab().down()  # as every lab test: the benchmark refuses to take a running lab's namespaces
    (row,) = converge.measure([2])
    assert row[:2] == [2, 20]
    assert row[-1] == "20 / 18"  # steps in sys-firewall / sys-net (internal forwards: one hop)


@pytest.mark.lab
def test_cutoff_benchmark_runs_in_its_own_lab() -> None:
    rows = cutoff.measure(1)
    assert [row[:2] for row in rows] == [
        ["del", "tcp"], ["del", "udp"], ["stop", "tcp"], ["stop", "udp"]
    ]


@pytest.mark.lab
def test_routing_benchmark_runs_its_own_lab(capfd: pytest.CaptureFixture[str]) -> None:
    assert routing.main(["--seconds", "0.1", "--runs", "1"]) == 0
    rows = [line for line in capfd.readouterr().out.splitlines() if line.startswith("|")]
    assert [row.split("|")[1].strip() for row in rows[2:]] == [p[0] for p in routing.PATHS]
