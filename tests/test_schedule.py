"""``watcher.schedule``: crontab means what crontab means, and the longest gap a schedule leaves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from watcher.config import parse_config
from watcher.schedule import cron_trigger, poll_period


def test_crontab_weekdays_mean_what_crontab_means() -> None:
    saturday = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    trigger = cron_trigger("0 9 * * 1-5")
    fires: list[datetime] = []
    t = trigger.get_next_fire_time(None, saturday)
    while len(fires) < 5 and t is not None:
        fires.append(t)
        t = trigger.get_next_fire_time(t, t)

    assert [f.strftime("%a") for f in fires] == ["Mon", "Tue", "Wed", "Thu", "Fri"]
    for sunday in ("0", "7", "sun"):
        fire = cron_trigger(f"0 0 * * {sunday}").get_next_fire_time(None, saturday)
        assert fire is not None and fire.strftime("%a") == "Sun"
    weekend = cron_trigger("0 0 * * 6-7").get_next_fire_time(None, saturday)
    assert weekend is not None and weekend.strftime("%a") == "Sun"
    with pytest.raises(ValueError, match="day of week"):
        cron_trigger("0 0 * * 8")


def test_readiness_allows_the_longest_gap_of_the_schedule() -> None:
    friday = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    minute, ten = timedelta(seconds=60), timedelta(seconds=10)
    assert poll_period(interval=minute, cron=None, jitter=ten, now=friday) == timedelta(seconds=70)
    assert poll_period(interval=minute, cron="*/5 * * * *", jitter=timedelta(0), now=friday) == timedelta(
        minutes=5
    )
    # Weekdays only: Friday to Monday is the longest gap, so readiness survives the weekend.
    assert poll_period(interval=minute, cron="0 9 * * 1-5", jitter=timedelta(0), now=friday) == timedelta(
        days=3
    )


def test_the_ready_age_is_the_longest_gap_times_ready_intervals() -> None:
    friday = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    config = parse_config({"schedule": {"cron": "0 9 * * 1-5"}, "health": {"ready_intervals": 2}}, env={})
    assert config.ready_max_age(now=friday) == timedelta(days=6)
