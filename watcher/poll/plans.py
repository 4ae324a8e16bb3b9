"""The plans source: who is on which plan, read in full each poll, diffed, and committed on its own.

A :class:`PlanRead` reads in a thread of its own while the customers' cycle runs:

1. ``GET /v1/plans`` in full: which plans exist. The watched plans are those, or ``[plans] plan_ids``.
2. Every watched plan's members (``status=all``, every page). While a plan's pages come back with
   the digests its pages had in the last successful read (the plan page memo), nothing of them is
   parsed or kept; a plan whose pages all do is unchanged, and costs its requests and nothing else.
   From a plan's first other page on, its stored fingerprints are loaded, pages seen before take
   their fingerprints from the memo, the others are parsed and fingerprinted, and only memberships
   whose fingerprints are not stored are staged (``store.plans``). Stored fingerprints not seen
   belong to memberships that changed (staged) or are gone.
3. Once the customers' cycle has ended (committed or not), :meth:`PlanRead.finish` commits in one
   transaction of its own (DESIGN rule 5, per source): staged memberships become state and
   ``customer.plan_added`` / ``plan_updated`` / ``plan_ended`` events, gone ones ``plan_removed``,
   memberships whose end has come by the poll's clock ``plan_ended`` (once), the plans and the memo
   are stored, and the poll's outcome is settled from both sources'.

Any failure before that commit leaves the plans as they were, and holds back nothing of the
customers (nor they anything of the plans): one source's trouble is its own.

A plan's first complete read is its baseline, silent unless ``diff.emit_baseline_events``: the
first plans read, or a plan newly named in ``plan_ids``. A plan that appears in ``GET /v1/plans``
after the first plans read is new on the account, and its members are reported as added.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from sqlalchemy import Connection

from .._time import Clock, format_ts, parse_ts
from ..config import DiffConfig, PlansConfig
from ..diff import diff_records
from ..errors import NotLeader, PollCancelled, PollRefused, WatcherError
from ..events import EventType, EventWriter, PollOutcome
from ..fingerprint import canonical_all, fingerprints
from ..routing import Route, Router
from ..store import Store
from ..store.plans import PlanSession, StagedMember, StoredMember, StoredPlan
from .memo import fingerprints_of, pack, pack_fingerprints, unpack
from .source import PlanSource, failure_reason

__all__ = ["PlanRead", "PlansResult", "plan_view"]

log = structlog.get_logger("watcher.poll")

#: Memberships staged per statement batch, and applied per batch in the commit.
_STAGE_BATCH = 2000
_COMMIT_BATCH = 500
#: The ``plan_details`` keys that ``plan_view`` renames; any other key is kept as it is.
_RENAMED = {"id": "plan_id", "name": "plan_name"}
_VIEW_KEYS = ("plan_id", "plan_name", "customer_plan_id", "starting_on", "ending_before", "custom_fields")


@dataclass(frozen=True)
class PlansResult:
    """How the plans source fared in one poll."""

    outcome: PollOutcome
    #: The first successful plans read: recorded silently (unless diff.emit_baseline_events).
    baseline: bool = False
    #: Plans whose members were read, and the memberships held once committed.
    plans: int = 0
    memberships: int = 0
    pages: int = 0
    events_by_type: Mapping[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is PollOutcome.SUCCEEDED

    @property
    def events(self) -> int:
        return sum(self.events_by_type.values())


def plan_view(item: Mapping[str, Any]) -> dict[str, Any]:
    """A membership as events carry it (``plan``): ``plan_id``, ``plan_name``, ``customer_plan_id``,
    ``starting_on``, ``ending_before`` (null while no end is set), ``custom_fields``, then any other
    key of ``plan_details`` as listed (unknown fields are data)."""
    details = item["plan_details"]
    view: dict[str, Any] = dict.fromkeys(_VIEW_KEYS)
    for key, value in details.items():
        view[_RENAMED.get(key, key)] = value
    return view


def _ends_at(item: Mapping[str, Any]) -> str | None:
    """``ending_before`` in the store's comparable form (the page's checks made sure it parses)."""
    ends = item["plan_details"].get("ending_before")
    return None if ends is None else format_ts(parse_ts(ends))


@dataclass
class _PlanState:
    """What one watched plan's read left for the commit."""

    #: Its pages' digests and fingerprints, to store as its memo (None: unchanged, keep the stored one).
    memo: list[tuple[bytes, bytes]] | None = None
    #: Distinct fingerprints seen on its pages (a changed plan only).
    seen: int = 0
    #: Memberships held for it when unchanged (from its memo).
    unchanged_count: int = 0
    silent: bool = False


class PlanRead:
    """One poll's read of the plans source, then its commit; see the module's docstring.

    :meth:`start` reads in a thread; :meth:`finish` (from the poll's thread, after the customers'
    cycle) waits for it and commits, or records why it could not; :meth:`abandon` gives up.
    """

    def __init__(
        self,
        store: Store,
        source: PlanSource,
        *,
        config: PlansConfig,
        diff: DiffConfig,
        routes: Sequence[Route],
        clock: Clock,
        cancel: threading.Event,
    ) -> None:
        self.store = store
        self.source = source
        self.config = config
        self.diff = diff
        self.routes = tuple(routes)
        self.clock = clock
        self.cancel = cancel
        self.pages = 0
        self.baseline = False
        self.error: BaseException | None = None
        self._session: PlanSession | None = None
        self._stored: dict[str, StoredPlan] = {}
        #: plan id -> its record as ``GET /v1/plans`` listed it now (canonical JSON).
        self._listed: dict[str, bytes] = {}
        self._plans: dict[str, _PlanState] = {}
        #: Memberships of changed plans not seen in this read, nor staged: gone.
        self._gone: list[str] = []
        #: Watched plans gone from the listing, whose memberships are all gone with them.
        self._vanished: list[str] = []
        #: Plans no longer watched (``plan_ids`` changed): forgotten silently.
        self._unwatched: list[str] = []
        #: The memberships of those two kinds of plans.
        self._vanished_members: list[str] = []
        self._unwatched_members: list[str] = []
        self._staged = 0
        self._buf: list[StagedMember] = []
        self._lock = threading.Lock()
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="plans", daemon=True)

    # -- the read -------------------------------------------------------------------------------

    def start(self) -> PlanRead:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._session = self.store.plan_session()
            self._read(self._session)
        except BaseException as exc:  # raised in the poll's thread, by finish()
            self.error = exc
        finally:
            with self._lock:
                if self._abandoned and self._session is not None:
                    self._session.close()

    def _check_cancel(self) -> None:
        if self.cancel.is_set() or self._abandoned:
            raise PollCancelled("poll abandoned: shutting down")

    def _read(self, session: PlanSession) -> None:
        session.tune(cache_kib=4096)
        has_baseline, self._stored, memo = session.snapshot()
        self.baseline = not has_baseline
        session.create_staging()
        for page in self.source.plan_pages():
            self._check_cancel()
            self.pages += 1
            records = page.parse()
            for plan_id, data in zip([r["id"] for r in records], canonical_all(records), strict=True):
                self._listed[plan_id] = data
        watched = list(self.config.plan_ids or self._listed)
        missing = [p for p in watched if p not in self._listed]
        for plan_id in missing:
            if plan_id not in self._stored:
                raise PollRefused(
                    f"plans.plan_ids names plan {plan_id!r}, which GET /v1/plans does not list "
                    f"({len(self._listed)} plans listed)"
                )
            log.warning("poll.plan_not_listed", plan_id=plan_id)
        for plan_id in watched:
            if plan_id in self._listed:
                self._check_cancel()
                self._read_plan(session, plan_id, memo.get(plan_id))
        self._flush(session)
        for plan_id, stored in self._stored.items():
            if stored.watched and plan_id not in self._plans:
                if plan_id in self._listed:
                    self._unwatched.append(plan_id)
                    self._unwatched_members += session.members_of(plan_id)
                else:
                    self._vanished.append(plan_id)
                    self._vanished_members += session.members_of(plan_id)
        self._guard(session)

    def _mode(self, plan_id: str) -> str:
        """``diff`` a plan read before; ``new``: appeared since the last plans read; else ``baseline``."""
        stored = self._stored.get(plan_id)
        if stored is not None and stored.watched:
            return "diff"
        if not self.baseline and (stored is None or not stored.listed):
            return "new"
        return "baseline"

    def _read_plan(self, session: PlanSession, plan_id: str, memo_blob: bytes | None) -> None:
        mode = self._mode(plan_id)
        memo = unpack(memo_blob) if memo_blob is not None and mode == "diff" else None
        known = dict(memo or ())
        state = self._plans[plan_id] = _PlanState(
            silent=mode == "baseline" and not self.diff.emit_baseline_events
        )
        # While every page so far is the memo's page at the same place, only its digest is kept.
        matching: list[tuple[bytes, bytes]] | None = [] if memo is not None else None
        stored: set[int] = set(session.member_hashes(plan_id)) if memo is None and mode == "diff" else set()
        seen: set[int] = set()
        pages: list[tuple[bytes, bytes]] = []
        digests = True  # every page had one (else no memo is kept)

        def diverge() -> None:
            nonlocal matching
            if mode == "diff":
                stored.update(session.member_hashes(plan_id))
            for _, packed in matching or ():
                seen.update(fingerprints_of(packed))
            pages.extend(matching or ())
            matching = None

        for body in self.source.member_pages(plan_id):
            self._check_cancel()
            self.pages += 1
            digest = body.digest
            if matching is not None:
                assert memo is not None
                index = len(matching)
                if index < len(memo) and digest is not None and memo[index][0] == digest:
                    matching.append(memo[index])
                    continue
                diverge()
            packed = known.get(digest) if digest is not None else None
            if packed is not None:
                # Seen before: its fingerprints are stored ones (a memo is kept only while it holds
                # exactly the plan's stored fingerprints), so nothing on it needs staging.
                seen.update(fingerprints_of(packed))
                pages.append((digest, packed))  # type: ignore[arg-type]
                continue
            digests = digests and digest is not None
            self._page(plan_id, body.parse(), stored, seen, pages, digest)
        if matching is not None:
            assert memo is not None
            if len(matching) == len(memo):  # every page as last time: unchanged
                state.unchanged_count = sum(len(packed) // 8 for _, packed in memo)
                return
            diverge()
        state.memo = pages if digests else []
        state.seen = len(seen)
        gone = stored - seen
        if gone:
            self._flush(session)
            self._gone += session.unstaged(session.members_with(plan_id, sorted(gone)))

    def _page(
        self,
        plan_id: str,
        records: list[dict[str, Any]],
        stored: set[int],
        seen: set[int],
        pages: list[tuple[bytes, bytes]],
        digest: bytes | None,
    ) -> None:
        data = canonical_all(records)
        hashes = fingerprints(data)
        pages.append((digest or b"", pack_fingerprints(hashes)))
        seen.update(hashes)
        for item, blob, h in zip(records, data, hashes, strict=True):
            if h not in stored:
                cpid = item["plan_details"]["customer_plan_id"]
                self._buf.append((plan_id, cpid, item["customer_details"]["id"], h, blob, _ends_at(item)))
        if len(self._buf) >= _STAGE_BATCH:
            assert self._session is not None
            self._flush(self._session)

    def _flush(self, session: PlanSession) -> None:
        if self._buf:
            rows, self._buf = self._buf, []
            self._staged += len(rows)
            session.stage(rows)

    def _guard(self, session: PlanSession) -> None:
        """Refuse a read in which an implausible share of the known memberships is gone."""
        vanished = len(self._vanished_members)
        gone = len(self._gone) + vanished
        if not gone:
            return
        known = session.count_members()
        cfg = self.diff
        if gone > cfg.max_vanished_count and gone > cfg.max_vanished_fraction * known:
            raise PollRefused(
                f"{gone} of {known} known plan memberships are gone ({vanished} with plans no longer "
                f"listed; more than {cfg.max_vanished_fraction:.0%} and more than {cfg.max_vanished_count}); "
                "refusing to treat them as removed"
            )

    # -- the end: commit, or record the failure --------------------------------------------------

    def finish(self, poll_id: int, *, settle: bool = True) -> tuple[PlansResult, PollOutcome | None]:
        """Wait for the read, then commit it (or record why not); returns the plans' result and,
        with ``settle``, the poll's settled outcome. A bug is recorded, then raised again; a lease
        lost on a replicated store (:class:`~watcher.errors.NotLeader`) is raised, nothing recorded."""
        while self._thread.is_alive():
            self._thread.join(0.1)
            if self.cancel.is_set():
                self._thread.join(0.5)
                break
        try:
            if self._thread.is_alive() or self.cancel.is_set():
                raise PollCancelled("poll abandoned: shutting down")
            if self.error is not None:
                raise self.error
            assert self._session is not None
            return self._commit(self._session, poll_id, settle)
        except BaseException as exc:
            return self._failed(poll_id, exc, settle)
        finally:
            self._close()

    def abandon(self, poll_id: int | None) -> None:
        """Give up (the poll ended by an error of its own); recorded when the poll run exists."""
        self._abandoned = True
        self._thread.join(0.5)
        try:
            if poll_id is not None:
                self._failed(poll_id, PollCancelled("poll abandoned"), settle=True)
        finally:
            self._close()

    def _close(self) -> None:
        with self._lock:
            self._abandoned = True
            if self._session is not None and not self._thread.is_alive():
                try:
                    self.store.request_checkpoint()
                finally:
                    self._session.close()
                    self._session = None

    def _failed(
        self, poll_id: int, exc: BaseException, settle: bool
    ) -> tuple[PlansResult, PollOutcome | None]:
        if isinstance(exc, NotLeader):
            raise exc  # this replica lost the lease: it may record nothing (the new leader ends the run)
        if isinstance(exc, PollCancelled) or self.cancel.is_set():
            outcome, reason = PollOutcome.ABANDONED, "poll abandoned: shutting down"
        elif isinstance(exc, PollRefused):
            outcome, reason = PollOutcome.REFUSED, str(exc)
        else:
            outcome, reason = PollOutcome.FAILED, failure_reason(exc)
        with self.store.write() as conn:
            settled = PlanSession.finish(
                conn,
                poll_id,
                outcome=outcome,
                finished_at=format_ts(self.clock()),
                settle=settle,
                error=reason,
            )
        if outcome is PollOutcome.ABANDONED:
            log.info("poll.source_abandoned", poll_id=poll_id, source="plans", pages=self.pages)
        else:
            log.error("poll.source_failed", poll_id=poll_id, source="plans", outcome=outcome, error=reason)
            if not isinstance(exc, WatcherError):
                raise exc  # a bug: recorded as the plans' failure, and raised again, as the customers' are
        return PlansResult(outcome, pages=self.pages, error=reason), settled

    def _commit(
        self, session: PlanSession, poll_id: int, settle: bool
    ) -> tuple[PlansResult, PollOutcome | None]:
        now = self.clock()
        detected_at = format_ts(now)
        counts: Counter[str] = Counter()
        if self._staged:
            session.index_staging()
        with session.transaction("IMMEDIATE") as conn:
            writer = EventWriter(
                poll_id=poll_id,
                detected_at=detected_at,
                last_sequence=session.last_sequence(),
                route=Router(self.routes),
            )
            commit = _Commit(session, conn, writer, poll_id, detected_at, self.diff.ignore_fields, counts)
            silent = sorted(plan_id for plan_id, state in self._plans.items() if state.silent)
            session.insert_silently(silent, now=detected_at, poll_id=poll_id)
            commit.apply_staged(silent)
            commit.remove(self._gone + self._vanished_members)
            session.delete_members(conn, self._unwatched_members)
            commit.announce_endings()
            self._put_plans(session, conn, detected_at)
            memberships = 0
            for plan_id, state in self._plans.items():
                if state.memo is None:
                    memberships += state.unchanged_count
                    continue
                held = session.count_in(conn, plan_id)
                memberships += held
                # The memo stands for the plan's stored memberships only when it holds exactly their
                # fingerprints: each membership seen once (a page shift can show one twice).
                exact = held == state.seen and bool(state.memo)
                session.save_page_memo(conn, plan_id, pack(state.memo) if exact else None)
            for plan_id in self._vanished + self._unwatched:
                session.save_page_memo(conn, plan_id, None)
            session.append_events(*writer.take())
            settled = PlanSession.finish(
                conn,
                poll_id,
                outcome=PollOutcome.SUCCEEDED,
                finished_at=format_ts(self.clock()),
                settle=settle,
                baseline=self.baseline,
                pages=self.pages,
                items=memberships,
                events_by_type=dict(counts),
            )
        if self.baseline:
            log.info("poll.plans_baseline", poll_id=poll_id, plans=len(self._plans), memberships=memberships)
        result = PlansResult(
            PollOutcome.SUCCEEDED,
            baseline=self.baseline,
            plans=len(self._plans),
            memberships=memberships,
            pages=self.pages,
            events_by_type=dict(counts),
        )
        return result, settled

    def _put_plans(self, session: PlanSession, conn: Connection, now: str) -> None:
        """The plans as listed now (written only where they differ from what is stored)."""
        new, changed = [], []
        read = set(self._plans)
        for plan_id, data in self._listed.items():
            record = data.decode()
            name = str(orjson.loads(data).get("name") or "")
            watched = plan_id in read
            stored = self._stored.get(plan_id)
            if stored is None:
                new.append(
                    {
                        "id": plan_id,
                        "name": name,
                        "record": record,
                        "listed": True,
                        "watched": watched,
                        "first_seen_at": now,
                        "changed_at": now,
                    }
                )
            elif stored != StoredPlan(record, True, watched):
                changed.append(
                    {"key": plan_id, "name": name, "record": record, "listed": True, "watched": watched}
                    | {"changed_at": now}
                )
        for plan_id, stored in self._stored.items():
            if plan_id not in self._listed and (stored.listed or stored.watched):
                name = str(orjson.loads(stored.record).get("name") or "")
                changed.append(
                    {"key": plan_id, "name": name, "record": stored.record, "listed": False, "watched": False}
                    | {"changed_at": now}
                )
        session.put_plans(conn, new, changed)


class _Commit:
    """The plans' one transaction: staged memberships, gone ones, endings that came."""

    def __init__(
        self,
        session: PlanSession,
        conn: Connection,
        writer: EventWriter,
        poll_id: int,
        now: str,
        ignore: Sequence[str],
        counts: Counter[str],
    ) -> None:
        self.session = session
        self.conn = conn
        self.writer = writer
        self.poll_id = poll_id
        self.now = now
        # ``diff.ignore_fields`` entries under ``plan.`` apply to a membership's own fields.
        self.ignore = tuple(f.removeprefix("plan.") for f in ignore if f.startswith("plan."))
        self.counts = counts

    def _event(
        self,
        event_type: EventType,
        item: Mapping[str, Any],
        previous: Mapping[str, Any] | None,
        changes: list[Any],
    ) -> None:
        plan = plan_view(item)
        self.writer.add(
            event_type,
            item["customer_details"]["id"],
            item["customer_details"],
            None,
            changes,
            extra={"plan": plan, "previous_plan": None if previous is None else plan_view(previous)},
        )
        self.counts[event_type.value] += 1

    def _staged_batches(self, besides: Sequence[str]) -> Iterator[list[tuple[Any, ...]]]:
        last = ""
        while rows := self.session.chosen_staged(last, _COMMIT_BATCH, besides=besides):
            last = rows[-1][1]
            yield rows

    def apply_staged(self, silent: Sequence[str]) -> None:
        """The staged memberships of every plan but the ``silent`` ones (stored already)."""
        for rows in self._staged_batches(silent):
            stored = self.session.load_members(self.conn, [r[1] for r in rows])
            inserts, updates = [], []
            for plan_id, cpid, customer_id, h, blob, ends_at, _ in rows:
                item = orjson.loads(blob)
                ended = ends_at is not None and ends_at <= self.now
                old = stored.get(cpid)
                event = self._classify(item, old, ended)
                values = {
                    "plan_id": plan_id,
                    "customer_id": customer_id,
                    "hash": h,
                    "record": bytes(blob).decode(),
                    "ends_at": ends_at,
                    "ended": ended,
                    "changed_at": self.now if (event or old is None) else old.changed_at,
                    "last_poll_id": self.poll_id,
                }
                if old is None:
                    inserts.append({"customer_plan_id": cpid, "first_seen_at": self.now, **values})
                else:
                    updates.append({"key": cpid, **values})
            self.session.insert_members(self.conn, inserts)
            self.session.update_members(self.conn, updates)
            self.session.append_events(*self.writer.take())

    def _classify(self, item: dict[str, Any], old: StoredMember | None, ended: bool) -> EventType | None:
        """Which event a staged membership makes (written through the writer), if any."""
        if old is None:
            self._event(EventType.CUSTOMER_PLAN_ADDED, item, None, [])
            return EventType.CUSTOMER_PLAN_ADDED
        previous = orjson.loads(old.record)
        changes = [
            {**c.as_dict(), "field": f"plan.{c.field}"}
            for c in diff_records(plan_view(previous), plan_view(item), self.ignore)
        ]
        if ended and not old.ended:
            event_type = EventType.CUSTOMER_PLAN_ENDED
        elif changes or old.ended != ended:
            event_type = EventType.CUSTOMER_PLAN_UPDATED
        else:
            return None  # the customer's own record changed, or ignored fields: refreshed silently
        self._event(event_type, item, previous, changes)
        return event_type

    def remove(self, cpids: Sequence[str]) -> None:
        for i in range(0, len(cpids), _COMMIT_BATCH):
            chunk = cpids[i : i + _COMMIT_BATCH]
            stored = self.session.load_members(self.conn, chunk)
            for cpid in chunk:
                last = orjson.loads(stored[cpid].record)
                self._event(EventType.CUSTOMER_PLAN_REMOVED, last, last, [])
            self.session.delete_members(self.conn, chunk)
            self.session.append_events(*self.writer.take())

    def announce_endings(self) -> None:
        """``customer.plan_ended`` for memberships whose end has come by the poll's clock since the
        last read, though nothing about them changed in the API."""
        last = ""
        while rows := self.session.due_endings(self.conn, self.now, last, _COMMIT_BATCH):
            last = rows[-1][0]
            for _, record in rows:
                item = orjson.loads(record)
                self._event(EventType.CUSTOMER_PLAN_ENDED, item, item, [])
            self.session.mark_ended(
                self.conn, [cpid for cpid, _ in rows], changed_at=self.now, poll_id=self.poll_id
            )
            self.session.append_events(*self.writer.take())
