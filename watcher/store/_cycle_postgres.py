"""The sources' sessions on PostgreSQL, and every statement the customers' cycle runs on it there.

The same named methods as SQLite's sessions (:mod:`watcher.store.cycle`), with PostgreSQL's tools
(the plans' session, :mod:`watcher.store._plans_postgres`, builds on :class:`PostgresSourceSession`
the same way):

- **One transaction for a source's read.** The staging table is ``TEMP ... ON COMMIT DROP``,
  created in a transaction that stays open from the scan to the commit: nothing of the read lives
  in the session between transactions, so a source works through a transaction-mode pooler
  (PgBouncer) as well as on a direct connection, and a failed read's staging is gone with its
  rollback. Temp tables are not WAL-logged, and nothing another connection sees is written before
  the commit.
- **COPY** (binary) fills the staging table, the events and the outbox rows; a silent baseline is
  copied into a staging table of its own while it is fetched and lands in ``customers`` with one
  ``INSERT ... SELECT DISTINCT ON`` (the archived sighting wins, else the latest, as on SQLite).
- Sets of ids and fingerprints travel as one array parameter (``= ANY(%s)``), and the stored
  fingerprints load as two JSON arrays built by the server and parsed by orjson.

The psycopg connection beneath the SQLAlchemy one is used directly, inside transactions that
SQLAlchemy begins and commits (so that the fence, :func:`watcher.store.lease.check`, runs on the
same transaction).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from typing import TYPE_CHECKING, Any, cast

import orjson
from sqlalchemy import Connection, Engine, RootTransaction, TextClause

from ..events import CustomerStatus, EventRow, Listing, OutboxEntry, PollOutcome, Source
from .cycle import Sighting, StoredState
from .lease import Fence, check

if TYPE_CHECKING:  # imported by SQLAlchemy's dialect when a PostgreSQL engine is made (an extra)
    import psycopg

__all__ = ["PostgresBaselineWriter", "PostgresCycleSession", "PostgresSourceSession"]

_STAGED_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS poll_staged (seq bigserial, customer_id text NOT NULL, "
    "archived boolean NOT NULL, hash bigint NOT NULL, record bytea NOT NULL) ON COMMIT DROP"
)
_COPY_STAGED = "COPY poll_staged (customer_id, archived, hash, record) FROM STDIN (FORMAT BINARY)"
_STAGED_TYPES = ["text", "bool", "int8", "bytea"]
#: One staged row per customer, in id order: its archived sighting if it has one, else its latest.
_CHOSEN_STAGED = (
    "SELECT DISTINCT ON (customer_id) customer_id, archived, hash, record, seq FROM poll_staged "
    "WHERE customer_id > %s ORDER BY customer_id, archived DESC, seq DESC LIMIT %s"
)
_LOAD_KNOWN = (
    "SELECT coalesce(json_agg(hash) FILTER (WHERE status = 'active'), '[]')::text, "
    "coalesce(json_agg(hash) FILTER (WHERE status = 'archived'), '[]')::text FROM customers"
)
_UPSERT_STATE = (
    "INSERT INTO customers (id, status, hash, record, first_seen_at, changed_at, last_poll_id) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
    "hash = excluded.hash, record = excluded.record, first_seen_at = excluded.first_seen_at, "
    "changed_at = excluded.changed_at, last_poll_id = excluded.last_poll_id"
)
_COPY_EVENTS = (
    "COPY events (sequence, id, type, customer_id, poll_id, detected_at, payload) FROM STDIN (FORMAT BINARY)"
)
_EVENT_TYPES = ["int4", "text", "text", "text", "int4", "text", "text"]
_COPY_OUTBOX = (
    "COPY outbox (sequence, sink, status, attempts, created_at, next_attempt_at) FROM STDIN (FORMAT BINARY)"
)
_OUTBOX_TYPES = ["int4", "text", "text", "int4", "text", "text"]

_BASELINE_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS baseline_staged (seq bigserial, customer_id text NOT NULL, "
    "archived boolean NOT NULL, hash bigint NOT NULL, record bytea NOT NULL) ON COMMIT DROP"
)
_COPY_BASELINE = "COPY baseline_staged (customer_id, archived, hash, record) FROM STDIN (FORMAT BINARY)"
_INSERT_BASELINE = (
    "INSERT INTO customers (id, status, hash, record, first_seen_at, changed_at, last_poll_id) "
    "SELECT DISTINCT ON (customer_id) customer_id, "
    "CASE WHEN archived THEN 'archived' ELSE 'active' END, hash, convert_from(record, 'UTF8'), "
    "%(at)s, %(at)s, %(poll)s FROM baseline_staged ORDER BY customer_id, archived DESC, seq DESC"
)


class PostgresSourceSession:
    """A source's connection for one poll, from the store's pool and back to it when closed (its
    temporary tables go with the read's transaction, so nothing of the read stays on it). Not
    thread-safe: one thread at a time, as a source uses it."""

    def __init__(self, engine: Engine, *, write_lock: TextClause, fence: Fence | None) -> None:
        conn = engine.connect()
        self._conn = conn
        self._db = cast("psycopg.Connection[Any]", conn.connection.dbapi_connection)
        self._write_lock: TextClause = write_lock
        #: The lease this cycle began under (``Store.fence`` when the session opened).
        self._fence: Fence | None = fence
        self._tx: RootTransaction | None = None
        #: The transaction stays open across ``transaction()`` blocks (it holds the staging).
        self._held: bool = False
        #: The open transaction holds the writers' lock.
        self._locked: bool = False

    def close(self) -> None:
        tx, self._tx = self._tx, None
        if tx is not None and tx.is_active:
            tx.rollback()  # a cycle that did not commit: its staging goes with it
        self._conn.close()

    # -- transactions ---------------------------------------------------------------------------

    def _begin(self) -> None:
        if self._tx is None:
            self._tx = self._conn.begin()

    def _end(self, *, commit: bool) -> None:
        tx, self._tx = self._tx, None
        self._held = False
        self._locked = False
        if tx is not None:
            if commit:
                tx.commit()
            else:
                tx.rollback()

    @contextmanager
    def transaction(self, mode: str = "DEFERRED") -> Iterator[Connection]:
        """A transaction, or a part of the one that is open (see the module): ``IMMEDIATE`` takes
        the writer's lock and commits everything the open transaction holds, fenced."""
        outer = self._tx is not None
        self._begin()
        immediate = mode == "IMMEDIATE" and not self._locked
        try:
            if immediate:
                if self._fence is not None and self._fence.epoch is None:
                    check(self._conn, self._fence)  # raises: not the leader
                self._conn.execute(self._write_lock)
                self._locked = True
            yield self._conn
            if immediate:
                if self._fence is not None:
                    check(self._conn, self._fence)
                self._end(commit=True)
            elif not outer and not self._held:
                self._end(commit=True)
        except BaseException:
            if immediate or not outer:
                self._end(commit=False)
            raise

    def _cur(self) -> psycopg.Cursor[Any]:
        self._begin()
        return self._db.cursor()

    def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        with self._cur() as cur:
            return cur.execute(sql, params).fetchall()  # type: ignore[arg-type]

    def _one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        with self._cur() as cur:
            return cur.execute(sql, params).fetchone()  # type: ignore[arg-type]

    def tune(self, *, cache_kib: int) -> None:
        """Nothing to tune: the server's buffer cache is shared, and settings stay per transaction."""

    def set_cache(self, kib: int) -> None:
        pass

    def last_sequence(self) -> int:
        return int(self._one("SELECT coalesce(max(sequence), 0) FROM events")[0])

    def append_events(self, events: Sequence[EventRow], outbox: Sequence[OutboxEntry]) -> None:
        with self._cur() as cur:
            if events:
                with cur.copy(_COPY_EVENTS) as copy:
                    copy.set_types(_EVENT_TYPES)
                    for e in events:
                        copy.write_row(e)
            if outbox:
                with cur.copy(_COPY_OUTBOX) as copy:
                    copy.set_types(_OUTBOX_TYPES)
                    for o in outbox:
                        copy.write_row((o.sequence, o.sink, "pending", 0, o.created_at, o.created_at))


class PostgresCycleSession(PostgresSourceSession):
    """The customers' cycle: its connection (see :class:`PostgresSourceSession`) and every statement
    it runs."""

    # -- the poll run ---------------------------------------------------------------------------

    def begin_poll(self, now: str) -> int:
        """Record a running poll; a run left running belongs to a process that died mid-cycle."""
        with self.transaction("IMMEDIATE"):
            with self._cur() as cur:
                cur.execute(
                    "UPDATE poll_runs SET outcome = %s, finished_at = %s, "
                    "error = 'process ended during the cycle' WHERE outcome = %s",
                    (PollOutcome.ABANDONED, now, PollOutcome.RUNNING),
                )
                row = cur.execute(
                    "INSERT INTO poll_runs (started_at, outcome, baseline, pages, active, archived, "
                    "events, events_by_type) VALUES (%s, %s, false, 0, 0, 0, 0, '{}') RETURNING id",
                    (now, PollOutcome.RUNNING),
                ).fetchone()
            assert row is not None
            return int(row[0])

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
        the poll as succeeded, else its outcome is left to the source that finishes last."""
        by_type = orjson.dumps(events_by_type).decode()
        events = sum(events_by_type.values())
        with self._cur() as cur:
            cur.execute(
                "INSERT INTO poll_sources (poll_id, source, outcome, finished_at, baseline, pages, items, "
                "events, events_by_type) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
            cur.execute(
                "UPDATE poll_runs SET outcome = %s, finished_at = %s, baseline = %s, pages = %s, "
                "active = %s, archived = %s, events = %s, events_by_type = %s WHERE id = %s",
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
        return (
            self._one(
                "SELECT 1 FROM poll_sources WHERE source = %s AND outcome = %s LIMIT 1",
                (Source.CUSTOMERS, PollOutcome.SUCCEEDED),
            )
            is not None
        )

    def is_empty(self) -> bool:
        return self._one("SELECT 1 FROM customers LIMIT 1") is None

    def page_memo(self) -> list[tuple[Listing, bool, bytes]]:
        return [
            (Listing(int(archived)), bool(complete), bytes(blob))
            for archived, complete, blob in self._rows("SELECT archived, complete, pages FROM page_memo")
        ]

    def save_page_memo(self, listing: Listing, *, complete: bool, pages: bytes) -> None:
        with self._cur() as cur:
            cur.execute(
                "INSERT INTO page_memo (archived, complete, pages) VALUES (%s, %s, %s) "
                "ON CONFLICT (archived) DO UPDATE SET complete = excluded.complete, pages = excluded.pages",
                (bool(listing), complete, pages),
            )

    def stored_fingerprints(self) -> dict[Listing, set[int]]:
        active, archived = self._one(_LOAD_KNOWN)
        return {Listing.ACTIVE: set(orjson.loads(active)), Listing.ARCHIVED: set(orjson.loads(archived))}

    def counts_by_status(self) -> dict[str, int]:
        return {s: int(n) for s, n in self._rows("SELECT status, count(*) FROM customers GROUP BY status")}

    def count_customers(self) -> int:
        return int(self._one("SELECT count(*) FROM customers")[0])

    # -- staging --------------------------------------------------------------------------------

    def create_staging(self) -> None:
        """The staging table, in a transaction held open until the cycle commits (or fails)."""
        with self._cur() as cur:
            cur.execute(_STAGED_DDL)
            cur.execute("TRUNCATE poll_staged")
        self._held = True

    def stage(self, rows: Sequence[Sighting]) -> None:
        with self.transaction("DEFERRED"), self._cur() as cur, cur.copy(_COPY_STAGED) as copy:
            copy.set_types(_STAGED_TYPES)
            for row in rows:
                copy.write_row(row)

    def index_staging(self) -> None:
        with self.transaction("DEFERRED"), self._cur() as cur:
            cur.execute("CREATE INDEX ON poll_staged (customer_id)")
            cur.execute("ANALYZE poll_staged")  # temporary tables are never analysed by autovacuum

    def staged_stored(self) -> list[tuple[str, str, int]]:
        return self._rows(
            "SELECT id, status, hash FROM customers WHERE status <> 'deleted' AND id IN "
            "(SELECT customer_id FROM poll_staged)"
        )

    def with_fingerprints(self, fingerprints: Iterable[int]) -> list[tuple[str, str, int]]:
        return self._rows(
            "SELECT id, status, hash FROM customers WHERE status <> 'deleted' AND hash = ANY(%s::bigint[])",
            (list(fingerprints),),
        )

    def chosen_staged(self, after_id: str, limit: int) -> list[tuple[str, int, int, bytes, Any]]:
        return self._rows(_CHOSEN_STAGED, (after_id, limit))

    # -- the final transaction ------------------------------------------------------------------

    def load_states(self, ids: Sequence[str]) -> dict[str, StoredState]:
        rows = self._rows(
            "SELECT id, status, record, first_seen_at, changed_at, hash FROM customers WHERE id = ANY(%s)",
            (list(ids),),
        )
        return {r[0]: tuple(r[1:]) for r in rows}  # type: ignore[misc]

    def upsert_states(self, rows: Sequence[tuple[Any, ...]]) -> None:
        with self._cur() as cur:
            cur.executemany(_UPSERT_STATE, rows)

    def mark_deleted(self, ids: Sequence[str], *, detected_at: str, poll_id: int) -> None:
        with self._cur() as cur:
            cur.execute(
                "UPDATE customers SET status = %s, changed_at = %s, last_poll_id = %s WHERE id = ANY(%s)",
                (CustomerStatus.DELETED, detected_at, poll_id, list(ids)),
            )

    def baseline_writer(self, *, detected_at: str, poll_id: int) -> PostgresBaselineWriter:
        return PostgresBaselineWriter(self, detected_at=detected_at, poll_id=poll_id)


class PostgresBaselineWriter:
    """A silent baseline, copied into a temporary table as it is fetched (one ``COPY`` for the whole
    scan: the server takes the rows in while the next pages are fetched), then moved into
    ``customers`` by :meth:`finish`, one row per customer. Works in the session's open transaction."""

    #: Sightings per ``insert``: the COPY streams them, so this only sizes the cycle's buffer.
    batch_rows = 1000

    def __init__(self, session: PostgresCycleSession, *, detected_at: str, poll_id: int) -> None:
        self._session = session
        self._params = {"at": detected_at, "poll": poll_id}
        self.error: BaseException | None = None
        self._stack = ExitStack()
        cur = self._stack.enter_context(session._cur())
        cur.execute(_BASELINE_DDL)
        self._copy = self._stack.enter_context(cur.copy(_COPY_BASELINE))
        self._copy.set_types(_STAGED_TYPES)
        self._open = True

    def set_cache(self, kib: int) -> None:
        pass

    def insert(self, rows: Sequence[Sighting]) -> None:
        if self.error is not None:
            raise self.error
        try:
            for row in rows:
                self._copy.write_row(row)
        except BaseException as exc:
            self.error = exc
            raise

    def finish(self) -> None:
        if self.error is not None:
            raise self.error
        self._open = False
        self._stack.close()  # ends the COPY
        with self._session._cur() as cur:
            cur.execute("SET LOCAL work_mem = '64MB'")  # the DISTINCT ON sort, in memory
            cur.execute(_INSERT_BASELINE, self._params)

    def stop(self) -> None:
        if self._open:
            self._open = False
            with suppress(Exception):  # the transaction is rolled back anyway
                self._stack.__exit__(RuntimeError, RuntimeError("baseline stopped"), None)
