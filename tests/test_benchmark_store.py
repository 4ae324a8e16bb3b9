"""The store benchmark (``tests/benchmarks/bench_store.py``), run end to end over two simulated days.

The benchmark is not part of the test run, and a tool nobody runs rots; this runs the documented
command with windows of half a day, so that it keeps working and keeps measuring what it says: rows
written as cycles write them, pruned hourly, and a file that stops growing once the windows are full.
No timing is asserted (the figures belong to the benchmark).
"""

from __future__ import annotations

from typing import Any

import pytest

from .benchmarks import run

POLLS_PER_HOUR = 360  # a 10 s interval


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bench-store")
    options = {
        "--days": 2,
        "--customers": 200,
        "--churn-per-hour": 20,
        "--keep-deliveries": "12h",
        "--keep-polls": "12h",
        "--keep-events": "12h",
        "--sample-every": "6h",
        "--tables-every": "1d",
        "--db": tmp / "bench.db",
        "--out": tmp / "bench.json",
    }
    return run("bench_store", options)


def test_every_hour_of_polls_is_written_and_pruned_hourly(report: dict[str, Any]) -> None:
    assert report["polls_written"] == 1 + 48 * POLLS_PER_HOUR  # the real baseline, then the bulk
    assert report["events_written"] > 0
    assert report["prunes"]["runs"] == 48
    pruned = report["pruned"]
    assert pruned["polls"] == pruned["poll_sources"] > 30 * POLLS_PER_HOUR
    assert pruned["deliveries"] > 0 and pruned["events"] > 0


def test_the_windows_hold_what_they_should_once_full(report: dict[str, Any]) -> None:
    last = report["samples"][-1]
    rows = last["rows"]
    # Twelve hours of polls, and the few the notices and has_baseline keep beside them.
    assert 12 * POLLS_PER_HOUR <= rows["poll_runs"] <= 13 * POLLS_PER_HOUR
    assert rows["poll_sources"] == rows["poll_runs"]
    assert rows["outbox"] <= 2 * rows["events"]  # two sinks: every outbox row has its event
    assert set(last["tables"]) >= {"poll_runs", "poll_sources", "events", "outbox", "customers"}


def test_the_file_stops_growing_once_the_windows_are_full(report: dict[str, Any]) -> None:
    flat = report["flat_once_full"]
    assert flat is not None and flat["from_day"] >= 1.5
    assert flat["growth_ratio"] <= 1.05
    assert all(s["file_bytes"] > 0 and s["pages"] > 0 for s in report["samples"])
