"""Time helpers. Every timestamp we store or emit is UTC in one fixed-width RFC 3339 form,
so that SQLite can compare and sort them as plain strings."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

__all__ = ["Clock", "format_ts", "parse_ts", "utcnow"]

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_ts(dt: datetime) -> str:
    """``2026-11-22T03:04:05.123456Z``: fixed width, so lexical order is time order."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(value: str) -> datetime:
    """Parse RFC 3339 (``Z`` or an offset; date-only means midnight UTC)."""
    v = value.strip()
    if v.endswith(("Z", "z")):
        v = v[:-1] + "+00:00"
    dt = datetime.fromisoformat(v)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)
