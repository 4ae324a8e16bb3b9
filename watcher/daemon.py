"""The daemon: polls on a schedule, delivers on its own shorter one, stops cleanly.

APScheduler 3.x runs two jobs in a background scheduler. Each has ``max_instances=1`` and
``coalesce=True``: a poll that overruns its interval delays the next one instead of overlapping
it, and a backlog of missed runs collapses into one. Shutdown sets a cancel flag that the poll
checks between pages (an abandoned poll commits nothing) and closes the API client to cut short a
request in flight, so SIGTERM is honoured within seconds even mid-request.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from datetime import timedelta

import structlog
from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from ._time import Clock, utcnow
from .app import App
from .poll import PollResult

__all__ = ["Daemon"]

log = structlog.get_logger("watcher.daemon")


class Daemon:
    def __init__(
        self,
        app: App,
        *,
        clock: Clock = utcnow,
        rng: random.Random | None = None,
        on_poll: Callable[[PollResult], None] | None = None,
    ) -> None:
        self.app = app
        self.on_poll = on_poll
        self.clock = clock
        self.rng = rng or random.Random()
        self.cancel = threading.Event()
        self.last_result: PollResult | None = None
        self._poll_lock = threading.Lock()
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.add_listener(self._on_job_error, EVENT_JOB_ERROR)

    # -- jobs -----------------------------------------------------------------------------------

    def poll_once(self) -> PollResult | None:
        if self.cancel.is_set() or not self._poll_lock.acquire(blocking=False):
            return None
        try:
            result = self.app.poller.run(cancel=self.cancel)
            self.last_result = result
            if self.on_poll is not None:
                self.on_poll(result)
            if not self.cancel.is_set():
                self.app.deliverer.deliver_due(cancel=self.cancel)
            return result
        finally:
            self._poll_lock.release()

    def deliver_once(self) -> None:
        if not self.cancel.is_set():
            self.app.deliverer.deliver_due(cancel=self.cancel)

    def _on_job_error(self, event: JobExecutionEvent) -> None:
        log.error("daemon.job_error", job=event.job_id, error=repr(event.exception))

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        sched = self.app.config.schedule
        now = self.clock()
        first = now + timedelta(seconds=self.rng.uniform(0, sched.jitter.total_seconds()))
        trigger: CronTrigger | IntervalTrigger
        if sched.cron:
            trigger = CronTrigger.from_crontab(sched.cron, timezone="UTC")
            trigger.jitter = int(sched.jitter.total_seconds()) or None
        else:
            trigger = IntervalTrigger(
                seconds=sched.interval.total_seconds(), jitter=int(sched.jitter.total_seconds()) or None,
                timezone="UTC",
            )
        interval_s = sched.interval.total_seconds()
        self.scheduler.add_job(
            self.poll_once, trigger, id="poll", name="poll", next_run_time=first,
            max_instances=1, coalesce=True, misfire_grace_time=max(1, int(interval_s)),
        )
        self.scheduler.add_job(
            self.deliver_once,
            IntervalTrigger(seconds=sched.delivery_interval.total_seconds(), timezone="UTC"),
            id="deliver", name="deliver", max_instances=1, coalesce=True,
            misfire_grace_time=max(1, int(sched.delivery_interval.total_seconds())),
        )
        self.scheduler.start()
        log.info(
            "daemon.started", interval_s=interval_s, cron=sched.cron,
            delivery_interval_s=sched.delivery_interval.total_seconds(), sinks=list(self.app.sinks),
            database=str(self.app.store.path),
        )

    @property
    def alive(self) -> bool:
        return bool(self.scheduler.running)

    def stop(self, timeout: float = 8.0) -> None:
        """Abandon an in-flight poll, let deliveries finish or stay pending, close the database."""
        self.cancel.set()
        self.scheduler.shutdown(wait=False)
        # Cuts a request in flight short: the poll sees the cancel flag and commits nothing.
        self.app.client.close()
        if self._poll_lock.acquire(timeout=timeout):
            self._poll_lock.release()
        else:
            log.warning("daemon.poll_still_running", timeout_s=timeout)
        self.app.close()
        log.info("daemon.stopped")

    def run_until(self, stop: threading.Event) -> None:
        self.start()
        try:
            while not stop.wait(0.5):
                pass
        finally:
            self.stop()
