"""The daemon: polls on a schedule, delivers on its own shorter one, reports its health, stops cleanly.

Scheduling (APScheduler 3.x, one background scheduler, two jobs):

* **poll** on an interval or a crontab expression, first run at start-up after a random jitter (so a
  fleet restarted together does not hit the API in step), then on schedule. ``max_instances=1`` and
  ``coalesce=True``: a poll that overruns its slot makes the scheduler skip that slot rather than
  start a second poll, and a backlog of missed slots (a suspended VM, a blocked scheduler) collapses
  into a single catch-up run. ``misfire_grace_time=None``: a late poll always runs; for a watcher a
  late picture beats a skipped one.
* **deliver** on its own shorter interval, so a sink that was backing off is retried without waiting
  for the next poll; a poll that recorded events also delivers them right away.

Threads, and why: each poll runs in its own daemon thread, watched by the scheduler's job thread.
The watcher enforces ``schedule.poll_timeout`` by setting that poll's *own* cancel flag (the cycle
checks it between pages and commits nothing when it is set), so a hung poll is abandoned while the
daemon keeps running. Deliveries likewise run in daemon threads (one per sink). Nothing that can
block on the network runs in a non-daemon thread, so a hung request can delay shutdown by at most
the stop budget, never forever.

Shutdown (:meth:`Daemon.stop`, on SIGTERM/SIGINT): stop scheduling, cancel the poll in flight (it
commits nothing and is recorded ``abandoned``), give deliveries in flight the rest of an 8-second
budget to finish (an unfinished one stays pending and is sent again later: delivery is
at-least-once), close the database. Orchestrators send SIGKILL 10 s after SIGTERM; 8 s leaves room.

Repeated failure is news: after ``health.failing_after`` consecutive failed polls one
``watcher.poll_failing`` notice is recorded (and routed to the sinks whose ``events`` ask for
``watcher.*``), and one ``watcher.poll_recovered`` after the next success. The state is derived
from the database on every poll, never kept in memory, so it survives restarts: a restart in the
middle of a failure streak neither resets the count nor repeats a notice.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import structlog
from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import func, select, update
from sqlmodel import col

from . import metrics
from ._time import Clock, format_ts, parse_ts, utcnow
from .app import App
from .config import Config, ScheduleConfig
from .errors import ConfigError
from .health import HealthServer
from .poll import PollResult, record_notice
from .store import EventRecord, PollRun, Store

__all__ = [
    "FAILING",
    "RECOVERED",
    "Daemon",
    "FailureStreak",
    "cron_trigger",
    "failure_streak",
    "poll_period",
    "ready_max_age",
]

log = structlog.get_logger("watcher.daemon")

FAILING = "watcher.poll_failing"
RECOVERED = "watcher.poll_recovered"

#: Outcomes that break a streak of successes. ``abandoned`` is not one of them: it means the
#: process was stopped mid-poll (a deploy, a restart), which says nothing about Metronome. A poll
#: abandoned because it timed out is rewritten to ``failed`` (see ``Daemon._record_timeout``).
_FAILED_OUTCOMES = ("failed", "refused")

#: How long :meth:`Daemon.stop` may take: Docker and Kubernetes send SIGKILL 10 s after SIGTERM.
_STOP_BUDGET = 8.0

#: Upcoming cron fire times sampled to find the longest gap between two polls (see poll_period).
_CRON_SAMPLES = 400


# -- schedule helpers ---------------------------------------------------------------------------

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
    """A UTC trigger for a standard five-field crontab expression (Sunday is 0 or 7)."""
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


def poll_period(schedule: ScheduleConfig, *, now: datetime | None = None) -> timedelta:
    """The longest expected gap between two scheduled polls, jitter included.

    For an interval that is the interval. For a crontab expression it is the longest gap among the
    next few hundred fire times: a weekday-only schedule has a three-day gap over the weekend, and
    readiness must not fail every Saturday.
    """
    if not schedule.cron:
        return schedule.interval + schedule.jitter
    trigger = cron_trigger(schedule.cron)
    fire = trigger.get_next_fire_time(None, now or utcnow())
    longest = timedelta(0)
    for _ in range(_CRON_SAMPLES):
        if fire is None:
            break
        nxt = trigger.get_next_fire_time(fire, fire)
        if nxt is None:
            break
        longest = max(longest, nxt - fire)
        fire = nxt
    return longest + schedule.jitter


def ready_max_age(config: Config, *, now: datetime | None = None) -> timedelta:
    """How old the last successful poll may be while ``/readyz`` still says ready."""
    return poll_period(config.schedule, now=now) * config.health.ready_intervals


# -- the failure streak, from the database ------------------------------------------------------


@dataclass(frozen=True)
class FailureStreak:
    """Consecutive failed polls since the last success, and the last ``watcher.poll_*`` notice."""

    failures: int
    #: ``started_at`` of the first failed poll of the streak.
    since: str | None
    last_error: str | None
    last_failed_poll_id: int | None
    last_success_id: int | None
    #: ``watcher.poll_failing`` or ``watcher.poll_recovered``; None when none was ever sent.
    notice: str | None
    #: The poll the last notice was about (``detail.poll_id``).
    notice_poll_id: int | None

    @property
    def failing_notice_outstanding(self) -> bool:
        """A failing notice was sent and no poll has succeeded since."""
        return self.notice == FAILING and (self.last_success_id or 0) < (self.notice_poll_id or 0)

    @property
    def recovery_unannounced(self) -> bool:
        """A failing notice was sent, a poll has succeeded since, and no recovered notice says so."""
        return self.notice == FAILING and (self.last_success_id or 0) > (self.notice_poll_id or 0)


def failure_streak(store: Store) -> FailureStreak:
    """Read the streak from ``poll_runs`` and the last notice from the audit log."""
    poll_id, outcome = col(PollRun.id), col(PollRun.outcome)
    with store.read() as conn:
        last_success = conn.execute(select(func.max(poll_id)).where(outcome == "succeeded")).scalar()
        count, since, last_failed = conn.execute(
            select(func.count(), func.min(col(PollRun.started_at)), func.max(poll_id)).where(
                outcome.in_(_FAILED_OUTCOMES), poll_id > (last_success or 0)
            )
        ).one()
        last_error = None
        if last_failed is not None:
            last_error = conn.execute(select(col(PollRun.error)).where(poll_id == last_failed)).scalar()
        row = conn.execute(
            select(col(EventRecord.type), col(EventRecord.payload))
            .where(col(EventRecord.type).in_((FAILING, RECOVERED)))
            .order_by(col(EventRecord.sequence).desc())
            .limit(1)
        ).first()
    notice, notice_poll_id = None, None
    if row is not None:
        notice = str(row[0])
        detail = orjson.loads(row[1]).get("detail") or {}
        notice_poll_id = detail.get("poll_id") if isinstance(detail.get("poll_id"), int) else None
    return FailureStreak(
        failures=int(count),
        since=since,
        last_error=last_error,
        last_failed_poll_id=last_failed,
        last_success_id=last_success,
        notice=notice,
        notice_poll_id=notice_poll_id,
    )


def _streak_before(store: Store, success_id: int) -> tuple[int, str | None]:
    """Failed polls between ``success_id`` and the success before it, and when they began."""
    poll_id, outcome = col(PollRun.id), col(PollRun.outcome)
    with store.read() as conn:
        previous = conn.execute(
            select(func.max(poll_id)).where(outcome == "succeeded", poll_id < success_id)
        ).scalar()
        count, since = conn.execute(
            select(func.count(), func.min(col(PollRun.started_at))).where(
                outcome.in_(_FAILED_OUTCOMES), poll_id > (previous or 0), poll_id < success_id
            )
        ).one()
    return int(count), since


# -- the daemon ---------------------------------------------------------------------------------


@dataclass
class _InFlight:
    """One poll in progress, shared by its thread and the job thread that watches it."""

    cancel: threading.Event
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    timed_out: bool = False
    result: PollResult | None = None


class Daemon:
    """``metronome-watcher run``: :meth:`start`, then :meth:`stop` (or :meth:`run_until` for both).

    :meth:`poll_once` and :meth:`deliver_once` are the two scheduled jobs; tests and the demo may
    call them directly without starting the scheduler.
    """

    def __init__(
        self,
        app: App,
        *,
        clock: Clock = utcnow,
        rng: random.Random | None = None,
        on_poll: Callable[[PollResult], None] | None = None,
    ) -> None:
        self.app = app
        #: Called with each :class:`PollResult` (the demo prints them); errors are logged.
        self.on_poll = on_poll
        self.clock = clock
        self.rng = rng or random.Random()
        #: Set once, by :meth:`stop`: the whole daemon is shutting down.
        self.cancel = threading.Event()
        self.last_result: PollResult | None = None
        self.health: HealthServer | None = None
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.add_listener(self._on_job_error, EVENT_JOB_ERROR)
        # Held from the start of a poll until its cycle has ended (released by the poll thread), so
        # two polls never overlap even when one outlived its timeout.
        self._poll_lock = threading.Lock()
        self._state = threading.Lock()
        self._poll_cancel: threading.Event | None = None
        self._poll_started: float | None = None
        self._drains: set[threading.Thread] = set()
        self._stopped = False

    @property
    def config(self) -> Config:
        return self.app.config

    # -- jobs -----------------------------------------------------------------------------------

    def poll_once(self) -> PollResult | None:
        """Run one poll, bounded by ``schedule.poll_timeout``, then deliver what it recorded.

        Returns None when the poll was skipped (another is still running, or shutting down) or
        left behind by shutdown. A timed-out poll returns outcome ``failed``.
        """
        if self.cancel.is_set():
            return None
        if not self._poll_lock.acquire(blocking=False):
            log.warning("daemon.poll_skipped", reason="the previous poll is still running")
            return None
        run = _InFlight(threading.Event())
        with self._state:
            self._poll_cancel = run.cancel
            self._poll_started = time.monotonic()
        if self.cancel.is_set():  # stop() ran between the check above and registering the flag
            run.cancel.set()
        thread = threading.Thread(target=self._poll_thread, args=(run,), name="poll", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._poll_finished()
            raise
        timeout = self.config.schedule.poll_timeout.total_seconds()
        if not self._wait(run.done, timeout):
            if self.cancel.is_set():
                return None  # shutting down: stop() waits for the poll
            run.timed_out = True
            run.cancel.set()
            log.error("poll.timed_out", timeout_s=timeout)
            grace = self._abandon_grace()
            if not self._wait(run.done, grace):
                if not self.cancel.is_set():
                    # Blocked somewhere that ignores the cancel flag: it keeps the poll lock (so no
                    # second poll starts) and /healthz reports it, so an orchestrator restarts us.
                    log.error("poll.stuck", timeout_s=timeout, grace_s=grace)
                return None
        # The cycle is over; wait for the delivery that follows it (it is part of this run).
        while thread.is_alive() and not self.cancel.is_set():
            thread.join(0.1)
        return run.result

    def deliver_once(self) -> None:
        """Drain every sink once (each in its own thread), unless shutting down."""
        if not self.cancel.is_set():
            self._drain_all()

    def _poll_thread(self, run: _InFlight) -> None:
        result: PollResult | None = None
        notices = 0
        try:
            try:
                result = self.app.poller.run(cancel=run.cancel)
            except Exception as exc:  # the poller records the poll as failed, then re-raises bugs
                log.exception("poll.crashed", error=repr(exc))
            if result is not None and run.timed_out and result.outcome == "abandoned":
                result = self._record_timeout(result)
            run.result = result
            if result is not None:
                self.last_result = result
            if not self.cancel.is_set():
                notices = self._track_failures()
            if result is not None and self.on_poll is not None:
                try:
                    self.on_poll(result)
                except Exception as exc:
                    log.exception("daemon.on_poll_failed", error=repr(exc))
        finally:
            self._poll_finished()
            run.done.set()
        if not self.cancel.is_set() and (notices or (result is not None and result.events)):
            self._drain_all()

    def _poll_finished(self) -> None:
        with self._state:
            self._poll_cancel = None
            self._poll_started = None
        self._poll_lock.release()

    def _wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait for ``event`` up to ``timeout`` seconds, returning early when shutting down."""
        deadline = time.monotonic() + timeout
        while not event.is_set() and not self.cancel.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            event.wait(min(remaining, 0.1))
        return event.is_set()

    def _abandon_grace(self) -> float:
        # Cancellation is checked between pages; a request in flight ends within its own timeout.
        return self.config.metronome.timeout.total_seconds() + 30.0

    def _record_timeout(self, result: PollResult) -> PollResult:
        timeout = self.config.schedule.poll_timeout.total_seconds()
        error = (
            f"poll timed out after {timeout:g}s (schedule.poll_timeout) and was abandoned; "
            "nothing was committed"
        )
        try:
            with self.app.store.write() as conn:
                conn.execute(
                    update(PollRun)
                    .where(col(PollRun.id) == result.poll_id, col(PollRun.outcome) == "abandoned")
                    .values(outcome="failed", error=error)
                )
        except Exception as exc:
            log.error("daemon.record_timeout_failed", poll_id=result.poll_id, error=repr(exc))
        return dataclasses.replace(result, outcome="failed", error=error)

    def _track_failures(self) -> int:
        """Record ``watcher.poll_failing`` / ``watcher.poll_recovered`` when due; returns how many."""
        try:
            return self._track_failures_unsafe()
        except Exception as exc:  # the next poll re-derives the state and tries again
            log.exception("daemon.notice_failed", error=repr(exc))
            return 0

    def _track_failures_unsafe(self) -> int:
        store = self.app.store
        streak = failure_streak(store)
        sent = 0
        if streak.recovery_unannounced:
            assert streak.last_success_id is not None
            failed_polls, since = _streak_before(store, streak.last_success_id)
            now = self.clock()
            detail: dict[str, Any] = {
                "poll_id": streak.last_success_id,
                "failed_polls": failed_polls,
                "since": since,
            }
            if since:
                detail["down_seconds"] = round((now - parse_ts(since)).total_seconds(), 3)
            self._notice(RECOVERED, detail, now)
            sent += 1
            streak = dataclasses.replace(streak, notice=RECOVERED, notice_poll_id=streak.last_success_id)
        threshold = self.config.health.failing_after
        if streak.failures >= threshold and not streak.failing_notice_outstanding:
            self._notice(
                FAILING,
                {
                    "poll_id": streak.last_failed_poll_id,
                    "consecutive_failures": streak.failures,
                    "failing_after": threshold,
                    "since": streak.since,
                    "last_error": streak.last_error,
                },
                self.clock(),
            )
            sent += 1
        return sent

    def _notice(self, event_type: str, detail: dict[str, Any], now: datetime) -> None:
        payload = record_notice(self.app.store, event_type, self.app.poller.routes, now=now, detail=detail)
        metrics.EVENTS.labels(event_type).inc()
        log_method = log.error if event_type == FAILING else log.info
        log_method(event_type.replace("watcher.", "daemon."), sequence=payload["sequence"], **detail)

    def _drain_all(self) -> None:
        threads = []
        for name in self.app.deliverer.sinks:
            t = threading.Thread(target=self._drain_one, args=(name,), name=f"deliver:{name}", daemon=True)
            with self._state:
                self._drains.add(t)
            t.start()
            threads.append(t)
        for t in threads:
            while t.is_alive() and not self.cancel.is_set():
                t.join(0.1)

    def _drain_one(self, name: str) -> None:
        try:
            # The deliverer takes a per-sink lock: a drain already running for this sink makes
            # this one a no-op, and the running one picks up rows committed meanwhile.
            self.app.deliverer.drain(name, cancel=self.cancel)
        finally:
            with self._state:
                self._drains.discard(threading.current_thread())

    def _on_job_error(self, event: JobExecutionEvent) -> None:
        log.error("daemon.job_error", job=event.job_id, error=repr(event.exception))

    # -- health ---------------------------------------------------------------------------------

    def liveness_problem(self) -> str | None:
        """None while the daemon is alive; otherwise why not (``/healthz`` answers 503 with it)."""
        if self.cancel.is_set():
            return "shutting down"
        if not self.scheduler.running:
            return "scheduler is not running"
        # ``running`` is only a state flag; the scheduler's thread dying is what we fear.
        thread = getattr(self.scheduler, "_thread", None)
        if thread is not None and not thread.is_alive():
            return "scheduler thread has died"
        with self._state:
            started = self._poll_started
        if started is not None:
            limit = self.config.schedule.poll_timeout.total_seconds() + self._abandon_grace()
            running = time.monotonic() - started
            if running > limit:
                return (
                    f"a poll has been running for {running:.0f}s, "
                    f"beyond poll_timeout and its grace ({limit:.0f}s)"
                )
        return None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        sched = cfg.schedule
        if cfg.health.port is not None:
            self.health = HealthServer(
                self.app.store,
                port=cfg.health.port,
                host=cfg.health.host,
                max_age=ready_max_age(cfg),
                alive=self.liveness_problem,
                sinks=list(self.app.deliverer.sinks),
            )
            try:
                self.health.start()
            except OSError as exc:
                self.health = None
                where = f"{cfg.health.host}:{cfg.health.port}"
                raise ConfigError(f"health.port: cannot listen on {where}: {exc.strerror or exc}") from None
        jitter = sched.jitter.total_seconds()
        first = self.clock() + timedelta(seconds=self.rng.uniform(0, jitter))
        trigger: CronTrigger | IntervalTrigger
        if sched.cron:
            try:
                trigger = cron_trigger(sched.cron, jitter=jitter or None)
            except ValueError as exc:
                raise ConfigError(f"schedule.cron: {exc}") from None
        else:
            trigger = IntervalTrigger(
                seconds=sched.interval.total_seconds(), jitter=jitter or None, timezone="UTC"
            )
        self.scheduler.add_job(
            self.poll_once,
            trigger,
            id="poll",
            name="poll",
            next_run_time=first,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        self.scheduler.add_job(
            self.deliver_once,
            IntervalTrigger(seconds=sched.delivery_interval.total_seconds(), timezone="UTC"),
            id="deliver",
            name="deliver",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        self.scheduler.start()
        log.info(
            "daemon.started",
            interval_s=sched.interval.total_seconds(),
            cron=sched.cron,
            jitter_s=jitter,
            first_poll=format_ts(first),
            poll_timeout_s=sched.poll_timeout.total_seconds(),
            delivery_interval_s=sched.delivery_interval.total_seconds(),
            sinks=list(self.app.sinks),
            database=str(self.app.store.path),
            health_port=self.health.port if self.health else None,
        )

    @property
    def alive(self) -> bool:
        return self.liveness_problem() is None

    def stop(self, timeout: float = _STOP_BUDGET) -> None:
        """Abandon the poll in flight, let deliveries finish or stay pending, close the database."""
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        deadline = t0 + timeout
        log.info("daemon.stopping")
        self.cancel.set()
        with self._state:
            if self._poll_cancel is not None:
                self._poll_cancel.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self.health is not None:
            self.health.stop()
        if self._poll_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self._poll_lock.release()
        else:
            # It commits nothing from here on; the next start records it as abandoned.
            log.warning("daemon.poll_left_behind", waited_s=round(time.monotonic() - t0, 1))
        with self._state:
            drains = list(self._drains)
        for t in drains:
            t.join(max(0.0, deadline - time.monotonic()))
        pending = [t.name.removeprefix("deliver:") for t in drains if t.is_alive()]
        if pending:
            log.warning("daemon.deliveries_left_pending", sinks=pending)
        self.app.close()
        log.info("daemon.stopped", seconds=round(time.monotonic() - t0, 3))

    def run_until(self, stop: threading.Event) -> None:
        try:
            self.start()
            while not stop.wait(0.5):
                pass
        finally:
            self.stop()
