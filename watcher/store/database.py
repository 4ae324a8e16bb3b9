"""The database: one SQLite file (WAL) opened, created or migrated, and its transactions.

One file holds everything so that a single transaction can cover a whole cycle (DESIGN rule 5):
the new state of every changed customer, its audit events and one outbox row per (event, sink)
land together or not at all. WAL mode lets ``events`` and ``status`` read while the daemon
writes; writers take the lock up front (``BEGIN IMMEDIATE``) so that two writers queue politely
instead of failing half-way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import SQLModel, create_engine

from ..errors import StoreError
from . import queries
from ._checkpoint import Checkpointer
from .cycle import CycleSession
from .plans import PlanSession
from .schema import MIGRATIONS, SCHEMA_VERSION, CustomerState, PollRun

__all__ = ["Store"]

log = structlog.get_logger("watcher.store")

#: Bytes the WAL file is truncated back to after a checkpoint has emptied it.
_WAL_SIZE_LIMIT = 16 * 1024 * 1024
#: How long :meth:`Store.close` lets a checkpoint in progress run (the daemon exits within 10 s).
_CLOSE_CHECKPOINT_WAIT = 5.0


class Store:
    """Open (and create or migrate) the database at ``path``."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                f"sqlite:///{self.path}",
                connect_args={"check_same_thread": False, "timeout": busy_timeout},
            )
        except (OSError, SQLAlchemyError) as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc
        event.listen(self.engine, "connect", _on_connect)
        event.listen(self.engine, "begin", _on_begin)
        self._checkpointer = Checkpointer(self.path, lambda db: _on_connect(db, None))
        try:
            self._ensure_schema()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open database {self.path}: {exc.__class__.__name__}: {exc}") from exc

    def close(self) -> None:
        """Close the store, letting a checkpoint in progress finish first (up to a few seconds)."""
        if not self._checkpointer.close(timeout=_CLOSE_CHECKPOINT_WAIT):
            log.warning("store.checkpoint_unfinished", waited_s=_CLOSE_CHECKPOINT_WAIT)
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request_checkpoint(self) -> None:
        """Have the WAL copied back into the database file soon, on a thread of the store's own.

        The poll cycle asks for one after each commit instead of checkpointing in it; see
        :mod:`watcher.store._checkpoint`.
        """
        self._checkpointer.request()

    def wait_for_checkpoint(self, timeout: float | None = None) -> bool:
        """Wait until the checkpoints requested so far have run; False on timeout."""
        return self._checkpointer.wait(timeout)

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction that takes SQLite's write lock at once (``BEGIN IMMEDIATE``)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(watcher_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def cycle(self) -> Iterator[CycleSession]:
        """A poll cycle's own connection (see :class:`~watcher.store.cycle.CycleSession`).

        A checkpoint is asked for before it closes, so that the store's checkpointer has its own
        connection open by then and this one's closing is not a checkpoint of the whole WAL.
        """
        session = CycleSession(self.engine)
        try:
            yield session
        finally:
            try:
                self.request_checkpoint()
            finally:
                session.close()

    def plan_session(self) -> PlanSession:
        """The plans source's own connection for one poll (see :class:`~watcher.store.plans.PlanSession`);
        the caller closes it, after :meth:`request_checkpoint` when it committed."""
        return PlanSession(self.engine)

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
        with self.write() as conn:
            current = queries.schema_version(conn)
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.path} has schema version {current}, newer than this release "
                    f"understands ({SCHEMA_VERSION}); upgrade metronome-watcher"
                )
            if current == 0:
                SQLModel.metadata.create_all(conn)
            else:
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[version](conn)
            if current != SCHEMA_VERSION:
                queries.set_schema_version(conn, SCHEMA_VERSION)


def _on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Let us issue BEGIN ourselves (pysqlite's implicit transactions are not what we want).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed cycle is the audit log; it must survive a power cut, and we commit rarely.
    cur.execute("PRAGMA synchronous=FULL")
    # A baseline writes the whole account in one transaction, so the WAL grows to about the size
    # of the database; without a limit the file would keep that size for as long as the daemon runs.
    cur.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _on_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("watcher_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")
