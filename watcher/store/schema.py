"""The database's tables, and the migrations that bring an older database up to this release.

Tables are SQLModel models, so that one definition serves SQLAlchemy Core queries and the read
models handed to the CLI. Every statement that reads or writes them lives beside this module, in
:mod:`watcher.store.queries` and :mod:`watcher.store.cycle`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Index,
    UniqueConstraint,
    bindparam,
    exists,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlmodel import Field, SQLModel, col

from ..events import DeliveryState, PollOutcome, Source
from ..fingerprint import record_hash

__all__ = [
    "FIRST_POSTGRES_VERSION",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "CustomerState",
    "EventRecord",
    "Lease",
    "Meta",
    "OutboxRow",
    "PageMemo",
    "Plan",
    "PlanMember",
    "PlanPageMemo",
    "PollRun",
    "PollSource",
    "SinkState",
]

#: Bump when the schema changes, and add a step to ``MIGRATIONS`` that brings version N-1 to N.
SCHEMA_VERSION = 6
#: The first version a PostgreSQL store can have: one is created from the models at the latest
#: version, so the steps before it only ever run on SQLite.
FIRST_POSTGRES_VERSION = 6


class Meta(SQLModel, table=True):
    __tablename__ = "meta"
    key: str = Field(primary_key=True)
    value: str


class CustomerState(SQLModel, table=True):
    """The last committed picture of one customer."""

    __tablename__ = "customers"
    id: str = Field(primary_key=True)
    status: str  # events.CustomerStatus
    #: fingerprint.record_hash of ``record`` (63 bits: BIGINT where an engine has sizes)
    hash: int = Field(sa_type=BigInteger)
    record: str  # canonical JSON, as Metronome last returned it
    first_seen_at: str
    changed_at: str
    last_poll_id: int


class PageMemo(SQLModel, table=True):
    """The fingerprints of every listing page the last successful poll saw, one row per listing
    (``watcher.poll.memo``). Written in the poll's own transaction. Clear it whenever the
    fingerprint changes, the client's checks of a listing page get stricter (a page in the memo
    passed the checks of its day, and is not checked again), or anything but a poll changes
    ``customers``.
    """

    __tablename__ = "page_memo"
    archived: bool = Field(primary_key=True)  # events.Listing
    #: The last successful poll saw every stored customer exactly once, on these pages.
    complete: bool
    #: The listing's pages in order, packed as ``watcher.poll.memo`` describes.
    pages: bytes


class PollRun(SQLModel, table=True):
    __tablename__ = "poll_runs"
    id: int | None = Field(default=None, primary_key=True)
    started_at: str = Field(index=True)
    finished_at: str | None = None
    outcome: str = Field(default=PollOutcome.RUNNING, index=True)
    baseline: bool = False
    pages: int = 0
    active: int = 0
    archived: int = 0
    events: int = 0
    #: JSON object: event counts by type
    events_by_type: str = "{}"
    error: str | None = None


class PollSource(SQLModel, table=True):
    """How one source fared in one poll run (``events.Source``): each source commits on its own, so a
    run has a row per source it read, written in that source's own transaction (or with its failure).
    The run's own ``outcome`` is settled from them once the last source is done."""

    __tablename__ = "poll_sources"
    __table_args__ = (Index("ix_poll_sources_source_outcome", "source", "outcome", "poll_id"),)
    poll_id: int = Field(primary_key=True)
    source: str = Field(primary_key=True)  # events.Source
    outcome: str  # events.PollOutcome
    finished_at: str | None = None
    #: The source's first successful read: recorded silently (unless diff.emit_baseline_events).
    baseline: bool = False
    pages: int = 0
    #: Customers seen (active and archived), or plan memberships held, after the read.
    items: int = 0
    events: int = 0
    #: JSON object: event counts by type
    events_by_type: str = "{}"
    error: str | None = None


class Plan(SQLModel, table=True):
    """A plan ``GET /v1/plans`` listed, as the plans source last saw it."""

    __tablename__ = "plans"
    id: str = Field(primary_key=True)
    name: str
    #: canonical JSON, as ``GET /v1/plans`` last listed it
    record: str
    #: In the listing of the last successful plans read (False: gone from it since).
    listed: bool
    #: Its members were read completely by the last successful plans read, and are in ``plan_members``.
    watched: bool
    first_seen_at: str
    changed_at: str


class PlanMember(SQLModel, table=True):
    """The last committed picture of one membership (a customer on a plan), by ``customer_plan_id``."""

    __tablename__ = "plan_members"
    __table_args__ = (
        Index("ix_plan_members_plan_hash", "plan_id", "hash"),
        # The memberships whose end is still to be announced, by when it comes.
        Index(
            "ix_plan_members_due",
            "ends_at",
            sqlite_where=text("ended = 0 AND ends_at IS NOT NULL"),
            postgresql_where=text("NOT ended AND ends_at IS NOT NULL"),
        ),
    )
    customer_plan_id: str = Field(primary_key=True)
    plan_id: str
    customer_id: str
    #: fingerprint.record_hash of ``record`` (63 bits: BIGINT where an engine has sizes)
    hash: int = Field(sa_type=BigInteger)
    #: canonical JSON of the item as listed: ``{"customer_details": ..., "plan_details": ...}``
    record: str
    #: ``plan_details.ending_before`` in ``_time.format_ts`` form (comparable as text); None: no end set.
    ends_at: str | None = None
    #: Its end has passed and was announced (``customer.plan_ended``), or had passed when first seen.
    ended: bool = False
    first_seen_at: str
    changed_at: str
    last_poll_id: int


class PlanPageMemo(SQLModel, table=True):
    """The digest and fingerprints of every page of a plan's members that the last successful plans
    read saw (packed as ``watcher.poll.memo`` packs a listing's), written with ``plan_members``: a
    plan whose pages all come back byte for byte is settled without parsing. Clear it whenever the
    fingerprint or the checks of a members page change."""

    __tablename__ = "plan_page_memo"
    plan_id: str = Field(primary_key=True)
    pages: bytes


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


#: A sink's oldest pending delivery and its last error, found without reading the rows already
#: delivered (``/status``, ``/metrics`` and ``deliveries`` with a million events in the audit log).
_OUTBOX_STATUS_INDEXES = (
    Index(
        "ix_outbox_pending",
        "sink",
        "created_at",
        sqlite_where=text("status = 'pending'"),
        postgresql_where=text("status = 'pending'"),
    ),
    Index(
        "ix_outbox_errors",
        "sink",
        "last_attempt_at",
        sqlite_where=text("last_error IS NOT NULL"),
        postgresql_where=text("last_error IS NOT NULL"),
    ),
)


class OutboxRow(SQLModel, table=True):
    """One delivery of one event to one sink."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("sequence", "sink"),
        Index("ix_outbox_sink_status_sequence", "sink", "status", "sequence"),
        *_OUTBOX_STATUS_INDEXES,
    )
    id: int | None = Field(default=None, primary_key=True)
    sequence: int = Field(foreign_key="events.sequence")
    sink: str
    status: str = DeliveryState.PENDING
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


class Lease(SQLModel, table=True):
    """Who may poll and deliver, when several ``run`` replicas share one PostgreSQL database
    (``watcher.store.lease``). One row per lease; ``epoch`` grows by one at every acquisition, and
    every commit of the holder checks it. Times are the database's clock, never a replica's."""

    __tablename__ = "leases"
    name: str = Field(primary_key=True)
    holder: str
    epoch: int = Field(sa_type=BigInteger)
    acquired_at: datetime = Field(sa_type=DateTime(timezone=True))  # type: ignore[call-overload]
    renewed_at: datetime = Field(sa_type=DateTime(timezone=True))  # type: ignore[call-overload]
    expires_at: datetime = Field(sa_type=DateTime(timezone=True))  # type: ignore[call-overload]


# Every step is written for both engines, but a PostgreSQL store is created from the models at the
# latest version (``FIRST_POSTGRES_VERSION`` at the earliest): steps 2 to 6 only ever run on SQLite,
# and the tests upgrade SQLite files (``tests/fixtures``). A step after 6 runs on both.


def _migrate_to_2(conn: Connection) -> None:
    """Version 2 fingerprints with XXH3 instead of BLAKE2b. The stored records are canonical JSON, so
    the new fingerprints are computed from them; without this the next cycle would find every
    customer "changed" and rewrite the whole table. SQLite does it in one statement."""
    if conn.dialect.name == "sqlite":
        db = conn.connection.dbapi_connection
        assert db is not None
        db.create_function("watcher_record_hash", 1, lambda r: record_hash(r.encode()), deterministic=True)
        conn.exec_driver_sql("UPDATE customers SET hash = watcher_record_hash(record)")
        return
    rows = conn.execute(select(col(CustomerState.id), col(CustomerState.record))).all()
    if rows:
        conn.execute(
            update(CustomerState).where(col(CustomerState.id) == bindparam("cid")),
            [{"cid": cid, "hash": record_hash(record.encode())} for cid, record in rows],
        )


def _migrate_to_3(conn: Connection) -> None:
    """Version 3 remembers the fingerprints of the pages last seen (``PageMemo``)."""
    PageMemo.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


def _migrate_to_4(conn: Connection) -> None:
    """Version 4 indexes a sink's pending deliveries and its errors (see ``OutboxRow``), so that the
    web view's ``/status`` stays fast with a million events in the audit log."""
    for index in _OUTBOX_STATUS_INDEXES:
        index.create(conn, checkfirst=True)


def _migrate_to_5(conn: Connection) -> None:
    """Version 5 watches plans (``Plan``, ``PlanMember``, ``PlanPageMemo``) and records each source's
    outcome per poll (``PollSource``). Every earlier poll read the customers alone, so each finished
    one becomes a ``customers`` row: the customers' baseline stays where it was."""
    for table in (PollSource, Plan, PlanMember, PlanPageMemo):
        table.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined,union-attr]
    runs = PollRun.__table__  # type: ignore[attr-defined]
    sources = PollSource.__table__  # type: ignore[attr-defined]
    recorded = select(sources.c.poll_id).where(
        sources.c.poll_id == runs.c.id, sources.c.source == Source.CUSTOMERS.value
    )
    conn.execute(
        insert(sources).from_select(
            [
                "poll_id",
                "source",
                "outcome",
                "finished_at",
                "baseline",
                "pages",
                "items",
                "events",
                "events_by_type",
                "error",
            ],
            select(
                runs.c.id,
                literal(Source.CUSTOMERS.value),
                runs.c.outcome,
                runs.c.finished_at,
                runs.c.baseline,
                runs.c.pages,
                runs.c.active + runs.c.archived,
                runs.c.events,
                runs.c.events_by_type,
                runs.c.error,
            ).where(runs.c.outcome != PollOutcome.RUNNING.value, ~exists(recorded)),
        )
    )


def _migrate_to_6(conn: Connection) -> None:
    """Version 6 has the leader lease of a replicated (PostgreSQL) store (``Lease``). Fingerprints are
    BIGINT in its models, which changes nothing in a SQLite file (an INTEGER holds 64 bits)."""
    Lease.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


#: version -> the step that upgrades a database from version-1 to version.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    2: _migrate_to_2,
    3: _migrate_to_3,
    4: _migrate_to_4,
    5: _migrate_to_5,
    6: _migrate_to_6,
}
