"""Delivery: each sink drains its outbox rows in ``sequence`` order, on its own.

Rules (DESIGN rule 6), the same for every sink:

* Rows are attempted in ``sequence`` order. A retryable failure pauses the *sink* (not just the
  row) with exponential back-off plus jitter, honouring ``Retry-After``, so order is kept and a
  sick receiver is not hammered. The pause is stored, so a restart does not reset it.
* A row still failing ``max_age`` after it was queued (72 hours by default, as Metronome's own
  webhooks) is marked dead; a permanent failure (``Outcome("dead")``) is dead at once. Dead rows
  stay in the outbox and ``replay`` re-queues them with the same event id.
* ``Outcome("disable")`` (e.g. HTTP 410) switches the sink off until ``enable_sink``.
* A drain round hands a sink at most ``[delivery] batch_size`` rows (and never more than the
  sink's own ``max_batch``); a Slack round above its digest threshold becomes one digest.
* ``delivery_status`` reports each sink's most recent error, whether it was a retry, a dead
  event or a disable.
* Sinks are drained in parallel threads, so one slow or dead receiver never delays another, and
  a row is marked delivered only after the sink said so: a crash in between means the event is
  sent again (at-least-once, receivers dedupe on the event id).
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
from sqlalchemy import and_, func, insert, or_, select, update
from sqlmodel import col

from . import metrics
from ._time import Clock, format_ts, parse_ts, utcnow
from .config import DeliveryConfig
from .sinks import Outcome, Sink
from .store import EventRecord, OutboxRow, SinkState, Store

__all__ = [
    "Deliverer",
    "DrainReport",
    "SinkStatus",
    "delivery_status",
    "enable_sink",
    "replay",
]

log = structlog.get_logger("watcher.delivery")


@dataclass
class DrainReport:
    sink: str
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    skipped: str | None = None  # why nothing was attempted (disabled, backing off)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SinkStatus:
    sink: str
    pending: int
    delivered: int
    dead: int
    oldest_pending_age: float | None  # seconds
    last_error: str | None
    disabled: bool
    next_attempt_at: str | None


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
            state = self._state(name)
            if state.disabled:
                report.skipped = f"disabled: {state.disabled_reason}"
                return
            if state.next_attempt_at and state.next_attempt_at > format_ts(now):
                report.skipped = f"backing off until {state.next_attempt_at}"
                return
            rows = self._due(name, min(sink.max_batch, self.config.batch_size))
            if not rows:
                return
            events = [orjson.loads(r[3]) for r in rows]
            outcomes = list(sink.deliver(events))[: len(rows)]
            if not outcomes:
                outcomes = [Outcome("retry", error="sink attempted nothing")]
            stop = self._record(sink, state, rows, events, outcomes, report)
            if stop:
                return

    def _state(self, name: str) -> SinkState:
        with self.store.read() as conn:
            row = conn.execute(select(SinkState).where(SinkState.name == name)).first()  # type: ignore[arg-type]
        return SinkState.model_validate(row._mapping) if row else SinkState(name=name)

    def _due(self, name: str, limit: int) -> list[Any]:
        with self.store.read() as conn:
            return list(
                conn.execute(
                    select(OutboxRow.id, OutboxRow.sequence, OutboxRow.created_at, EventRecord.payload)  # type: ignore[call-overload]
                    .join(EventRecord, EventRecord.sequence == OutboxRow.sequence)
                    .where(OutboxRow.sink == name, OutboxRow.status == "pending")
                    .order_by(OutboxRow.sequence)
                    .limit(limit)
                ).all()
            )

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        cfg = self.config
        step: float = cfg.first_backoff.total_seconds() * 2.0 ** max(failures - 1, 0)
        base = min(cfg.max_backoff.total_seconds(), step)
        delay = base * (0.5 + self.rng.random() / 2)  # "equal jitter": never less than half the step
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def _record(
        self,
        sink: Sink,
        state: SinkState,
        rows: Sequence[Any],
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
            for row, event, outcome in zip(rows, events, outcomes, strict=False):
                row_id, seq = row[0], row[1]
                base = update(OutboxRow).where(OutboxRow.id == row_id)  # type: ignore[arg-type]
                attempted = {"attempts": OutboxRow.attempts + 1, "last_attempt_at": ts}
                counted.append(outcome.kind)
                if outcome.kind == "delivered":
                    conn.execute(base.values(status="delivered", delivered_at=ts, **attempted))
                    report.delivered += 1
                    continue
                error = (outcome.error or outcome.kind)[:1000]
                report.errors.append(error)
                if outcome.kind == "dead":
                    conn.execute(base.values(status="dead", last_error=error, **attempted))
                    # The sink's last error is what `deliveries` shows: it must be this one, not an
                    # older retry's (a timeout yesterday must not hide a no_service today).
                    self._set_state(conn, name, last_error=error)
                    report.dead += 1
                    log.error("delivery.dead", sink=name, event_id=event.get("id"), sequence=seq, error=error)
                    continue
                if outcome.kind == "disable":
                    conn.execute(base.values(last_error=error, **attempted))
                    self._set_state(conn, name, disabled=True, disabled_reason=error, last_error=error)
                    log.error("delivery.sink_disabled", sink=name, error=error)
                    stop = True
                    break
                # retry: pause the whole sink so that order holds and the receiver gets air.
                failures = state.consecutive_failures + 1
                delay = self._backoff(failures, outcome.retry_after)
                next_at = format_ts(now + timedelta(seconds=delay))
                conn.execute(base.values(last_error=error, next_attempt_at=next_at, **attempted))
                report.retried += 1
                expired = self._expire(conn, name, now)
                report.dead += expired
                self._set_state(
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
                stop = True
                break
            else:
                if state.consecutive_failures or state.next_attempt_at:
                    self._set_state(conn, name, consecutive_failures=0, next_attempt_at=None)
                    log.info("delivery.recovered", sink=name)
        for kind in counted:
            metrics.DELIVERIES.labels(name, kind).inc()
        return stop

    def _expire(self, conn: Any, name: str, now: datetime) -> int:
        """Give up on rows queued longer than ``max_age`` ago while the sink keeps failing."""
        cutoff = format_ts(now - self.config.max_age)
        res = conn.execute(
            update(OutboxRow)
            .where(OutboxRow.sink == name, OutboxRow.status == "pending", OutboxRow.created_at <= cutoff)  # type: ignore[arg-type]
            .values(
                status="dead", last_error=func.coalesce(OutboxRow.last_error, "") + " (gave up after max_age)"
            )
        )
        n = int(res.rowcount or 0)
        if n:
            log.error("delivery.gave_up", sink=name, rows=n, max_age_s=self.config.max_age.total_seconds())
            metrics.DELIVERIES.labels(name, "expired").inc(n)
        return n

    @staticmethod
    def _set_state(conn: Any, name: str, **values: Any) -> None:
        exists = conn.execute(select(col(SinkState.name)).where(col(SinkState.name) == name)).first()
        if exists:
            conn.execute(update(SinkState).where(SinkState.name == name).values(**values))  # type: ignore[arg-type]
        else:
            conn.execute(insert(SinkState).values(name=name, **values))

    def _update_gauges(self, name: str) -> None:
        for status in delivery_status(self.store, self.clock(), sinks=[name]):
            metrics.OUTBOX_BACKLOG.labels(name).set(status.pending)
            metrics.OUTBOX_OLDEST_PENDING_AGE.labels(name).set(status.oldest_pending_age or 0)


def delivery_status(store: Store, now: datetime, *, sinks: Sequence[str] = ()) -> list[SinkStatus]:
    """Per sink: pending, delivered and dead counts, oldest pending age and the last error."""
    with store.read() as conn:
        q = select(OutboxRow.sink, OutboxRow.status, func.count(), func.min(OutboxRow.created_at)).group_by(  # type: ignore[call-overload]
            OutboxRow.sink, OutboxRow.status
        )
        if sinks:
            q = q.where(OutboxRow.sink.in_(list(sinks)))  # type: ignore[attr-defined]
        counts: dict[str, dict[str, Any]] = {}
        for sink, status, n, oldest in conn.execute(q):
            counts.setdefault(sink, {})[status] = (n, oldest)
        states = {
            s.name: s
            for s in (SinkState.model_validate(r._mapping) for r in conn.execute(select(SinkState)).all())
        }
        last_errors: dict[str, str | None] = dict(
            conn.execute(
                select(OutboxRow.sink, OutboxRow.last_error)  # type: ignore[call-overload]
                .where(OutboxRow.last_error.is_not(None))  # type: ignore[union-attr]
                .order_by(OutboxRow.last_attempt_at)
            ).all()
        )
    names = list(sinks) or sorted(set(counts) | set(states))
    out = []
    for name in names:
        c = counts.get(name, {})
        state = states.get(name)
        oldest = c.get("pending", (0, None))[1]
        out.append(
            SinkStatus(
                sink=name,
                pending=c.get("pending", (0, None))[0],
                delivered=c.get("delivered", (0, None))[0],
                dead=c.get("dead", (0, None))[0],
                oldest_pending_age=(now - parse_ts(oldest)).total_seconds() if oldest else None,
                last_error=(state.last_error if state and state.last_error else None)
                or last_errors.get(name),
                disabled=bool(state and state.disabled),
                next_attempt_at=state.next_attempt_at if state else None,
            )
        )
    return out


def replay(
    store: Store,
    sink: str,
    *,
    now: datetime,
    event_ids: Sequence[str] = (),
    sequence_from: int | None = None,
    sequence_to: int | None = None,
    since: str | None = None,
    until: str | None = None,
    dead_only: bool = False,
) -> int:
    """Queue events for ``sink`` again (same event ids). With no selector, every dead row.

    Events that were never routed to the sink get a new outbox row; rows already pending are
    left alone. Returns how many rows were (re)queued.
    """
    ts = format_ts(now)
    conds: list[Any] = []
    if event_ids:
        conds.append(EventRecord.id.in_(list(event_ids)))  # type: ignore[attr-defined]
    if sequence_from is not None:
        conds.append(EventRecord.sequence >= sequence_from)
    if sequence_to is not None:
        conds.append(EventRecord.sequence <= sequence_to)
    if since:
        conds.append(EventRecord.detected_at >= since)
    if until:
        conds.append(EventRecord.detected_at < until)
    selected = not conds
    with store.write() as conn:
        q = (
            select(EventRecord.sequence, OutboxRow.id, OutboxRow.status)  # type: ignore[call-overload]
            .outerjoin(
                OutboxRow,
                and_(col(OutboxRow.sequence) == col(EventRecord.sequence), col(OutboxRow.sink) == sink),
            )
            .where(*conds)
        )
        if selected or dead_only:
            q = q.where(OutboxRow.status == "dead")
        else:
            q = q.where(or_(col(OutboxRow.status).is_(None), col(OutboxRow.status) != "pending"))
        n = 0
        for seq, row_id, _status in conn.execute(q).all():
            if row_id is None:
                conn.execute(
                    insert(OutboxRow).values(
                        sequence=seq,
                        sink=sink,
                        status="pending",
                        attempts=0,
                        created_at=ts,
                        next_attempt_at=ts,
                    )
                )
            else:
                # A fresh max_age window: the operator asked for this delivery now.
                conn.execute(
                    update(OutboxRow)
                    .where(OutboxRow.id == row_id)  # type: ignore[arg-type]
                    .values(status="pending", created_at=ts, next_attempt_at=ts, delivered_at=None)
                )
            n += 1
        conn.execute(
            update(SinkState)
            .where(col(SinkState.name) == sink)
            .values(consecutive_failures=0, next_attempt_at=None)
        )
    log.info("delivery.replayed", sink=sink, rows=n)
    return n


def enable_sink(store: Store, sink: str) -> bool:
    """Switch a disabled sink back on; its pending rows go out on the next drain."""
    with store.write() as conn:
        res = conn.execute(
            update(SinkState)
            .where(SinkState.name == sink)  # type: ignore[arg-type]
            .values(disabled=False, disabled_reason=None, consecutive_failures=0, next_attempt_at=None)
        )
    changed = bool(res.rowcount)
    if changed:
        log.info("delivery.sink_enabled", sink=sink)
    return changed
