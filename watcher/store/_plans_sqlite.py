"""The plans source's session on SQLite: its staging table, through the ``sqlite3`` connection.

The statements both engines share are :class:`~watcher.store.plans.PlanSession`'s; here are the
TEMP table ``plan_staged`` and what reads it, many rows per statement, sets of ids as JSON arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from itertools import chain
from typing import Any

import orjson

from ._cycle_sqlite import STATEMENT_ROWS, SqliteSourceSession
from .plans import PlanSession, StagedMember, chunked

__all__ = ["SqlitePlanSession"]

_STAGED_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS plan_staged (plan_id TEXT NOT NULL, customer_plan_id TEXT NOT NULL, "
    "customer_id TEXT NOT NULL, hash INTEGER NOT NULL, record BLOB NOT NULL, ends_at TEXT)"
)
#: One staged row per membership, in customer_plan_id order: the latest sighting of it; the plans
#: read silently (a JSON array) are left to ``_INSERT_SILENT``.
_CHOSEN_STAGED = (
    "SELECT plan_id, customer_plan_id, customer_id, hash, record, ends_at, max(rowid) FROM temp.plan_staged "
    "WHERE customer_plan_id > ? AND plan_id NOT IN (SELECT value FROM json_each(?)) "
    "GROUP BY customer_plan_id ORDER BY customer_plan_id LIMIT ?"
)
#: A silent baseline's memberships (the latest sighting of each) into ``plan_members`` in one
#: statement: nothing is stored for those plans yet, and nothing is said about them.
_INSERT_SILENT = (
    "INSERT OR REPLACE INTO plan_members (customer_plan_id, plan_id, customer_id, hash, record, ends_at, "
    "ended, first_seen_at, changed_at, last_poll_id) SELECT customer_plan_id, plan_id, customer_id, hash, "
    "CAST(record AS TEXT), ends_at, coalesce(ends_at <= ?1, 0), ?1, ?1, ?2 FROM temp.plan_staged "
    "WHERE rowid IN (SELECT max(rowid) FROM temp.plan_staged "
    "WHERE plan_id IN (SELECT value FROM json_each(?3)) GROUP BY customer_plan_id)"
)


@functools.cache
def _insert_staged_sql(rows: int) -> str:
    return "INSERT INTO temp.plan_staged VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?)"] * rows)


class SqlitePlanSession(SqliteSourceSession, PlanSession):
    """The plans source's connection for one poll on SQLite (see
    :class:`~watcher.store._cycle_sqlite.SqliteSourceSession`)."""

    # -- staging --------------------------------------------------------------------------------

    def create_staging(self) -> None:
        self._db.execute(_STAGED_DDL)
        self._db.execute("DELETE FROM temp.plan_staged")

    def stage(self, rows: Sequence[StagedMember]) -> None:
        """Append memberships to the staging table (a transaction that takes no database lock)."""
        per_statement = min(STATEMENT_ROWS, self._max_params // 6)
        with self.transaction():
            for i in range(0, len(rows), per_statement):
                chunk = rows[i : i + per_statement]
                self._db.execute(_insert_staged_sql(len(chunk)), tuple(chain.from_iterable(chunk)))

    def index_staging(self) -> None:
        with self.transaction():
            self._db.execute(
                "CREATE INDEX IF NOT EXISTS temp.plan_staged_by_id ON plan_staged (customer_plan_id)"
            )

    def unstaged(self, cpids: Sequence[str]) -> list[str]:
        """Those of ``cpids`` that were not staged (seen nowhere in this read)."""
        out: list[str] = []
        with self.transaction():
            for chunk in chunked(list(cpids)):
                staged = {
                    cpid
                    for (cpid,) in self._db.execute(
                        "SELECT customer_plan_id FROM temp.plan_staged "
                        f"WHERE customer_plan_id IN ({', '.join('?' * len(chunk))})",
                        tuple(chunk),
                    )
                }
                out += [cpid for cpid in chunk if cpid not in staged]
        return out

    def chosen_staged(self, after: str, limit: int, *, besides: Sequence[str] = ()) -> list[tuple[Any, ...]]:
        """Up to ``limit`` staged memberships after customer_plan_id ``after``, one sighting each,
        of plans other than ``besides``."""
        return self._rows(_CHOSEN_STAGED, (after, orjson.dumps(list(besides)).decode(), limit))

    def insert_silently(self, plan_ids: Sequence[str], *, now: str, poll_id: int) -> None:
        """The staged memberships of plans read for the first time and silently, stored as they are
        (in the caller's transaction); a membership whose end has come by ``now`` is stored ended."""
        if plan_ids:
            self._db.execute(_INSERT_SILENT, (now, poll_id, orjson.dumps(list(plan_ids)).decode()))
