"""The soak benchmark (``tests/benchmarks/bench_soak.py``), run end to end for a few cycles.

The soak itself runs for thousands of cycles and is not part of the test run; this runs its
documented command for a dozen, so that it keeps working and keeps measuring what it says. No
figure is held to its target here (a few cycles are all warm-up): only that every figure is there,
that the daemon really polled at its 1 s interval and stopped cleanly, and that every event of the
audit log reached the receiver.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .benchmarks import run


@pytest.mark.slow
def test_the_soak_runs_the_daemon_and_reports_memory_descriptors_and_threads(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    options = {
        "--cycles": 12,
        "--warmup": 4,
        "--customers": 300,
        "--churn": 0.1,
        "--sample-every": 0.5,
        "--out": out,
    }
    report = run("bench_soak", options, timeout=100)

    assert report["cycles"] == 12 and report["failed_polls"] == 0
    assert report["daemon_exit_code"] == 0  # SIGTERM: a clean stop
    # Twelve cycles at a 1 s interval take about twelve seconds, not one.
    assert 8 <= report["seconds"] <= 60
    start, end = report["start"], report["end"]
    assert start["cycles"] >= 4 and end["cycles"] == 12
    for figures in (start, end):
        assert figures["rss_kib"] > 10_000 and figures["hwm_kib"] >= figures["rss_kib"]
        assert figures["threads"] >= 2 and figures["fds"] >= 3
    assert report["peak_rss_growth_pct"] == round(
        100 * (end["hwm_kib"] - start["hwm_kib"]) / start["hwm_kib"], 2
    )
    assert isinstance(report["peak_rss_growth_le_10pct"], bool)
    assert report["fds"]["min"] <= report["fds"]["max"] and isinstance(report["fds"]["flat"], bool)
    assert report["threads"]["min"] <= report["threads"]["max"]
    # The churn made changes, and the receiver got every one of them but those still pending.
    assert report["events"] > 0 and report["every_event_delivered_or_pending"] is True
    assert report["events_dead"] == 0
    assert report["events_delivered"] + report["events_pending_at_stop"] == report["events"]
    assert [s["cycles"] for s in report["samples"]] == sorted(s["cycles"] for s in report["samples"])
