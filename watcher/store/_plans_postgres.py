"""The plans source's session on PostgreSQL: its staging table, with PostgreSQL's tools.

The statements both engines share are :class:`~watcher.store.plans.PlanSession`'s; here are the
temporary table ``plan_staged`` and what reads it. As the customers' cycle's
(:mod:`watcher.store._cycle_postgres`), the table is ``ON COMMIT DROP`` in a transaction held open
from the read's start to its commit, so that nothing of the read lives in the session between
transactions (a transaction-mode pooler may hand the next one another server connection) and a
failed read's staging goes with its rollback. ``COPY`` fills it; ``DISTINCT ON`` picks the latest
sighting of each membership; sets of ids travel as one array parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._cycle_postgres import PostgresSourceSession
from .plans import PlanSession, StagedMember

__all__ = ["PostgresPlanSession"]

_STAGED_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS plan_staged (seq bigserial, plan_id text NOT NULL, "
    "customer_plan_id text NOT NULL, customer_id text NOT NULL, hash bigint NOT NULL, "
    "record bytea NOT NULL, ends_at text) ON COMMIT DROP"
)
_COPY_STAGED = (
    "COPY plan_staged (plan_id, customer_plan_id, customer_id, hash, record, ends_at) "
    "FROM STDIN (FORMAT BINARY)"
)
_STAGED_TYPES = ["text", "text", "text", "int8", "bytea", "text"]
#: One staged row per membership, in customer_plan_id order: the latest sighting of it; the plans
#: read silently are left to ``_INSERT_SILENT``.
_CHOSEN_STAGED = (
    "SELECT DISTINCT ON (customer_plan_id) plan_id, customer_plan_id, customer_id, hash, record, "
    "ends_at, seq FROM plan_staged WHERE customer_plan_id > %s AND NOT (plan_id = ANY(%s::text[])) "
    "ORDER BY customer_plan_id, seq DESC LIMIT %s"
)
#: A silent baseline's memberships (the latest sighting of each) into ``plan_members`` in one
#: statement: nothing is stored for those plans yet, and nothing is said about them.
_INSERT_SILENT = (
    "INSERT INTO plan_members (customer_plan_id, plan_id, customer_id, hash, record, ends_at, ended, "
    "first_seen_at, changed_at, last_poll_id) SELECT DISTINCT ON (customer_plan_id) customer_plan_id, "
    "plan_id, customer_id, hash, convert_from(record, 'UTF8'), ends_at, coalesce(ends_at <= %(now)s, false), "
    "%(now)s, %(now)s, %(poll)s FROM plan_staged WHERE plan_id = ANY(%(plans)s::text[]) "
    "ORDER BY customer_plan_id, seq DESC "
    "ON CONFLICT (customer_plan_id) DO UPDATE SET plan_id = excluded.plan_id, "
    "customer_id = excluded.customer_id, hash = excluded.hash, record = excluded.record, "
    "ends_at = excluded.ends_at, ended = excluded.ended, first_seen_at = excluded.first_seen_at, "
    "changed_at = excluded.changed_at, last_poll_id = excluded.last_poll_id"
)


class PostgresPlanSession(PostgresSourceSession, PlanSession):
    """The plans source's connection for one poll on PostgreSQL (see
    :class:`~watcher.store._cycle_postgres.PostgresSourceSession`)."""

    # -- staging --------------------------------------------------------------------------------

    def create_staging(self) -> None:
        """The staging table, in a transaction held open until the plans commit (or fail)."""
        with self._cur() as cur:
            cur.execute(_STAGED_DDL)
            cur.execute("TRUNCATE plan_staged")
        self._held = True

    def stage(self, rows: Sequence[StagedMember]) -> None:
        with self.transaction(), self._cur() as cur, cur.copy(_COPY_STAGED) as copy:
            copy.set_types(_STAGED_TYPES)
            for row in rows:
                copy.write_row(row)

    def index_staging(self) -> None:
        with self.transaction(), self._cur() as cur:
            cur.execute("CREATE INDEX ON plan_staged (customer_plan_id)")
            cur.execute("ANALYZE plan_staged")  # temporary tables are never analysed by autovacuum

    def unstaged(self, cpids: Sequence[str]) -> list[str]:
        """Those of ``cpids`` that were not staged (seen nowhere in this read)."""
        with self.transaction():
            staged = {
                cpid
                for (cpid,) in self._rows(
                    "SELECT customer_plan_id FROM plan_staged WHERE customer_plan_id = ANY(%s::text[])",
                    (list(cpids),),
                )
            }
        return [cpid for cpid in cpids if cpid not in staged]

    def chosen_staged(self, after: str, limit: int, *, besides: Sequence[str] = ()) -> list[tuple[Any, ...]]:
        return self._rows(_CHOSEN_STAGED, (after, list(besides), limit))

    def insert_silently(self, plan_ids: Sequence[str], *, now: str, poll_id: int) -> None:
        if plan_ids:
            with self._cur() as cur:
                cur.execute(_INSERT_SILENT, {"now": now, "poll": poll_id, "plans": list(plan_ids)})
