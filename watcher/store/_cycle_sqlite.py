"""The sources' sessions on SQLite, and every statement the customers' cycle runs on it there.

A source reads and writes on one connection of its own (:class:`SqliteSourceSession`), because it
owns a TEMP staging table, and because its hot path runs on the ``sqlite3`` connection beneath
SQLAlchemy: multi-row statements and builtins, so that no Python runs per customer where SQLite can
do the work. The customers' session is :class:`SqliteCycleSession`; the plans' is in
:mod:`watcher.store._plans_sqlite`. What they offer is :mod:`watcher.store.cycle`'s protocols.

Where the cycle stages records: the TEMP table ``poll_staged``. Writing it takes no lock on the
database file (a long scan never blocks the daemon's other writers), costs no fsync and no WAL
traffic, and leaves no freed pages behind in the database. It disappears with the connection, which
is exactly what a failed or interrupted cycle needs (rule 1). Rows are only appended, one per
sighting the cycle could not settle by fingerprint; a customer seen more than once has several.
"""

from __future__ import annotations

import functools
import queue
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from typing import Any

import orjson
from sqlalchemy import Connection, Engine

from ..events import CustomerStatus, EventRow, Listing, OutboxEntry, PollOutcome, Source
from . import queries
from .cycle import Sighting, StoredState

__all__ = ["STATEMENT_ROWS", "SqliteBaselineWriter", "SqliteCycleSession", "SqliteSourceSession"]

INSERT_EVENT = (
    "INSERT INTO events (sequence, id, type, customer_id, poll_id, detected_at, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
INSERT_OUTBOX = (
    "INSERT INTO outbox (sequence, sink, status, attempts, created_at, next_attempt_at) "
    "VALUES (?1, ?2, 'pending', 0, ?3, ?3)"
)

#: Rows per INSERT statement (fewer when the SQLite library allows fewer parameters). One
#: multi-row statement is one SQLite step, so the GIL is handed over once per statement.
STATEMENT_ROWS = 250
#: Customers (a rowid range) per step when the stored fingerprints load from the table: it bounds
#: the JSON text at a million customers.
_KNOWN_CHUNK = 100_000

_STAGED_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS poll_staged (customer_id TEXT NOT NULL, "
    "archived INTEGER NOT NULL, hash INTEGER NOT NULL, record BLOB NOT NULL)"
)
#: One staged row per customer, in id order: its archived sighting if it has one (archived wins),
#: else its latest. SQLite takes the bare columns of a ``max()`` aggregate from the row holding it.
_CHOSEN_STAGED = (
    "SELECT customer_id, archived, hash, record, max(archived * 4294967296 + rowid) "
    "FROM temp.poll_staged WHERE customer_id > ? GROUP BY customer_id ORDER BY customer_id LIMIT ?"
)
_LOAD_KNOWN = (
    "SELECT json_group_array(hash) FILTER (WHERE status = 'active'), "
    "json_group_array(hash) FILTER (WHERE status = 'archived') "
    "FROM customers WHERE rowid >= ? AND rowid < ?"
)
#: A changed customer's new state: an UPDATE in place when it is stored (same rowid, same index
#: entry), where REPLACE would delete and re-insert.
_UPSERT_STATE = (
    "INSERT INTO customers (id, status, hash, record, first_seen_at, changed_at, last_poll_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
    "hash = excluded.hash, record = excluded.record, first_seen_at = excluded.first_seen_at, "
    "changed_at = excluded.changed_at, last_poll_id = excluded.last_poll_id"
)


@functools.cache
def _insert_staged_sql(rows: int) -> str:
    return "INSERT INTO temp.poll_staged VALUES " + ", ".join(["(?, ?, ?, ?)"] * rows)


@functools.cache
def _insert_customers_sql(rows: int) -> str:
    # ?1 and ?2 (detected_at, poll id) are bound once per statement, and each row binds exactly the
    # four values of a sighting. A repeated sighting replaces the first, except that an active one
    # never replaces an archived one (archived wins, as in ``_CHOSEN_STAGED``).
    values = ", ".join(
        f"(?{i}, iif(?{i + 1}, 'archived', 'active'), ?{i + 2}, CAST(?{i + 3} AS TEXT), ?1, ?1, ?2)"
        for i in range(3, 3 + 4 * rows, 4)
    )
    return (
        "INSERT INTO customers (id, status, hash, record, first_seen_at, changed_at, last_poll_id) "
        f"VALUES {values} ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
        "hash = excluded.hash, record = excluded.record "
        "WHERE excluded.status = 'archived' OR customers.status = 'active'"
    )


class SqliteSourceSession:
    """A source's connection for one poll, taken out of the pool so that closing it really closes it
    (and its temporary file with it). Not thread-safe: one thread at a time, as a source uses it.

    The customers' session is :class:`SqliteCycleSession`; the plans' is
    ``store._plans_sqlite.SqlitePlanSession``.
    """

    def __init__(self, engine: Engine) -> None:
        conn = engine.connect()
        conn.detach()
        self._conn = conn
        db = conn.connection.dbapi_connection
        assert isinstance(db, sqlite3.Connection)
        self._db: sqlite3.Connection = db
        self._max_params: int = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self, mode: str = "DEFERRED") -> Iterator[Connection]:
        """``BEGIN <mode>``: DEFERRED takes no lock until something is written (the staging table
        is TEMP, so staging takes none at all); IMMEDIATE takes the write lock at once."""
        conn = self._conn.execution_options(watcher_begin=mode)
        with conn.begin():
            yield conn

    def tune(self, *, cache_kib: int) -> None:
        """Settings of this connection alone: the staging table's journal in memory, a page cache for
        the stored rows a cycle reads twice, and no checkpoint on commit (the store's checkpointer
        copies the WAL afterwards, see ``Store.request_checkpoint``)."""
        self._db.execute("PRAGMA temp.journal_mode=MEMORY")
        self.set_cache(cache_kib)
        self._db.execute("PRAGMA wal_autocheckpoint = 0")

    def set_cache(self, kib: int) -> None:
        self._db.execute(f"PRAGMA cache_size = -{kib}")

    def last_sequence(self) -> int:
        return queries.last_sequence(self._conn)

    def append_events(self, events: Sequence[EventRow], outbox: Sequence[OutboxEntry]) -> None:
        if events:
            self._db.executemany(INSERT_EVENT, events)
        if outbox:
            self._db.executemany(INSERT_OUTBOX, outbox)

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return self._db.execute(sql, params).fetchall()


class SqliteCycleSession(SqliteSourceSession):
    """The customers' cycle: its connection (see :class:`SqliteSourceSession`) and every statement it
    runs."""

    # -- the poll run ---------------------------------------------------------------------------

    def begin_poll(self, now: str) -> int:
        """Record a running poll; a run left running belongs to a process that died mid-cycle."""
        with self.transaction("IMMEDIATE"):
            self._db.execute(
                "UPDATE poll_runs SET outcome = ?, finished_at = ?, "
                "error = 'process ended during the cycle' WHERE outcome = ?",
                (PollOutcome.ABANDONED, now, PollOutcome.RUNNING),
            )
            cursor = self._db.execute(
                "INSERT INTO poll_runs (started_at, outcome, baseline, pages, active, archived, events, "
                "events_by_type) VALUES (?, ?, 0, 0, 0, 0, 0, '{}')",
                (now, PollOutcome.RUNNING),
            )
            assert cursor.lastrowid is not None
            return int(cursor.lastrowid)

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
        by_type = orjson.dumps(events_by_type).decode()
        events = sum(events_by_type.values())
        self._db.execute(
            "INSERT INTO poll_sources (poll_id, source, outcome, finished_at, baseline, pages, items, "
            "events, events_by_type) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                poll_id,
                Source.CUSTOMERS,
                PollOutcome.SUCCEEDED,
                finished_at,
                baseline,
                pages,
                active + archived,
                events,
                by_type,
            ),
        )
        self._db.execute(
            "UPDATE poll_runs SET outcome = ?, finished_at = ?, baseline = ?, pages = ?, "
            "active = ?, archived = ?, events = ?, events_by_type = ? WHERE id = ?",
            (
                PollOutcome.SUCCEEDED if settle else PollOutcome.RUNNING,
                finished_at if settle else None,
                baseline,
                pages,
                active,
                archived,
                events,
                by_type,
                poll_id,
            ),
        )

    # -- what is stored -------------------------------------------------------------------------

    def has_baseline(self) -> bool:
        return queries.has_baseline(self._conn, Source.CUSTOMERS)

    def is_empty(self) -> bool:
        return self._db.execute("SELECT 1 FROM customers LIMIT 1").fetchone() is None

    def page_memo(self) -> list[tuple[Listing, bool, bytes]]:
        return [
            (Listing(archived), bool(complete), blob)
            for archived, complete, blob in self._db.execute(
                "SELECT archived, complete, pages FROM page_memo"
            )
        ]

    def save_page_memo(self, listing: Listing, *, complete: bool, pages: bytes) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO page_memo (archived, complete, pages) VALUES (?, ?, ?)",
            (int(listing), complete, pages),
        )

    def stored_fingerprints(self) -> dict[Listing, set[int]]:
        """The fingerprints of every stored active and archived customer."""
        # Each chunk is one SQLite step that builds two JSON arrays without holding the GIL (the
        # producer threads keep fetching meanwhile), and orjson turns them into ints in C.
        known: dict[Listing, set[int]] = {Listing.ACTIVE: set(), Listing.ARCHIVED: set()}
        lo, hi = self._db.execute("SELECT min(rowid), max(rowid) FROM customers").fetchone()
        if lo is not None:
            for start in range(lo, hi + 1, _KNOWN_CHUNK):
                active, archived = self._db.execute(_LOAD_KNOWN, (start, start + _KNOWN_CHUNK)).fetchone()
                known[Listing.ACTIVE].update(orjson.loads(active))
                known[Listing.ARCHIVED].update(orjson.loads(archived))
        return known

    def counts_by_status(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT status, count(*) FROM customers GROUP BY status").fetchall())

    def count_customers(self) -> int:
        (rows,) = self._db.execute("SELECT count(*) FROM customers").fetchone()  # from the id index
        return int(rows)

    # -- staging --------------------------------------------------------------------------------

    def create_staging(self) -> None:
        self._db.execute(_STAGED_DDL)
        self._db.execute("DELETE FROM temp.poll_staged")

    def stage(self, rows: Sequence[Sighting]) -> None:
        """Append sightings to the staging table (in a transaction that takes no database lock)."""
        per_statement = min(STATEMENT_ROWS, self._max_params // 4)
        with self.transaction("DEFERRED"):
            for i in range(0, len(rows), per_statement):
                chunk = rows[i : i + per_statement]
                self._db.execute(_insert_staged_sql(len(chunk)), tuple(chain.from_iterable(chunk)))

    def index_staging(self) -> None:
        """Index the staged rows by customer, once the scan is over (before the write lock is taken)."""
        with self.transaction("DEFERRED"):
            self._db.execute("CREATE INDEX IF NOT EXISTS temp.staged_by_id ON poll_staged (customer_id)")

    def staged_stored(self) -> list[tuple[str, str, int]]:
        """(id, status, fingerprint) of the stored, not deleted, customers among the staged ones."""
        return self._rows(
            "SELECT id, status, hash FROM customers WHERE status != 'deleted' AND id IN "
            "(SELECT customer_id FROM temp.poll_staged)"
        )

    def with_fingerprints(self, fingerprints: Iterable[int]) -> list[tuple[str, str, int]]:
        """(id, status, fingerprint) of the stored, not deleted, customers with these fingerprints."""
        # One pass over the table (SQLite builds a transient index over the JSON array's values): it
        # only runs when customers vanished, and needs no index of the table's own.
        return self._rows(
            "SELECT id, status, hash FROM customers WHERE status != 'deleted' "
            "AND hash IN (SELECT value FROM json_each(?))",
            (orjson.dumps(list(fingerprints)).decode(),),
        )

    def chosen_staged(self, after_id: str, limit: int) -> list[tuple[str, int, int, bytes, int]]:
        """Up to ``limit`` staged customers after ``after_id``, in id order, one sighting each."""
        return self._rows(_CHOSEN_STAGED, (after_id, limit))

    # -- the final transaction ------------------------------------------------------------------

    def load_states(self, ids: Sequence[str]) -> dict[str, StoredState]:
        rows = self._db.execute(
            "SELECT id, status, record, first_seen_at, changed_at, hash FROM customers "
            f"WHERE id IN ({', '.join('?' * len(ids))})",
            tuple(ids),
        )
        return {r[0]: r[1:] for r in rows}

    def upsert_states(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """(id, status, fingerprint, record, first_seen_at, changed_at, poll id) for each customer."""
        self._db.executemany(_UPSERT_STATE, rows)

    def mark_deleted(self, ids: Sequence[str], *, detected_at: str, poll_id: int) -> None:
        self._db.execute(
            f"UPDATE customers SET status = ?, changed_at = ?, last_poll_id = ? "
            f"WHERE id IN ({', '.join('?' * len(ids))})",
            (CustomerStatus.DELETED, detected_at, poll_id, *ids),
        )

    def baseline_writer(self, *, detected_at: str, poll_id: int) -> SqliteBaselineWriter:
        """A writer for a silent baseline into an empty store; see :class:`SqliteBaselineWriter`."""
        return SqliteBaselineWriter(self, detected_at=detected_at, poll_id=poll_id)


class SqliteBaselineWriter:
    """Writes a silent baseline's sightings straight into ``customers``, from a thread of its own.

    A baseline into an empty store has nothing to diff against, so its rows need no staging. One
    multi-row INSERT is one SQLite step, and SQLite releases the GIL for all of it: on this thread
    the account is written on the other core while it is still being fetched. The session must not
    be used by anyone else until :meth:`finish` or :meth:`stop` returned.
    """

    def __init__(self, session: SqliteCycleSession, *, detected_at: str, poll_id: int) -> None:
        self._session = session
        self._db = session._db
        self._params = (detected_at, poll_id)
        self._per_statement = min(STATEMENT_ROWS, (session._max_params - 2) // 4)
        #: One multi-row statement's worth per call.
        self.batch_rows = STATEMENT_ROWS
        # A bounded backlog: flat memory, and back-pressure if the disk is slower than the API.
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue(maxsize=16)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="baseline-writer")
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is None:  # after a failure, only drain
                try:
                    self._db.execute(*item)
                except BaseException as exc:
                    self.error = exc

    def _submit(self, sql: str, params: tuple[Any, ...]) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put((sql, params))

    def set_cache(self, kib: int) -> None:
        self._submit(f"PRAGMA cache_size = -{kib}", ())

    def insert(self, rows: Sequence[Sighting]) -> None:
        for i in range(0, len(rows), self._per_statement):
            chunk = rows[i : i + self._per_statement]
            self._submit(_insert_customers_sql(len(chunk)), (*self._params, *chain.from_iterable(chunk)))

    def finish(self) -> None:
        """Wait until everything submitted is written; raise what failed, if anything did."""
        self.stop()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
