"""One poll cycle: list, reconcile, diff, and commit state + audit events + outbox together.

The cycle, and why it is shaped this way:

1. Both listings are read in full (concurrently when asked: the cycle's floor is the API's
   latency, so overlapping the two halves it). Each record is fingerprinted and compared with the
   stored fingerprint; only records that differ are *staged*, in batches, in a TEMP table of the
   cycle's own connection (no lock on the database, no fsync, gone with the connection). A cycle
   without changes therefore writes nothing but its poll-run row, and memory holds only
   ``id -> fingerprint`` rather than whole records.
2. Known customers seen in neither listing are looked up by id (rule 3): 404 means deleted, a
   record is used as seen, an error means no conclusion this cycle. Before that, the mass-vanish
   guard refuses an implausible cycle.
3. One ``BEGIN IMMEDIATE`` transaction turns the staged records into new state, audit events with
   consecutive ``sequence`` numbers and one outbox row per (event, routed sink) (rule 5).

A silent baseline into an empty store skips the staging: it has nothing to diff, so its rows go
straight into ``customers`` inside the one transaction, opened before the scan (see ``_Cycle._run``).

Any failure before the commit leaves nothing but the failed poll-run row (rule 1). Why the hot
path looks the way it does (fingerprints by ``map``, a pop per customer, producers that observe
their own pages) is in ``docs/performance.md``.
"""

from __future__ import annotations

import fcntl
import functools
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain, compress, count, repeat
from operator import itemgetter, ne, rshift
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog
import xxhash
from sqlalchemy import Connection, func, insert, select, update

from . import metrics
from ._time import Clock, format_ts, utcnow
from .config import DiffConfig
from .diff import diff_records
from .errors import APIError, PollRefused, WatcherError
from .routing import Route
from .store import CustomerState, EventRecord, OutboxRow, PollRun, Store, canonical, record_hash

__all__ = ["CustomerSource", "PollCancelled", "PollResult", "Poller", "record_notice"]

log = structlog.get_logger("watcher.poll")

#: Staged rows are flushed in batches of this size: large enough to amortise a commit,
#: small enough that memory stays flat however many customers changed.
_STAGE_BATCH = 2000
_COMMIT_BATCH = 500


class CustomerSource(Protocol):
    """What the cycle needs from Metronome (``watcher.client.MetronomeClient`` provides it)."""

    def iter_pages(self, *, archived: bool) -> Iterator[list[dict[str, Any]]]: ...

    def get_customer(self, customer_id: str) -> dict[str, Any] | None: ...


class PollCancelled(WatcherError):
    """The cycle was abandoned on request (shutdown); nothing was committed."""


@dataclass(frozen=True)
class PollResult:
    poll_id: int
    outcome: str  # "succeeded" | "failed" | "refused" | "abandoned"
    baseline: bool = False
    pages: int = 0
    active: int = 0
    archived: int = 0
    events_by_type: Mapping[str, int] = field(default_factory=dict)
    duration: float = 0.0
    error: str | None = None
    #: Customers that vanished but whose lookup by id failed: no conclusion this cycle.
    unresolved: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome == "succeeded"

    @property
    def events(self) -> int:
        return sum(self.events_by_type.values())


class Poller:
    """Runs poll cycles against one store. Not re-entrant: one cycle at a time per database,
    enforced across processes with a lock file next to the database."""

    def __init__(
        self,
        store: Store,
        source: CustomerSource,
        *,
        diff: DiffConfig | None = None,
        routes: Sequence[Route] = (),
        clock: Clock = utcnow,
        concurrent_listings: bool = True,
    ) -> None:
        self.store = store
        self.source = source
        self.diff = diff or DiffConfig()
        self.routes = tuple(routes)
        self.clock = clock
        self.concurrent_listings = concurrent_listings

    def run(self, *, cancel: threading.Event | None = None) -> PollResult:
        """Run one cycle. Never raises for API trouble: the outcome says what happened."""
        cancel = cancel or threading.Event()
        t0 = time.perf_counter()
        lock = _PollLock(self.store.path)
        try:
            lock.acquire()
        except PollRefused as exc:
            return self._refused_by_lock(str(exc))
        with lock:
            poll_id = self._begin()
            cycle = _Cycle(self, poll_id, cancel)
            try:
                result = cycle.run()
            except BaseException as exc:
                outcome = (
                    "abandoned"
                    if isinstance(exc, PollCancelled) or cancel.is_set()
                    else "refused"
                    if isinstance(exc, PollRefused)
                    else "failed"
                )
                reason = str(exc) if isinstance(exc, WatcherError) else f"internal error: {exc!r}"
                duration = time.perf_counter() - t0
                if outcome == "abandoned":
                    reason = "poll abandoned: shutting down"
                self._fail(poll_id, outcome, reason)
                metrics.POLLS.labels(outcome).inc()
                metrics.POLL_DURATION.observe(duration)
                if outcome == "abandoned":
                    # On shutdown the API client is closed under the poll's feet; whatever that
                    # raised is not news, the abandonment is.
                    log.info(
                        "poll.abandoned",
                        poll_id=poll_id,
                        duration_ms=round(duration * 1000),
                        pages=cycle.pages,
                    )
                else:
                    log.error(
                        "poll.failed",
                        poll_id=poll_id,
                        outcome=outcome,
                        error=reason,
                        duration_ms=round(duration * 1000),
                        pages=cycle.pages,
                    )
                if not isinstance(exc, WatcherError) and outcome != "abandoned":
                    raise
                return PollResult(poll_id, outcome, pages=cycle.pages, duration=duration, error=reason)
        duration = time.perf_counter() - t0
        result = PollResult(**{**result.__dict__, "duration": duration})
        metrics.POLLS.labels("succeeded").inc()
        metrics.POLL_DURATION.observe(duration)
        metrics.LAST_SUCCESSFUL_POLL.set(self.clock().timestamp())
        for t, n in result.events_by_type.items():
            metrics.EVENTS.labels(t).inc(n)
        metrics.CUSTOMERS.labels("active").set(result.active)
        metrics.CUSTOMERS.labels("archived").set(result.archived)
        log.info(
            "poll.completed",
            poll_id=poll_id,
            outcome="succeeded",
            baseline=result.baseline,
            duration_ms=round(duration * 1000),
            pages=result.pages,
            active=result.active,
            archived=result.archived,
            events=dict(result.events_by_type),
            unresolved=result.unresolved,
        )
        return result

    def _begin(self) -> int:
        now = format_ts(self.clock())
        with self.store.write() as conn:
            # A run left "running" belongs to a process that died mid-cycle: it committed nothing.
            conn.execute(
                update(PollRun)
                .where(PollRun.outcome == "running")  # type: ignore[arg-type]
                .values(outcome="abandoned", finished_at=now, error="process ended during the cycle")
            )
            run = conn.execute(insert(PollRun).values(started_at=now, outcome="running"))
            poll_id = run.inserted_primary_key
        assert poll_id is not None
        return int(poll_id[0])

    def _refused_by_lock(self, error: str) -> PollResult:
        now = format_ts(self.clock())
        with self.store.write() as conn:
            poll_id = conn.execute(
                insert(PollRun).values(started_at=now, finished_at=now, outcome="refused", error=error)
            ).inserted_primary_key
        assert poll_id is not None
        metrics.POLLS.labels("refused").inc()
        log.error("poll.failed", poll_id=poll_id[0], outcome="refused", error=error)
        return PollResult(int(poll_id[0]), "refused", error=error)

    def _fail(self, poll_id: int, outcome: str, error: str) -> None:
        # Nothing staged survives: the staging table went away with the cycle's connection.
        with self.store.write() as conn:
            conn.execute(
                update(PollRun)
                .where(PollRun.id == poll_id)  # type: ignore[arg-type]
                .values(outcome=outcome, finished_at=format_ts(self.clock()), error=error[:2000])
            )


class _PollLock:
    """An exclusive ``flock`` on ``<db>.lock``: two pollers on one database would each see the
    other's changes as their own and emit them twice."""

    def __init__(self, db_path: Path) -> None:
        self.path = Path(f"{db_path}.lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise PollRefused("another poll is already running against this database") from None

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


#: Pages parsed but not yet observed, at most. More let the producers run further ahead while the
#: stored state loads, but every parsed page in flight raises the peak RSS (64 cost 25 MB at 100k).
_QUEUED_PAGES = 8
#: The pieces of ``store.record_hash(store.canonical(record))``, for ``map`` over a whole page.
_ID = itemgetter("id")
_dumps, _SORT, _xxh3 = orjson.dumps, orjson.OPT_SORT_KEYS, xxhash.xxh3_64_intdigest


class _Page:
    """One page of a listing, with the id and fingerprint of every record.

    The fingerprints are computed where the page is parsed (in the producer thread when listings
    are fetched concurrently): the records are still in the CPU's caches there, and the consumer is
    left with dictionary look-ups only.
    """

    __slots__ = ("archived", "canonical", "hashes", "ids")

    def __init__(self, archived: bool, records: list[dict[str, Any]]) -> None:
        self.archived = archived
        self.ids: list[str] = list(map(_ID, records))
        #: ``store.canonical(record)`` and ``store.record_hash()`` of it, for every record, without
        #: a Python-level loop. The parsed records themselves are not needed after this.
        self.canonical: list[bytes] = list(map(_dumps, records, repeat(None), repeat(_SORT)))
        self.hashes: list[int] = list(map(rshift, map(_xxh3, self.canonical), repeat(1)))


#: Where the cycle stages records: a TEMP table of the cycle's own connection. Writing it takes no
#: lock on the database file (a long scan never blocks the daemon's other writers), costs no fsync
#: and no WAL traffic, and leaves no freed pages behind in the database. It disappears with the
#: connection, which is exactly what a failed or interrupted cycle needs (rule 1). Its rollback
#: journal is kept in memory: it only ever holds the pages of one batch.
#:
#: Rows are only ever appended (no index to maintain while the scan runs): when a customer's
#: staging is revised (seen in both listings), a later row supersedes the earlier one, and a row
#: without a record withdraws it. The final transaction reads the latest row per customer, through
#: an index built once the scan is over.
_STAGED_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS poll_staged (customer_id TEXT NOT NULL, "
    "archived INTEGER NOT NULL, hash INTEGER NOT NULL, record TEXT, check_duplicate INTEGER NOT NULL)"
)
#: The latest staged row of every customer, in id order (SQLite takes the bare columns of a
#: ``max()`` aggregate from the row holding the maximum).
_LATEST_STAGED = (
    "SELECT customer_id, archived, hash, record, check_duplicate, max(rowid) FROM temp.poll_staged "
    "WHERE customer_id > ? GROUP BY customer_id ORDER BY customer_id"
)
#: At most this many staged rows per INSERT statement (fewer when the SQLite library allows fewer
#: than 5 x this many parameters). One multi-row statement is one SQLite step, so the GIL is
#: handed over once per statement rather than once per row: each hand-over can wait for a
#: producer thread's switch interval while the listings are being fetched.
_STAGE_ROWS_PER_STATEMENT = _STAGE_BATCH
#: Customers per chunk when the known state loads (a rowid range; keeps the JSON text small).
_KNOWN_CHUNK = 20_000
_UPSERT_STATE = (
    "INSERT OR REPLACE INTO customers (id, status, hash, record, first_seen_at, changed_at, last_poll_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


class _Scan:
    """Reads both listings and hands every page to ``observe`` exactly once, one page at a time.

    One listing after the other in the calling thread, or (``concurrent``) from two producer
    threads that start fetching as soon as this is created. While the API answers quickly the
    cycle is CPU-bound under the GIL, and waking a consumer thread for every page would cost a
    thread switch per page; so a producer observes its own pages, and the other producer's that
    are waiting, whenever the observing lock is free, and queues them when it is not.

    The consuming thread holds the lock until :meth:`run` (the stored fingerprints load in the
    meantime, while the first pages are fetched) and takes it back for good on the way out, so
    the cycle's state is only ever touched by one thread at a time, and by none once the scan
    is over. It never waits on the network itself, so it sees a cancel request (shutdown,
    ``poll_timeout``) within a fraction of a second even while a request hangs.
    """

    def __init__(
        self,
        source: CustomerSource,
        concurrent: bool,
        observe: Callable[[_Page], None],
        check_cancel: Callable[[], None],
    ) -> None:
        self.source = source
        self.observe = observe
        self.check_cancel = check_cancel
        self.pending: deque[_Page] = deque()
        # Bounded memory: a queued page is its ids, fingerprints and canonical JSON (about 60 kB
        # for 100 records).
        self.slots = threading.Semaphore(_QUEUED_PAGES)
        self.lock = threading.RLock()
        self.lock.acquire()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.threads: list[threading.Thread] = []
        if concurrent:
            self.threads = [
                threading.Thread(target=self._produce, args=(a,), daemon=True, name=f"list-{a}")
                for a in (False, True)
            ]
            for t in self.threads:
                t.start()

    def _produce(self, archived: bool) -> None:
        try:
            for records in self.source.iter_pages(archived=archived):
                page = _Page(archived, records)
                while not self.slots.acquire(timeout=0.05):
                    if self.stop.is_set():
                        return
                    self._try_observe()
                if self.stop.is_set():
                    return
                self.pending.append(page)
                self._try_observe()
        except BaseException as exc:  # raised in the consuming thread
            if self.error is None:
                self.error = exc
            self.stop.set()

    def _try_observe(self) -> None:
        if self.lock.acquire(blocking=False):
            try:
                self._observe_pending()
            except BaseException as exc:
                if self.error is None:
                    self.error = exc
                self.stop.set()
            finally:
                self.lock.release()

    def _observe_pending(self) -> None:
        while self.pending and not self.stop.is_set():
            page = self.pending.popleft()
            self.slots.release()
            self.observe(page)

    def run(self) -> None:
        """Observe every page of both listings; the caller holds the lock (since ``__init__``)."""
        if not self.threads:
            for archived in (False, True):
                for records in self.source.iter_pages(archived=archived):
                    self.check_cancel()
                    self.observe(_Page(archived, records))
            return
        while any(t.is_alive() for t in self.threads):
            self._observe_pending()  # what queued up while the lock was ours
            self.lock.release()
            self.threads[0 if self.threads[0].is_alive() else 1].join(0.2)
            self.lock.acquire()
            self.check_cancel()
            if self.error is not None:
                raise self.error
        if self.error is not None:
            raise self.error
        self._observe_pending()

    def close(self) -> None:
        """Stop the producers and take the lock for good: nothing is observed after this.

        A producer stuck in a request sees ``stop`` only when the request ends. It is a daemon
        thread that touches nothing but its own page, so there is no need to wait for it: a short
        join keeps a cancelled poll (SIGTERM) from stalling shutdown for a read timeout.
        """
        self.stop.set()
        self.lock.acquire()
        for t in self.threads:
            t.join(timeout=0.5)


class _Writer:
    """Executes statements on a connection from a thread of its own, in order.

    One multi-row INSERT is one SQLite step, and SQLite releases the GIL for all of it: on this
    thread it runs on the other core while the listings are fetched and fingerprinted. The
    connection must not be used by anyone else until :meth:`finish` or :meth:`stop` returned.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.max_params = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        # At most two batches waiting: bounded memory, and back-pressure if the disk is slower
        # than the API.
        self.q: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="baseline-writer")
        self.thread.start()

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is None:  # after a failure, only drain
                try:
                    self.db.execute(*item)
                except BaseException as exc:
                    self.error = exc

    def submit(self, sql: str, params: tuple[Any, ...]) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((sql, params))

    def finish(self) -> None:
        """Wait until everything submitted is written; raise what failed, if anything did."""
        self.stop()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()


class _Cycle:
    """The state of one cycle in progress."""

    def __init__(self, poller: Poller, poll_id: int, cancel: threading.Event) -> None:
        self.p = poller
        self.store = poller.store
        self.poll_id = poll_id
        self.cancel = cancel
        self.pages = 0
        #: archived -> {id: fingerprint} of the stored customers in that listing *not seen yet* in
        #: this cycle: a sighting pops its entry, so whatever is left when both listings are read has
        #: vanished. Plain ints in two dicts: this is the cycle's one account-sized structure.
        self.known: dict[bool, dict[str, int]] = {False: {}, True: {}}
        self.n_known = 0
        #: id -> (archived, stored) for the customers the fast path could not settle (changed, new,
        #: moved between listings, seen twice); ``stored`` is the (archived, fingerprint) popped
        #: from ``known`` at the first sighting, or None when there was none to pop.
        self.sightings: dict[str, tuple[bool, tuple[bool, int] | None]] = {}
        self.counts = {False: 0, True: 0}  # customers seen, by listing
        #: id -> (archived, fingerprint, canonical JSON or None to withdraw, check_duplicate), not
        #: yet flushed. ``check_duplicate``: see ``_observe_slow``.
        self._stage_buf: dict[str, tuple[bool, int, bytes | None, bool]] = {}
        self._conn: Connection | None = None
        #: Set when a silent baseline is written straight into ``customers`` (see ``_run``).
        self._writer: _Writer | None = None
        self.detected_at = ""

    # -- 1. listings --------------------------------------------------------------------------

    def run(self) -> PollResult:
        # One connection for the whole cycle, because it owns the TEMP staging table. It is taken
        # out of the pool so that closing it really closes it, and its temporary file with it.
        with self.store.engine.connect() as conn:
            conn.detach()
            self._conn = conn
            return self._run(conn)

    @contextmanager
    def _transaction(self, mode: str) -> Iterator[Connection]:
        """``BEGIN <mode>`` on the cycle's connection (see ``Store.write``): DEFERRED for the
        staging table (no lock on the database), IMMEDIATE for the final transaction."""
        assert self._conn is not None
        conn = self._conn.execution_options(watcher_begin=mode)
        with conn.begin():
            yield conn

    def _run(self, conn: Connection) -> PollResult:
        # The first pages are in flight while the known state loads.
        scan = _Scan(self.p.source, self.p.concurrent_listings, self._observe_page, self._check_cancel)
        with ExitStack() as direct_transaction:
            try:
                conn.connection.dbapi_connection.execute("PRAGMA temp.journal_mode=MEMORY")  # type: ignore[union-attr]
                with self._transaction("DEFERRED"):
                    baseline = not self.store.has_baseline(conn)
                    self._load_known(conn)
                    self.n_known = len(self.known[False]) + len(self.known[True])
                    direct = (
                        baseline
                        and not self.p.diff.emit_baseline_events
                        and conn.exec_driver_sql("SELECT 1 FROM customers LIMIT 1").first() is None
                    )
                    if not direct:
                        conn.exec_driver_sql(_STAGED_DDL)
                        conn.exec_driver_sql("DELETE FROM temp.poll_staged")
                if direct:
                    # A silent baseline into an empty store: there is nothing to diff against, so
                    # its rows go straight into ``customers``, in one transaction that holds the
                    # write lock for the whole scan and commits with the poll-run row (or rolls
                    # back: rule 1 holds). Nothing else writes to an empty store meanwhile (there
                    # are no events to deliver). The INSERTs run on a thread of their own: SQLite
                    # releases the GIL, so the account is written while it is still being fetched
                    # instead of copied once the scan is over.
                    self.detected_at = format_ts(self.p.clock())
                    direct_transaction.enter_context(self._transaction("IMMEDIATE"))
                    db = conn.connection.dbapi_connection
                    assert isinstance(db, sqlite3.Connection)
                    self._writer = _Writer(db)
                    # On the way out the writer stops before the transaction ends (LIFO).
                    direct_transaction.callback(self._writer.stop)
                scan.run()
            finally:
                scan.close()
            self._flush()
            deleted, unresolved = self._resolve_vanished()
            self._flush()
            if self._writer is not None:
                self._writer.finish()
            self._check_cancel()
            events = self._commit(baseline, deleted)
        return PollResult(
            self.poll_id,
            "succeeded",
            baseline=baseline,
            pages=self.pages,
            active=self.counts[False],
            archived=self.counts[True],
            events_by_type=events,
            unresolved=unresolved,
        )

    def _load_known(self, conn: Connection) -> None:
        # SQLite builds each chunk as one JSON object in a single step, without holding the GIL
        # (so the producer threads keep fetching meanwhile), and orjson turns it into a dict in C:
        # no per-row Python work, and no per-row GIL hand-over.
        db = conn.connection.dbapi_connection
        assert db is not None
        lo, hi = db.execute("SELECT min(rowid), max(rowid) FROM customers").fetchone()
        if lo is None:
            return
        for start in range(lo, hi + 1, _KNOWN_CHUNK):
            active, archived = db.execute(
                "SELECT json_group_object(id, hash) FILTER (WHERE status = 'active'), "
                "json_group_object(id, hash) FILTER (WHERE status = 'archived') "
                "FROM customers WHERE rowid >= ? AND rowid < ?",
                (start, start + _KNOWN_CHUNK),
            ).fetchone()
            self.known[False].update(orjson.loads(active))
            self.known[True].update(orjson.loads(archived))

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise PollCancelled("poll abandoned: shutting down")

    def _observe_page(self, p: _Page) -> None:
        """Every record of a page against the stored fingerprints.

        This runs once per customer per cycle, so it is the cycle's own cost on top of the API's.
        The common case is one C-level pass over the page: pop each id's stored fingerprint from
        ``known`` and compare the lists. Only the records that differ go through
        :meth:`_observe_slow` one by one.
        """
        self.pages += 1
        if len(self._stage_buf) >= _STAGE_BATCH:
            self._flush()
        archived, ids, hashes = p.archived, p.ids, p.hashes
        if not self.n_known and self._all_new(ids):
            # Nothing stored (a baseline): every record is new, staged as a whole page.
            self.counts[archived] += len(ids)
            self.sightings.update(zip(ids, repeat((archived, None))))
            staged = zip(repeat(archived), hashes, p.canonical, repeat(True), strict=False)
            self._stage_buf.update(zip(ids, staged, strict=False))
            return
        stored = list(map(self.known[archived].pop, ids, repeat(None)))
        self.counts[archived] += len(stored)
        if stored != hashes:
            for i in compress(count(), map(ne, stored, hashes)):
                self._observe_slow(ids[i], archived, hashes[i], p.canonical[i], stored[i])

    def _all_new(self, ids: list[str]) -> bool:
        """No id seen before in this cycle, nor twice in the page."""
        prior = list(map(self.sightings.get, ids))
        return prior.count(None) == len(prior) and len(set(ids)) == len(ids)

    def _observe_slow(self, cid: str, archived: bool, h: int, data: bytes, stored_hash: int | None) -> None:
        """A sighting the fast path could not settle. It is already counted in ``counts[archived]``;
        ``stored_hash`` is what it popped from ``known[archived]`` (None: nothing)."""
        if stored_hash is not None:
            # The first sighting of a stored customer, in its stored listing, changed.
            self.sightings[cid] = (archived, (archived, stored_hash))
            self._stage_buf[cid] = (archived, h, data, False)
            return
        prev = self.sightings.get(cid)
        if prev is None:
            other = self.known[not archived].pop(cid, None)
            stored = None if other is None else (not archived, other)
            self.sightings[cid] = (archived, stored)
            # Nothing stored in either listing: a new customer, or one the fast path already saw
            # in this cycle (it keeps no record of those, which is what makes it fast). Which of the
            # two is settled when the staged row meets the stored state (``_apply_staged``).
            self._stage_buf[cid] = (archived, h, data, stored is None)
            return
        # Seen before in this cycle: in both listings (it moved mid-scan), or twice in one.
        prev_archived, stored = prev
        if prev_archived and not archived:
            self.counts[False] -= 1  # archived wins (it was archived mid-scan): not counted again
            return
        self.counts[prev_archived] -= 1
        self.sightings[cid] = (archived, stored)
        if stored == (archived, h):
            # Staged from the other sighting, but this one matches the stored state after all. It
            # may already be flushed, so withdraw it (withdrawing nothing is harmless).
            self._stage_buf[cid] = (archived, h, None, False)
        else:
            self._stage_buf[cid] = (archived, h, data, stored is None)

    def _observe_looked_up(self, record: dict[str, Any]) -> None:
        """A vanished customer's record, fetched by id: a sighting like any other."""
        cid = record["id"]
        archived = record.get("archived_at") is not None
        data = canonical(record)
        h = record_hash(data)
        stored_hash = self.known[archived].pop(cid, None)
        self.counts[archived] += 1
        if stored_hash != h:
            self._observe_slow(cid, archived, h, data, stored_hash)

    def _flush(self) -> None:
        if not self._stage_buf:
            return
        if self._writer is not None:
            self._flush_direct()
            return
        rows = list(self._stage_buf.items())
        with self._transaction("DEFERRED") as conn:
            db = conn.connection.dbapi_connection
            assert isinstance(db, sqlite3.Connection)
            limit = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            per_statement = min(_STAGE_ROWS_PER_STATEMENT, limit // 5)
            for i in range(0, len(rows), per_statement):
                chunk = rows[i : i + per_statement]
                params: list[Any] = []
                for cid, (a, h, d, dup) in chunk:
                    params += (cid, a, h, None if d is None else d.decode(), dup)
                conn.exec_driver_sql(_insert_staged_sql(len(chunk)), tuple(params))
        self._stage_buf.clear()

    def _flush_direct(self) -> None:
        """Staged rows of a silent baseline straight into ``customers`` (see ``_run``)."""
        assert self._conn is not None
        assert self._writer is not None
        per_statement = min(_STAGE_ROWS_PER_STATEMENT, self._writer.max_params // 7)
        ids = list(self._stage_buf)
        archived, hashes, data, _ = zip(*self._stage_buf.values(), strict=True)
        # Nothing is stored, so no sighting can match a stored state and be withdrawn.
        assert None not in data
        at, poll_id = self.detected_at, self.poll_id
        rows = list(
            zip(
                ids,
                map(_STATUS.__getitem__, archived),
                hashes,
                map(bytes.decode, data),
                repeat(at),
                repeat(at),
                repeat(poll_id),
                strict=False,
            )
        )
        for i in range(0, len(rows), per_statement):
            chunk = rows[i : i + per_statement]
            # OR REPLACE: a later sighting of the same customer wins.
            self._writer.submit(_insert_customers_sql(len(chunk)), tuple(chain.from_iterable(chunk)))
        self._stage_buf.clear()

    # -- 2. vanished customers ----------------------------------------------------------------

    def _resolve_vanished(self) -> tuple[list[str], int]:
        # What the scan did not pop from ``known`` was seen in neither listing.
        vanished = [*self.known[False], *self.known[True]]
        if not vanished:
            return [], 0
        n_known = self.n_known
        cfg = self.p.diff
        if len(vanished) > cfg.max_vanished_count and len(vanished) > cfg.max_vanished_fraction * n_known:
            raise PollRefused(
                f"{len(vanished)} of {n_known} known customers are missing from both listings "
                f"(more than {cfg.max_vanished_fraction:.0%} and more than {cfg.max_vanished_count}); "
                "refusing to treat them as deleted"
            )
        deleted: list[str] = []
        unresolved = 0
        for cid in vanished:
            self._check_cancel()
            try:
                record = self.p.source.get_customer(cid)
            except APIError as exc:
                unresolved += 1
                log.warning("poll.lookup_failed", poll_id=self.poll_id, customer_id=cid, error=str(exc))
                continue
            if record is None:
                deleted.append(cid)
            elif record.get("id") != cid:
                unresolved += 1
                log.warning("poll.lookup_mismatch", poll_id=self.poll_id, customer_id=cid)
            else:
                self._observe_looked_up(record)
        return deleted, unresolved

    # -- 3. the one transaction ---------------------------------------------------------------

    def _commit(self, baseline: bool, deleted: list[str]) -> dict[str, int]:
        now = self.p.clock()
        detected_at = format_ts(now)
        emit = not baseline or self.p.diff.emit_baseline_events
        counts: Counter[str] = Counter()
        if self._writer is not None:  # the rows are in; the transaction is already open
            assert self._conn is not None
            self._record_success(self._conn, baseline, counts)
            return {}
        with self._transaction("DEFERRED") as conn:  # before the write lock is taken
            conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS temp.staged_by_id ON poll_staged (customer_id)")
        with self._transaction("IMMEDIATE") as conn:
            seq = conn.execute(select(func.coalesce(func.max(EventRecord.sequence), 0))).scalar_one()
            writer = _EventWriter(conn, self.poll_id, detected_at, self.p.routes, seq)
            self._apply_staged(conn, writer, emit, detected_at, counts)
            for i in range(0, len(deleted), _COMMIT_BATCH):
                chunk = deleted[i : i + _COMMIT_BATCH]
                prev = _load_states(conn, chunk)
                for cid in chunk:
                    old = prev[cid]
                    last = orjson.loads(old[1])
                    writer.add("customer.deleted", cid, last, last, [])
                    counts["customer.deleted"] += 1
                conn.execute(
                    update(CustomerState)
                    .where(CustomerState.id.in_(chunk))  # type: ignore[attr-defined]
                    .values(status="deleted", changed_at=detected_at, last_poll_id=self.poll_id)
                )
                writer.flush()
            self._record_success(conn, baseline, counts)
        return dict(counts)

    def _record_success(self, conn: Connection, baseline: bool, counts: Counter[str]) -> None:
        conn.execute(
            update(PollRun)
            .where(PollRun.id == self.poll_id)  # type: ignore[arg-type]
            .values(
                outcome="succeeded",
                finished_at=format_ts(self.p.clock()),
                baseline=baseline,
                pages=self.pages,
                active=self.counts[False],
                archived=self.counts[True],
                events=sum(counts.values()),
                events_by_type=orjson.dumps(dict(counts)).decode(),
            )
        )

    def _apply_staged(
        self, conn: Connection, writer: _EventWriter, emit: bool, detected_at: str, counts: Counter[str]
    ) -> None:
        """Staged records -> new state and events, in batches read back in id order."""
        ignore = self.p.diff.ignore_fields
        last_id = ""
        while True:
            rows = conn.exec_driver_sql(f"{_LATEST_STAGED} LIMIT ?", (last_id, _COMMIT_BATCH)).all()
            if not rows:
                break
            last_id = rows[-1][0]
            batch = [r for r in rows if r[3] is not None]  # a row without a record withdraws it
            prev = _load_states(conn, [r[0] for r in batch]) if batch else {}
            upserts: list[tuple[Any, ...]] = []
            for cid, archived, h, data, check_duplicate, _ in batch:
                status = "archived" if archived else "active"
                old = prev.get(cid)
                if check_duplicate and old is not None and old[0] != "deleted":
                    # The scan found no stored fingerprint for a stored customer: the fast path had
                    # already popped it, so this was its second sighting in the cycle (it moved
                    # between listings mid-scan, or a page shift repeated it). The first sighting
                    # matched the stored state; count the customer once, and let archived win.
                    was_archived = old[0] == "archived"
                    self.counts[False if was_archived != archived else archived] -= 1
                    if (was_archived and not archived) or (was_archived == archived and h == old[4]):
                        continue
                event_type: str | None
                changes: list[dict[str, Any]] = []
                previous: Any = None
                record: Any = None
                if old is None or old[0] == "deleted":
                    event_type = "customer.created" if emit else None
                else:
                    record = orjson.loads(data)
                    previous = orjson.loads(old[1])
                    changes = [c.as_dict() for c in diff_records(previous, record, ignore)]
                    was_archived = old[0] == "archived"
                    if archived and not was_archived:
                        event_type = "customer.archived"
                    elif was_archived and not archived:
                        event_type = "customer.unarchived"
                    elif changes:
                        event_type = "customer.updated"
                    else:
                        event_type = None  # noise only (e.g. updated_at): refresh silently
                if event_type:
                    if record is None:
                        record = orjson.loads(data)
                    writer.add(event_type, cid, record, previous, changes)
                    counts[event_type] += 1
                upserts.append(
                    (
                        cid,
                        status,
                        h,
                        data,
                        old[2] if old else detected_at,
                        detected_at if (event_type or old is None) else old[3],
                        self.poll_id,
                    )
                )
            if upserts:
                conn.exec_driver_sql(_UPSERT_STATE, upserts)
            writer.flush()


_STATUS = {False: "active", True: "archived"}


@functools.cache
def _insert_customers_sql(rows: int) -> str:
    return (
        "INSERT OR REPLACE INTO customers (id, status, hash, record, first_seen_at, changed_at, "
        "last_poll_id) VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * rows)
    )


@functools.cache
def _insert_staged_sql(rows: int) -> str:
    return "INSERT INTO temp.poll_staged VALUES " + ", ".join(["(?, ?, ?, ?, ?)"] * rows)


def _load_states(conn: Connection, ids: Sequence[str]) -> dict[str, tuple[str, str, str, str, int]]:
    """id -> (status, record, first_seen_at, changed_at, hash) of the stored customers among ``ids``."""
    rows = conn.exec_driver_sql(
        "SELECT id, status, record, first_seen_at, changed_at, hash FROM customers "
        f"WHERE id IN ({', '.join('?' * len(ids))})",
        tuple(ids),
    ).all()
    return {r[0]: (r[1], r[2], r[3], r[4], r[5]) for r in rows}


class _EventWriter:
    """Appends events with consecutive sequence numbers and routes each to its sinks."""

    def __init__(
        self,
        conn: Connection,
        poll_id: int | None,
        detected_at: str,
        routes: Sequence[Route],
        last_sequence: int,
    ) -> None:
        self.conn = conn
        self.poll_id = poll_id
        self.detected_at = detected_at
        self.routes = routes
        self.sequence = last_sequence
        self.events: list[dict[str, Any]] = []
        self.outbox: list[dict[str, Any]] = []

    def add(
        self,
        event_type: str,
        customer_id: str | None,
        customer: Any,
        previous: Any,
        changes: list[dict[str, Any]],
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        self.sequence += 1
        payload: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "type": event_type,
            "sequence": self.sequence,
            "detected_at": self.detected_at,
            "poll_id": self.poll_id,
            "customer_id": customer_id,
            "customer": customer,
            "previous": previous,
            "changes": changes,
        }
        if extra:
            payload.update(extra)
        self.events.append(
            {
                "sequence": self.sequence,
                "id": payload["id"],
                "type": event_type,
                "customer_id": customer_id,
                "poll_id": self.poll_id,
                "detected_at": self.detected_at,
                "payload": orjson.dumps(payload).decode(),
            }
        )
        fields = [c["field"] for c in changes]
        for route in self.routes:
            if route.accepts(event_type, fields):
                self.outbox.append(
                    {
                        "sequence": self.sequence,
                        "sink": route.sink,
                        "status": "pending",
                        "attempts": 0,
                        "created_at": self.detected_at,
                        "next_attempt_at": self.detected_at,
                    }
                )
        return payload

    def flush(self) -> None:
        if self.events:
            self.conn.execute(insert(EventRecord), self.events)
            self.events = []
        if self.outbox:
            self.conn.execute(insert(OutboxRow), self.outbox)
            self.outbox = []


def record_notice(
    store: Store, event_type: str, routes: Sequence[Route], *, now: datetime, detail: Mapping[str, Any]
) -> dict[str, Any]:
    """Append a ``watcher.*`` notice (not a customer change) to the audit log and route it."""
    with store.write() as conn:
        seq = conn.execute(select(func.coalesce(func.max(EventRecord.sequence), 0))).scalar_one()
        writer = _EventWriter(conn, None, format_ts(now), routes, seq)
        payload = writer.add(event_type, None, None, None, [], extra={"detail": dict(detail)})
        writer.flush()
    return payload
