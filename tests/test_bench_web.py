"""The web benchmark (``tests/benchmarks/bench_web.py``), run end to end on a small audit log.

As ``tests/test_benchmark.py`` does for the poll benchmark: no timing is asserted (the figures are
the benchmark's, recorded in docs/performance.md), only that every measurement is there and that
what can be known exactly is exact: every page answered with rows, and the feed paged through every
event once, in order, to the last sequence.
"""

from __future__ import annotations

from typing import Any

import pytest

from .benchmarks import run

EVENTS = 3000
CUSTOMERS = 300


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-web") / "bench.json"
    options = {"--events": EVENTS, "--customers": CUSTOMERS, "--repeat": 2, "--out": out}
    return run("bench_web", options)


def test_every_page_is_measured_and_shows_what_it_should(report: dict[str, Any]) -> None:
    pages = report["pages"]
    assert set(pages) == {
        "first_page", "type_filter", "type_filter_rare", "type_filter_glob", "customer_filter_id",
        "customer_filter_id_few_events", "customer_filter_name_part", "customer_filter_common_word",
        "time_range_one_day", "deep_page", "customer_page", "status",
    }  # fmt: skip
    for name, page in pages.items():
        assert 0 < page["min_ms"] <= page["median_ms"] <= page["max_ms"], name
        assert page["bytes"] > 0, name
    for name in ("first_page", "type_filter", "type_filter_glob", "customer_filter_id", "deep_page"):
        assert pages[name]["rows"] == 50, name  # a full page
    assert pages["customer_filter_name_part"]["rows"] >= 1
    assert pages["customer_page"]["rows"] >= 1


def test_the_feed_pages_through_every_event_once(report: dict[str, Any]) -> None:
    feed, data = report["feed"], report["data"]
    assert data["events"] == EVENTS and data["customers"] <= CUSTOMERS
    assert feed["events"] == feed["last_sequence"] == EVENTS
    assert feed["requests"] == EVENTS // 1000 + 1 + (1 if EVENTS % 1000 else 0)
    assert feed["events_per_second"] > 0
    assert set(report["targets"]) == {
        "first_page_under_100ms", "type_filter_under_100ms", "customer_filter_id_under_100ms",
        "feed_at_least_20000_events_per_s",
    }  # fmt: skip
