"""The plans source's session for one poll, whatever the engine, and its engine-neutral statements.

Like the customers' cycle (:mod:`watcher.store.cycle`), the plans read stages what it could not
settle by fingerprint in a temporary table of its own connection (``plan_staged``): no lock on the
database while it reads, nothing left behind when it fails. :class:`PlanSession` is what the read
and its commit call. Its statements are SQLAlchemy Core where a plain statement does, written
once here for both engines; the staging table and what reads it are each engine's own, beside this
module: SQLite's (:mod:`watcher.store._plans_sqlite`: the ``sqlite3`` connection beneath, many rows
per statement, JSON arrays for sets) and PostgreSQL's (:mod:`watcher.store._plans_postgres`:
``COPY``, ``DISTINCT ON``, arrays for sets, the read in one transaction as the cycle's is). A read
that finds nothing changed runs only the reads of :meth:`PlanSession.snapshot`,
:meth:`PlanSession.due_endings` and the poll's own rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlmodel import col

from ..events import PollOutcome, Source
from . import queries
from .cycle import SourceSession
from .schema import Plan, PlanMember, PlanPageMemo

__all__ = ["PlanSession", "StagedMember", "StoredMember", "StoredPlan"]

#: A membership the read could not settle: (plan id, customer_plan_id, customer id, fingerprint,
#: canonical JSON of the item, ``ends_at``).
StagedMember = tuple[str, str, str, int, bytes, str | None]

#: Ids per ``IN (...)`` list: well under SQLite's limit on parameters.
_IN_CHUNK = 500


class StoredPlan(NamedTuple):
    record: str
    listed: bool
    watched: bool


class StoredMember(NamedTuple):
    plan_id: str
    record: str
    ended: bool
    first_seen_at: str
    changed_at: str


def chunked(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    return (values[i : i + _IN_CHUNK] for i in range(0, len(values), _IN_CHUNK))


class PlanSession(SourceSession, Protocol):
    """The plans source's connection for one poll (see :class:`~watcher.store.cycle.SourceSession`).

    Each engine's session subclasses it: the methods with a body are the same on both (SQLAlchemy
    Core); those without are the engine's own, on its staging table.
    """

    def _all(self, statement: Any) -> list[Any]:
        """Rows of one read, in a transaction of its own (one takes no lock in WAL mode)."""
        with self.transaction() as conn:
            return list(conn.execute(statement).all())

    # -- what the read starts from --------------------------------------------------------------

    def snapshot(self) -> tuple[bool, dict[str, StoredPlan], dict[str, bytes]]:
        """In one read: whether a plans read ever succeeded, every stored plan, and the page memo."""
        with self.transaction() as conn:
            baseline = queries.has_baseline(conn, Source.PLANS)
            plans = {
                pid: StoredPlan(record, bool(listed), bool(watched))
                for pid, record, listed, watched in conn.execute(
                    select(col(Plan.id), col(Plan.record), col(Plan.listed), col(Plan.watched))
                )
            }
            memo = {
                plan_id: pages
                for plan_id, pages in conn.execute(select(col(PlanPageMemo.plan_id), col(PlanPageMemo.pages)))
            }
        return baseline, plans, memo

    def member_hashes(self, plan_id: str) -> list[int]:
        """The fingerprints of a plan's stored memberships (from the ``(plan_id, hash)`` index)."""
        return [
            h for (h,) in self._all(select(col(PlanMember.hash)).where(col(PlanMember.plan_id) == plan_id))
        ]

    def members_with(self, plan_id: str, hashes: Sequence[int]) -> list[str]:
        """The customer_plan_ids of a plan's stored memberships with these fingerprints."""
        out: list[Any] = []
        for chunk in chunked(list(hashes)):
            out += self._all(
                select(col(PlanMember.customer_plan_id)).where(
                    col(PlanMember.plan_id) == plan_id, col(PlanMember.hash).in_(chunk)
                )
            )
        return [cpid for (cpid,) in out]

    def members_of(self, plan_id: str) -> list[str]:
        return [
            cpid
            for (cpid,) in self._all(
                select(col(PlanMember.customer_plan_id)).where(col(PlanMember.plan_id) == plan_id)
            )
        ]

    def count_members(self, plan_id: str | None = None) -> int:
        q = select(func.count()).select_from(PlanMember)
        if plan_id is not None:
            q = q.where(col(PlanMember.plan_id) == plan_id)
        return int(self._all(q)[0][0])

    # -- staging (each engine's own) ------------------------------------------------------------

    def create_staging(self) -> None:
        """The staging table (gone when the session closes, or with the read's transaction)."""

    def stage(self, rows: Sequence[StagedMember]) -> None:
        """Append memberships to the staging table (which no other connection sees)."""

    def index_staging(self) -> None:
        """Index the staged rows by customer_plan_id, once the read is over."""

    def unstaged(self, cpids: Sequence[str]) -> list[str]:
        """Those of ``cpids`` that were not staged (seen nowhere in this read), in their order."""

    def chosen_staged(self, after: str, limit: int, *, besides: Sequence[str] = ()) -> list[tuple[Any, ...]]:
        """Up to ``limit`` staged memberships after customer_plan_id ``after``, in customer_plan_id
        order, the latest sighting of each, of plans other than ``besides``: (plan id,
        customer_plan_id, customer id, fingerprint, JSON, ends_at, -)."""

    def insert_silently(self, plan_ids: Sequence[str], *, now: str, poll_id: int) -> None:
        """The staged memberships of plans read for the first time and silently, stored as they are
        (the latest sighting of each, in the caller's transaction); a membership whose end has come
        by ``now`` is stored ended."""

    # -- the commit (inside the transaction its caller holds) -----------------------------------

    def load_members(self, conn: Connection, cpids: Sequence[str]) -> dict[str, StoredMember]:
        out: dict[str, StoredMember] = {}
        for chunk in chunked(list(cpids)):
            rows = conn.execute(
                select(
                    col(PlanMember.customer_plan_id),
                    col(PlanMember.plan_id),
                    col(PlanMember.record),
                    col(PlanMember.ended),
                    col(PlanMember.first_seen_at),
                    col(PlanMember.changed_at),
                ).where(col(PlanMember.customer_plan_id).in_(chunk))
            )
            for cpid, plan_id, record, ended, first, changed in rows:
                out[cpid] = StoredMember(plan_id, record, bool(ended), first, changed)
        return out

    @staticmethod
    def insert_members(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """New memberships: dicts of every ``PlanMember`` column."""
        if rows:
            conn.execute(insert(PlanMember), list(rows))

    @staticmethod
    def update_members(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Stored memberships seen changed: dicts of ``key`` (the customer_plan_id) and every other
        ``PlanMember`` column but ``first_seen_at``."""
        if not rows:
            return
        conn.execute(
            update(PlanMember)
            .where(col(PlanMember.customer_plan_id) == bindparam("key"))
            .values(
                plan_id=bindparam("plan_id"),
                customer_id=bindparam("customer_id"),
                hash=bindparam("hash"),
                record=bindparam("record"),
                ends_at=bindparam("ends_at"),
                ended=bindparam("ended"),
                changed_at=bindparam("changed_at"),
                last_poll_id=bindparam("last_poll_id"),
            ),
            list(rows),
        )

    @staticmethod
    def delete_members(conn: Connection, cpids: Sequence[str]) -> None:
        for chunk in chunked(list(cpids)):
            conn.execute(delete(PlanMember).where(col(PlanMember.customer_plan_id).in_(chunk)))

    @staticmethod
    def due_endings(conn: Connection, now: str, after: str, limit: int) -> list[tuple[str, str]]:
        """(customer_plan_id, record) of memberships whose end has come by ``now`` and was not
        announced yet, after ``after`` in customer_plan_id order (from a partial index: usually none)."""
        rows = conn.execute(
            select(col(PlanMember.customer_plan_id), col(PlanMember.record))
            .where(
                col(PlanMember.ended).is_(False),
                col(PlanMember.ends_at).is_not(None),
                col(PlanMember.ends_at) <= now,
                col(PlanMember.customer_plan_id) > after,
            )
            .order_by(col(PlanMember.customer_plan_id))
            .limit(limit)
        )
        return [(cpid, record) for cpid, record in rows]

    @staticmethod
    def mark_ended(conn: Connection, cpids: Sequence[str], *, changed_at: str, poll_id: int) -> None:
        for chunk in chunked(list(cpids)):
            conn.execute(
                update(PlanMember)
                .where(col(PlanMember.customer_plan_id).in_(chunk))
                .values(ended=True, changed_at=changed_at, last_poll_id=poll_id)
            )

    @staticmethod
    def put_plans(conn: Connection, new: Sequence[dict[str, Any]], changed: Sequence[dict[str, Any]]) -> None:
        """Insert ``new`` plans (dicts of every ``Plan`` column) and update ``changed`` ones (dicts of
        ``key``, ``name``, ``record``, ``listed``, ``watched`` and ``changed_at``)."""
        if new:
            conn.execute(insert(Plan), list(new))
        if changed:
            conn.execute(
                update(Plan)
                .where(col(Plan.id) == bindparam("key"))
                .values(
                    name=bindparam("name"),
                    record=bindparam("record"),
                    listed=bindparam("listed"),
                    watched=bindparam("watched"),
                    changed_at=bindparam("changed_at"),
                ),
                list(changed),
            )

    @staticmethod
    def save_page_memo(conn: Connection, plan_id: str, pages: bytes | None) -> None:
        """Store a plan's page memo (None: forget it)."""
        conn.execute(delete(PlanPageMemo).where(col(PlanPageMemo.plan_id) == plan_id))
        if pages is not None:
            conn.execute(insert(PlanPageMemo).values(plan_id=plan_id, pages=pages))

    @staticmethod
    def count_in(conn: Connection, plan_id: str) -> int:
        q = select(func.count()).select_from(PlanMember).where(col(PlanMember.plan_id) == plan_id)
        return int(conn.execute(q).scalar() or 0)

    @staticmethod
    def finish(
        conn: Connection,
        poll_id: int,
        *,
        outcome: PollOutcome,
        finished_at: str,
        settle: bool,
        baseline: bool = False,
        pages: int = 0,
        items: int = 0,
        events_by_type: dict[str, int] | None = None,
        error: str | None = None,
    ) -> PollOutcome | None:
        """Record how the plans fared; with ``settle`` (the last source done) settle the poll too."""
        queries.record_source(
            conn,
            poll_id,
            Source.PLANS,
            outcome=outcome,
            finished_at=finished_at,
            baseline=baseline,
            pages=pages,
            items=items,
            events_by_type=events_by_type,
            error=error,
        )
        return queries.settle_poll(conn, poll_id, finished_at=finished_at) if settle else None
