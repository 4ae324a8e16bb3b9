"""When polls run: interval and crontab triggers, and the longest gap a schedule leaves.

Imports nothing of the watcher's own, so that ``watcher.config`` can validate ``schedule.cron``
with exactly the parser the daemon runs.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

__all__ = ["cron_trigger", "poll_period", "poll_trigger"]

#: Upcoming cron fire times sampled to find the longest gap between two polls (see poll_period).
_CRON_SAMPLES = 400

_DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_APS_DOW = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # APScheduler's order: 0 is Monday


def _dow_value(token: str, expr: str) -> int:
    t = token.strip().lower()
    if t.isdigit() and 0 <= int(t) <= 7:
        return int(t) % 7
    if t in _DOW_NAMES:
        return _DOW_NAMES.index(t)
    raise ValueError(f"invalid day of week {token!r} in crontab expression {expr!r}")


def _crontab_weekdays(field: str, expr: str) -> str:
    """Translate a crontab day-of-week field (0 and 7 are Sunday) into APScheduler 3 names.

    APScheduler 3 reads digits with 0 = Monday (its documented historical mistake), so a plain
    ``from_crontab("0 9 * * 1-5")`` would poll Tuesday to Saturday. Expanding the field to a list of
    day names gives the meaning every crontab user expects.
    """
    if field == "*":
        return field
    days: set[int] = set()
    for part in field.split(","):
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"invalid step {step_text!r} in crontab expression {expr!r}")
            step = int(step_text)
        if base == "*":
            first, last = 0, 6
        elif "-" in base:
            a, _, b = base.partition("-")
            first, last = _dow_value(a, expr), _dow_value(b, expr)
            if b.strip() == "7":
                last = 7  # "5-7" is Friday to Sunday
        else:
            first = _dow_value(base, expr)
            last = 6 if step_text else first
        if last < first:
            raise ValueError(f"day-of-week range {base!r} runs backwards in crontab expression {expr!r}")
        days.update(d % 7 for d in range(first, last + 1, step))
    return ",".join(_APS_DOW[(d - 1) % 7] for d in sorted(days, key=lambda d: (d - 1) % 7))


def cron_trigger(expr: str, *, jitter: float | None = None) -> CronTrigger:
    """A UTC trigger for a standard five-field crontab expression (Sunday is 0 or 7).

    Raises ValueError, naming what is wrong, for an expression it cannot read.
    """
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"crontab expression {expr!r} must have 5 fields, not {len(fields)}")
    minute, hour, day, month, dow = fields
    return CronTrigger(
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=_crontab_weekdays(dow, expr),
        timezone="UTC",
        jitter=jitter,
    )


def poll_trigger(*, interval: timedelta, cron: str | None, jitter: timedelta) -> BaseTrigger:
    """The poll job's trigger: ``cron`` when set, else every ``interval``; ``jitter`` added to each."""
    spread = jitter.total_seconds() or None
    if cron:
        return cron_trigger(cron, jitter=spread)
    return IntervalTrigger(seconds=interval.total_seconds(), jitter=spread, timezone="UTC")


def poll_period(*, interval: timedelta, cron: str | None, jitter: timedelta, now: datetime) -> timedelta:
    """The longest expected gap between two scheduled polls, jitter included.

    For an interval that is the interval. For a crontab expression it is the longest gap among the
    next few hundred fire times: a weekday-only schedule has a three-day gap over the weekend, and
    readiness must not fail every Saturday.
    """
    if not cron:
        return interval + jitter
    trigger = cron_trigger(cron)
    fire = trigger.get_next_fire_time(None, now)
    longest = timedelta(0)
    for _ in range(_CRON_SAMPLES):
        if fire is None:
            break
        nxt = trigger.get_next_fire_time(fire, fire)
        if nxt is None:
            break
        longest = max(longest, nxt - fire)
        fire = nxt
    return longest + jitter
