"""``metronome-watcher store check``: is the database sound, and does it keep the store's promises?

SQLite's own ``PRAGMA integrity_check`` and ``foreign_key_check`` (PostgreSQL checks its pages and
keys by itself), then the store's invariants, all read in one transaction (one snapshot, while the
daemon runs): the audit log's sequences strictly increasing as its payloads say, poll ids never
going back along it; every outbox row has its event and a known state; every customer has one
known state, its own id in its record and the fingerprint of that record; every membership's plan
and every source's poll run exist; the schema is this release's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, func, select
from sqlmodel import col

from ..events import CustomerStatus, DeliveryState
from ..fingerprint import record_hash
from . import queries
from .database import Store
from .schema import (
    SCHEMA_VERSION,
    CustomerState,
    EventRecord,
    OutboxRow,
    Plan,
    PlanMember,
    PollRun,
    PollSource,
)

__all__ = ["Finding", "check_store"]

#: Rows read at a time from the large tables.
_CHUNK = 5000


@dataclass(frozen=True)
class Finding:
    """One check: what it checks, whether it held, and (when not) what is wrong."""

    name: str
    ok: bool
    detail: str = ""


def check_store(store: Store) -> list[Finding]:
    """Every check, in order; a check that cannot run at all is a failed one."""
    checks: list[tuple[str, Callable[[Connection], str | None]]] = []
    if store.dialect == "sqlite":
        checks += [("integrity_check", _integrity), ("foreign keys", _foreign_keys)]
    checks += [
        ("schema version", _schema_version),
        ("audit log sequences strictly increasing", _sequences),
        ("every outbox row has its event", _outbox_events),
        ("every outbox row in a known state", _outbox_states),
        ("no customer in two states", _customers),
        ("every plan membership has its plan", _plan_members),
        ("every source's row has its poll run", _poll_sources),
    ]
    findings = []
    # One read transaction (one snapshot), rolled back at the end: it wrote nothing, and on a damaged
    # file a commit could fail where every check has already said what it found.
    with store.engine.connect() as conn:
        tx = conn.begin()
        try:
            for name, check in checks:
                try:
                    with conn.begin_nested():  # a check that fails leaves the others their transaction
                        problem = check(conn)
                except Exception as exc:  # a damaged file fails the check that met it, not the command
                    # The driver's own words, without SQLAlchemy's wrapping.
                    problem = f"could not check: {getattr(exc, 'orig', None) or exc}".splitlines()[0]
                findings.append(Finding(name, problem is None, problem or ""))
        finally:
            with contextlib.suppress(Exception):
                tx.rollback()
    return findings


def _integrity(conn: Connection) -> str | None:
    rows = [r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check(20)")]
    if rows == ["ok"]:
        return None
    # One problem a line (a row may hold several), without the "*** in database main ***" heading.
    lines = [x for r in rows for x in str(r).splitlines() if x.strip() and not x.startswith("***")]
    return "; ".join(lines[:3]) + (f" (and {len(lines) - 3} more)" if len(lines) > 3 else "")


def _foreign_keys(conn: Connection) -> str | None:
    rows = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
    if not rows:
        return None
    table, rowid, parent, _ = rows[0]
    return f"{len(rows)} row(s) name a missing {parent} row (first: {table} rowid {rowid})"


def _schema_version(conn: Connection) -> str | None:
    version = queries.schema_version(conn)
    return None if version == SCHEMA_VERSION else f"version {version}, this release's is {SCHEMA_VERSION}"


def _chunks(conn: Connection, query: Any, key: Any) -> Iterator[Sequence[Any]]:
    """``query``'s rows in ``key`` order (its first column), a page at a time (no server cursor)."""
    last = None
    while True:
        page = query.order_by(key).limit(_CHUNK)
        chunk = conn.execute(page if last is None else page.where(key > last)).all()
        if not chunk:
            return
        yield chunk
        last = chunk[-1][0]


def _sequences(conn: Connection) -> str | None:
    """In sequence order: each payload carries its row's sequence and id, sequences start above 0,
    and the poll that detected an event is never older than an earlier event's."""
    seq = col(EventRecord.sequence)
    q = select(seq, col(EventRecord.id), col(EventRecord.poll_id), col(EventRecord.payload))
    previous, poll = 0, 0
    for chunk in _chunks(conn, q, seq):
        for sequence, event_id, poll_id, payload in chunk:
            assert isinstance(sequence, int) and isinstance(payload, str | bytes)
            if sequence <= previous:
                return f"sequence {sequence} follows {previous}"
            event = orjson.loads(payload)
            if event.get("sequence") != sequence or event.get("id") != event_id:
                said = f"sequence {event.get('sequence')!r}, id {event.get('id')!r}"
                return f"event at sequence {sequence} carries {said}"
            if isinstance(poll_id, int):
                if poll_id < poll:
                    return f"event {sequence} is from poll {poll_id}, after an event from poll {poll}"
                poll = poll_id
            previous = sequence
    return None


def _outbox_events(conn: Connection) -> str | None:
    orphans = conn.execute(
        select(func.count(), func.min(col(OutboxRow.sequence))).where(
            ~select(col(EventRecord.sequence))
            .where(col(EventRecord.sequence) == col(OutboxRow.sequence))
            .exists()
        )
    ).one()
    n, first = orphans
    return None if not n else f"{n} outbox row(s) without their event (first: sequence {first})"


def _outbox_states(conn: Connection) -> str | None:
    status = col(OutboxRow.status)
    unknown = conn.execute(
        select(func.count(), func.min(status)).where(status.not_in([s.value for s in DeliveryState]))
    ).one()
    if unknown[0]:
        return f"{unknown[0]} outbox row(s) in an unknown state (e.g. {unknown[1]!r})"
    undated = conn.execute(
        select(func.count()).where(status == DeliveryState.DELIVERED, col(OutboxRow.delivered_at).is_(None))
    ).scalar()
    return f"{undated} delivered outbox row(s) without delivered_at" if undated else None


def _customers(conn: Connection) -> str | None:
    """One row per customer (the key sees to that) with one known status, and its record its own."""
    statuses = [s.value for s in CustomerStatus]
    cid_ = col(CustomerState.id)
    q = select(cid_, col(CustomerState.status), col(CustomerState.hash), col(CustomerState.record))
    for chunk in _chunks(conn, q, cid_):
        for cid, status, h, record in chunk:
            assert isinstance(record, str)
            if status not in statuses:
                return f"customer {cid} has status {status!r}"
            if orjson.loads(record).get("id") != cid:
                return f"customer {cid}'s record is another customer's"
            if record_hash(record.encode()) != h:
                return f"customer {cid}'s fingerprint is not its record's"
    return None


def _plan_members(conn: Connection) -> str | None:
    missing = conn.execute(
        select(func.count(), func.min(col(PlanMember.plan_id))).where(
            ~select(col(Plan.id)).where(col(Plan.id) == col(PlanMember.plan_id)).exists()
        )
    ).one()
    return None if not missing[0] else f"{missing[0]} membership(s) of a plan not stored (e.g. {missing[1]})"


def _poll_sources(conn: Connection) -> str | None:
    missing = conn.execute(
        select(func.count(), func.min(col(PollSource.poll_id))).where(
            ~select(col(PollRun.id)).where(col(PollRun.id) == col(PollSource.poll_id)).exists()
        )
    ).one()
    return (
        None
        if not missing[0]
        else f"{missing[0]} source row(s) of a poll run not stored (e.g. poll {missing[1]})"
    )
