"""Delivery: each sink drains its outbox rows in ``sequence`` order, on its own.

Rules (DESIGN rule 6), the same for every sink:

* Rows are attempted in ``sequence`` order. A retryable failure pauses the *sink* (not just the
  row) with exponential back-off plus jitter (``watcher._retry.Backoff``, as the API client),
  honouring ``Retry-After``, so order is kept and a sick receiver is not hammered. The pause is
  stored, so a restart does not reset it.
* A row still failing ``max_age`` after it was queued (72 hours by default, as Metronome's own
  webhooks) is marked dead; a permanent failure (``Outcome("dead")``) is dead at once. Dead rows
  stay in the outbox and ``replay`` re-queues them with the same event id.
* ``Outcome("disable")`` (e.g. HTTP 410) switches the sink off until ``enable_sink``.
* A drain round hands a sink at most ``[delivery] batch_size`` rows (and never more than the
  sink's own ``max_batch``); a Slack round above its digest threshold becomes one digest.
* ``Store.delivery_status`` reports each sink's most recent error, whether it was a retry, a dead
  event or a disable.
* Sinks are drained in parallel threads, so one slow or dead receiver never delays another, and
  a row is marked delivered only after the sink said so: a crash in between means the event is
  sent again (at-least-once, receivers dedupe on the event id). So does a replica that lost the
  leader lease while it was sending: its marks are fenced (:class:`~watcher.errors.NotLeader`).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
import structlog
from sqlalchemy import Connection

from . import metrics
from ._retry import Backoff
from ._time import Clock, format_ts, utcnow
from .config import DeliveryConfig
from .errors import NotLeader, StoreError
from .events import DeliveryState, OutcomeKind
from .sinks import Outcome, Sink
from .store import SinkState, Store, queries
from .store.queries import ReplaySelection

__all__ = ["Deliverer", "DrainReport", "ReplaySelection", "enable_sink", "replay"]

log = structlog.get_logger("watcher.delivery")


@dataclass
class DrainReport:
    sink: str
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    skipped: str | None = None  # why nothing was attempted (disabled, backing off)
    errors: list[str] = field(default_factory=list)


class Deliverer:
    """Drains the outbox into ``sinks``. Thread-safe; one drain per sink at a time."""

    def __init__(
        self,
        store: Store,
        sinks: Mapping[str, Sink],
        *,
        config: DeliveryConfig | None = None,
        clock: Clock = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.sinks = dict(sinks)
        self.config = config or DeliveryConfig()
        self.clock = clock
        self.rng = rng or random.Random()
        self._backoff = Backoff(
            self.config.first_backoff.total_seconds(), self.config.max_backoff.total_seconds()
        )
        self._locks = {name: threading.Lock() for name in self.sinks}

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.close()

    def deliver_due(self, *, cancel: threading.Event | None = None) -> dict[str, DrainReport]:
        """Drain every sink once, in parallel, until each is empty, paused or cancelled."""
        if not self.sinks:
            return {}
        with ThreadPoolExecutor(max_workers=len(self.sinks), thread_name_prefix="sink") as pool:
            futures = {name: pool.submit(self.drain, name, cancel=cancel) for name in self.sinks}
            return {name: f.result() for name, f in futures.items()}

    def drain(self, name: str, *, cancel: threading.Event | None = None) -> DrainReport:
        report = DrainReport(name)
        lock = self._locks[name]
        if not lock.acquire(blocking=False):
            report.skipped = "already draining"
            return report
        try:
            self._drain(self.sinks[name], report, cancel)
        except NotLeader as exc:  # a replica that lost the leader lease: its marks did not land
            log.warning("delivery.not_leader", sink=name, error=str(exc))
            report.errors.append(str(exc))
        except StoreError as exc:  # e.g. a full disk: what was sent and not marked is sent again
            log.error("delivery.store_error", sink=name, error=exc.reason)
            report.errors.append(exc.reason)
        except Exception as exc:  # a sink bug must not take the daemon down: log, retry later
            log.exception("delivery.error", sink=name, error=repr(exc))
            report.errors.append(repr(exc))
        finally:
            lock.release()
            self._update_gauges(name)
        return report

    # -- internals ------------------------------------------------------------------------------

    def _drain(self, sink: Sink, report: DrainReport, cancel: threading.Event | None) -> None:
        name = sink.name
        while cancel is None or not cancel.is_set():
            now = self.clock()
            with self.store.read() as conn:
                state = queries.sink_state(conn, name)
                if state.disabled:
                    report.skipped = f"disabled: {state.disabled_reason}"
                    return
                if state.next_attempt_at and state.next_attempt_at > format_ts(now):
                    report.skipped = f"backing off until {state.next_attempt_at}"
                    return
                rows = queries.due_deliveries(conn, name, min(sink.max_batch, self.config.batch_size))
            if not rows:
                return
            events = [orjson.loads(payload) for _, _, payload in rows]
            outcomes = list(sink.deliver(events))[: len(rows)]
            if not outcomes:
                outcomes = [Outcome(OutcomeKind.RETRY, error="sink attempted nothing")]
            counted = (report.delivered, report.retried, report.dead)
            try:
                stop = self._record(sink, state, rows, events, outcomes, report)
            except NotLeader:
                # Sent, but the marks did not commit: the new leader sends these again, same ids.
                report.delivered, report.retried, report.dead = counted
                raise
            if stop:
                return

    def _record(
        self,
        sink: Sink,
        state: SinkState,
        rows: Sequence[tuple[int, int, str]],
        events: Sequence[Mapping[str, Any]],
        outcomes: Sequence[Outcome],
        report: DrainReport,
    ) -> bool:
        """Write what happened. Returns True when the sink must pause (retry or disable)."""
        name = sink.name
        now = self.clock()
        ts = format_ts(now)
        stop = False
        # Counted after the commit, so a scrape never sees a delivery the database does not have.
        counted: list[str] = []
        with self.store.write() as conn:
            for (row_id, seq, _), event, outcome in zip(rows, events, outcomes, strict=False):
                counted.append(outcome.kind)
                if outcome.kind == OutcomeKind.DELIVERED:
                    queries.mark_attempt(conn, row_id, at=ts, state=DeliveryState.DELIVERED)
                    report.delivered += 1
                    continue
                error = (outcome.error or outcome.kind)[:1000]
                report.errors.append(error)
                if outcome.kind == OutcomeKind.DEAD:
                    queries.mark_attempt(conn, row_id, at=ts, state=DeliveryState.DEAD, error=error)
                    # The sink's last error is what `deliveries` shows: it must be this one, not an
                    # older retry's (a timeout yesterday must not hide a no_service today).
                    queries.set_sink_state(conn, name, last_error=error)
                    report.dead += 1
                    log.error("delivery.dead", sink=name, event_id=event.get("id"), sequence=seq, error=error)
                    continue
                if outcome.kind == OutcomeKind.DISABLE:
                    queries.mark_attempt(conn, row_id, at=ts, error=error)
                    queries.set_sink_state(conn, name, disabled=True, disabled_reason=error, last_error=error)
                    log.error("delivery.sink_disabled", sink=name, error=error)
                    stop = True
                    break
                # retry: pause the whole sink so that order holds and the receiver gets air.
                self._pause(conn, sink, state, now, row_id, seq, event, outcome, error, report)
                stop = True
                break
            else:
                if state.consecutive_failures or state.next_attempt_at:
                    queries.set_sink_state(conn, name, consecutive_failures=0, next_attempt_at=None)
                    log.info("delivery.recovered", sink=name)
        for kind in counted:
            metrics.DELIVERIES.labels(name, kind).inc()
        return stop

    def _pause(
        self,
        conn: Connection,
        sink: Sink,
        state: SinkState,
        now: datetime,
        row_id: int,
        seq: int,
        event: Mapping[str, Any],
        outcome: Outcome,
        error: str,
        report: DrainReport,
    ) -> None:
        name = sink.name
        failures = state.consecutive_failures + 1
        delay = self._backoff.wait(failures, self.rng)
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        next_at = format_ts(now + timedelta(seconds=delay))
        queries.mark_attempt(conn, row_id, at=format_ts(now), error=error, next_attempt_at=next_at)
        report.retried += 1
        # Give up on rows queued longer than ``max_age`` ago while the sink keeps failing.
        expired = queries.expire_pending(conn, name, queued_before=format_ts(now - self.config.max_age))
        if expired:
            log.error(
                "delivery.gave_up", sink=name, rows=expired, max_age_s=self.config.max_age.total_seconds()
            )
            metrics.DELIVERIES.labels(name, "expired").inc(expired)
        report.dead += expired
        queries.set_sink_state(
            conn, name, consecutive_failures=failures, next_attempt_at=next_at, last_error=error
        )
        log.warning(
            "delivery.retry_scheduled",
            sink=name,
            event_id=event.get("id"),
            sequence=seq,
            error=error,
            failures=failures,
            delay_s=round(delay, 1),
            expired=expired,
        )

    def _update_gauges(self, name: str) -> None:
        try:
            statuses = self.store.delivery_status(self.clock(), sinks=[name])
        except StoreError as exc:  # the gauges stay as they were until the database answers
            log.warning("delivery.gauges_stale", sink=name, error=exc.reason)
            return
        for status in statuses:
            metrics.OUTBOX_BACKLOG.labels(name).set(status.pending)
            metrics.OUTBOX_OLDEST_PENDING_AGE.labels(name).set(status.oldest_pending_age or 0)


def replay(store: Store, sink: str, *, now: datetime, selection: ReplaySelection | None = None) -> int:
    """Queue events for ``sink`` again, with their original ids; with no selector, every dead row.

    Events that were never routed to the sink get a new outbox row; rows already pending are left
    alone. Returns how many rows were (re)queued.
    """
    with store.write() as conn:
        n = queries.replay(conn, sink, selection or ReplaySelection(), now=format_ts(now))
    log.info("delivery.replayed", sink=sink, rows=n)
    return n


def enable_sink(store: Store, sink: str) -> bool:
    """Switch a disabled sink back on; its pending rows go out on the next drain."""
    with store.write() as conn:
        changed = queries.enable_sink(conn, sink)
    if changed:
        log.info("delivery.sink_enabled", sink=sink)
    return changed
