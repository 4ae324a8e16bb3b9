"""What a source's session offers for one poll, whatever the engine: the named methods it calls.

A source reads and writes on one connection of its own, through the methods of its session: the
customers' cycle through :class:`CycleSession` (``Store.cycle()``), the plans through
:class:`~watcher.store.plans.PlanSession` (``Store.plan_session()``); neither sees SQL. What both
share is :class:`SourceSession`. Each engine has its sessions beside this module, with its own
hot-path tools: SQLite's (:mod:`watcher.store._cycle_sqlite`, :mod:`watcher.store._plans_sqlite`:
TEMP staging tables, multi-row statements and JSON builtins on the ``sqlite3`` connection) and
PostgreSQL's (:mod:`watcher.store._cycle_postgres`, :mod:`watcher.store._plans_postgres`: temporary
staging tables filled with ``COPY``, a source's read in one transaction, arrays for sets of ids).

The contract both keep:

- Staging (:meth:`CycleSession.stage`) writes nothing another connection can see, and is gone
  when the session closes: a failed or interrupted read leaves nothing behind (rule 1).
- A transaction opened with ``mode="IMMEDIATE"`` is a writer's: it queues behind every other
  writer of the database, and when it commits, the state, the events and the outbox rows written
  in it land together (rule 5). When the store is fenced (a replica holding the leader lease), the
  commit checks the lease's epoch in the same transaction, and a session that lost the lease
  commits nothing (:class:`~watcher.errors.NotLeader`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from sqlalchemy import Connection

from ..events import EventRow, Listing, OutboxEntry

__all__ = ["BaselineWriter", "CycleSession", "Sighting", "SourceSession", "StoredState"]

#: A sighting the cycle could not settle: (customer id, archived, fingerprint, canonical JSON).
Sighting = tuple[str, bool, int, bytes]
#: id -> (status, record, first_seen_at, changed_at, fingerprint) of a stored customer.
StoredState = tuple[str, str, str, str, int]


class BaselineWriter(Protocol):
    """Writes a silent baseline's sightings into an empty store while the listings are fetched.

    It works inside the session's open ``IMMEDIATE`` transaction; nobody else may use the session
    until :meth:`finish` or :meth:`stop` returned. A customer sighted twice is stored once: the
    archived sighting wins, else the later one.
    """

    #: Sightings per :meth:`insert` call that suit the writer (the cycle buffers this many).
    batch_rows: int
    error: BaseException | None

    def set_cache(self, kib: int) -> None: ...

    def insert(self, rows: Sequence[Sighting]) -> None: ...

    def finish(self) -> None:
        """Wait until everything submitted is written; raise what failed, if anything did."""

    def stop(self) -> None:
        """Stop without raising (the transaction is being rolled back)."""


class SourceSession(Protocol):
    """A source's connection for one poll. Not thread-safe: one thread at a time, as a source uses it."""

    def close(self) -> None: ...

    def transaction(self, mode: str = "DEFERRED") -> AbstractContextManager[Connection]:
        """``DEFERRED``: a reader's (or the staging's); ``IMMEDIATE``: a writer's, see the module."""

    def tune(self, *, cache_kib: int) -> None:
        """Settings of this connection alone, for a read (a page cache, where the engine has one)."""

    def set_cache(self, kib: int) -> None: ...

    def last_sequence(self) -> int: ...

    def append_events(self, events: Sequence[EventRow], outbox: Sequence[OutboxEntry]) -> None: ...


class CycleSession(SourceSession, Protocol):
    """The customers' cycle's connection for one poll, and every statement the cycle runs."""

    # -- the poll run

    def begin_poll(self, now: str) -> int:
        """Record a running poll (committed at once); a run left running was abandoned."""

    def finish_poll(
        self,
        poll_id: int,
        *,
        finished_at: str,
        baseline: bool,
        pages: int,
        active: int,
        archived: int,
        events_by_type: dict[str, int],
        settle: bool = True,
    ) -> None:
        """Record the customers as read, inside the transaction that commits them; with ``settle``
        (no other source is still reading) the poll as succeeded, else its outcome is left to the
        source that finishes last (``queries.settle_poll``)."""

    # -- what is stored

    def has_baseline(self) -> bool:
        """True once a read of the customers has succeeded."""

    def is_empty(self) -> bool: ...

    def page_memo(self) -> list[tuple[Listing, bool, bytes]]: ...

    def save_page_memo(self, listing: Listing, *, complete: bool, pages: bytes) -> None: ...

    def stored_fingerprints(self) -> dict[Listing, set[int]]:
        """The fingerprints of every stored active and archived customer."""

    def counts_by_status(self) -> dict[str, int]: ...

    def count_customers(self) -> int: ...

    # -- staging

    def create_staging(self) -> None: ...

    def stage(self, rows: Sequence[Sighting]) -> None:
        """Append sightings to the staging (which no other connection sees)."""

    def index_staging(self) -> None:
        """Index the staged rows by customer, once the scan is over (before the write lock)."""

    def staged_stored(self) -> list[tuple[str, str, int]]:
        """(id, status, fingerprint) of the stored, not deleted, customers among the staged ones."""

    def with_fingerprints(self, fingerprints: Iterable[int]) -> list[tuple[str, str, int]]:
        """(id, status, fingerprint) of the stored, not deleted, customers with these fingerprints."""

    def chosen_staged(self, after_id: str, limit: int) -> list[tuple[str, int, int, bytes, Any]]:
        """Up to ``limit`` staged customers after ``after_id``, in id order, one sighting each: the
        archived one if there is one, else the latest. (id, archived, fingerprint, JSON, -)."""

    # -- the final transaction

    def load_states(self, ids: Sequence[str]) -> dict[str, StoredState]: ...

    def upsert_states(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """(id, status, fingerprint, record, first_seen_at, changed_at, poll id) for each customer."""

    def mark_deleted(self, ids: Sequence[str], *, detected_at: str, poll_id: int) -> None: ...

    def baseline_writer(self, *, detected_at: str, poll_id: int) -> BaselineWriter:
        """A writer for a silent baseline into an empty store, inside an open IMMEDIATE transaction."""
