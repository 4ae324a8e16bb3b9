"""Moving a store: every table of a SQLite store copied into an empty PostgreSQL one, and checked.

The customers' state and the plans' (memberships, plans, their page memo), the poll history with
each source's outcome, the audit log, the outbox, each sink's state and the page memo: everything
but the schema's version and the leader lease.

``metronome-watcher store migrate --to postgresql://...`` runs :func:`copy_store`. Both stores are
opened by :class:`~watcher.store.Store` first, so both are at this release's schema (the source is
migrated in place, as any start would). The copy is one transaction on the target: it lands whole
or not at all, and a target that holds anything at all is refused before anything is written.
Ids, sequences and timestamps are copied as they are, so event ids stay what receivers have seen,
``sequence`` carries on from where it was, and pending deliveries and back-offs are still due.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, func, insert, select, text

from ..errors import StoreError
from . import queries
from .database import Store
from .schema import (
    CustomerState,
    EventRecord,
    OutboxRow,
    PageMemo,
    Plan,
    PlanMember,
    PlanPageMemo,
    PollRun,
    PollSource,
    SinkState,
)

__all__ = ["TABLES", "TransferReport", "copy_store"]

#: What moves, in an order that satisfies the foreign keys (outbox rows name their events): every
#: table but ``meta`` (the target has its own, at the same version) and ``leases`` (a SQLite store
#: has no replicas, and the target's replicas take the lease afresh).
TABLES: tuple[Table, ...] = tuple(
    m.__table__  # type: ignore[attr-defined,union-attr]
    for m in (
        PollRun,
        PollSource,
        CustomerState,
        EventRecord,
        OutboxRow,
        SinkState,
        PageMemo,
        Plan,
        PlanMember,
        PlanPageMemo,
    )
)
#: Rows per INSERT (one executemany each).
_BATCH = 2000


@dataclass(frozen=True)
class TransferReport:
    #: table -> rows copied (equal in both stores: checked).
    rows: dict[str, int]
    #: The last ``sequence`` of the audit log (equal in both stores: checked).
    last_sequence: int


def copy_store(source: Store, target: Store) -> TransferReport:
    """Copy every row of ``source`` into ``target``, which must be empty; verify by counts and the
    last sequence. Raises :class:`StoreError` for a non-empty target or a failed check."""
    with source.read() as src, target.write() as dst:
        held = {t.name: n for t in TABLES if (n := _count(dst, t))}
        if held:
            what = ", ".join(f"{name}: {n} rows" for name, n in held.items())
            raise StoreError(
                f"the target store {target.description} is not empty ({what}); "
                "store migrate copies only into an empty store"
            )
        for table in TABLES:
            for batch in _batches(src, table):
                dst.execute(insert(table), batch)
        if target.dialect == "postgresql":
            _advance_sequences(dst)
        counts = {t.name: _count(src, t) for t in TABLES}
        copied = {t.name: _count(dst, t) for t in TABLES}
        last, copied_last = queries.last_sequence(src), queries.last_sequence(dst)
        if copied != counts or copied_last != last:
            raise StoreError(
                f"the copy does not match its source (rows {copied} against {counts}, last sequence "
                f"{copied_last} against {last}); nothing was committed"
            )
    return TransferReport(counts, last)


def _count(conn: Connection, table: Table) -> int:
    return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)


def _batches(conn: Connection, table: Table) -> Iterator[list[dict[str, Any]]]:
    result = conn.execute(select(table).order_by(*table.primary_key.columns))
    while chunk := result.fetchmany(_BATCH):
        yield [dict(row._mapping) for row in chunk]


def _advance_sequences(conn: Connection) -> None:
    """Ids were copied as they were: each table's id sequence must carry on after the largest."""
    for table in TABLES:
        column = table.autoincrement_column  # the one that has a sequence on PostgreSQL, if any
        if column is not None:
            conn.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table.name}', '{column.name}'), "
                    f"coalesce(max({column.name}), 1), max({column.name}) IS NOT NULL) FROM {table.name}"
                )
            )
