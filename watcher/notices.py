"""Repeated failure is news: ``watcher.poll_failing`` and ``watcher.poll_recovered`` notices.

A poll fails when any source it reads fails (with plans watched, its ``detail.failed_sources`` says
which). After ``health.failing_after`` consecutive failed polls one ``watcher.poll_failing`` notice is
recorded in the audit log (and routed to the sinks whose ``events`` ask for ``watcher.*``), and one
``watcher.poll_recovered`` after the next success. The state is derived from the database every
time, never kept in memory, so it survives restarts: a restart in the middle of a failure streak
neither resets the count nor repeats a notice, and it tells the same story as ``status``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from ._time import format_ts, parse_ts
from .events import EventType, EventWriter
from .routing import Route, Router
from .store import Store, queries

__all__ = ["FailureStreak", "announce", "failure_streak", "record_notice"]

_NOTICES = (EventType.POLL_FAILING, EventType.POLL_RECOVERED)


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
    #: The sources that failed in the last failed poll, when it read more than one (plans watched).
    failed_sources: tuple[str, ...] = ()

    @property
    def failing_notice_outstanding(self) -> bool:
        """A failing notice was sent and no poll has succeeded since."""
        return self.notice == EventType.POLL_FAILING and (self.last_success_id or 0) < (
            self.notice_poll_id or 0
        )

    @property
    def recovery_unannounced(self) -> bool:
        """A failing notice was sent, a poll has succeeded since, and no recovered notice says so."""
        return self.notice == EventType.POLL_FAILING and (self.last_success_id or 0) > (
            self.notice_poll_id or 0
        )


def failure_streak(store: Store) -> FailureStreak:
    """The streak from the poll history, and the last notice from the audit log."""
    with store.read() as conn:
        counts = queries.failure_counts(conn)
        last = queries.last_notice(conn, _NOTICES)
    notice, notice_poll_id = None, None
    if last is not None:
        notice = str(last["type"])
        detail = last.get("detail") or {}
        notice_poll_id = detail.get("poll_id") if isinstance(detail.get("poll_id"), int) else None
    return FailureStreak(
        failures=counts.failures,
        since=counts.since,
        last_error=counts.last_error,
        last_failed_poll_id=counts.last_failed_poll_id,
        last_success_id=counts.last_success_id,
        notice=notice,
        notice_poll_id=notice_poll_id,
        failed_sources=counts.failed_sources,
    )


def record_notice(
    store: Store, event_type: EventType, routes: Sequence[Route], *, now: datetime, detail: dict[str, Any]
) -> dict[str, Any]:
    """Append a ``watcher.*`` notice (not a customer change) to the audit log and route it."""
    with store.write() as conn:
        writer = EventWriter(
            poll_id=None,
            detected_at=format_ts(now),
            last_sequence=queries.last_sequence(conn),
            route=Router(routes),
        )
        event = writer.add(event_type, None, None, None, [], extra={"detail": detail})
        queries.append_events(conn, *writer.take())
    return event


def announce(
    store: Store, routes: Sequence[Route], *, failing_after: int, now: datetime
) -> list[dict[str, Any]]:
    """Record the notices that are due after a poll (recovered, then failing); returns them."""
    streak = failure_streak(store)
    sent = []
    if streak.recovery_unannounced:
        assert streak.last_success_id is not None
        with store.read() as conn:
            before = queries.failure_counts(conn, before_success=streak.last_success_id)
        detail: dict[str, Any] = {
            "poll_id": streak.last_success_id,
            "failed_polls": before.failures,
            "since": before.since,
        }
        if before.since:
            detail["down_seconds"] = round((now - parse_ts(before.since)).total_seconds(), 3)
        sent.append(record_notice(store, EventType.POLL_RECOVERED, routes, now=now, detail=detail))
        streak = replace(streak, notice=EventType.POLL_RECOVERED, notice_poll_id=streak.last_success_id)
    if streak.failures >= failing_after and not streak.failing_notice_outstanding:
        detail = {
            "poll_id": streak.last_failed_poll_id,
            "consecutive_failures": streak.failures,
            "failing_after": failing_after,
            "since": streak.since,
            "last_error": streak.last_error,
        }
        if streak.failed_sources:
            detail["failed_sources"] = list(streak.failed_sources)
        sent.append(record_notice(store, EventType.POLL_FAILING, routes, now=now, detail=detail))
    return sent
