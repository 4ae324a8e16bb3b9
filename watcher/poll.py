"""One poll cycle: list, reconcile, diff, and commit state + audit events + outbox together.

The cycle, and why it is shaped this way:

1. The stored fingerprints load as two sets of integers, one per listing (from the page memo when
   it holds exactly them, else from the customers table). Both listings are read in full by
   producer threads (concurrently when asked: a cycle cannot be faster than the API's latency, and
   overlapping the two listings lowers that floor), which hand a page that was slow to arrive to
   the cycle's thread, so that the next request is in flight while it is worked on (``_Scan``).
   Each record is fingerprinted, or a page seen before byte for byte takes its fingerprints from the
   page memo (``watcher._memo``), and is parsed only if they do not settle it. A fingerprint covers
   the whole record, id included, so a record whose fingerprint is in its listing's set is a stored
   customer, unchanged: settling it is removing the fingerprint. Only the rest (changed, new, moved
   between listings, seen twice) is *staged*, in batches, in a TEMP table of the cycle's own
   connection (no lock on the database, no fsync, gone with the connection). A cycle without changes
   therefore writes nothing but its poll-run row, and memory holds only integers rather than records
   or ids.
2. What is left in the sets belongs to stored customers not seen as stored: the staged ones are
   matched by id, the others vanished. Those are looked up by id (rule 3): 404 means deleted, a
   record is used as seen, an error means no conclusion this cycle. Before that, the mass-vanish
   guard refuses an implausible cycle.
3. One ``BEGIN IMMEDIATE`` transaction turns the staged records into new state, audit events with
   consecutive ``sequence`` numbers and one outbox row per (event, routed sink) (rule 5), and
   stores the page memo.

A silent baseline into an empty store skips the staging: it has nothing to diff, so its rows go
straight into ``customers`` inside the one transaction, opened before the scan (see ``_Cycle._run``).

Any failure before the commit leaves nothing but the failed poll-run row (rule 1). Why the hot
path looks the way it does (fingerprints by ``map``, sets of integers, the page memo, producers
that hand slow pages over) is in ``docs/performance.md``.
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
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain, repeat
from operator import itemgetter, rshift
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog
import xxhash
from sqlalchemy import Connection, insert, update

from . import metrics
from ._memo import Memo
from ._time import Clock, format_ts, utcnow
from .client import MetronomeClient, PageBody
from .config import DiffConfig
from .diff import diff_records
from .errors import APIError, PollRefused, WatcherError
from .routing import Route
from .store import CustomerState, PollRun, Store, canonical, record_hash

__all__ = ["CustomerSource", "PollCancelled", "PollResult", "Poller", "record_notice"]

log = structlog.get_logger("watcher.poll")

#: Staged rows are flushed to the staging table in batches of this size: large enough to amortise
#: a transaction, small enough that memory stays flat however many customers changed.
_STAGE_BATCH = 2000
_COMMIT_BATCH = 500


class CustomerSource(Protocol):
    """What the cycle needs from Metronome (``watcher.client.MetronomeClient`` provides it).

    A page that carries a ``digest`` (``watcher.client.ListingPage``) and was seen before, byte for
    byte, is recognised from ``PageMemo`` instead of being fingerprinted again. (With a
    :class:`~watcher.client.MetronomeClient` the cycle reads unparsed ``PageBody`` pages instead,
    and such a page is not even parsed.)
    """

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
            cycle = _Cycle(self, cancel)
            try:
                result = cycle.run()
            except BaseException as exc:
                poll_id = cycle.poll_id
                if poll_id is None:  # not even the poll run could be recorded
                    raise
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
        poll_id = result.poll_id
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


#: Pages fetched but not yet observed, at most: the producers wait when the queue is full. Fetched
#: ahead while the stored fingerprints load (a few milliseconds from the page memo; from the
#: customers table, a scan that SQLite runs without the GIL, about 20 ms per 100k customers), and
#: whenever observing falls behind. A queued page from the API is its body, about 45 kB for 100
#: records, so this bounds the backlog at about a megabyte whatever the account's size.
_BACKLOG_PAGES = 24
#: A page that took at least this long to arrive (seconds) is handed to the cycle's thread rather
#: than worked on by its producer (see ``_Scan``). Handing over costs a thread switch or two; it
#: pays only when the wait for the next page is long enough to hide the work in, which is not the
#: case while the GIL's switch interval (5 ms) can delay a woken thread by as much.
_HANDOFF_WAIT = 0.005
#: The pieces of ``store.record_hash(store.canonical(record))``, for ``map`` over a whole page.
_ID = itemgetter("id")
_dumps, _SORT, _xxh3 = orjson.dumps, orjson.OPT_SORT_KEYS, xxhash.xxh3_64_intdigest


#: A page as a producer gets it: unparsed from :class:`MetronomeClient`, else its records.
_Fetched = PageBody | list[dict[str, Any]]


def _records(page: _Fetched) -> list[dict[str, Any]]:
    return page.parse() if isinstance(page, PageBody) else page


class _Page:
    """One page of a listing, with the id and fingerprint of every record.

    The fingerprints are computed by whichever thread observes the page (its producer, or the
    cycle's thread when the page was handed over), with builtins only: no Python bytecode runs
    per record. A page whose fingerprints are known from ``PageMemo`` is *lazy*: it keeps what was
    fetched and computes ids and canonical JSON only if the fingerprints do not settle it
    (:meth:`fingerprint`). A lazy page from :class:`MetronomeClient` is not even parsed unless
    then: its digest was on a page that parsed, so it parses too, to the same records
    (``PageBody.digest``), and parsing it would only build them to throw them away.
    """

    __slots__ = ("archived", "canonical", "digest", "fetched", "hashes", "ids")

    def __init__(self, archived: bool, fetched: _Fetched, memo: Memo | None = None) -> None:
        self.archived = archived
        self.digest: bytes | None = getattr(fetched, "digest", None)
        self.ids: list[str] = []
        self.canonical: list[bytes] = []
        #: What was fetched, while the page is lazy; None once fingerprinted.
        self.fetched: _Fetched | None = None
        hashes = None if memo is None else memo.get(self.digest)
        if hashes is None:
            self.fingerprint(_records(fetched))
        else:
            self.fetched = fetched
            self.hashes = hashes

    def fingerprint(self, records: list[dict[str, Any]]) -> None:
        self.ids = list(map(_ID, records))
        #: ``store.canonical(record)`` and ``store.record_hash()`` of it, for every record. The
        #: parsed records themselves are not needed after this.
        self.canonical = list(map(_dumps, records, repeat(None), repeat(_SORT)))
        self.hashes = list(map(rshift, map(_xxh3, self.canonical), repeat(1)))
        self.fetched = None


#: Where the cycle stages records: a TEMP table of the cycle's own connection. Writing it takes no
#: lock on the database file (a long scan never blocks the daemon's other writers), costs no fsync
#: and no WAL traffic, and leaves no freed pages behind in the database. It disappears with the
#: connection, which is exactly what a failed or interrupted cycle needs (rule 1). Its rollback
#: journal is kept in memory: it only ever holds the pages of one batch.
#:
#: Rows are only ever appended, one per sighting the fast path could not settle; a customer seen
#: more than once has several. The final transaction reads one row per customer (archived wins,
#: else the latest), through an index built once the scan is over. ``record`` is the canonical
#: JSON as UTF-8 bytes.
_STAGED_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS poll_staged (customer_id TEXT NOT NULL, "
    "archived INTEGER NOT NULL, hash INTEGER NOT NULL, record BLOB NOT NULL)"
)
#: One staged row per customer, in id order: its archived sighting if it has one (archived wins),
#: else its latest. SQLite takes the bare columns of a ``max()`` aggregate from the row holding
#: the maximum.
_CHOSEN_STAGED = (
    "SELECT customer_id, archived, hash, record, max(archived * 4294967296 + rowid) "
    "FROM temp.poll_staged WHERE customer_id > ? GROUP BY customer_id ORDER BY customer_id LIMIT ?"
)
#: Rows per INSERT statement (fewer when the SQLite library allows fewer parameters), and per batch
#: of a silent baseline. One multi-row statement is one SQLite step, so the GIL is handed over once
#: per statement rather than once per row. Measured on a baseline of 100k customers, 250 rows
#: beat 2,000 by a fifth of the cycle: big statements kept the writer thread behind the scan.
_STATEMENT_ROWS = 250
#: Customers (a rowid range) per SQLite step when the stored fingerprints load from the table: it
#: bounds the JSON text at a million customers.
_KNOWN_CHUNK = 100_000
_LOAD_KNOWN = (
    "SELECT json_group_array(hash) FILTER (WHERE status = 'active'), "
    "json_group_array(hash) FILTER (WHERE status = 'archived') "
    "FROM customers WHERE rowid >= ? AND rowid < ?"
)
#: The page cache of the cycle's connection, in KiB (it goes away with the connection). A silent
#: baseline doubles it whenever it has fewer bytes than ``_DIRECT_CACHE_BYTES_PER_ROW`` per row
#: written: the rows go into the id index in random order, and a cache that holds that index
#: (about 80 bytes a customer) keeps the inserts from evicting and re-reading its pages. At a
#: million customers a 16 MB cache made the writer the bottleneck (15 s of inserts, against 9 s
#: with 128 MB).
_CACHE_KIB = 16 * 1024
_DIRECT_CACHE_BYTES_PER_ROW = 128
#: A changed customer's new state. An UPDATE in place when the customer is stored (same rowid,
#: same id index entry: one page touched per customer, where REPLACE would delete and re-insert).
_UPSERT_STATE = (
    "INSERT INTO customers (id, status, hash, record, first_seen_at, changed_at, last_poll_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
    "hash = excluded.hash, record = excluded.record, first_seen_at = excluded.first_seen_at, "
    "changed_at = excluded.changed_at, last_poll_id = excluded.last_poll_id"
)


class _Scan:
    """Reads both listings and hands every page to ``observe`` exactly once, one page at a time.

    Producer threads fetch: two, one per listing, when ``concurrent``; otherwise one that reads the
    listings one after the other. What happens to a page depends on how long it took to arrive:

    - Quickly (under ``_HANDOFF_WAIT``): the cycle is CPU-bound under the GIL, and waking another
      thread for every page would cost more than it saves (about 0.2 ms of CPU a page, measured),
      so the producer parses and observes the page itself.
    - Slowly, as behind a real API's latency: the producer puts the page on a queue, unparsed when
      it comes from :class:`MetronomeClient` (which reads the cursor from the end of the body), and
      goes straight back to the network; the calling thread parses and observes it. The next
      request is then in flight while this page is worked on, so the cycle's own work hides inside
      the wait for the next page instead of adding to it. From a :class:`MetronomeClient` the page
      is queued only once that request is on the wire (its ``sent`` callback): queued before, the
      calling thread woke, took the GIL and parsed while the request was still being built, which
      put 0.4 to 0.6 ms of parsing in front of every request (measured at 50 ms of latency).

    Pages are observed under one lock, and in order within a listing: a producer observes a page
    itself only when none of its listing's pages is still queued.

    Nothing is observed before :meth:`run` (the stored fingerprints load in the meantime, while the
    producers fill the queue), and nothing after :meth:`close`. The calling thread never waits on
    the network itself, so it sees a cancel request (shutdown, ``poll_timeout``) within a fraction
    of a second even while a request hangs.
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
        #: Fingerprints of pages seen before, set before :meth:`run`.
        self.memo: Memo | None = None
        self.check_cancel = check_cancel
        #: ``(archived, page)`` for a page; ``(False, None)`` when a producer is done.
        self.queue: queue.Queue[tuple[bool, _Fetched | None]] = queue.Queue(_BACKLOG_PAGES)
        #: Held while a page is observed. Guards ``queued``, and ``stop`` is set under it.
        self.lock = threading.Lock()
        #: Pages of each listing queued and not observed yet.
        self.queued = {False: 0, True: 0}
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        listings = [("active",), ("archived",)] if concurrent else [("active", "archived")]
        self.threads = [
            threading.Thread(target=self._produce, args=(a,), daemon=True, name="list-" + "-".join(a))
            for a in listings
        ]
        for t in self.threads:
            t.start()

    def _produce(self, listings: tuple[str, ...]) -> None:
        source = self.source
        clock = time.monotonic
        # A slow page waits in ``pending`` until the next request is on the wire, when the source
        # can say so (the client's ``sent``); from any other source it is queued at once.
        defer = isinstance(source, MetronomeClient)
        pending: list[tuple[bool, _Fetched]] = []

        def hand_over() -> None:
            while pending:
                self._put(pending.pop())

        try:
            for listing in listings:
                archived = listing == "archived"
                pages: Iterator[_Fetched]
                if isinstance(source, MetronomeClient):
                    pages = source.iter_page_bodies(archived=archived, sent=hand_over)
                else:
                    pages = source.iter_pages(archived=archived)
                requested = clock()
                for page in pages:
                    quick = clock() - requested < _HANDOFF_WAIT
                    # Only this thread adds to its listing's ``queued``: once read as 0, it stays 0.
                    if quick and self.ready.is_set() and not self.queued[archived]:
                        p = _Page(archived, page, self.memo)
                        with self.lock:
                            if self.stop.is_set():
                                return
                            self.observe(p)
                    else:
                        with self.lock:
                            self.queued[archived] += 1
                        if defer:
                            pending.append((archived, page))
                        elif not self._put((archived, page)):
                            return
                    requested = clock()
                hand_over()  # the listing's last page: no request follows it
        except BaseException as exc:  # raised in the calling thread
            if self.error is None:
                self.error = exc
        finally:
            hand_over()
            self._put((False, None))

    def _put(self, item: tuple[bool, _Fetched | None]) -> bool:
        """Queue ``item``, waiting while the queue is full; False once the scan is stopped."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
            except queue.Full:
                continue
            return True
        return False

    def run(self) -> None:
        """Observe every page of both listings (the stored state is ready)."""
        self.ready.set()
        running = len(self.threads)
        while running:
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                item = None
            self.check_cancel()
            if self.error is not None:
                raise self.error
            if item is None:
                continue
            archived, page = item
            if page is None:
                running -= 1
                continue
            p = _Page(archived, page, self.memo)
            with self.lock:
                self.observe(p)
                self.queued[archived] -= 1

    def close(self) -> None:
        """Stop the producers: nothing is observed once this returns.

        ``stop`` is set under the observing lock, so a page being observed is finished first and
        none is started after. A producer stuck in a request sees ``stop`` only when the request
        ends. It is a daemon thread that touches nothing but its own pages, so there is no need to
        wait for it: a short join keeps a cancelled poll (SIGTERM) from stalling shutdown for a
        read timeout.
        """
        with self.lock:
            self.stop.set()
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
        # A bounded backlog (16 statements of ``_STATEMENT_ROWS``): flat memory, and back-pressure
        # if the disk is slower than the API.
        self.q: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue(maxsize=16)
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


#: A sighting the fast path could not settle: (customer id, archived, fingerprint, canonical JSON).
_Sighting = tuple[str, bool, int, bytes]


class _Cycle:
    """The state of one cycle in progress."""

    def __init__(self, poller: Poller, cancel: threading.Event) -> None:
        self.p = poller
        self.store = poller.store
        #: The poll run's id, once it is recorded (the first thing ``run`` writes).
        self.poll_id: int | None = None
        self.cancel = cancel
        self.pages = 0
        #: archived -> the fingerprints of the stored customers in that listing that no sighting
        #: has matched yet. A fingerprint covers the whole canonical record, id included, so a
        #: sighting whose fingerprint is in its listing's set *is* a stored customer, unchanged,
        #: and settling it is removing the fingerprint. Plain ints in two sets: this is the
        #: cycle's one account-sized structure, and it loads without building a string per
        #: customer.
        self.known: dict[bool, set[int]] = {False: set(), True: set()}
        self.n_known = {False: 0, True: 0}
        #: ``known`` is not built yet: the memo is complete and every page so far was settled by it.
        self.deferred = False
        #: Customers seen, by listing; final once the staged rows are applied (``_apply_staged``).
        self.counts = {False: 0, True: 0}
        #: Sightings not yet flushed to the staging table, and how many were staged in all.
        self._stage_buf: list[_Sighting] = []
        self.staged = 0
        #: Staged customers that were *also* seen exactly as stored in their stored listing (a
        #: second sighting: they moved between listings mid-scan, or a listing repeated them).
        self.also_settled: set[str] = set()
        self.memo = Memo()
        self.looked_up = 0  # vanished customers whose lookup by id returned a record
        self.unresolved = 0  # vanished customers whose lookup failed: no conclusion
        self._conn: Connection | None = None
        #: Set when a silent baseline is written straight into ``customers`` (see ``_run``).
        self._writer: _Writer | None = None
        self._cache_kib = _CACHE_KIB
        self.detected_at = ""

    # -- 1. listings --------------------------------------------------------------------------

    def run(self) -> PollResult:
        # One connection for the whole cycle, because it owns the TEMP staging table. It is taken
        # out of the pool so that closing it really closes it, and its temporary file with it.
        with self.store.engine.connect() as conn:
            conn.detach()
            self._conn = conn
            result = self._run(conn)
            # Asked for before this connection closes: the store's checkpointer then has its own
            # connection open, and this one's closing is not a checkpoint of the whole WAL.
            self.store.request_checkpoint()
            return result

    @property
    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None
        return _dbapi(self._conn)

    @contextmanager
    def _transaction(self, mode: str) -> Iterator[Connection]:
        """``BEGIN <mode>`` on the cycle's connection (see ``Store.write``): DEFERRED for the
        staging table (no lock on the database), IMMEDIATE for the final transaction."""
        assert self._conn is not None
        conn = self._conn.execution_options(watcher_begin=mode)
        with conn.begin():
            yield conn

    def _begin(self) -> int:
        """Record the poll run; a run left "running" belongs to a process that died mid-cycle."""
        now = format_ts(self.p.clock())
        with self._transaction("IMMEDIATE"):
            db = self._db
            db.execute(
                "UPDATE poll_runs SET outcome = 'abandoned', finished_at = ?, "
                "error = 'process ended during the cycle' WHERE outcome = 'running'",
                (now,),
            )
            cursor = db.execute(
                "INSERT INTO poll_runs (started_at, outcome, baseline, pages, active, archived, events, "
                "events_by_type) VALUES (?, 'running', 0, 0, 0, 0, 0, '{}')",
                (now,),
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def _run(self, conn: Connection) -> PollResult:
        # The first pages are in flight while the poll run is recorded and the stored fingerprints
        # load (nothing is observed before ``scan.run()``).
        scan = _Scan(self.p.source, self.p.concurrent_listings, self._observe_page, self._check_cancel)
        with ExitStack() as direct_transaction:
            try:
                self.poll_id = self._begin()
                self._db.execute("PRAGMA temp.journal_mode=MEMORY")
                # The stored rows of changed customers are read twice, scattered over the table
                # (matched after the scan, applied in the final transaction): a page cache that
                # keeps them for the second read. Memory is only taken as pages are read.
                self._db.execute(f"PRAGMA cache_size = -{self._cache_kib}")
                # The commit returns once the cycle is in the WAL; the store's checkpointer copies
                # it into the database afterwards (``Store.request_checkpoint``).
                self._db.execute("PRAGMA wal_autocheckpoint = 0")
                with self._transaction("DEFERRED"):
                    baseline = not self.store.has_baseline(conn)
                    if self.memo.load(self._db):
                        # Settled page by page from the memo; see ``_observe_page``.
                        self.deferred = True
                        self.n_known = {a: self.memo.stored_records(a) for a in (False, True)}
                    else:
                        self._load_known()
                        self.n_known = {archived: len(known) for archived, known in self.known.items()}
                    scan.memo = self.memo
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
                    self._writer = _Writer(self._db)
                    # On the way out the writer stops before the transaction ends (LIFO).
                    direct_transaction.callback(self._writer.stop)
                scan.run()
            finally:
                scan.close()
            self._flush()
            if self._writer is not None:
                self._writer.finish()
                self._count_direct()
                deleted: list[str] = []
                unresolved = 0
            else:
                deleted, unresolved = self._resolve_vanished(self._match_unseen())
                self._flush()
            self._check_cancel()
            events = self._commit(baseline, deleted)
        assert self.poll_id is not None
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

    def _load_known(self) -> None:
        # Each chunk is one SQLite step that builds two JSON arrays without holding the GIL (the
        # producer threads keep fetching meanwhile), and orjson turns them into ints in C: no
        # per-row Python work, and no string per customer.
        db = self._db
        lo, hi = db.execute("SELECT min(rowid), max(rowid) FROM customers").fetchone()
        if lo is not None:
            for start in range(lo, hi + 1, _KNOWN_CHUNK):
                active, archived = db.execute(_LOAD_KNOWN, (start, start + _KNOWN_CHUNK)).fetchone()
                self.known[False].update(orjson.loads(active))
                self.known[True].update(orjson.loads(archived))

    def _undefer(self) -> None:
        if self.deferred:
            self.known = {archived: self.memo.unsettled(archived) for archived in (False, True)}
            self.deferred = False

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise PollCancelled("poll abandoned: shutting down")

    def _observe_page(self, p: _Page) -> None:
        """Every record of a page against the stored fingerprints.

        This runs once per customer per cycle, so it is the cycle's own cost on top of the API's.
        The common case is two C-level passes over the page: the fingerprints it shares with its
        listing's set, and their removal. Only when some record is not among them (changed, new,
        moved, or repeated) does the page go through Python record by record, to stage those.
        """
        self.pages += 1
        if self.deferred:
            # A complete memo: while every page is one of its pages, seen again, no set of stored
            # fingerprints is needed (``watcher._memo``). On the first other page, build it.
            lazy = p.fetched is not None
            if (lazy or self.memo.get(p.digest) == p.hashes) and self.memo.settle(p.archived, p.digest):
                self.memo.note(p.archived, p.digest, p.hashes, lazy=lazy)
                return
            self._undefer()
        known, hashes = self.known[p.archived], p.hashes
        settled = known.intersection(hashes) if known else set()
        if len(settled) == len(hashes):
            known.difference_update(settled)
            self.memo.note(p.archived, p.digest, hashes, lazy=p.fetched is not None)
            return
        if p.fetched is not None:  # lazy (from the memo): its records are needed after all
            p.fingerprint(_records(p.fetched))
            hashes = p.hashes
            settled = known.intersection(hashes) if known else set()
        self.memo.note(p.archived, p.digest, hashes, lazy=False)
        if settled:
            known.difference_update(settled)
        buf = self._stage_buf
        if not settled:
            buf.extend(zip(p.ids, repeat(p.archived), hashes, p.canonical, strict=False))
        else:
            for i, h in enumerate(hashes):
                if h in settled:
                    settled.discard(h)  # a repeat of it further down this page is staged
                else:
                    buf.append((p.ids[i], p.archived, h, p.canonical[i]))
        if len(buf) >= (_STATEMENT_ROWS if self._writer is not None else _STAGE_BATCH):
            self._flush()

    def _flush(self) -> None:
        if not self._stage_buf:
            return
        rows, self._stage_buf = self._stage_buf, []
        self.staged += len(rows)
        if self._writer is not None:
            self._flush_direct(rows)
            return
        with self._transaction("DEFERRED"):
            per_statement = min(_STATEMENT_ROWS, self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 4)
            for i in range(0, len(rows), per_statement):
                chunk = rows[i : i + per_statement]
                self._db.execute(_insert_staged_sql(len(chunk)), tuple(chain.from_iterable(chunk)))

    def _flush_direct(self, rows: list[_Sighting]) -> None:
        """Staged rows of a silent baseline straight into ``customers`` (see ``_run``)."""
        assert self._writer is not None
        archived = sum(map(itemgetter(1), rows))
        self.counts[True] += archived
        self.counts[False] += len(rows) - archived
        if self.staged * _DIRECT_CACHE_BYTES_PER_ROW > 1024 * self._cache_kib:
            self._cache_kib *= 2
            self._writer.submit(f"PRAGMA cache_size = -{self._cache_kib}", ())
        per_statement = min(_STATEMENT_ROWS, (self._writer.max_params - 2) // 4)
        for i in range(0, len(rows), per_statement):
            chunk = rows[i : i + per_statement]
            self._writer.submit(
                _insert_customers_sql(len(chunk)),
                (self.detected_at, self.poll_id, *chain.from_iterable(chunk)),
            )

    def _count_direct(self) -> None:
        """A silent baseline's counts: each customer once, as the upserts left it (archived wins)."""
        db = self._db
        (rows,) = db.execute("SELECT count(*) FROM customers").fetchone()  # from the id index
        if rows != self.staged:  # someone was seen twice: count what the upserts kept
            self.counts = {False: 0, True: 0}
            for status, n in db.execute("SELECT status, count(*) FROM customers GROUP BY status"):
                self.counts[status == "archived"] = n

    # -- 2. unseen and vanished customers -------------------------------------------------------

    def _match_unseen(self) -> list[tuple[str, bool, int]]:
        """Settle the stored fingerprints no sighting matched; return the vanished customers.

        What is left in ``known`` once both listings are read belongs to stored customers that
        were not seen as stored: those that were staged (changed, or moved between listings) and
        those seen nowhere (vanished). A staged customer whose stored fingerprint is *not* left
        was also seen as stored: that is recorded for the final transaction (``also_settled``).
        """
        self._undefer()
        known = self.known
        for archived in (False, True):
            self.counts[archived] = self.n_known[archived] - len(known[archived])
        db = self._db
        if self.staged:
            rows = db.execute(
                "SELECT id, status, hash FROM customers WHERE status != 'deleted' AND id IN "
                "(SELECT customer_id FROM temp.poll_staged)"
            ).fetchall()
            for cid, status, h in rows:
                if h in known[status == "archived"]:
                    known[status == "archived"].discard(h)
                else:
                    self.also_settled.add(cid)
        if not (known[False] or known[True]):
            return []
        # One pass over the table (SQLite builds a transient index over the JSON array's values):
        # it only runs when customers vanished, and needs no index of the table's own.
        rows = db.execute(
            "SELECT id, status, hash FROM customers WHERE status != 'deleted' "
            "AND hash IN (SELECT value FROM json_each(?))",
            (orjson.dumps([*known[False], *known[True]]).decode(),),
        ).fetchall()
        vanished = []
        for cid, status, h in rows:
            archived = status == "archived"
            if h in known[archived]:
                vanished.append((cid, archived, h))
        return vanished

    def _resolve_vanished(self, vanished: list[tuple[str, bool, int]]) -> tuple[list[str], int]:
        if not vanished:
            return [], 0
        n_known = self.n_known[False] + self.n_known[True]
        cfg = self.p.diff
        if len(vanished) > cfg.max_vanished_count and len(vanished) > cfg.max_vanished_fraction * n_known:
            raise PollRefused(
                f"{len(vanished)} of {n_known} known customers are missing from both listings "
                f"(more than {cfg.max_vanished_fraction:.0%} and more than {cfg.max_vanished_count}); "
                "refusing to treat them as deleted"
            )
        deleted: list[str] = []
        unresolved = 0
        for cid, stored_archived, stored_hash in sorted(vanished):
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
                # A sighting like any other: as stored, it is settled here; otherwise staged.
                self.looked_up += 1
                archived = record.get("archived_at") is not None
                data = canonical(record)
                h = record_hash(data)
                if (archived, h) == (stored_archived, stored_hash):
                    self.counts[archived] += 1
                else:
                    self._stage_buf.append((cid, archived, h, data))
        self.unresolved = unresolved
        return deleted, unresolved

    # -- 3. the one transaction ---------------------------------------------------------------

    def _commit(self, baseline: bool, deleted: list[str]) -> dict[str, int]:
        now = self.p.clock()
        detected_at = format_ts(now)
        emit = not baseline or self.p.diff.emit_baseline_events
        counts: Counter[str] = Counter()
        if self._writer is not None:  # the rows are in; the transaction is already open
            self._record_success(baseline, counts)
            return {}
        if self.staged:
            with self._transaction("DEFERRED") as conn:  # before the write lock is taken
                conn.exec_driver_sql(
                    "CREATE INDEX IF NOT EXISTS temp.staged_by_id ON poll_staged (customer_id)"
                )
        with self._transaction("IMMEDIATE") as conn:
            writer = _EventWriter(conn, self.poll_id, detected_at, self.p.routes, _last_sequence(conn))
            if self.staged:
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
            self._record_success(baseline, counts)
        return dict(counts)

    def _record_success(self, baseline: bool, counts: Counter[str]) -> None:
        # On the cycle's connection, inside the transaction its caller holds.
        # The memo holds exactly the stored fingerprints when every customer now stored was seen
        # once, on a page, as stored: no second sightings (the records seen are the customers
        # counted) and none known only from a lookup by id, or not known at all this cycle.
        seen_once = self.memo.records == self.counts[False] + self.counts[True]
        self.memo.save(self._db, complete=seen_once and not self.looked_up and not self.unresolved)
        self._db.execute(
            "UPDATE poll_runs SET outcome = 'succeeded', finished_at = ?, baseline = ?, pages = ?, "
            "active = ?, archived = ?, events = ?, events_by_type = ? WHERE id = ?",
            (
                format_ts(self.p.clock()),
                baseline,
                self.pages,
                self.counts[False],
                self.counts[True],
                sum(counts.values()),
                orjson.dumps(dict(counts)).decode(),
                self.poll_id,
            ),
        )

    def _apply_staged(
        self, conn: Connection, writer: _EventWriter, emit: bool, detected_at: str, counts: Counter[str]
    ) -> None:
        """Staged records -> new state and events, in batches read back in id order."""
        ignore = self.p.diff.ignore_fields
        last_id = ""
        while True:
            rows = conn.exec_driver_sql(_CHOSEN_STAGED, (last_id, _COMMIT_BATCH)).all()
            if not rows:
                break
            last_id = rows[-1][0]
            prev = _load_states(conn, [r[0] for r in rows])
            upserts: list[tuple[Any, ...]] = []
            for cid, archived, h, data, _ in rows:
                archived = bool(archived)
                old = prev.get(cid)
                if cid in self.also_settled:
                    # Seen as stored too, so already counted, in its stored listing: this is a
                    # second sighting (it moved between listings mid-scan, or a page shift repeated
                    # it). Count the customer once, and let archived win.
                    assert old is not None
                    was_archived = old[0] == "archived"
                    if archived and not was_archived:
                        self.counts[False] -= 1
                        self.counts[True] += 1
                    if (was_archived and not archived) or (was_archived == archived and h == old[4]):
                        continue
                else:
                    self.counts[archived] += 1
                status = "archived" if archived else "active"
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
                        data.decode(),
                        old[2] if old else detected_at,
                        detected_at if (event_type or old is None) else old[3],
                        self.poll_id,
                    )
                )
            if upserts:
                conn.exec_driver_sql(_UPSERT_STATE, upserts)
            writer.flush()


@functools.cache
def _insert_customers_sql(rows: int) -> str:
    # ?1 and ?2 (detected_at, poll id) are bound once per statement, and each row binds exactly
    # the four values of a staged sighting, so the parameters are one flat pass over the batch.
    # A repeated sighting replaces the first, except that an active one never replaces an
    # archived one (archived wins, as in ``_CHOSEN_STAGED``).
    values = ", ".join(
        f"(?{i}, iif(?{i + 1}, 'archived', 'active'), ?{i + 2}, CAST(?{i + 3} AS TEXT), ?1, ?1, ?2)"
        for i in range(3, 3 + 4 * rows, 4)
    )
    return (
        "INSERT INTO customers (id, status, hash, record, first_seen_at, changed_at, last_poll_id) "
        f"VALUES {values} ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
        "hash = excluded.hash, record = excluded.record "
        "WHERE excluded.status = 'archived' OR customers.status = 'active'"
    )


@functools.cache
def _insert_staged_sql(rows: int) -> str:
    return "INSERT INTO temp.poll_staged VALUES " + ", ".join(["(?, ?, ?, ?)"] * rows)


def _load_states(conn: Connection, ids: Sequence[str]) -> dict[str, tuple[str, str, str, str, int]]:
    """id -> (status, record, first_seen_at, changed_at, hash) of the stored customers among ``ids``."""
    rows = _dbapi(conn).execute(
        "SELECT id, status, record, first_seen_at, changed_at, hash FROM customers "
        f"WHERE id IN ({', '.join('?' * len(ids))})",
        tuple(ids),
    )
    return {r[0]: r[1:] for r in rows}


def _last_sequence(conn: Connection) -> int:
    (seq,) = _dbapi(conn).execute("SELECT coalesce(max(sequence), 0) FROM events").fetchone()
    return int(seq)


def _dbapi(conn: Connection) -> sqlite3.Connection:
    db = conn.connection.dbapi_connection
    assert isinstance(db, sqlite3.Connection)
    return db


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
        #: Rows of ``_INSERT_EVENT`` and ``_INSERT_OUTBOX`` not yet written.
        self.events: list[tuple[Any, ...]] = []
        self.outbox: list[tuple[Any, ...]] = []

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
            (
                self.sequence,
                payload["id"],
                event_type,
                customer_id,
                self.poll_id,
                self.detected_at,
                orjson.dumps(payload).decode(),
            )
        )
        fields = [c["field"] for c in changes]
        for route in self.routes:
            if route.accepts(event_type, fields):
                self.outbox.append((self.sequence, route.sink, self.detected_at))
        return payload

    def flush(self) -> None:
        # Plain parameter tuples: a cycle that archives thousands of customers writes thousands
        # of events, and building an ORM-level insert per batch of dicts cost more than the rows.
        if self.events:
            self.conn.exec_driver_sql(_INSERT_EVENT, self.events)
            self.events = []
        if self.outbox:
            self.conn.exec_driver_sql(_INSERT_OUTBOX, self.outbox)
            self.outbox = []


_INSERT_EVENT = (
    "INSERT INTO events (sequence, id, type, customer_id, poll_id, detected_at, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_OUTBOX = (
    "INSERT INTO outbox (sequence, sink, status, attempts, created_at, next_attempt_at) "
    "VALUES (?1, ?2, 'pending', 0, ?3, ?3)"
)


def record_notice(
    store: Store, event_type: str, routes: Sequence[Route], *, now: datetime, detail: Mapping[str, Any]
) -> dict[str, Any]:
    """Append a ``watcher.*`` notice (not a customer change) to the audit log and route it."""
    with store.write() as conn:
        writer = _EventWriter(conn, None, format_ts(now), routes, _last_sequence(conn))
        payload = writer.add(event_type, None, None, None, [], extra={"detail": dict(detail)})
        writer.flush()
    return payload
