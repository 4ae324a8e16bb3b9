"""Every statement the watcher runs on its database outside the poll cycle's hot path.

Each function takes the connection of a transaction its caller holds (``Store.read()`` or
``Store.write()``), so that callers decide what lands together and nothing outside this package
writes SQL. They are SQLAlchemy Core, so that each runs on SQLite and on PostgreSQL alike; the few
that need an engine's own functions (the web view's search of customers) or order differently
there (NULLs) ask ``conn.dialect.name``, and keep SQLite's statement as it was. The sources' own
statements are in their sessions: the customers' cycle's (:mod:`watcher.store.cycle`) and the
plans' (:mod:`watcher.store.plans`), each with a session per engine.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Select,
    and_,
    cast,
    delete,
    exists,
    func,
    insert,
    inspect,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlmodel import col

from .._time import parse_ts
from ..events import DeliveryState, EventRow, EventType, OutboxEntry, PollOutcome, Source
from .schema import (
    CustomerState,
    EventRecord,
    Meta,
    OutboxRow,
    Plan,
    PlanMember,
    PollRun,
    PollSource,
    SinkState,
)

__all__ = [
    "MANY_CUSTOMERS",
    "EventPage",
    "FailureCounts",
    "PruneBounds",
    "ReplaySelection",
    "SinkStatus",
    "append_events",
    "customer_counts",
    "delivery_status",
    "due_deliveries",
    "enable_sink",
    "event_page",
    "expire_pending",
    "fail_poll",
    "failed_sources_of",
    "failure_counts",
    "get_customer",
    "get_poll",
    "has_baseline",
    "last_notice",
    "last_polls",
    "last_sequence",
    "last_successful_poll",
    "mark_attempt",
    "match_customers",
    "plan_counts",
    "prunable_counts",
    "prune_bounds",
    "prune_deliveries",
    "prune_events",
    "prune_polls",
    "query_events",
    "record_refused_poll",
    "record_source",
    "replay",
    "schema_version",
    "set_schema_version",
    "set_sink_state",
    "settle_poll",
    "sink_state",
    "source_outcomes",
    "time_out_poll",
]

#: The outcomes that break a streak of successes. ``abandoned`` is not one of them: it means the
#: process was stopped mid-poll (a deploy, a restart), which says nothing about Metronome.
_FAILED = (PollOutcome.FAILED, PollOutcome.REFUSED)


# -- the schema's version ----------------------------------------------------------------------


def schema_version(conn: Connection) -> int:
    """The version recorded in ``meta``; 0 for a database without one (a new one)."""
    if not inspect(conn).has_table(Meta.__tablename__):
        return 0
    v = conn.execute(select(col(Meta.value)).where(col(Meta.key) == "schema_version")).scalar()
    return int(v) if v is not None else 0


def set_schema_version(conn: Connection, version: int) -> None:
    key = col(Meta.key) == "schema_version"
    if not conn.execute(update(Meta).where(key).values(value=str(version))).rowcount:
        conn.execute(insert(Meta).values(key="schema_version", value=str(version)))


# -- polls ----------------------------------------------------------------------------------------


def has_baseline(conn: Connection, source: Source = Source.CUSTOMERS) -> bool:
    """True once a read of ``source`` has succeeded: only then are its differences changes."""
    # One row is enough (a daemon that polls every few minutes has a long history to count).
    q = select(col(PollSource.poll_id)).where(
        col(PollSource.source) == source, col(PollSource.outcome) == PollOutcome.SUCCEEDED
    )
    return conn.execute(q.limit(1)).first() is not None


def last_polls(conn: Connection, limit: int = 10) -> list[PollRun]:
    rows = conn.execute(select(PollRun).order_by(col(PollRun.id).desc()).limit(limit)).all()
    return [PollRun.model_validate(r._mapping) for r in rows]


def get_poll(conn: Connection, poll_id: int) -> PollRun | None:
    row = conn.execute(select(PollRun).where(col(PollRun.id) == poll_id)).first()
    return PollRun.model_validate(row._mapping) if row else None


def last_successful_poll(conn: Connection) -> PollRun | None:
    row = conn.execute(
        select(PollRun)
        .where(col(PollRun.outcome) == PollOutcome.SUCCEEDED)
        .order_by(col(PollRun.id).desc())
        .limit(1)
    ).first()
    return PollRun.model_validate(row._mapping) if row else None


def record_refused_poll(conn: Connection, *, now: str, error: str) -> int:
    """A poll refused before it began (another poll holds the database): recorded as finished."""
    result = conn.execute(
        insert(PollRun).values(started_at=now, finished_at=now, outcome=PollOutcome.REFUSED, error=error)
    )
    assert result.inserted_primary_key is not None
    return int(result.inserted_primary_key[0])


def fail_poll(conn: Connection, poll_id: int, *, outcome: PollOutcome, finished_at: str, error: str) -> None:
    conn.execute(
        update(PollRun)
        .where(col(PollRun.id) == poll_id)
        .values(outcome=outcome, finished_at=finished_at, error=error[:2000])
    )


def time_out_poll(conn: Connection, poll_id: int, *, error: str) -> None:
    """A poll abandoned because it outlived its timeout counts as failed, not abandoned (and so do
    the sources it abandoned)."""
    conn.execute(
        update(PollRun)
        .where(col(PollRun.id) == poll_id, col(PollRun.outcome) == PollOutcome.ABANDONED)
        .values(outcome=PollOutcome.FAILED, error=error)
    )
    conn.execute(
        update(PollSource)
        .where(col(PollSource.poll_id) == poll_id, col(PollSource.outcome) == PollOutcome.ABANDONED)
        .values(outcome=PollOutcome.FAILED, error=error)
    )


def record_source(
    conn: Connection,
    poll_id: int,
    source: Source,
    *,
    outcome: PollOutcome,
    finished_at: str,
    baseline: bool = False,
    pages: int = 0,
    items: int = 0,
    events_by_type: dict[str, int] | None = None,
    error: str | None = None,
) -> None:
    """How ``source`` fared in the poll, in the transaction that commits it (or records its failure)."""
    by_type = events_by_type or {}
    conn.execute(
        insert(PollSource).values(
            poll_id=poll_id,
            source=source,
            outcome=outcome,
            finished_at=finished_at,
            baseline=baseline,
            pages=pages,
            items=items,
            events=sum(by_type.values()),
            events_by_type=orjson.dumps(by_type).decode(),
            error=None if error is None else error[:2000],
        )
    )


def source_outcomes(conn: Connection, poll_id: int) -> dict[str, tuple[str, str | None]]:
    """source -> (outcome, error) of every source the poll read, in the order they were recorded."""
    rows = conn.execute(
        select(col(PollSource.source), col(PollSource.outcome), col(PollSource.error))
        .where(col(PollSource.poll_id) == poll_id)
        .order_by(col(PollSource.source))
    ).all()
    return {source: (outcome, error) for source, outcome, error in rows}


#: How the outcomes of a poll's sources make the poll's: the first of these that any source had.
_SETTLE_ORDER = (PollOutcome.ABANDONED, PollOutcome.FAILED, PollOutcome.REFUSED)


def settle_poll(conn: Connection, poll_id: int, *, finished_at: str) -> PollOutcome:
    """Record the poll's outcome from its sources' (once the last of them is done) and return it.

    It succeeded when every source did; otherwise it is abandoned, failed or refused (in that order
    of precedence), and its error names each source that did not succeed: ``plans: <reason>``.
    Its events are those its sources committed.
    """
    rows = conn.execute(
        select(
            col(PollSource.source),
            col(PollSource.outcome),
            col(PollSource.error),
            col(PollSource.events_by_type),
        )
        .where(col(PollSource.poll_id) == poll_id)
        .order_by(col(PollSource.source))
    ).all()
    outcomes = {PollOutcome(outcome) for _, outcome, _, _ in rows}
    outcome = next((o for o in _SETTLE_ORDER if o in outcomes), PollOutcome.SUCCEEDED)
    failed = [(source, o, error) for source, o, error, _ in rows if o != PollOutcome.SUCCEEDED]
    if len(rows) == 1 or (len(failed) == len(rows) and len({e for _, _, e in failed}) == 1):
        error = failed[0][2] if failed else None  # one source, or all of them for one reason (shutdown)
    else:
        error = "; ".join(f"{source}: {error or o}" for source, o, error in failed) or None
    by_type: dict[str, int] = {}
    for *_, counts in rows:
        for event_type, n in orjson.loads(counts).items():
            by_type[event_type] = by_type.get(event_type, 0) + n
    conn.execute(
        update(PollRun)
        .where(col(PollRun.id) == poll_id)
        .values(
            outcome=outcome,
            finished_at=finished_at,
            error=error[:2000] if error else None,
            events=sum(by_type.values()),
            events_by_type=orjson.dumps(by_type).decode(),
        )
    )
    return outcome


@dataclass(frozen=True)
class FailureCounts:
    """Failed polls after the last success (or after ``success_id`` and before the success after it)."""

    failures: int
    #: ``started_at`` of the first failed poll counted.
    since: str | None
    last_failed_poll_id: int | None
    last_error: str | None
    last_success_id: int | None
    #: The sources that did not succeed in the last failed poll, when it read more than one.
    failed_sources: tuple[str, ...] = ()


def failure_counts(conn: Connection, *, before_success: int | None = None) -> FailureCounts:
    """The failed polls since the last success; with ``before_success``, those that led up to it."""
    poll_id, outcome = col(PollRun.id), col(PollRun.outcome)
    succeeded = select(func.max(poll_id)).where(outcome == PollOutcome.SUCCEEDED)
    if before_success is not None:
        succeeded = succeeded.where(poll_id < before_success)
    last_success = conn.execute(succeeded).scalar()
    window = [outcome.in_(_FAILED), poll_id > (last_success or 0)]
    if before_success is not None:
        window.append(poll_id < before_success)
    count, since, last_failed = conn.execute(
        select(func.count(), func.min(col(PollRun.started_at)), func.max(poll_id)).where(*window)
    ).one()
    last_error: str | None = None
    failed_sources: tuple[str, ...] = ()
    if last_failed is not None:
        last_error = conn.execute(select(col(PollRun.error)).where(poll_id == last_failed)).scalar()
        failed_sources = failed_sources_of(conn, last_failed)
    return FailureCounts(int(count), since, last_failed, last_error, last_success, failed_sources)


def failed_sources_of(conn: Connection, poll_id: int) -> tuple[str, ...]:
    """The sources that did not succeed in a poll that read more than one; () otherwise."""
    outcomes = source_outcomes(conn, poll_id)
    if len(outcomes) < 2:
        return ()
    return tuple(source for source, (outcome, _) in outcomes.items() if outcome != PollOutcome.SUCCEEDED)


def last_notice(conn: Connection, types: Sequence[EventType]) -> dict[str, Any] | None:
    """The latest event of one of these (notice) types, as its v1 payload."""
    payload = conn.execute(
        select(col(EventRecord.payload))
        .where(col(EventRecord.type).in_(list(types)))
        .order_by(col(EventRecord.sequence).desc())
        .limit(1)
    ).scalar()
    return None if payload is None else dict(orjson.loads(payload))


# -- customers and the audit log ------------------------------------------------------------------


def customer_counts(conn: Connection) -> dict[str, int]:
    rows = conn.execute(
        select(col(CustomerState.status), func.count()).group_by(col(CustomerState.status))
    ).all()
    return {status: n for status, n in rows}


def plan_counts(conn: Connection) -> tuple[int, int, int]:
    """(plans whose members are watched, memberships held, of which ended)."""
    plans = conn.execute(select(func.count()).where(col(Plan.watched).is_(True))).scalar() or 0
    members, ended = conn.execute(
        select(func.count(), func.count().filter(col(PlanMember.ended).is_(True))).select_from(PlanMember)
    ).one()
    return int(plans), int(members or 0), int(ended or 0)


def get_customer(conn: Connection, customer_id: str) -> CustomerState | None:
    row = conn.execute(select(CustomerState).where(col(CustomerState.id) == customer_id)).first()
    return CustomerState.model_validate(row._mapping) if row else None


def query_events(
    conn: Connection,
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
        q = q.where(col(EventRecord.customer_id) == customer_id)
    if types:
        q = q.where(col(EventRecord.type).in_(list(types)))
    if since:
        q = q.where(col(EventRecord.detected_at) >= since)
    if until:
        q = q.where(col(EventRecord.detected_at) < until)
    if after_sequence is not None:
        q = q.where(col(EventRecord.sequence) > after_sequence)
    if limit is not None:
        q = q.limit(limit)
    return [orjson.loads(p) for (p,) in conn.execute(q)]


#: Above this many customers matched by a text, a page of their events is found by walking the log
#: from the newest event (they are common); below it, by each customer's own index entries.
MANY_CUSTOMERS = 50
#: A text whose first ``MANY_CUSTOMERS`` matches are among the first this many customers matches one
#: in 400 or more: walking the log checking each event's customer then beats reading every customer
#: (measured in docs/performance.md).
_COMMON_MATCH = 20_000


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _customer_match(dialect: str, text: str) -> Any:
    """Customers whose id, name or external id contains ``text`` (ASCII letters in either case).

    The JSON text of the record is searched first (``LIKE`` is a fast scan of it); only the records
    it lets through are parsed to check that the text is in one of the three keys. SQLite's ``LIKE``
    ignores the case of ASCII letters by itself; PostgreSQL's ``ILIKE`` does the same (and of the
    other letters too), as its ``lower`` does.
    """
    record = col(CustomerState.record)
    # The record is stored as JSON: a quote or backslash in the text is escaped there.
    encoded = orjson.dumps(text).decode()[1:-1]
    needle = text.lower()
    if dialect == "sqlite":
        return and_(
            record.like(_like_pattern(encoded), escape="\\"),
            or_(
                func.instr(func.lower(col(CustomerState.id)), needle) > 0,
                func.instr(func.lower(func.json_extract(record, "$.name")), needle) > 0,
                func.instr(func.lower(func.json_extract(record, "$.external_id")), needle) > 0,
            ),
        )
    parsed = cast(record, postgresql.JSONB)
    return and_(
        record.ilike(_like_pattern(encoded), escape="\\"),
        or_(
            func.strpos(func.lower(col(CustomerState.id)), needle) > 0,
            func.strpos(func.lower(parsed["name"].astext), needle) > 0,
            func.strpos(func.lower(parsed["external_id"].astext), needle) > 0,
        ),
    )


def match_customers(conn: Connection, text: str, *, limit: int = MANY_CUSTOMERS + 1) -> list[str]:
    """Ids of up to ``limit`` customers the text names: the one whose id it is, else those whose id,
    name or external id contains it (ASCII letters in either case)."""
    return _matching(conn, text, limit)[0]


def _matching(conn: Connection, text: str, limit: int) -> tuple[list[str], int | None]:
    """:func:`match_customers`, and about how many customers were read to find ``limit`` of them
    (None when fewer match: then the whole table was read)."""
    text = text.strip()
    if not text:
        return [], None
    cid = col(CustomerState.id)
    exact = conn.execute(select(cid).where(cid == text)).scalar()
    if exact is not None:
        return [exact], None
    dialect = conn.dialect.name
    if dialect == "sqlite":
        rowid: Any = literal_column("customers.rowid")
        q = select(cid, rowid).where(_customer_match(dialect, text)).order_by(rowid).limit(limit)
        rows = conn.execute(q).all()
        return [r[0] for r in rows], int(rows[-1][1]) if len(rows) == limit else None
    # PostgreSQL has no rowid: the table is read in id order, and what was read is counted on the
    # id index, no further than the count that decides anything (``_COMMON_MATCH``).
    ids = list(
        conn.execute(select(cid).where(_customer_match(dialect, text)).order_by(cid).limit(limit)).scalars()
    )
    if len(ids) < limit:
        return ids, None
    upto = select(cid).where(cid <= ids[-1]).limit(_COMMON_MATCH + 1).subquery()
    return ids, int(conn.execute(select(func.count()).select_from(upto)).scalar() or 0)


@dataclass(frozen=True)
class EventPage:
    """A page of the audit log, newest first, and whether there are more on either side of it."""

    #: The v1 events (empty when the page was asked for with ``parse=False``) ...
    events: list[dict[str, Any]]
    #: ... their sequences, and their payloads as stored: the JSON text ``orjson`` wrote, which
    #: ``orjson`` reads back and writes again byte for byte (``events --format jsonl`` prints that).
    sequences: list[int]
    payloads: list[str]
    #: There are matching events older than the last one here.
    older: bool
    #: There are matching events newer than the first one here.
    newer: bool


_EMPTY = EventPage([], [], [], older=False, newer=False)


def event_page(
    conn: Connection,
    *,
    types: Sequence[str] = (),
    customer_ids: Sequence[str] | None = None,
    customer_text: str | None = None,
    since: str | None = None,
    until: str | None = None,
    before: int | None = None,
    after: int | None = None,
    limit: int = 50,
    parse: bool = True,
) -> EventPage:
    """Up to ``limit`` audit events, newest first: those just below sequence ``before``, or just
    above ``after``, or the newest.

    ``parse=False`` leaves the payloads as stored (the change feed sends them as they are).
    ``customer_ids`` keeps those customers' events (an empty list keeps none); ``customer_text``
    those of every customer :func:`match_customers` would find. With ``since`` or ``until`` the
    events are ordered by ``(detected_at, sequence)``, which is sequence order unless the clock was
    set back, so that the ``detected_at`` index finds a page of any time range without sorting it.

    Each part is one index range, read no further than the page: a filter on several types or a
    few customers is one range each, merged here; a text that many customers match walks the log
    from the cursor and keeps their events.
    """
    walk = False
    if customer_text is not None:
        ids, read = _matching(conn, customer_text, MANY_CUSTOMERS + 1)
        if not ids:
            return _EMPTY
        if len(ids) <= MANY_CUSTOMERS:
            customer_ids = ids
        else:
            # Found within the first few thousand customers: they are common, and a page of their
            # events is found within the newest few thousand events.
            walk = read is not None and read <= _COMMON_MATCH
    if customer_ids is not None and not customer_ids:
        return _EMPTY
    seq, when = col(EventRecord.sequence), col(EventRecord.detected_at)
    by_time = since is not None or until is not None
    key: Any = tuple_(when, seq) if by_time else seq
    ascending = after is not None
    cursor = after if ascending else before
    conds: list[Any] = []
    if since is not None:
        conds.append(when >= since)
    if until is not None:
        conds.append(when < until)
    if cursor is not None:
        bound: Any = cursor
        if by_time:
            at = _detected_at_near(conn, cursor, ascending=ascending)
            bound = tuple_(at, cursor) if at is not None else None
        if bound is not None:  # None: no event on the cursor's far side, so all are on this one
            conds.append(key > bound if ascending else key < bound)
    if customer_text is not None and customer_ids is None:
        # Many customers match. The log is walked in order and stops at a page's worth: checking
        # each event's customer when they are common, else against the set of them all, read once
        # (an expression keeps SQLite from choosing the customer index and sorting their events).
        if walk:
            conds.append(
                exists()
                .where(col(CustomerState.id) == col(EventRecord.customer_id))
                .where(_customer_match(conn.dialect.name, customer_text))
            )
        else:
            matched = select(col(CustomerState.id)).where(_customer_match(conn.dialect.name, customer_text))
            conds.append(func.coalesce(col(EventRecord.customer_id), "").in_(matched))

    def part(*only: Any) -> Select[Any]:
        q: Select[Any] = select(seq, when, col(EventRecord.payload)).where(*conds, *only)  # type: ignore[assignment]
        if by_time:
            q = q.order_by(when, seq) if ascending else q.order_by(when.desc(), seq.desc())
        else:
            q = q.order_by(seq) if ascending else q.order_by(seq.desc())
        return q.limit(limit + 1)

    of_type = col(EventRecord.type)
    if customer_ids is not None:
        in_types = [of_type.in_(list(types))] if types else []
        parts = [part(col(EventRecord.customer_id) == cid, *in_types) for cid in customer_ids]
    elif len(types) > 1:
        parts = [part(of_type == t) for t in types]
    else:
        parts = [part(*([of_type == types[0]] if types else []))]
    rows_by_part = [conn.execute(p).all() for p in parts]
    order = (lambda r: (r[1], r[0])) if by_time else (lambda r: r[0])
    merged = heapq.merge(*rows_by_part, key=order, reverse=not ascending)
    rows = list(itertools.islice(merged, limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    if ascending:
        rows.reverse()
    payloads = [r[2] for r in rows]
    events = [orjson.loads(p) for p in payloads] if parse else []
    older, newer = (bool(cursor), more) if ascending else (more, cursor is not None)
    return EventPage(events, [r[0] for r in rows], payloads, older=older, newer=newer)


def _detected_at_near(conn: Connection, sequence: int, *, ascending: bool) -> str | None:
    """``detected_at`` of the event at a paging cursor (of the nearest one on the page's side)."""
    seq = col(EventRecord.sequence)
    q = select(col(EventRecord.detected_at))
    q = q.where(seq <= sequence).order_by(seq.desc()) if ascending else q.where(seq >= sequence).order_by(seq)
    return conn.execute(q.limit(1)).scalar()


def last_sequence(conn: Connection) -> int:
    return int(conn.execute(select(func.coalesce(func.max(col(EventRecord.sequence)), 0))).scalar() or 0)


def append_events(conn: Connection, events: Sequence[EventRow], outbox: Sequence[OutboxEntry]) -> None:
    """Write events (``events.EventWriter.take``) and their outbox rows (one executemany each)."""
    if events:
        conn.execute(insert(EventRecord), [e._asdict() for e in events])
    if outbox:
        conn.execute(
            insert(OutboxRow),
            [
                {
                    "sequence": o.sequence,
                    "sink": o.sink,
                    "status": DeliveryState.PENDING,
                    "attempts": 0,
                    "created_at": o.created_at,
                    "next_attempt_at": o.created_at,
                }
                for o in outbox
            ],
        )


# -- delivery -------------------------------------------------------------------------------------


def sink_state(conn: Connection, name: str) -> SinkState:
    row = conn.execute(select(SinkState).where(col(SinkState.name) == name)).first()
    return SinkState.model_validate(row._mapping) if row else SinkState(name=name)


def set_sink_state(conn: Connection, name: str, **values: Any) -> None:
    exists = conn.execute(select(col(SinkState.name)).where(col(SinkState.name) == name)).first()
    if exists:
        conn.execute(update(SinkState).where(col(SinkState.name) == name).values(**values))
    else:
        conn.execute(insert(SinkState).values(name=name, **values))


def due_deliveries(conn: Connection, sink: str, limit: int) -> list[tuple[int, int, str]]:
    """The sink's oldest pending rows, in sequence order: (outbox row id, sequence, event payload)."""
    rows = conn.execute(
        select(col(OutboxRow.id), col(OutboxRow.sequence), col(EventRecord.payload))
        .join(EventRecord, col(EventRecord.sequence) == col(OutboxRow.sequence))
        .where(col(OutboxRow.sink) == sink, col(OutboxRow.status) == DeliveryState.PENDING)
        .order_by(col(OutboxRow.sequence))
        .limit(limit)
    ).all()
    return [(int(r[0] or 0), int(r[1]), str(r[2])) for r in rows]


def mark_attempt(
    conn: Connection,
    row_id: int,
    *,
    at: str,
    state: DeliveryState = DeliveryState.PENDING,
    error: str | None = None,
    next_attempt_at: str | None = None,
) -> None:
    """Record one attempt at one outbox row: delivered, dead, or still pending with its error."""
    values: dict[str, Any] = {"attempts": col(OutboxRow.attempts) + 1, "last_attempt_at": at}
    if state is DeliveryState.DELIVERED:
        values.update(status=state, delivered_at=at)
    else:
        values.update(status=state, last_error=error)
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
    conn.execute(update(OutboxRow).where(col(OutboxRow.id) == row_id).values(**values))


def expire_pending(conn: Connection, sink: str, *, queued_before: str) -> int:
    """Mark dead the sink's pending rows queued at or before ``queued_before``; returns how many."""
    result = conn.execute(
        update(OutboxRow)
        .where(
            col(OutboxRow.sink) == sink,
            col(OutboxRow.status) == DeliveryState.PENDING,
            col(OutboxRow.created_at) <= queued_before,
        )
        .values(
            status=DeliveryState.DEAD,
            last_error=func.coalesce(OutboxRow.last_error, "") + " (gave up after max_age)",
        )
    )
    return int(result.rowcount or 0)


@dataclass(frozen=True)
class SinkStatus:
    sink: str
    pending: int
    delivered: int
    dead: int
    oldest_pending_age: float | None  # seconds
    last_error: str | None
    disabled: bool
    next_attempt_at: str | None


def delivery_status(conn: Connection, now: datetime, *, sinks: Sequence[str] = ()) -> list[SinkStatus]:
    """Per sink: pending, delivered and dead counts, oldest pending age and the last error."""
    # Three statements, each on an index of its own (the counts from ``ix_outbox_sink_status_sequence``
    # alone, the oldest pending row and the last error from the partial indexes of schema version 4),
    # so that a log of a million delivered events is counted, never read.
    sink, status = col(OutboxRow.sink), col(OutboxRow.status)
    q = select(sink, status, func.count()).group_by(sink, status)
    if sinks:
        q = q.where(sink.in_(list(sinks)))
    counts: dict[str, dict[str, int]] = {}
    for name, kind, n in conn.execute(q):
        counts.setdefault(name, {})[kind] = n
    oldest_pending: dict[str, str] = dict(
        conn.execute(
            select(sink, func.min(col(OutboxRow.created_at)))
            .where(status == DeliveryState.PENDING)
            .group_by(sink)
        ).all()
    )
    states = {
        s.name: s
        for s in (SinkState.model_validate(r._mapping) for r in conn.execute(select(SinkState)).all())
    }
    names = list(sinks) or sorted(set(counts) | set(states))
    last_errors = {name: _last_error(conn, name) for name in names}
    out = []
    for name in names:
        c = counts.get(name, {})
        state = states.get(name)
        oldest = oldest_pending.get(name)
        out.append(
            SinkStatus(
                sink=name,
                pending=c.get(DeliveryState.PENDING, 0),
                delivered=c.get(DeliveryState.DELIVERED, 0),
                dead=c.get(DeliveryState.DEAD, 0),
                oldest_pending_age=(now - parse_ts(oldest)).total_seconds() if oldest else None,
                last_error=(state.last_error if state and state.last_error else None)
                or last_errors.get(name),
                disabled=bool(state and state.disabled),
                next_attempt_at=state.next_attempt_at if state else None,
            )
        )
    return out


def _last_error(conn: Connection, sink: str) -> str | None:
    """The sink's latest delivery error (from the partial index ``ix_outbox_errors``); a row that
    gave up unsent (never attempted) counts as older than every attempt."""
    when = col(OutboxRow.last_attempt_at)
    q = select(col(OutboxRow.last_error)).where(
        col(OutboxRow.sink) == sink, col(OutboxRow.last_error).is_not(None)
    )
    if conn.dialect.name == "sqlite":  # NULL sorts first, so last when descending
        return conn.execute(q.order_by(when.desc()).limit(1)).scalar()
    # PostgreSQL sorts NULL first when descending: the attempts first (the index read backwards),
    # then, only if there was none, a row never attempted.
    last = conn.execute(q.where(when.is_not(None)).order_by(when.desc()).limit(1)).scalar()
    return last if last is not None else conn.execute(q.where(when.is_(None)).limit(1)).scalar()


@dataclass(frozen=True)
class ReplaySelection:
    """Which events ``replay`` queues again; with no selector at all, every dead one."""

    event_ids: Sequence[str] = ()
    sequence_from: int | None = None
    sequence_to: int | None = None
    since: str | None = None
    until: str | None = None
    #: Only rows that are dead (the default when nothing else is selected).
    dead_only: bool = False


def replay(conn: Connection, sink: str, selection: ReplaySelection, *, now: str) -> int:
    """Queue events for ``sink`` again (same event ids). With no selector, every dead row.

    Events that were never routed to the sink get a new outbox row; rows already pending are
    left alone. Returns how many rows were (re)queued.
    """
    sel = selection
    conds: list[Any] = []
    if sel.event_ids:
        conds.append(col(EventRecord.id).in_(list(sel.event_ids)))
    if sel.sequence_from is not None:
        conds.append(col(EventRecord.sequence) >= sel.sequence_from)
    if sel.sequence_to is not None:
        conds.append(col(EventRecord.sequence) <= sel.sequence_to)
    if sel.since:
        conds.append(col(EventRecord.detected_at) >= sel.since)
    if sel.until:
        conds.append(col(EventRecord.detected_at) < sel.until)
    q = (
        select(col(EventRecord.sequence), col(OutboxRow.id))
        .outerjoin(
            OutboxRow, and_(col(OutboxRow.sequence) == col(EventRecord.sequence), col(OutboxRow.sink) == sink)
        )
        .where(*conds)
    )
    if not conds or sel.dead_only:
        q = q.where(col(OutboxRow.status) == DeliveryState.DEAD)
    else:
        q = q.where(or_(col(OutboxRow.status).is_(None), col(OutboxRow.status) != DeliveryState.PENDING))
    n = 0
    for seq, row_id in conn.execute(q).all():
        if row_id is None:
            conn.execute(
                insert(OutboxRow).values(
                    sequence=seq,
                    sink=sink,
                    status=DeliveryState.PENDING,
                    attempts=0,
                    created_at=now,
                    next_attempt_at=now,
                )
            )
        else:
            # A fresh max_age window: the operator asked for this delivery now.
            conn.execute(
                update(OutboxRow)
                .where(col(OutboxRow.id) == row_id)
                .values(status=DeliveryState.PENDING, created_at=now, next_attempt_at=now, delivered_at=None)
            )
        n += 1
    conn.execute(
        update(SinkState)
        .where(col(SinkState.name) == sink)
        .values(consecutive_failures=0, next_attempt_at=None)
    )
    return n


def enable_sink(conn: Connection, sink: str) -> bool:
    """Switch a sink back on and end its back-off; False when it was not disabled."""
    was_disabled = bool(
        conn.execute(select(col(SinkState.disabled)).where(col(SinkState.name) == sink)).scalar()
    )
    conn.execute(
        update(SinkState)
        .where(col(SinkState.name) == sink)
        .values(disabled=False, disabled_reason=None, consecutive_failures=0, next_attempt_at=None)
    )
    return was_disabled


# -- housekeeping ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneBounds:
    """How far one prune may go, found before it deletes anything. Each batch checks its rows again
    in its own transaction, so a row that changed since (a replayed delivery) is left alone."""

    #: Delivered outbox rows delivered before this time go.
    deliveries_before: str
    #: ... and they belong to events below this sequence (those detected before that time).
    delivery_sequence_below: int
    #: Poll runs started before this time go ...
    polls_before: str
    #: ... with an id below this: none after the success before the last one (notices count them).
    poll_id_below: int
    #: The last successful run of each source (``has_baseline``): kept whatever its age.
    kept_polls: tuple[int, ...]
    #: Audit events detected before this time go (None: the audit log is kept forever) ...
    events_before: str | None
    #: ... below this sequence: never the newest event, whose sequence the next one follows.
    event_sequence_below: int
    #: The newest event of each ``watcher.*`` type (the notices' state is read from them): kept.
    kept_events: tuple[int, ...]


def prune_bounds(
    conn: Connection, *, deliveries_before: str, polls_before: str, events_before: str | None
) -> PruneBounds:
    """The bounds of a prune at these cut-offs (each found on an index, reading no range)."""
    seq, detected = col(EventRecord.sequence), col(EventRecord.detected_at)
    last = last_sequence(conn)

    def first_event_at(when: str) -> int:
        q = select(seq).where(detected >= when).order_by(detected, seq).limit(1)
        found = conn.execute(q).scalar()
        return int(found) if found is not None else last + 1

    run_id = col(PollRun.id)
    first_run = conn.execute(
        select(run_id)
        .where(col(PollRun.started_at) >= polls_before)
        .order_by(col(PollRun.started_at))
        .limit(1)
    ).scalar()
    if first_run is None:
        first_run = int(conn.execute(select(func.coalesce(func.max(run_id), 0))).scalar() or 0) + 1
    successes = conn.execute(
        select(run_id).where(col(PollRun.outcome) == PollOutcome.SUCCEEDED).order_by(run_id.desc()).limit(2)
    ).all()
    # With fewer than two successes every failure may still be part of the story notices tell.
    floor = int(successes[1][0] or 0) if len(successes) == 2 else 0
    # One index seek per source and per notice type (a GROUP BY would read the whole index).
    kept_polls = [
        conn.execute(
            select(func.max(col(PollSource.poll_id))).where(
                col(PollSource.source) == source, col(PollSource.outcome) == PollOutcome.SUCCEEDED
            )
        ).scalar()
        for source in Source
    ]
    kept_events = [
        conn.execute(select(func.max(seq)).where(col(EventRecord.type) == t)).scalar()
        for t in EventType
        if t.startswith("watcher.")
    ]
    return PruneBounds(
        deliveries_before=deliveries_before,
        delivery_sequence_below=first_event_at(deliveries_before),
        polls_before=polls_before,
        poll_id_below=min(int(first_run), floor),
        kept_polls=tuple(sorted(int(p) for p in kept_polls if p is not None)),
        events_before=events_before,
        event_sequence_below=0 if events_before is None else min(first_event_at(events_before), last),
        kept_events=tuple(sorted(int(e) for e in kept_events if e is not None)),
    )


def _delivered_before(cutoff: str) -> list[Any]:
    return [col(OutboxRow.status) == DeliveryState.DELIVERED, col(OutboxRow.delivered_at) < cutoff]


def _prunable_events(bounds: PruneBounds, *, after: int) -> list[Any]:
    seq = col(EventRecord.sequence)
    conds = [
        seq > after,
        seq < bounds.event_sequence_below,
        col(EventRecord.detected_at) < bounds.events_before,
    ]
    if bounds.kept_events:
        conds.append(seq.not_in(bounds.kept_events))
    return conds


def _prunable_polls(bounds: PruneBounds, *, after: int) -> list[Any]:
    run_id = col(PollRun.id)
    conds = [run_id > after, run_id < bounds.poll_id_below, col(PollRun.started_at) < bounds.polls_before]
    if bounds.kept_polls:
        conds.append(run_id.not_in(bounds.kept_polls))
    return conds


def prune_deliveries(
    conn: Connection, bounds: PruneBounds, *, after: int, limit: int
) -> tuple[int, int | None]:
    """Delete the delivered outbox rows of up to ``limit`` events above sequence ``after`` (pending
    and dead rows stay: they are still to deliver, or to ``replay``). Returns (rows deleted, the
    cursor to pass next; None when nothing is left)."""
    seq = col(OutboxRow.sequence)
    window = [seq > after, seq < bounds.delivery_sequence_below, *_delivered_before(bounds.deliveries_before)]
    found = conn.execute(select(seq).where(*window).order_by(seq).limit(limit)).all()
    if not found:
        return 0, None
    upto = int(found[-1][0])
    deleted = conn.execute(delete(OutboxRow).where(*window, seq <= upto)).rowcount
    return int(deleted or 0), upto if len(found) == limit else None


def prune_events(conn: Connection, bounds: PruneBounds, *, after: int, limit: int) -> tuple[int, int | None]:
    """Delete up to ``limit`` audit events above sequence ``after`` that no outbox row holds any
    more (one pending, dead, or delivered within ``keep_deliveries`` keeps its event)."""
    if bounds.events_before is None:
        return 0, None
    seq = col(EventRecord.sequence)
    held = exists().where(col(OutboxRow.sequence) == seq)
    found = [
        int(r[0])
        for r in conn.execute(
            select(seq).where(*_prunable_events(bounds, after=after), ~held).order_by(seq).limit(limit)
        )
    ]
    if not found:
        return 0, None
    deleted = conn.execute(delete(EventRecord).where(seq.in_(found))).rowcount
    return int(deleted or 0), found[-1] if len(found) == limit else None


def prune_polls(
    conn: Connection, bounds: PruneBounds, *, after: int, limit: int
) -> tuple[int, int, int | None]:
    """Delete up to ``limit`` poll runs above id ``after``, each with its sources' rows. Returns
    (runs deleted, source rows deleted, the cursor to pass next or None)."""
    run_id = col(PollRun.id)
    found = [
        int(r[0] or 0)
        for r in conn.execute(
            select(run_id).where(*_prunable_polls(bounds, after=after)).order_by(run_id).limit(limit)
        )
    ]
    if not found:
        return 0, 0, None
    sources = conn.execute(delete(PollSource).where(col(PollSource.poll_id).in_(found))).rowcount
    runs = conn.execute(delete(PollRun).where(run_id.in_(found))).rowcount
    return int(runs or 0), int(sources or 0), found[-1] if len(found) == limit else None


def prunable_counts(conn: Connection, bounds: PruneBounds) -> dict[str, int]:
    """What a prune at ``bounds`` would delete now: outbox rows, events, poll runs, source rows."""
    seq = col(OutboxRow.sequence)
    deliveries = conn.execute(
        select(func.count()).where(
            seq < bounds.delivery_sequence_below, *_delivered_before(bounds.deliveries_before)
        )
    ).scalar()
    events = 0
    if bounds.events_before is not None:
        # An event goes once every outbox row it has would have gone first.
        staying = exists().where(
            col(OutboxRow.sequence) == col(EventRecord.sequence),
            ~and_(*_delivered_before(bounds.deliveries_before)),
        )
        events = (
            conn.execute(select(func.count()).where(*_prunable_events(bounds, after=0), ~staying)).scalar()
            or 0
        )
    runs = select(col(PollRun.id)).where(*_prunable_polls(bounds, after=0))
    polls = conn.execute(select(func.count()).select_from(runs.subquery())).scalar()
    sources = conn.execute(select(func.count()).where(col(PollSource.poll_id).in_(runs))).scalar()
    return {
        "deliveries": int(deliveries or 0),
        "events": int(events),
        "polls": int(polls or 0),
        "poll_sources": int(sources or 0),
    }
