"""Housekeeping: what the store no longer needs, deleted in short transactions.

``[store] keep_deliveries`` (30 days) bounds the delivered outbox rows, ``keep_polls`` (90 days)
the poll history, and ``keep_events`` (unset: forever) the audit log. The daemon prunes hourly on
the leader, and ``metronome-watcher store prune`` on demand; both run :func:`prune`.

What is never deleted, whatever its age: an outbox row that is pending (still to deliver) or dead
(kept for ``replay``), an event that still has an outbox row, the newest event (the next sequence
follows it) and the newest of each ``watcher.*`` notice (the notices' state is read from them), the
last successful run of each source (``has_baseline``) and every run after the success before the
last one (the failure streak ``status`` and the notices count). A run goes with its sources' rows.

Each batch is one write transaction of at most ``batch`` rows (a few milliseconds), and the prune
rests at least as long as the batch took before the next one, so a poll's commit waiting for the
write lock waits for one batch at most. Its bounds are found first, on indexes; every batch checks
its rows again in its own transaction. On SQLite the freed pages go to the file's freelist and are
reused by later writes, so the file stops growing once the windows are full (no VACUUM needed;
docs/operations.md has the figures).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from .._time import format_ts
from ..config import StoreConfig
from . import queries
from .database import Store

__all__ = ["PruneReport", "prune"]

#: Rows per transaction.
BATCH = 1000
#: The least rest between two batches, in seconds (longer when a batch took longer).
PAUSE = 0.05


@dataclass(frozen=True)
class PruneReport:
    """What a prune deleted (or, with ``dry_run``, would delete)."""

    deliveries: int
    events: int
    polls: int
    poll_sources: int
    batches: int
    seconds: float
    #: The longest batch (the longest the write lock was held by this prune), in seconds.
    longest_batch: float
    dry_run: bool
    #: False when it was stopped before the end (shutting down, or no longer the leader).
    complete: bool

    def counts(self) -> dict[str, int]:
        return {
            "deliveries": self.deliveries,
            "events": self.events,
            "polls": self.polls,
            "poll_sources": self.poll_sources,
        }


def prune(
    store: Store,
    keep: StoreConfig,
    *,
    now: datetime,
    dry_run: bool = False,
    batch: int = BATCH,
    pause: float = PAUSE,
    should_stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
) -> PruneReport:
    """Delete what ``keep``'s windows let go at ``now``: deliveries, then events, then poll runs."""
    t0 = time.perf_counter()
    with store.read() as conn:
        bounds = queries.prune_bounds(
            conn,
            deliveries_before=format_ts(now - keep.keep_deliveries),
            polls_before=format_ts(now - keep.keep_polls),
            events_before=None if keep.keep_events is None else format_ts(now - keep.keep_events),
        )
        if dry_run:
            c = queries.prunable_counts(conn, bounds)
            return PruneReport(
                **c,
                batches=0,
                seconds=time.perf_counter() - t0,
                longest_batch=0.0,
                dry_run=True,
                complete=True,
            )
    totals = {"deliveries": 0, "events": 0, "polls": 0, "poll_sources": 0}
    batches = 0
    longest = 0.0
    stopped = False

    def run(step: Callable[[int], int | None]) -> None:
        """Batches of one kind until none is left, resting between them."""
        nonlocal batches, longest, stopped
        cursor: int | None = 0
        while cursor is not None:
            if should_stop():
                stopped = True
                return
            started = time.perf_counter()
            cursor = step(cursor)
            batches += 1
            took = time.perf_counter() - started
            longest = max(longest, took)
            if cursor is not None:
                sleep(max(pause, took))

    def deliveries(after: int) -> int | None:
        with store.write() as conn:
            n, cursor = queries.prune_deliveries(conn, bounds, after=after, limit=batch)
        totals["deliveries"] += n
        return cursor

    def events(after: int) -> int | None:
        with store.write() as conn:
            n, cursor = queries.prune_events(conn, bounds, after=after, limit=batch)
        totals["events"] += n
        return cursor

    def polls(after: int) -> int | None:
        with store.write() as conn:
            runs, sources, cursor = queries.prune_polls(conn, bounds, after=after, limit=batch)
        totals["polls"] += runs
        totals["poll_sources"] += sources
        return cursor

    # Deliveries first: an event goes only once its outbox rows have.
    run(deliveries)
    if bounds.events_before is not None and not stopped:
        run(events)
    if not stopped:
        run(polls)
    return PruneReport(
        **totals,
        batches=batches,
        seconds=time.perf_counter() - t0,
        longest_batch=longest,
        dry_run=False,
        complete=not stopped,
    )
