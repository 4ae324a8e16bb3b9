"""The poll benchmark (``tests/benchmarks/bench_poll.py``), run end to end on a tiny account.

The benchmark is not part of the test run, and a tool nobody runs rots; this runs the documented
command with a few hundred customers, so that it keeps working and keeps measuring what it says.
No timing is asserted (the figures belong to the benchmark): only that every measurement is there,
that the cycles saw the whole account, and that what can be known exactly is exact.
"""

from __future__ import annotations

from typing import Any

import pytest

from .benchmarks import run

CUSTOMERS = 300
LATENCY_MS = 5


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    options = {
        "--customers": CUSTOMERS,
        "--repeat": 1,
        "--latency-ms": LATENCY_MS,
        "--latency-customers": CUSTOMERS,
        "--out": out,
    }
    return run("bench_poll", options)


def test_every_scenario_reads_the_whole_account(report: dict[str, Any]) -> None:
    (size,) = report["sizes"]
    scenarios = size["scenarios"]
    assert set(scenarios) == {
        "floor_sequential",
        "floor_concurrent",
        "baseline",
        "no_change",
        "no_change_sequential_listings",
        "changed_1pct",
    }
    pages = size["pages"]
    for name in ("floor_sequential", "floor_concurrent"):
        floor = scenarios[name]
        assert floor["records"] == CUSTOMERS
        assert floor["pages_active"] + floor["pages_archived"] == pages
    for name in ("baseline", "no_change", "no_change_sequential_listings", "changed_1pct"):
        cycle = scenarios[name]
        assert cycle["active"] + cycle["archived"] == CUSTOMERS, name
        assert cycle["pages"] == pages, name
        assert cycle["seconds"] > 0 and cycle["ratio_to_floor"] > 0 and cycle["peak_rss_mb"] > 0
        assert isinstance(cycle["checkpoint_wait_seconds"], float), name  # the work after the cycle
    assert scenarios["baseline"]["baseline"] is True
    assert scenarios["no_change"]["baseline"] is False
    assert scenarios["no_change"]["events"] == 0
    assert scenarios["no_change_sequential_listings"]["events"] == 0


def test_the_changed_cycle_reports_exactly_the_changes_made(report: dict[str, Any]) -> None:
    (size,) = report["sizes"]
    (mutation,) = size["mutations_per_1pct_run"]
    assert mutation["changed"] == round(CUSTOMERS / 100)
    # Every kind of mutation is one event, but ``touch`` (updated_at only), which must be none.
    expected = mutation["changed"] - mutation["by_kind"].get("touch", 0)
    assert size["scenarios"]["changed_1pct"]["events"] == expected


def test_database_and_server_figures_are_reported(report: dict[str, Any]) -> None:
    (size,) = report["sizes"]
    db = size["database"]
    assert db["customers_raw_json_bytes"] > 0 and db["bytes_at_end"] > 0
    assert db["ratio_to_raw_plus_events"] == pytest.approx(
        db["bytes_at_end"] / (db["customers_raw_json_bytes"] + db["events_payload_bytes"])
    )
    assert size["server"]["cpu_ms_per_page"] > 0
    assert set(size["whole_process"]) == {"baseline", "no_change", "changed_1pct"}
    assert set(size["targets"]) == {
        "no_change_le_1.25x_floor",
        "changed_1pct_le_1.5x_floor",
        "baseline_le_2x_floor",
        "peak_rss_le_250mb",
        "db_le_2x_raw_plus_events",
    }


def test_latency_run_compares_with_pages_times_latency(report: dict[str, Any]) -> None:
    latency = report["latency"]
    pages_active, pages_archived = latency["pages_active"], latency["pages_archived"]
    assert latency["pages_x_latency_sequential_s"] == pytest.approx(
        (pages_active + pages_archived) * LATENCY_MS / 1000
    )
    assert latency["pages_x_latency_concurrent_s"] == pytest.approx(
        max(pages_active, pages_archived) * LATENCY_MS / 1000
    )
    runs = [k for k, v in latency.items() if isinstance(v, dict) and "over_pages_x_latency" in v]
    assert set(runs) == {
        "floor_sequential",
        "floor_concurrent",
        "poll_baseline_concurrent",
        "poll_no_change_sequential",
        "poll_no_change_concurrent",
        "poll_changed_1pct_concurrent",
    }
    for name in runs:
        # Every page waits out the latency, so nothing can beat ``pages x latency``.
        assert latency[name]["over_pages_x_latency"] >= 1, name
        assert name.startswith("floor") or isinstance(latency[name]["checkpoint_wait_seconds"], float), name
    wake = latency["page_without_latency_ms"]
    for mode in ("back_to_back", "after_idle"):
        assert wake[mode]["request_ms"] > 0 and wake[mode]["parse_ms"] > 0
    assert set(latency["concurrency_gain"]) == {"floor", "poll_no_change"}


def test_the_plans_case_reads_every_membership_and_reports_exactly_the_endings(
    report: dict[str, Any],
) -> None:
    (plans,) = report["plans"]
    assert (plans["customers"], plans["plans"], plans["memberships"]) == (CUSTOMERS, 20, CUSTOMERS)
    scenarios = plans["scenarios"]
    assert set(scenarios) == {"floor_plans", "baseline", "no_change", "ended_1pct"}
    floor = scenarios["floor_plans"]
    assert (floor["records"], floor["plans"], floor["memberships"]) == (CUSTOMERS, 20, CUSTOMERS)
    assert plans["pages"] == floor["pages_active"] + floor["pages_archived"] + floor["pages_members"]
    for name in ("baseline", "no_change", "ended_1pct"):
        cycle = scenarios[name]
        assert cycle["active"] + cycle["archived"] == CUSTOMERS, name
        assert (cycle["plans"]["plans"], cycle["plans"]["memberships"]) == (20, CUSTOMERS), name
        assert cycle["plans"]["pages"] == 1 + floor["pages_members"], name  # GET /v1/plans, then members
        assert cycle["seconds"] > 0 and cycle["ratio_to_floor"] > 0, name
    assert scenarios["baseline"]["plans"]["baseline"] is True
    assert scenarios["no_change"]["plans"]["baseline"] is False
    assert scenarios["no_change"]["events"] == 0
    (mutation,) = plans["mutations_per_1pct_run"]
    assert mutation["changed"] == round(CUSTOMERS / 100)
    # Every end date is one event: plan_ended for those in the past, plan_updated for those ahead.
    assert (
        scenarios["ended_1pct"]["plans"]["events"] == scenarios["ended_1pct"]["events"] == mutation["changed"]
    )
    assert set(plans["targets"]) == {"no_change_le_1.25x_floor_plans"}
