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
* **prune** hourly (first a few minutes after start-up), on the leader: what ``[store] keep_*`` lets
  go, in short batches (:mod:`watcher.store.prune`), logged as one ``store.pruned`` line.

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

After every poll, the notices that are due (``watcher.poll_failing``, ``watcher.poll_recovered``)
are recorded and delivered: see :mod:`watcher.notices`.

Replicas (a PostgreSQL store): every replica runs the scheduler, and a
:class:`~watcher.store.lease.LeaseKeeper` decides which one's jobs do anything. The leader polls
and delivers; a standby's jobs return at once, and it answers ``/readyz`` as a ready standby. On
taking the lease a replica delivers at once, and polls at once when a poll is due (the last
successful one, whoever ran it, is older than the interval), so the schedule carries on across a
take-over. On losing it, the poll in flight is cancelled (it could commit nothing anyway: every
commit is fenced by the lease's epoch). A clean stop releases the lease, so a standby takes over
within a third of the lease rather than all of it. With SQLite there is one process per database
(the poll lock file), and none of this runs. See ``docs/ha.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import structlog
from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from . import metrics
from ._time import Clock, format_ts, parse_ts, utcnow
from .app import App
from .config import Config
from .errors import ConfigError, StoreError
from .events import EventType, PollOutcome
from .health import Health
from .notices import announce
from .poll import PollResult
from .schedule import poll_trigger
from .store import queries
from .store.lease import LeaseKeeper
from .store.prune import PruneReport, prune
from .web import WebServer

__all__ = ["Daemon"]

log = structlog.get_logger("watcher.daemon")

#: How long :meth:`Daemon.stop` may take: Docker and Kubernetes send SIGKILL 10 s after SIGTERM.
_STOP_BUDGET = 8.0
#: Housekeeping: how often, and how long after start-up the first time (a daemon restarted more
#: often than hourly still prunes).
_PRUNE_EVERY = timedelta(hours=1)
_PRUNE_FIRST = timedelta(minutes=5)


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
        #: The last poll's failure when the database could not record it (the disk is still full):
        #: ``/readyz`` shows it until a poll is recorded again. None otherwise.
        self.unrecorded_failure: dict[str, str] | None = None
        #: The one HTTP server (health, and the web view when ``[web]`` is on); None without a port.
        self.health: WebServer | None = None
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.add_listener(self._on_job_error, EVENT_JOB_ERROR)
        # Held from the start of a poll until its cycle has ended (released by the poll thread), so
        # two polls never overlap even when one outlived its timeout.
        self._poll_lock = threading.Lock()
        self._state = threading.Lock()
        self._poll_cancel: threading.Event | None = None
        self._poll_started: float | None = None
        self._drains: set[threading.Thread] = set()
        #: Held while a prune runs, so that :meth:`stop` lets its batch end before closing the store.
        self._prune_lock = threading.Lock()
        self._stopped = False
        #: Leadership among replicas (a PostgreSQL store); None with SQLite.
        self.lease: LeaseKeeper | None = None
        if app.store.replicated:
            self.lease = LeaseKeeper(
                app.store,
                ttl=app.config.ha.lease.total_seconds(),
                on_acquired=self._on_leader,
                on_lost=self._on_lost,
            )

    @property
    def config(self) -> Config:
        return self.app.config

    # -- jobs -----------------------------------------------------------------------------------

    def poll_once(self) -> PollResult | None:
        """Run one poll, bounded by ``schedule.poll_timeout``, then deliver what it recorded.

        Returns None when the poll was skipped (another is still running, or shutting down) or
        left behind by shutdown. A timed-out poll returns outcome ``failed``.
        """
        if self.cancel.is_set() or not self.leading:
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
        """Drain every sink once (each in its own thread), unless shutting down or standing by."""
        if not self.cancel.is_set() and self.leading:
            self._drain_all()

    def prune_once(self) -> PruneReport | None:
        """Delete what the ``[store] keep_*`` windows let go (on the leader); None when skipped or failed."""
        if self.cancel.is_set() or not self.leading:
            return None
        with self._prune_lock:
            try:
                report = prune(
                    self.app.store,
                    self.config.store,
                    now=self.clock(),
                    should_stop=lambda: self.cancel.is_set() or not self.leading,
                )
            except StoreError as exc:  # the next hour tries again; nothing is half-deleted
                log.error("store.prune_failed", error=exc.reason)
                return None
            except Exception as exc:  # a bug: logged with its traceback, and the daemon goes on
                log.exception("store.prune_failed", error=repr(exc))
                return None
        log.info(
            "store.pruned",
            **report.counts(),
            batches=report.batches,
            seconds=round(report.seconds, 3),
            longest_batch_s=round(report.longest_batch, 4),
            complete=report.complete,
        )
        return report

    # -- leadership -----------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """True when this process may poll and deliver: always with SQLite, as leader otherwise."""
        return self.lease is None or self.lease.is_leader

    def ha_state(self) -> dict[str, object] | None:
        """What ``/readyz`` says about leadership; None with SQLite."""
        if self.lease is None:
            return None
        seen = self.lease.seen
        state: dict[str, object] = {
            "role": "leader" if self.lease.is_leader else "standby",
            "holder": self.lease.holder,
        }
        if self.lease.is_leader:
            state["epoch"] = self.lease.epoch
        elif seen is not None and seen.valid:
            state["leader"] = seen.holder
        return state

    def _on_leader(self, epoch: int) -> None:
        """Just took the lease: deliver now, and poll now if a poll is due (see the module)."""
        if self.cancel.is_set() or not self.scheduler.running:
            return
        now = self.clock()
        last = self.app.store.last_successful_poll()
        interval = self.config.schedule.interval
        due = last is None or (now - parse_ts(last.finished_at or last.started_at)) >= interval
        with contextlib.suppress(Exception):  # a job already gone (shutting down) is fine
            self.scheduler.modify_job("deliver", next_run_time=now)
            if due and self.config.schedule.cron is None:
                self.scheduler.modify_job("poll", next_run_time=now)
        log.info("daemon.leading", epoch=epoch, poll_due=due)

    def _on_lost(self, reason: str) -> None:
        """Lost the lease: the poll in flight is cancelled (it could commit nothing anyway)."""
        with self._state:
            if self._poll_cancel is not None:
                self._poll_cancel.set()
        log.warning("daemon.standing_by", reason=reason)

    def _poll_thread(self, run: _InFlight) -> None:
        result: PollResult | None = None
        notices = 0
        try:
            try:
                result = self.app.poller.run(cancel=run.cancel)
            except Exception as exc:  # the poller records the poll as failed, then re-raises bugs
                log.exception("poll.crashed", error=repr(exc))
            if result is not None and run.timed_out and result.outcome == PollOutcome.ABANDONED:
                result = self._record_timeout(result)
            run.result = result
            if result is not None:
                self.last_result = result
                self.unrecorded_failure = (
                    None if result.recorded else {"error": result.error or "", "at": format_ts(self.clock())}
                )
            if not self.cancel.is_set() and self.leading:
                notices = self._track_failures()
            if result is not None and self.on_poll is not None:
                try:
                    self.on_poll(result)
                except Exception as exc:
                    log.exception("daemon.on_poll_failed", error=repr(exc))
        finally:
            self._poll_finished()
            run.done.set()
        news = notices or (result is not None and result.events)
        if not self.cancel.is_set() and self.leading and news:
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
                queries.time_out_poll(conn, result.poll_id, error=error)
        except StoreError as exc:
            log.error("daemon.record_timeout_failed", poll_id=result.poll_id, error=exc.reason)
        except Exception as exc:
            log.error("daemon.record_timeout_failed", poll_id=result.poll_id, error=repr(exc))
        return dataclasses.replace(result, outcome=PollOutcome.FAILED, error=error)

    def _track_failures(self) -> int:
        """Record ``watcher.poll_failing`` / ``watcher.poll_recovered`` when due; returns how many."""
        try:
            return self._track_failures_unsafe()
        except StoreError as exc:  # e.g. the disk is full: the next poll tries again
            log.error("daemon.notice_failed", error=exc.reason)
            return 0
        except Exception as exc:  # the next poll re-derives the state and tries again
            log.exception("daemon.notice_failed", error=repr(exc))
            return 0

    def _track_failures_unsafe(self) -> int:
        sent = announce(
            self.app.store,
            self.app.poller.routes,
            failing_after=self.config.health.failing_after,
            now=self.clock(),
        )
        for notice in sent:
            metrics.EVENTS.labels(notice["type"]).inc()
            log_method = log.error if notice["type"] == EventType.POLL_FAILING else log.info
            log_method(
                notice["type"].replace("watcher.", "daemon."), sequence=notice["sequence"], **notice["detail"]
            )
        return len(sent)

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
        if self.lease is not None and not self.lease.thread_alive:
            return "the lease keeper's thread has died"
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
            checks = Health(
                self.app.store,
                max_age=cfg.ready_max_age(),
                alive=self.liveness_problem,
                sinks=list(self.app.deliverer.sinks),
                ha=self.ha_state if self.lease is not None else None,
                unrecorded=lambda: self.unrecorded_failure,
            )
            self.health = WebServer(checks, port=cfg.health.port, host=cfg.health.host, web=cfg.web)
            try:
                self.health.start()
            except OSError as exc:
                self.health = None
                where = f"{cfg.health.host}:{cfg.health.port}"
                raise ConfigError(f"health.port: cannot listen on {where}: {exc.strerror or exc}") from None
        jitter = sched.jitter.total_seconds()
        first = self.clock() + timedelta(seconds=self.rng.uniform(0, jitter))
        # Validated with the config already; a config built in code may still carry a bad one.
        try:
            trigger = poll_trigger(interval=sched.interval, cron=sched.cron, jitter=sched.jitter)
        except ValueError as exc:
            raise ConfigError(f"schedule.cron: {exc}") from None
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
        self.scheduler.add_job(
            self.prune_once,
            IntervalTrigger(seconds=_PRUNE_EVERY.total_seconds(), timezone="UTC"),
            id="prune",
            name="prune",
            next_run_time=self.clock() + _PRUNE_FIRST,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        self.scheduler.start()
        if self.lease is not None:
            self.lease.start()  # standing by until it has the lease: the jobs do nothing till then
        log.info(
            "daemon.started",
            interval_s=sched.interval.total_seconds(),
            cron=sched.cron,
            jitter_s=jitter,
            first_poll=format_ts(first),
            poll_timeout_s=sched.poll_timeout.total_seconds(),
            delivery_interval_s=sched.delivery_interval.total_seconds(),
            sinks=list(self.app.sinks),
            database=self.app.store.description,
            health_port=self.health.port if self.health else None,
            ha_lease_s=None if self.lease is None else self.lease.ttl,
        )

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
        if self._prune_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self._prune_lock.release()  # a prune stops after its batch in flight
        pending = [t.name.removeprefix("deliver:") for t in drains if t.is_alive()]
        if pending:
            log.warning("daemon.deliveries_left_pending", sinks=pending)
        if self.lease is not None:
            self.lease.stop()  # releases the lease: a standby takes over without waiting for it
        self.app.close()
        log.info("daemon.stopped", seconds=round(time.monotonic() - t0, 3))

    def run_until(self, stop: threading.Event) -> None:
        try:
            self.start()
            while not stop.wait(0.5):
                pass
        finally:
            self.stop()
