"""The store: current state, poll history, the append-only audit log and the outbox, in SQLite.

One file holds everything so that a single transaction can cover a whole cycle (DESIGN rule 5):
the new state of every changed customer, its audit events and one outbox row per
(event, sink) land together or not at all. WAL mode lets ``events`` and ``status`` read while the
daemon writes; writers take the lock up front (``BEGIN IMMEDIATE``) so that two writers queue
politely instead of failing half-way.

Tables are SQLModel models; the hot paths use SQLAlchemy Core on the same tables because a
baseline of 100k customers must not build 100k ORM objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import structlog
import xxhash
from sqlalchemy import Connection, Engine, Index, UniqueConstraint, event, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Field, SQLModel, col, create_engine

from ._checkpoint import Checkpointer
from .errors import StoreError

log = structlog.get_logger("watcher.store")

__all__ = [
    "SCHEMA_VERSION",
    "CustomerState",
    "EventRecord",
    "Meta",
    "OutboxRow",
    "PageMemo",
    "PollRun",
    "SinkState",
    "Store",
    "canonical",
    "record_hash",
]

#: Bump when the schema changes, and add a step to ``_MIGRATIONS`` that brings version N-1 to N.
SCHEMA_VERSION = 3


def canonical(record: Any) -> bytes:
    """The record as compact JSON with sorted keys: key order never matters (rule 4)."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def record_hash(data: bytes) -> int:
    """A 63-bit fingerprint of canonical JSON: XXH3-64 without its lowest bit, so that it fits
    SQLite's signed INTEGER as it is and the poll cycle can compute it with builtins alone.

    It only has to tell "same record" from "changed record" (a collision would hide one change
    with odds of 2**-63 per change), not resist forgery: the records come from the operator's own
    Metronome account. A fast hash matters because every customer is hashed every cycle.
    """
    return xxhash.xxh3_64_intdigest(data) >> 1


class Meta(SQLModel, table=True):
    __tablename__ = "meta"
    key: str = Field(primary_key=True)
    value: str


class CustomerState(SQLModel, table=True):
    """The last committed picture of one customer."""

    __tablename__ = "customers"
    id: str = Field(primary_key=True)
    status: str  # "active" | "archived" | "deleted"
    hash: int
    record: str  # canonical JSON, as Metronome last returned it
    first_seen_at: str
    changed_at: str
    last_poll_id: int


class PageMemo(SQLModel, table=True):
    """The fingerprints of every listing page the last successful poll saw, one row per listing,
    by the page's digest (``client.ListingPage.digest``): a page seen again byte for byte needs no
    fingerprinting, nor parsing (see ``watcher._memo``). Written in the poll's own transaction.
    Clear it whenever ``record_hash`` changes, the client's checks of a listing page get stricter
    (a page in the memo passed the checks of its day, and is not checked again), or anything but a
    poll changes ``customers``.
    """

    __tablename__ = "page_memo"
    archived: bool = Field(primary_key=True)
    #: The last successful poll saw every stored customer exactly once, on these pages: their
    #: fingerprints are the stored fingerprints (see ``watcher._memo``).
    complete: bool
    #: The listing's pages in order, each as its 16-byte digest, its number of records (4 bytes,
    #: little-endian) and the ``record_hash`` of each record (8 bytes each, little-endian).
    pages: bytes


class PollRun(SQLModel, table=True):
    __tablename__ = "poll_runs"
    id: int | None = Field(default=None, primary_key=True)
    started_at: str = Field(index=True)
    finished_at: str | None = None
    #: running | succeeded | failed | refused | abandoned
    outcome: str = Field(default="running", index=True)
    baseline: bool = False
    pages: int = 0
    active: int = 0
    archived: int = 0
    events: int = 0
    #: JSON object: event counts by type
    events_by_type: str = "{}"
    error: str | None = None


class EventRecord(SQLModel, table=True):
    """The audit log. ``payload`` is the v1 event contract, exactly as every sink receives it."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_customer_sequence", "customer_id", "sequence"),
        Index("ix_events_type_sequence", "type", "sequence"),
    )
    sequence: int = Field(primary_key=True)
    id: str = Field(unique=True)
    type: str
    customer_id: str | None = None
    poll_id: int | None = None
    detected_at: str = Field(index=True)
    payload: str


class OutboxRow(SQLModel, table=True):
    """One delivery of one event to one sink."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("sequence", "sink"),
        Index("ix_outbox_sink_status_sequence", "sink", "status", "sequence"),
    )
    id: int | None = Field(default=None, primary_key=True)
    sequence: int = Field(foreign_key="events.sequence")
    sink: str
    #: pending | delivered | dead
    status: str = "pending"
    attempts: int = 0
    created_at: str
    next_attempt_at: str
    last_attempt_at: str | None = None
    delivered_at: str | None = None
    last_error: str | None = None


class SinkState(SQLModel, table=True):
    """Per-sink delivery state that outlives a process: back-off after failures, and disabling."""

    __tablename__ = "sink_state"
    name: str = Field(primary_key=True)
    disabled: bool = False
    disabled_reason: str | None = None
    consecutive_failures: int = 0
    next_attempt_at: str | None = None
    last_error: str | None = None


#: version -> the step that upgrades a database from version-1 to version.
_MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


def _migrate_to_2(conn: Connection) -> None:
    """Version 2 fingerprints with XXH3 instead of BLAKE2b (``record_hash``). The stored records
    are canonical JSON, so the new fingerprints are computed from them, in one statement; without
    this the next cycle would find every customer "changed" and rewrite the whole table."""
    db = conn.connection.dbapi_connection
    assert db is not None
    db.create_function("watcher_record_hash", 1, lambda r: record_hash(r.encode()), deterministic=True)
    conn.exec_driver_sql("UPDATE customers SET hash = watcher_record_hash(record)")


_MIGRATIONS[2] = _migrate_to_2


def _migrate_to_3(conn: Connection) -> None:
    """Version 3 remembers the fingerprints of the pages last seen (``PageMemo``)."""
    PageMemo.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


_MIGRATIONS[3] = _migrate_to_3


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

    def request_checkpoint(self) -> None:
        """Have the WAL copied back into the database file soon, on a thread of the store's own.

        The poll cycle asks for one after each commit instead of checkpointing in it; see
        :mod:`watcher._checkpoint`.
        """
        self._checkpointer.request()

    def wait_for_checkpoint(self, timeout: float | None = None) -> bool:
        """Wait until the checkpoints requested so far have run; False on timeout."""
        return self._checkpointer.wait(timeout)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def schema_version(self) -> int:
        with self.read() as conn:
            v = conn.execute(select(col(Meta.value)).where(col(Meta.key) == "schema_version")).scalar()
        return int(v) if v is not None else 0

    def _ensure_schema(self) -> None:
        with self.write() as conn:
            has_meta = conn.exec_driver_sql(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
            ).first()
            current = 0
            if has_meta:
                v = conn.exec_driver_sql("SELECT value FROM meta WHERE key='schema_version'").scalar()
                current = int(v) if v is not None else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.path} has schema version {current}, newer than this release "
                    f"understands ({SCHEMA_VERSION}); upgrade metronome-watcher"
                )
            if current == 0:
                SQLModel.metadata.create_all(conn)
            else:
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    _MIGRATIONS[version](conn)
            if current != SCHEMA_VERSION:
                conn.exec_driver_sql(
                    "INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (str(SCHEMA_VERSION),),
                )

    # -- small queries shared by the CLI and the daemon ---------------------------------------

    def has_baseline(self, conn: Connection | None = None) -> bool:
        """True once any poll has succeeded: only then are differences changes."""
        # One row is enough (a daemon that polls every few minutes has a long history to count).
        q = "SELECT 1 FROM poll_runs WHERE outcome = 'succeeded' LIMIT 1"
        if conn is not None:
            return conn.exec_driver_sql(q).first() is not None
        with self.read() as c:
            return c.exec_driver_sql(q).first() is not None

    def last_polls(self, limit: int = 10) -> list[PollRun]:
        with self.read() as conn:
            rows = conn.execute(select(PollRun).order_by(PollRun.id.desc()).limit(limit)).all()  # type: ignore[union-attr]
        return [PollRun.model_validate(r._mapping) for r in rows]

    def last_successful_poll(self) -> PollRun | None:
        with self.read() as conn:
            row = conn.execute(
                select(PollRun)
                .where(PollRun.outcome == "succeeded")  # type: ignore[arg-type]
                .order_by(PollRun.id.desc())  # type: ignore[union-attr]
                .limit(1)
            ).first()
        return PollRun.model_validate(row._mapping) if row else None

    def customer_counts(self) -> dict[str, int]:
        with self.read() as conn:
            rows = conn.execute(
                select(col(CustomerState.status), func.count()).group_by(col(CustomerState.status))
            ).all()
        return {status: n for status, n in rows}

    def get_customer(self, customer_id: str) -> CustomerState | None:
        with self.read() as conn:
            row = conn.execute(select(CustomerState).where(CustomerState.id == customer_id)).first()  # type: ignore[arg-type]
        return CustomerState.model_validate(row._mapping) if row else None

    def query_events(
        self,
        *,
        customer_id: str | None = None,
        types: Sequence[str] = (),
        since: str | None = None,
        until: str | None = None,
        after_sequence: int | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Audit events in ``sequence`` order, as v1 contract dicts."""
        q = select(col(EventRecord.payload)).order_by(col(EventRecord.sequence))
        if customer_id:
            q = q.where(EventRecord.customer_id == customer_id)  # type: ignore[arg-type]
        if types:
            q = q.where(EventRecord.type.in_(list(types)))  # type: ignore[attr-defined]
        if since:
            q = q.where(EventRecord.detected_at >= since)  # type: ignore[arg-type]
        if until:
            q = q.where(EventRecord.detected_at < until)  # type: ignore[arg-type]
        if after_sequence is not None:
            q = q.where(EventRecord.sequence > after_sequence)  # type: ignore[arg-type]
        if limit is not None:
            q = q.limit(limit)
        with self.read() as conn:
            return [orjson.loads(p) for (p,) in conn.execute(q)]


#: Bytes the WAL file is truncated back to after a checkpoint has emptied it.
_WAL_SIZE_LIMIT = 16 * 1024 * 1024
#: How long :meth:`Store.close` lets a checkpoint in progress run (the daemon exits within 10 s).
_CLOSE_CHECKPOINT_WAIT = 5.0


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
