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

Any failure before step 3 commits nothing but the failed poll-run row (rule 1).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog
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


_DONE = object()

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
    "archived INTEGER NOT NULL, hash INTEGER NOT NULL, record TEXT)"
)
#: The latest staged row of every customer, in id order (SQLite takes the bare columns of a
#: ``max()`` aggregate from the row holding the maximum).
_LATEST_STAGED = (
    "SELECT customer_id, archived, hash, record, max(rowid) FROM temp.poll_staged "
    "WHERE customer_id > ? GROUP BY customer_id ORDER BY customer_id"
)
#: At most this many staged rows per INSERT statement (fewer when the SQLite library allows fewer
#: than 4 x this many parameters). One multi-row statement is one SQLite step, so the GIL is
#: handed over once per statement rather than once per row: each hand-over can wait for a
#: producer thread's switch interval while the listings are being fetched.
_STAGE_ROWS_PER_STATEMENT = _STAGE_BATCH
#: ``store.record_hash`` without its per-call set-up: copying an initialised 8-byte BLAKE2b state
#: is cheaper than building one from keyword arguments, and the digests are identical.
_BLAKE2B_8 = hashlib.blake2b(digest_size=8)
#: Customers per chunk when the known state loads (a rowid range; keeps the JSON text small).
_KNOWN_CHUNK = 20_000
_UPSERT_STATE = (
    "INSERT OR REPLACE INTO customers (id, status, hash, record, first_seen_at, changed_at, last_poll_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


class _Listings:
    """The pages of both listings as ``(archived, page)``: one listing after the other, or (when
    ``concurrent``) from two producer threads that start fetching as soon as this is created."""

    def __init__(self, source: CustomerSource, concurrent: bool, check_cancel: Any) -> None:
        self.source = source
        self.check_cancel = check_cancel
        self.threads: list[threading.Thread] = []
        # Two producer threads, one consumer: diffing stays single-threaded and needs no locks;
        # the small bounded queue keeps at most a few pages in memory.
        self.q: queue.Queue[Any] = queue.Queue(maxsize=8)
        self.stop = threading.Event()
        if concurrent:
            self.threads = [
                threading.Thread(target=self._produce, args=(a,), daemon=True, name=f"list-{a}")
                for a in (False, True)
            ]
            for t in self.threads:
                t.start()

    def _produce(self, archived: bool) -> None:
        q, stop = self.q, self.stop
        try:
            for page in self.source.iter_pages(archived=archived):
                while not stop.is_set():
                    try:
                        q.put((archived, page), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            q.put(exc)

    def __iter__(self) -> Iterator[tuple[bool, list[dict[str, Any]]]]:
        if not self.threads:
            for archived in (False, True):
                for page in self.source.iter_pages(archived=archived):
                    yield archived, page
            return
        done = 0
        while done < 2:
            try:
                item = self.q.get(timeout=0.2)
            except queue.Empty:
                self.check_cancel()
                continue
            if item is _DONE:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    def close(self) -> None:
        self.stop.set()
        # A producer stuck in a request sees ``stop`` only when the request ends. It is a daemon
        # thread that touches nothing but the queue, so there is no need to wait for it: a short
        # join keeps a cancelled poll (SIGTERM) from stalling shutdown for a read timeout.
        for t in self.threads:
            t.join(timeout=0.5)


class _Cycle:
    """The state of one cycle in progress."""

    def __init__(self, poller: Poller, poll_id: int, cancel: threading.Event) -> None:
        self.p = poller
        self.store = poller.store
        self.poll_id = poll_id
        self.cancel = cancel
        self.pages = 0
        #: archived -> {id: fingerprint} of every customer known to be in that listing. Plain ints in
        #: two dicts rather than (hash, archived) tuples: this is the cycle's one account-sized structure.
        self.known: dict[bool, dict[str, int]] = {False: {}, True: {}}
        #: id -> archived for every customer seen this cycle, and -> None for the known ones not
        #: seen (yet). Pre-filled with the known ids: the scan then updates existing entries (no
        #: resizing, and no second copy of each id string kept alive).
        self.seen: dict[str, bool | None] = {}
        self.counts = {False: 0, True: 0}  # customers seen, by listing
        #: id -> (archived, fingerprint, canonical JSON or None to withdraw), not yet flushed.
        self._stage_buf: dict[str, tuple[bool, int, bytes | None]] = {}
        self._conn: Connection | None = None

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
        listings = _Listings(self.p.source, self.p.concurrent_listings, self._check_cancel)
        try:
            conn.connection.dbapi_connection.execute("PRAGMA temp.journal_mode=MEMORY")  # type: ignore[union-attr]
            with self._transaction("DEFERRED"):
                baseline = not self.store.has_baseline(conn)
                self._load_known(conn)
                self.seen = dict.fromkeys(self.known[False])
                self.seen.update(dict.fromkeys(self.known[True]))
                conn.exec_driver_sql(_STAGED_DDL)
                conn.exec_driver_sql("DELETE FROM temp.poll_staged")
            for archived, page in listings:
                self._check_cancel()
                self.pages += 1
                self._observe_page(page, archived)
                if len(self._stage_buf) >= _STAGE_BATCH:
                    self._flush()
        finally:
            listings.close()
        self._flush()
        deleted, unresolved = self._resolve_vanished()
        self._flush()
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

    def _observe_page(self, page: list[dict[str, Any]], archived: bool) -> None:
        """:meth:`_observe` for a whole page, with its common case inlined: this loop runs once per
        customer per cycle, so it is the cycle's own cost on top of the API's."""
        seen = self.seen
        seen_before = seen.get
        known = self.known[archived].get
        stage = self._stage_buf
        dumps, sort_keys = orjson.dumps, orjson.OPT_SORT_KEYS
        new_hash, from_bytes = _BLAKE2B_8.copy, int.from_bytes
        counted = 0
        for record in page:
            cid = record["id"]
            if seen_before(cid) is not None:  # seen twice (in both listings): the general case decides
                self._observe(record, archived)
                continue
            seen[cid] = archived
            counted += 1
            data = dumps(record, option=sort_keys)  # == store.canonical(record)
            hasher = new_hash()
            hasher.update(data)
            h = from_bytes(hasher.digest(), "big", signed=True)  # == store.record_hash(data)
            if known(cid) != h:
                stage[cid] = (archived, h, data)
        self.counts[archived] += counted

    def _observe(self, record: dict[str, Any], archived: bool) -> None:
        cid = record["id"]
        before = self.seen.get(cid)
        if before is True and not archived:
            return  # seen in both listings: archived wins (it was archived mid-scan)
        self.seen[cid] = archived
        if before is not None:
            self.counts[before] -= 1
        self.counts[archived] += 1
        data = canonical(record)
        h = record_hash(data)
        if self.known[archived].get(cid) == h:
            if before is not None:
                # Staged from the other listing: this sighting matches the stored state after all.
                # It may already be flushed, so withdraw it (withdrawing nothing is harmless).
                self._stage_buf[cid] = (archived, h, None)
            return
        self._stage_buf[cid] = (archived, h, data)

    def _flush(self) -> None:
        if not self._stage_buf:
            return
        rows = list(self._stage_buf.items())
        with self._transaction("DEFERRED") as conn:
            db = conn.connection.dbapi_connection
            assert isinstance(db, sqlite3.Connection)
            limit = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            per_statement = min(_STAGE_ROWS_PER_STATEMENT, limit // 4)
            for i in range(0, len(rows), per_statement):
                chunk = rows[i : i + per_statement]
                params: list[Any] = []
                for cid, (a, h, d) in chunk:
                    params += (cid, a, h, None if d is None else d.decode())
                conn.exec_driver_sql(_insert_staged_sql(len(chunk)), tuple(params))
        self._stage_buf.clear()

    # -- 2. vanished customers ----------------------------------------------------------------

    def _resolve_vanished(self) -> tuple[list[str], int]:
        vanished = [cid for cid, archived in self.seen.items() if archived is None]
        if not vanished:
            return [], 0
        n_known = len(self.known[False]) + len(self.known[True])
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
                self._observe(record, record.get("archived_at") is not None)
        return deleted, unresolved

    # -- 3. the one transaction ---------------------------------------------------------------

    def _commit(self, baseline: bool, deleted: list[str]) -> dict[str, int]:
        now = self.p.clock()
        detected_at = format_ts(now)
        emit = not baseline or self.p.diff.emit_baseline_events
        counts: Counter[str] = Counter()
        with self._transaction("DEFERRED") as conn:  # before the write lock is taken
            conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS temp.staged_by_id ON poll_staged (customer_id)")
        with self._transaction("IMMEDIATE") as conn:
            seq = conn.execute(select(func.coalesce(func.max(EventRecord.sequence), 0))).scalar_one()
            writer = _EventWriter(conn, self.poll_id, detected_at, self.p.routes, seq)
            if not emit and conn.exec_driver_sql("SELECT 1 FROM customers LIMIT 1").first() is None:
                # A silent baseline into an empty store: every staged record is simply new, so the
                # copy is one statement instead of a Python loop over the whole account.
                conn.exec_driver_sql(
                    "INSERT INTO customers (id, status, hash, record, first_seen_at, changed_at, "
                    "last_poll_id) SELECT customer_id, CASE WHEN archived THEN 'archived' ELSE 'active' END, "
                    f"hash, record, ?, ?, ? FROM ({_LATEST_STAGED}) WHERE record IS NOT NULL",
                    (detected_at, detected_at, self.poll_id, ""),
                )
            else:
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
        return dict(counts)

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
            for cid, archived, h, data, _ in batch:
                status = "archived" if archived else "active"
                old = prev.get(cid)
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


@functools.cache
def _insert_staged_sql(rows: int) -> str:
    return "INSERT INTO temp.poll_staged VALUES " + ", ".join(["(?, ?, ?, ?)"] * rows)


def _load_states(conn: Connection, ids: Sequence[str]) -> dict[str, tuple[str, str, str, str]]:
    rows = conn.exec_driver_sql(
        "SELECT id, status, record, first_seen_at, changed_at FROM customers "
        f"WHERE id IN ({', '.join('?' * len(ids))})",
        tuple(ids),
    ).all()
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


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
