"""The database: opened, created or migrated, and its transactions, on SQLite or PostgreSQL.

``Store(path)`` is a SQLite file (the default: one file, WAL, see :mod:`watcher.store._sqlite`);
``Store("postgresql://...")`` a PostgreSQL database (:mod:`watcher.store._postgres`), which several
``run`` replicas may share. Both have the same tables and migrations (:mod:`watcher.store.schema`),
the same statements (:mod:`watcher.store.queries`) and the same promises: a writer's transaction
queues behind every other writer's, and what it writes lands together or not at all.

Every database error leaves the store as a :class:`~watcher.errors.StoreError` that says what
happened in an operator's words (:mod:`watcher.store._errors`), and a database that is not the
watcher's is refused before anything is written to it (:mod:`watcher.store._marker`).

When the store is fenced (``fence``, set by :class:`~watcher.store.lease.LeaseKeeper` on a
replica), every write transaction proves at its commit that this process still holds the leader
lease at the epoch it began with, and rolls back with :class:`~watcher.errors.NotLeader` otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine
from sqlmodel import SQLModel

from ..config import is_postgres_url
from ..errors import NotLeader, StoreError
from . import _marker, queries
from ._errors import guarded, translating
from ._postgres import PostgresEngine
from ._sqlite import SqliteEngine
from .cycle import CycleSession
from .lease import Fence, check
from .plans import PlanSession
from .schema import MIGRATIONS, SCHEMA_VERSION, CustomerState, PollRun

__all__ = ["Store"]


class Store:
    """Open (and create or migrate) the database at ``target``: a SQLite file's path, or a
    ``postgresql://`` URL."""

    def __init__(self, target: str | Path, *, busy_timeout: float = 30.0) -> None:
        self._db: SqliteEngine | PostgresEngine
        if is_postgres_url(target):
            self._db = PostgresEngine(str(target))
        else:
            self._db = SqliteEngine(Path(target), busy_timeout=busy_timeout)
        self.engine: Engine = self._db.engine
        #: The SQLite file; None for PostgreSQL.
        self.path: Path | None = self._db.path
        #: What every write must prove at commit (see the module); None: nothing.
        self.fence: Fence | None = None
        try:
            self._ensure_schema()
        except BaseException:
            self._db.close()
            raise

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._db.dialect

    @property
    def description(self) -> str:
        """The file, or the URL without its password: how logs and messages name the store."""
        return self._db.description

    @property
    def replicated(self) -> bool:
        """True when several processes may share the store (PostgreSQL): leadership is a lease."""
        return self._db.dialect == "postgresql"

    def close(self) -> None:
        """Close the store, letting a SQLite checkpoint in progress finish first (a few seconds)."""
        with translating(self._db.where):
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request_checkpoint(self) -> None:
        """SQLite: have the WAL copied back into the database file soon, on a thread of the store's
        own (the poll cycle asks after each commit; see :mod:`watcher.store._checkpoint`)."""
        self._db.request_checkpoint()

    def wait_for_checkpoint(self, timeout: float | None = None) -> bool:
        """Wait until the checkpoints requested so far have run; False on timeout."""
        return self._db.wait_for_checkpoint(timeout)

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: it queues behind other writers at once (SQLite's ``BEGIN
        IMMEDIATE``, a lock of the schema on PostgreSQL), and is fenced when the store is."""
        fence = self.fence
        if fence is not None and fence.epoch is None:
            raise NotLeader("this replica does not hold the leader lease: it writes nothing")
        with translating(self._db.where), self.engine.connect() as conn:
            conn = conn.execution_options(watcher_begin="IMMEDIATE")
            with conn.begin():
                self._db.begin_write(conn)
                yield conn
                if fence is not None:
                    check(conn, fence)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with translating(self._db.where), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def cycle(self) -> Iterator[CycleSession]:
        """A poll cycle's own connection (see :class:`~watcher.store.cycle.CycleSession`).

        SQLite: a checkpoint is asked for before it closes, so that the store's checkpointer has
        its own connection open by then and this one's closing is not a checkpoint of the WAL.
        """
        db = self._db
        with translating(db.where):
            session: CycleSession = db.session(self.fence)
            try:
                yield session
            finally:
                try:
                    self.request_checkpoint()
                finally:
                    session.close()

    def plan_session(self) -> PlanSession:
        """The plans source's own connection for one poll (see :class:`~watcher.store.plans.PlanSession`);
        the caller closes it, after :meth:`request_checkpoint` when it committed. Its database errors
        are translated as the other transactions' are."""
        with translating(self._db.where):
            return guarded(self._db.plan_session(self.fence), self._db.where)

    # -- reads that are a transaction of their own ----------------------------------------------

    def schema_version(self) -> int:
        with self.read() as conn:
            return queries.schema_version(conn)

    def has_baseline(self) -> bool:
        """True once any poll has succeeded: only then are differences changes."""
        with self.read() as conn:
            return queries.has_baseline(conn)

    def last_polls(self, limit: int = 10) -> list[PollRun]:
        with self.read() as conn:
            return queries.last_polls(conn, limit)

    def failed_sources(self, poll_id: int) -> tuple[str, ...]:
        """The sources a poll of more than one source failed on; () otherwise."""
        with self.read() as conn:
            return queries.failed_sources_of(conn, poll_id)

    def last_successful_poll(self) -> PollRun | None:
        with self.read() as conn:
            return queries.last_successful_poll(conn)

    def customer_counts(self) -> dict[str, int]:
        with self.read() as conn:
            return queries.customer_counts(conn)

    def plan_counts(self) -> tuple[int, int, int]:
        """(plans whose members are watched, memberships held, of which ended)."""
        with self.read() as conn:
            return queries.plan_counts(conn)

    def get_customer(self, customer_id: str) -> CustomerState | None:
        with self.read() as conn:
            return queries.get_customer(conn, customer_id)

    def query_events(self, **filters: Any) -> list[dict[str, Any]]:
        """Audit events in ``sequence`` order, as v1 contract dicts (see :func:`queries.query_events`)."""
        with self.read() as conn:
            return queries.query_events(conn, **filters)

    def event_page(self, **filters: Any) -> queries.EventPage:
        """A page of the audit log, newest first (see :func:`queries.event_page`)."""
        with self.read() as conn:
            return queries.event_page(conn, **filters)

    def delivery_status(self, now: datetime, *, sinks: Sequence[str] = ()) -> list[queries.SinkStatus]:
        """Per sink: pending, delivered and dead counts, oldest pending age and the last error."""
        with self.read() as conn:
            return queries.delivery_status(conn, now, sinks=sinks)

    # -- internals ------------------------------------------------------------------------------

    def _ensure_schema(self) -> None:
        # A write transaction: two processes opening a new database at once create it once. Nothing
        # is written before the database is known to be ours (or empty).
        with self.write() as conn:
            facts = _marker.facts_of(conn)
            if _marker.judge(facts) is _marker.Ownership.FOREIGN:
                setting = "path" if self.dialect == "sqlite" else "url"
                raise _marker.refusal(self.description, facts, setting=setting)
            current = queries.schema_version(conn)
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.description} has schema version {current}, newer than this "
                    f"release understands ({SCHEMA_VERSION}); upgrade metronome-watcher"
                )
            if current == 0:
                SQLModel.metadata.create_all(conn)
            else:
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[version](conn)
            if current != SCHEMA_VERSION:
                queries.set_schema_version(conn, SCHEMA_VERSION)
            if facts.needs_marking:
                _marker.mark(conn, facts)
