"""One poll cycle: list, reconcile, diff, and commit state + audit events + outbox together.

1. Both listings are read in full (:class:`~watcher.poll.scan.Scan`), and each record is
   fingerprinted, or a page seen before byte for byte takes its fingerprints from the page memo
   (:mod:`watcher.poll.memo`). A fingerprint covers the whole record, id included, so a record
   whose fingerprint is among its listing's stored ones is a stored customer, unchanged: settling
   it is removing the fingerprint. Only the rest (changed, new, moved between listings, seen
   twice) is *staged*, in batches, in a TEMP table of the cycle's own connection. A cycle without
   changes therefore writes nothing but its poll-run row, and holds integers rather than records.
2. What is left of the stored fingerprints belongs to stored customers not seen as stored: the
   staged ones are matched by id, the others vanished. Those are looked up by id (rule 3): 404
   means deleted, a record is used as seen, an error means no conclusion this cycle. Before that,
   the mass-vanish guard refuses an implausible cycle.
3. One ``BEGIN IMMEDIATE`` transaction turns the staged records into new state, audit events with
   consecutive ``sequence`` numbers and one outbox row per (event, routed sink) (rule 5), and stores
   the page memo.

A silent baseline into an empty store skips the staging: it has nothing to diff, so its rows go
straight into ``customers`` inside the one transaction, opened before the scan.

Any failure before the commit leaves nothing but the failed poll-run row (rule 1).

With ``[plans] watch`` on, :class:`Poller` reads the plans source (:mod:`watcher.poll.plans`) in a
thread of its own meanwhile; it commits in its own transaction once this cycle has ended, however
this cycle ended, and settles the poll's outcome from both.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from itertools import repeat
from operator import itemgetter
from typing import Any

import orjson
import structlog

from .. import metrics
from .._time import Clock, format_ts, utcnow
from ..config import DiffConfig, PlansConfig
from ..diff import diff_records
from ..errors import APIError, NotLeader, PollCancelled, PollRefused, StoreError, WatcherError
from ..events import CustomerStatus, EventType, EventWriter, Listing, PollOutcome, Source
from ..fingerprint import canonical, record_hash
from ..routing import Route, Router
from ..store import Store, queries
from ..store.cycle import BaselineWriter, CycleSession, Sighting
from ..store.lease import LeaseKeeper
from .lock import PollLock
from .memo import Memo
from .plans import PlanRead, PlansResult
from .scan import Scan, SeenPage
from .source import CustomerSource, PlanSource, failure_reason

__all__ = ["PollResult", "Poller"]

log = structlog.get_logger("watcher.poll")

#: Sightings are staged in batches of this size: large enough to amortise a transaction, small
#: enough that memory stays flat however many customers changed.
_STAGE_BATCH = 2000
#: Staged customers applied per batch in the final transaction.
_COMMIT_BATCH = 500
#: The page cache of the cycle's connection, in KiB (gone with the connection). The stored rows of
#: changed customers are read twice, scattered over the table; a silent baseline doubles it whenever
#: it has fewer bytes than ``_BASELINE_CACHE_BYTES_PER_ROW`` per row written, so that the id index,
#: written in random order, stays in the cache.
_CACHE_KIB = 16 * 1024
_BASELINE_CACHE_BYTES_PER_ROW = 128
#: The lease a cycle takes for itself on PostgreSQL when no daemon holds one (``[ha] lease``'s
#: default); renewed every third of it while the cycle runs.
_LEASE_SECONDS = 15.0


@dataclass(frozen=True)
class PollResult:
    poll_id: int
    outcome: PollOutcome
    baseline: bool = False
    pages: int = 0
    active: int = 0
    archived: int = 0
    events_by_type: Mapping[str, int] = field(default_factory=dict)
    duration: float = 0.0
    error: str | None = None
    #: Customers that vanished but whose lookup by id failed: no conclusion this cycle.
    unresolved: int = 0
    #: The plans source's result; None when plans are not watched. ``outcome`` and ``error`` are then
    #: the poll's as settled from both sources (``error`` names each source that failed), and
    #: ``events_by_type`` counts both sources' events.
    plans: PlansResult | None = None
    #: The sources that did not succeed, when the poll read more than one.
    failed_sources: tuple[str, ...] = ()
    #: False when the database failed and could not even record the failure (the disk is still
    #: full): ``error`` is then only here, in the log and in the metrics, and ``poll_id`` may be 0.
    recorded: bool = True

    @property
    def ok(self) -> bool:
        return self.outcome is PollOutcome.SUCCEEDED

    @property
    def customers_ok(self) -> bool:
        """Whether the customers were read and committed (whatever became of the plans)."""
        return self.ok or (self.plans is not None and Source.CUSTOMERS not in self.failed_sources)

    @property
    def events(self) -> int:
        return sum(self.events_by_type.values())


class Poller:
    """Runs poll cycles against one store. One cycle at a time per database, enforced across
    processes: on SQLite by :class:`~watcher.poll.lock.PollLock`; on PostgreSQL by the leader lease,
    which the daemon holds (``store.fence``) or which a cycle takes for itself (the ``poll`` command)."""

    def __init__(
        self,
        store: Store,
        source: CustomerSource,
        *,
        diff: DiffConfig | None = None,
        routes: Sequence[Route] = (),
        clock: Clock = utcnow,
        concurrent_listings: bool = True,
        plans: PlansConfig | None = None,
        plan_source: PlanSource | None = None,
    ) -> None:
        self.store = store
        self.source = source
        self.diff = diff or DiffConfig()
        self.routes = tuple(routes)
        self.clock = clock
        self.concurrent_listings = concurrent_listings
        #: The plans source, when ``plans.watch`` is on (``plan_source`` reads it).
        self.plans = plans if plans is not None and plans.watch else None
        if self.plans is not None and plan_source is None:
            raise ValueError("plans are watched, but no plan_source was given")
        self.plan_source = plan_source

    def run(self, *, cancel: threading.Event | None = None) -> PollResult:
        """Run one cycle. Never raises for API or database trouble: the outcome says what happened."""
        cancel = cancel or threading.Event()
        t0 = time.perf_counter()
        try:
            return self._run(cancel, t0)
        except StoreError as exc:  # the database failed, and the failure could not be recorded
            return self._unrecorded(None, exc.reason, time.perf_counter() - t0)

    def _run(self, cancel: threading.Event, t0: float) -> PollResult:
        with ExitStack() as guard:
            try:
                if self.store.path is not None:
                    guard.enter_context(PollLock(self.store.path))
                elif self.store.fence is None:  # no daemon holds the lease for us: hold it ourselves
                    guard.enter_context(LeaseKeeper(self.store, ttl=_LEASE_SECONDS).hold())
            except PollRefused as exc:
                return self._refused_by_lock(str(exc))
            if self.plans is not None:
                return self._run_both(cancel, t0)
            cycle = _Cycle(self, cancel)
            try:
                result = cycle.run()
            except NotLeader as exc:
                return self._not_leader(cycle, exc, time.perf_counter() - t0)
            except BaseException as exc:
                if cycle.poll_id is None:  # not even the poll run could be recorded
                    raise
                return self._failed(cycle, exc, cancel, time.perf_counter() - t0)
        result = replace(result, duration=time.perf_counter() - t0)
        self._count(result)
        self._completed(result)
        return result

    def _count(self, result: PollResult) -> None:
        """The poll's metrics, once it has settled."""
        metrics.POLLS.labels(result.outcome).inc()
        metrics.POLL_DURATION.observe(result.duration)
        for t, n in result.events_by_type.items():
            metrics.EVENTS.labels(t).inc(n)
        if result.customers_ok:
            metrics.CUSTOMERS.labels(CustomerStatus.ACTIVE).set(result.active)
            metrics.CUSTOMERS.labels(CustomerStatus.ARCHIVED).set(result.archived)

    def _completed(self, result: PollResult, **extra: Any) -> None:
        """A poll that succeeded: the time of the last success, and the poll's one summary line."""
        metrics.LAST_SUCCESSFUL_POLL.set(self.clock().timestamp())
        log.info(
            "poll.completed",
            poll_id=result.poll_id,
            outcome=PollOutcome.SUCCEEDED,
            baseline=result.baseline,
            duration_ms=round(result.duration * 1000),
            pages=result.pages,
            active=result.active,
            archived=result.archived,
            events=dict(result.events_by_type),
            unresolved=result.unresolved,
            **extra,
        )

    def _run_both(self, cancel: threading.Event, t0: float) -> PollResult:
        """A poll of both sources: the plans read beside the customers' cycle, each committing on its
        own, the plans last (they settle the poll's outcome)."""
        assert self.plans is not None and self.plan_source is not None
        plans = PlanRead(
            self.store,
            self.plan_source,
            config=self.plans,
            diff=self.diff,
            routes=self.routes,
            clock=self.clock,
            cancel=cancel,
        ).start()
        cycle = _Cycle(self, cancel, settle=False)
        try:
            try:
                customers = cycle.run()
            except NotLeader as exc:
                plans.abandon(None)  # nothing more may be written: the new leader ends the poll run
                return self._not_leader(cycle, exc, time.perf_counter() - t0)
            except BaseException as exc:
                if cycle.poll_id is None:
                    raise
                customers = self._failed(cycle, exc, cancel, time.perf_counter() - t0, settle=False)
        except BaseException:
            plans.abandon(cycle.poll_id)
            raise
        try:
            plans_result, settled = plans.finish(customers.poll_id)
        except NotLeader as exc:  # the plans' commit (or the record of their failure) was refused
            return self._not_leader(cycle, exc, time.perf_counter() - t0)
        assert settled is not None
        with self.store.read() as conn:
            poll = queries.get_poll(conn, customers.poll_id)
            failed = queries.failed_sources_of(conn, customers.poll_id)
        assert poll is not None
        by_type = Counter(customers.events_by_type)
        by_type.update(plans_result.events_by_type)
        result = replace(
            customers,
            outcome=settled,
            error=poll.error,
            events_by_type=dict(by_type),
            duration=time.perf_counter() - t0,
            plans=plans_result,
            failed_sources=failed,
        )
        self._count(result)
        plans_summary = {
            "outcome": plans_result.outcome,
            "baseline": plans_result.baseline,
            "plans": plans_result.plans,
            "memberships": plans_result.memberships,
            "pages": plans_result.pages,
        }
        if result.ok:
            self._completed(result, plans=plans_summary)
        elif settled is not PollOutcome.ABANDONED:
            log.error(
                "poll.failed",
                poll_id=result.poll_id,
                outcome=settled,
                error=result.error,
                failed_sources=list(failed),
                duration_ms=round(result.duration * 1000),
                events=dict(result.events_by_type),
                plans=plans_summary,
            )
        return result

    def _failed(
        self,
        cycle: _Cycle,
        exc: BaseException,
        cancel: threading.Event,
        duration: float,
        *,
        settle: bool = True,
    ) -> PollResult:
        """Record a cycle that ended without committing, and say why; bugs are raised again.

        Without ``settle`` another source is still reading: the customers' failure is recorded as
        theirs, and the poll's own outcome is left to the source that finishes last.
        """
        assert cycle.poll_id is not None
        if isinstance(exc, PollCancelled) or cancel.is_set():
            outcome, reason = PollOutcome.ABANDONED, "poll abandoned: shutting down"
        elif isinstance(exc, PollRefused):
            outcome, reason = PollOutcome.REFUSED, str(exc)
        else:
            outcome = PollOutcome.FAILED
            reason = failure_reason(exc)
        # Nothing staged survives: the staging table went away with the cycle's connection.
        finished_at = format_ts(self.clock())
        unrecorded: str | None = None
        try:
            with self.store.write() as conn:
                queries.record_source(
                    conn,
                    cycle.poll_id,
                    Source.CUSTOMERS,
                    outcome=outcome,
                    finished_at=finished_at,
                    error=reason,
                )
                if settle:
                    queries.fail_poll(
                        conn, cycle.poll_id, outcome=outcome, finished_at=finished_at, error=reason
                    )
        except NotLeader as lost:  # the new leader records the run as abandoned
            log.warning("poll.not_leader", poll_id=cycle.poll_id, error=str(lost))
        except StoreError as full:  # e.g. the disk is still full: the result and the log say it
            unrecorded = full.reason
        recorded = {} if unrecorded is None else {"recorded": False, "record_error": unrecorded}
        result = PollResult(
            cycle.poll_id,
            outcome,
            pages=cycle.pages,
            duration=duration,
            error=reason,
            recorded=unrecorded is None,
        )
        if not settle:
            if outcome is PollOutcome.ABANDONED:
                log.info("poll.source_abandoned", poll_id=cycle.poll_id, source=Source.CUSTOMERS)
            else:
                log.error(
                    "poll.source_failed",
                    poll_id=cycle.poll_id,
                    source=Source.CUSTOMERS,
                    outcome=outcome,
                    error=reason,
                    pages=cycle.pages,
                    **recorded,
                )
                if not isinstance(exc, WatcherError):
                    raise exc
            return result
        metrics.POLLS.labels(outcome).inc()
        metrics.POLL_DURATION.observe(duration)
        if outcome is PollOutcome.ABANDONED:
            # On shutdown the API client is closed under the poll's feet; whatever that raised is
            # not news, the abandonment is.
            log.info(
                "poll.abandoned", poll_id=cycle.poll_id, duration_ms=round(duration * 1000), pages=cycle.pages
            )
        else:
            log.error(
                "poll.failed",
                poll_id=cycle.poll_id,
                outcome=outcome,
                error=reason,
                duration_ms=round(duration * 1000),
                pages=cycle.pages,
                **recorded,
            )
            if not isinstance(exc, WatcherError):
                raise exc
        return result

    def _unrecorded(self, poll_id: int | None, reason: str, duration: float) -> PollResult:
        """A poll that failed on the database where not even its failure could be recorded."""
        metrics.POLLS.labels(PollOutcome.FAILED).inc()
        metrics.POLL_DURATION.observe(duration)
        log.error(
            "poll.failed",
            poll_id=poll_id,
            outcome=PollOutcome.FAILED,
            error=reason,
            duration_ms=round(duration * 1000),
            recorded=False,
        )
        return PollResult(poll_id or 0, PollOutcome.FAILED, duration=duration, error=reason, recorded=False)

    def _not_leader(self, cycle: _Cycle, exc: NotLeader, duration: float) -> PollResult:
        """The lease was lost during the cycle: it committed nothing, and this replica may write
        nothing more (the new leader records the poll run as abandoned when its own begins)."""
        metrics.POLLS.labels(PollOutcome.ABANDONED).inc()
        log.warning(
            "poll.not_leader", poll_id=cycle.poll_id, error=str(exc), duration_ms=round(duration * 1000)
        )
        return PollResult(
            cycle.poll_id or 0, PollOutcome.ABANDONED, pages=cycle.pages, duration=duration, error=str(exc)
        )

    def _refused_by_lock(self, error: str) -> PollResult:
        with self.store.write() as conn:
            poll_id = queries.record_refused_poll(conn, now=format_ts(self.clock()), error=error)
        metrics.POLLS.labels(PollOutcome.REFUSED).inc()
        log.error("poll.failed", poll_id=poll_id, outcome=PollOutcome.REFUSED, error=error)
        return PollResult(poll_id, PollOutcome.REFUSED, error=error)


class _Cycle:
    """The state of one cycle in progress; ``settle``: no other source reads in the same poll."""

    def __init__(self, poller: Poller, cancel: threading.Event, *, settle: bool = True) -> None:
        self.p = poller
        self.settle = settle
        #: The poll run's id, once it is recorded (the first thing the cycle writes).
        self.poll_id: int | None = None
        self.cancel = cancel
        self.pages = 0
        #: listing -> the fingerprints of the stored customers in that listing that no sighting has
        #: matched yet: the cycle's one account-sized structure, plain ints in two sets.
        self.known: dict[Listing, set[int]] = {listing: set() for listing in Listing}
        self.n_known = dict.fromkeys(Listing, 0)
        #: ``known`` is not built yet: the memo is complete and every page so far was settled by it.
        self.deferred = False
        #: Customers seen, by listing; final once the staged rows are applied.
        self.counts = dict.fromkeys(Listing, 0)
        #: Sightings not yet staged, and how many were staged in all.
        self._stage_buf: list[Sighting] = []
        self.staged = 0
        #: Staged customers that were *also* seen exactly as stored in their stored listing (a
        #: second sighting: they moved between listings mid-scan, or a listing repeated them).
        self.also_settled: set[str] = set()
        self.memo = Memo()
        self.looked_up = 0  # vanished customers whose lookup by id returned a record
        self.unresolved = 0  # vanished customers whose lookup failed: no conclusion
        self._session: CycleSession | None = None
        #: Set when a silent baseline is written straight into ``customers``.
        self._writer: BaselineWriter | None = None
        self._cache_kib = _CACHE_KIB

    @property
    def session(self) -> CycleSession:
        assert self._session is not None
        return self._session

    # -- 1. listings --------------------------------------------------------------------------

    def run(self) -> PollResult:
        # The first pages are in flight while the poll run is recorded and the stored fingerprints
        # load (nothing is observed before ``scan.run()``).
        scan = Scan(self.p.source, self.p.concurrent_listings, self._observe_page, self._check_cancel)
        with self.p.store.cycle() as session, ExitStack() as direct_transaction:
            self._session = session
            try:
                self.poll_id = session.begin_poll(format_ts(self.p.clock()))
                session.tune(cache_kib=self._cache_kib)
                with session.transaction():
                    baseline = not session.has_baseline()
                    if self.memo.load(session.page_memo()):
                        self.deferred = True  # settled page by page from the memo: ``_observe_page``
                        self.n_known = {listing: self.memo.stored_records(listing) for listing in Listing}
                    else:
                        self.known = session.stored_fingerprints()
                        self.n_known = {listing: len(known) for listing, known in self.known.items()}
                    scan.memo = self.memo
                    direct = baseline and not self.p.diff.emit_baseline_events and session.is_empty()
                    if not direct:
                        session.create_staging()
                if direct:
                    # Nothing else writes to an empty store meanwhile (there are no events to
                    # deliver), so the write lock is held for the whole scan, and the rows commit
                    # with the poll-run row (or roll back: rule 1 holds).
                    direct_transaction.enter_context(session.transaction("IMMEDIATE"))
                    self._writer = session.baseline_writer(
                        detected_at=format_ts(self.p.clock()), poll_id=self.poll_id
                    )
                    # On the way out the writer stops before the transaction ends (LIFO).
                    direct_transaction.callback(self._writer.stop)
                scan.run()
            finally:
                scan.close()
            self._flush()
            if self._writer is not None:
                self._writer.finish()
                self._count_baseline()
                deleted: list[str] = []
            else:
                deleted = self._resolve_vanished(self._match_unseen())
                self._flush()
            self._check_cancel()
            events = self._commit(baseline, deleted)
        assert self.poll_id is not None
        return PollResult(
            self.poll_id,
            PollOutcome.SUCCEEDED,
            baseline=baseline,
            pages=self.pages,
            active=self.counts[Listing.ACTIVE],
            archived=self.counts[Listing.ARCHIVED],
            events_by_type=events,
            unresolved=self.unresolved,
        )

    def _undefer(self) -> None:
        if self.deferred:
            self.known = {listing: self.memo.unsettled(listing) for listing in Listing}
            self.deferred = False

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise PollCancelled("poll abandoned: shutting down")

    def _observe_page(self, p: SeenPage) -> None:
        """Every record of a page against the stored fingerprints.

        This runs once per customer per cycle, so it is the cycle's own cost on top of the API's.
        The common case is two C-level passes over the page: the fingerprints it shares with its
        listing's set, and their removal. Only when some record is not among them (changed, new,
        moved, or repeated) does the page go through Python record by record, to stage those.
        """
        self.pages += 1
        if self.deferred:
            # A complete memo: while every page is one of its pages, seen again, no set of stored
            # fingerprints is needed. On the first other page, build it.
            lazy = p.lazy
            if (lazy or self.memo.get(p.digest) == p.hashes) and self.memo.settle(p.listing, p.digest):
                self.memo.note(p.listing, p.digest, p.hashes, lazy=lazy)
                return
            self._undefer()
        known, hashes = self.known[p.listing], p.hashes
        settled = known.intersection(hashes) if known else set()
        if len(settled) == len(hashes):
            known.difference_update(settled)
            self.memo.note(p.listing, p.digest, hashes, lazy=p.lazy)
            return
        if p.lazy:  # its records are needed after all
            p.unlazy()
            hashes = p.hashes
            settled = known.intersection(hashes) if known else set()
        self.memo.note(p.listing, p.digest, hashes, lazy=False)
        if settled:
            known.difference_update(settled)
        buf = self._stage_buf
        archived = bool(p.listing)
        if not settled:
            buf.extend(zip(p.ids, repeat(archived), hashes, p.canonical, strict=False))
        else:
            for i, h in enumerate(hashes):
                if h in settled:
                    settled.discard(h)  # a repeat of it further down this page is staged
                else:
                    buf.append((p.ids[i], archived, h, p.canonical[i]))
        if len(buf) >= (self._writer.batch_rows if self._writer is not None else _STAGE_BATCH):
            self._flush()

    def _flush(self) -> None:
        if not self._stage_buf:
            return
        rows, self._stage_buf = self._stage_buf, []
        self.staged += len(rows)
        if self._writer is None:
            self.session.stage(rows)
            return
        archived = sum(map(itemgetter(1), rows))
        self.counts[Listing.ARCHIVED] += archived
        self.counts[Listing.ACTIVE] += len(rows) - archived
        if self.staged * _BASELINE_CACHE_BYTES_PER_ROW > 1024 * self._cache_kib:
            self._cache_kib *= 2
            self._writer.set_cache(self._cache_kib)
        self._writer.insert(rows)

    def _count_baseline(self) -> None:
        """A silent baseline's counts: each customer once, as the upserts left it (archived wins)."""
        if self.session.count_customers() != self.staged:  # someone was seen twice
            by_status = self.session.counts_by_status()
            self.counts = {
                Listing.ACTIVE: by_status.get(CustomerStatus.ACTIVE, 0),
                Listing.ARCHIVED: by_status.get(CustomerStatus.ARCHIVED, 0),
            }

    # -- 2. unseen and vanished customers -------------------------------------------------------

    def _match_unseen(self) -> list[tuple[str, Listing, int]]:
        """Settle the stored fingerprints no sighting matched; return the vanished customers.

        What is left in ``known`` once both listings are read belongs to stored customers that were
        not seen as stored: those that were staged (changed, or moved between listings) and those
        seen nowhere (vanished). A staged customer whose stored fingerprint is *not* left was also
        seen as stored: that is recorded for the final transaction (``also_settled``).
        """
        self._undefer()
        known = self.known
        for listing in Listing:
            self.counts[listing] = self.n_known[listing] - len(known[listing])
        if self.staged:
            for cid, status, h in self.session.staged_stored():
                listing = _listing(status)
                if h in known[listing]:
                    known[listing].discard(h)
                else:
                    self.also_settled.add(cid)
        if not (known[Listing.ACTIVE] or known[Listing.ARCHIVED]):
            return []
        rows = self.session.with_fingerprints([*known[Listing.ACTIVE], *known[Listing.ARCHIVED]])
        return [(cid, _listing(status), h) for cid, status, h in rows if h in known[_listing(status)]]

    def _resolve_vanished(self, vanished: list[tuple[str, Listing, int]]) -> list[str]:
        """Look the vanished customers up by id; return those that are gone (404)."""
        if not vanished:
            return []
        n_known = sum(self.n_known.values())
        cfg = self.p.diff
        if len(vanished) > cfg.max_vanished_count and len(vanished) > cfg.max_vanished_fraction * n_known:
            raise PollRefused(
                f"{len(vanished)} of {n_known} known customers are missing from both listings "
                f"(more than {cfg.max_vanished_fraction:.0%} and more than {cfg.max_vanished_count}); "
                "refusing to treat them as deleted"
            )
        deleted: list[str] = []
        for cid, stored_listing, stored_hash in sorted(vanished):
            self._check_cancel()
            try:
                record = self.p.source.get_customer(cid)
            except APIError as exc:
                self.unresolved += 1
                log.warning("poll.lookup_failed", poll_id=self.poll_id, customer_id=cid, error=str(exc))
                continue
            if record is None:
                deleted.append(cid)
            elif record.get("id") != cid:
                self.unresolved += 1
                log.warning("poll.lookup_mismatch", poll_id=self.poll_id, customer_id=cid)
            else:
                # A sighting like any other: as stored, it is settled here; otherwise staged.
                self.looked_up += 1
                listing = Listing(record.get("archived_at") is not None)
                data = canonical(record)
                h = record_hash(data)
                if (listing, h) == (stored_listing, stored_hash):
                    self.counts[listing] += 1
                else:
                    self._stage_buf.append((cid, bool(listing), h, data))
        return deleted

    # -- 3. the one transaction ---------------------------------------------------------------

    def _commit(self, baseline: bool, deleted: list[str]) -> dict[str, int]:
        counts: Counter[str] = Counter()
        session = self.session
        if self._writer is not None:  # the rows are in; the transaction is already open
            self._record_success(baseline, counts)
            return {}
        detected_at = format_ts(self.p.clock())
        emit = not baseline or self.p.diff.emit_baseline_events
        if self.staged:
            session.index_staging()
        with session.transaction("IMMEDIATE"):
            assert self.poll_id is not None
            writer = EventWriter(
                poll_id=self.poll_id,
                detected_at=detected_at,
                last_sequence=session.last_sequence(),
                route=Router(self.p.routes),
            )
            if self.staged:
                self._apply_staged(writer, emit, detected_at, counts)
            for i in range(0, len(deleted), _COMMIT_BATCH):
                chunk = deleted[i : i + _COMMIT_BATCH]
                prev = session.load_states(chunk)
                for cid in chunk:
                    last = orjson.loads(prev[cid][1])
                    writer.add(EventType.CUSTOMER_DELETED, cid, last, last, [])
                    counts[EventType.CUSTOMER_DELETED.value] += 1
                session.mark_deleted(chunk, detected_at=detected_at, poll_id=self.poll_id)
                session.append_events(*writer.take())
            self._record_success(baseline, counts)
        return dict(counts)

    def _record_success(self, baseline: bool, counts: Counter[str]) -> None:
        # Inside the transaction its caller holds. The memo holds exactly the stored fingerprints
        # when every customer now stored was seen once, on a page, as stored: no second sightings
        # (the records seen are the customers counted) and none known only from a lookup by id, or
        # not known at all this cycle.
        assert self.poll_id is not None
        seen_once = self.memo.records == sum(self.counts.values())
        self.memo.save(self.session, complete=seen_once and not self.looked_up and not self.unresolved)
        self.session.finish_poll(
            self.poll_id,
            finished_at=format_ts(self.p.clock()),
            baseline=baseline,
            pages=self.pages,
            active=self.counts[Listing.ACTIVE],
            archived=self.counts[Listing.ARCHIVED],
            events_by_type=dict(counts),
            settle=self.settle,
        )

    def _apply_staged(self, writer: EventWriter, emit: bool, detected_at: str, counts: Counter[str]) -> None:
        """Staged records -> new state and events, in batches read back in id order."""
        session = self.session
        ignore = self.p.diff.ignore_fields
        last_id = ""
        while rows := session.chosen_staged(last_id, _COMMIT_BATCH):
            last_id = rows[-1][0]
            prev = session.load_states([r[0] for r in rows])
            upserts: list[tuple[Any, ...]] = []
            for cid, archived_flag, h, data, _ in rows:
                listing = Listing(bool(archived_flag))
                old = prev.get(cid)
                if cid in self.also_settled:
                    # Seen as stored too, so already counted, in its stored listing: this is a
                    # second sighting (it moved between listings mid-scan, or a page shift repeated
                    # it). Count the customer once, and let archived win.
                    assert old is not None
                    was = _listing(old[0])
                    if listing is Listing.ARCHIVED and was is Listing.ACTIVE:
                        self.counts[Listing.ACTIVE] -= 1
                        self.counts[Listing.ARCHIVED] += 1
                    if (was is Listing.ARCHIVED and listing is Listing.ACTIVE) or (
                        was is listing and h == old[4]
                    ):
                        continue
                else:
                    self.counts[listing] += 1
                event_type = self._classify(cid, listing, old, data, writer, emit, ignore)
                if event_type:
                    counts[event_type.value] += 1
                upserts.append(
                    (
                        cid,
                        CustomerStatus.ARCHIVED if listing else CustomerStatus.ACTIVE,
                        h,
                        data.decode(),
                        old[2] if old else detected_at,
                        detected_at if (event_type or old is None) else old[3],
                        self.poll_id,
                    )
                )
            if upserts:
                session.upsert_states(upserts)
            session.append_events(*writer.take())

    @staticmethod
    def _classify(
        cid: str,
        listing: Listing,
        old: tuple[str, str, str, str, int] | None,
        data: bytes,
        writer: EventWriter,
        emit: bool,
        ignore: Sequence[str],
    ) -> EventType | None:
        """Which event a staged customer makes (written through ``writer``), if any."""
        if old is None or old[0] == CustomerStatus.DELETED:
            if not emit:
                return None
            writer.add(EventType.CUSTOMER_CREATED, cid, orjson.loads(data), None, [])
            return EventType.CUSTOMER_CREATED
        record = orjson.loads(data)
        previous = orjson.loads(old[1])
        changes = [c.as_dict() for c in diff_records(previous, record, ignore)]
        was = _listing(old[0])
        if listing is Listing.ARCHIVED and was is Listing.ACTIVE:
            event_type = EventType.CUSTOMER_ARCHIVED
        elif was is Listing.ARCHIVED and listing is Listing.ACTIVE:
            event_type = EventType.CUSTOMER_UNARCHIVED
        elif changes:
            event_type = EventType.CUSTOMER_UPDATED
        else:
            return None  # noise only (e.g. updated_at): refresh silently
        writer.add(event_type, cid, record, previous, changes)
        return event_type


def _listing(status: str) -> Listing:
    return Listing(status == CustomerStatus.ARCHIVED)
