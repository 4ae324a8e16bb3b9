"""Store benchmark: a year of 10 s polls with steady churn on a fake clock, pruned hourly (issue 16).

Run from the repository root, with the package installed (it is not collected by ``pytest``)::

    python -m tests.benchmarks.bench_store                          # a year, keep_events = 90d
    python -m tests.benchmarks.bench_store --keep-events none       # the default: the audit log kept
    python -m tests.benchmarks.bench_store --days 3 --keep-polls 1d --keep-deliveries 1d --keep-events 1d

It prints one JSON document on stdout (progress on stderr; ``--out FILE`` keeps a copy): the
database's size sampled over simulated time (``samples``), each table's share at the end, and what
the hourly prunes took. The question it answers: once the ``keep_*`` windows are full, does the
SQLite file stop growing without a VACUUM (deleted pages go to the freelist and are reused)?

What it writes, and how: the first poll is a real baseline (``Poller`` against the simulated
Metronome, ``--customers`` customers). Every later poll is written in bulk, an hour of polls per
write transaction, as the rows a real cycle writes: a ``poll_runs`` row and its ``poll_sources`` row
per poll (succeeded, or failed with an error at ``--failure-rate``), and, at ``--churn-per-hour``,
a renamed customer's ``customer.updated`` event (built by ``events.EventWriter``, the cycle's own
writer, so the payload is the v1 event with the record before and after), its new state in
``customers`` and one outbox row per sink (``--sinks``), delivered two seconds later. The prune is
``watcher.store.prune.prune`` itself, every ``--prune-every`` of simulated time, with its rest
between batches left out (it changes no size). The clock is fake: a year takes minutes.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import bindparam, func, insert, select, update
from sqlmodel import col

from tests.benchmarks import emit
from watcher._logging import configure_logging
from watcher._time import format_ts
from watcher.config import DiffConfig, StoreConfig, parse_duration
from watcher.events import DeliveryState, EventWriter, PollOutcome, Source
from watcher.fingerprint import canonical, record_hash
from watcher.metronome import MetronomeClient
from watcher.poll import Poller
from watcher.routing import Route, Router
from watcher.simulator import SimulatedMetronome
from watcher.store import CustomerState, EventRecord, OutboxRow, PollRun, PollSource, Store, queries
from watcher.store.prune import prune

START = datetime(2026, 1, 1, tzinfo=UTC)
TOKEN = "bench-token"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def file_bytes(db: Path) -> dict[str, int]:
    wal = Path(f"{db}-wal")
    con = sqlite3.connect(db)
    try:
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        free = con.execute("PRAGMA freelist_count").fetchone()[0]
        size = con.execute("PRAGMA page_size").fetchone()[0]
    finally:
        con.close()
    return {
        "file_bytes": db.stat().st_size,
        "wal_bytes": wal.stat().st_size if wal.exists() else 0,
        "pages": pages,
        "freelist_pages": free,
        "page_size": size,
    }


def table_bytes(db: Path) -> dict[str, int]:
    """Bytes of each table with its indexes (SQLite's ``dbstat``)."""
    con = sqlite3.connect(db)
    try:
        names = dict(con.execute("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"))
        out: dict[str, int] = {}
        for name, size in con.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
            table = names.get(name, name)
            out[table] = out.get(table, 0) + int(size)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))
    finally:
        con.close()


def counts(store: Store) -> dict[str, int]:
    with store.read() as conn:
        return {
            model.__tablename__: int(conn.execute(select(func.count()).select_from(model)).scalar() or 0)  # type: ignore[attr-defined]
            for model in (PollRun, PollSource, EventRecord, OutboxRow)
        }


class Year:
    """The simulated account and its writer: an hour of polls at a time."""

    def __init__(self, args: argparse.Namespace, store: Store, records: dict[str, dict[str, Any]]) -> None:
        self.args = args
        self.store = store
        self.records = records
        self.ids = sorted(records)
        self.rng = random.Random(args.seed)
        self.router = Router([Route(f"sink{i}") for i in range(args.sinks)])
        self.active = sum(1 for r in records.values() if r.get("archived_at") is None)
        self.archived = len(records) - self.active
        self.pages = -(-self.active // 100) + -(-self.archived // 100)
        self.events = 0

    def hour(self, at: datetime, poll_id: int) -> int:
        """Write the polls of the hour starting at ``at`` (ids from ``poll_id``); returns the next id."""
        a = self.args
        polls = int(3600 // a.interval)
        churn_at = sorted(self.rng.randrange(polls) for _ in range(self._churn()))
        runs, sources, states = [], [], []
        with self.store.write() as conn:
            last = queries.last_sequence(conn)
            deliveries = []
            for i in range(polls):
                pid = poll_id + i
                started = at + timedelta(seconds=i * a.interval)
                finished = started + timedelta(seconds=0.4)
                failed = self.rng.random() < a.failure_rate
                by_type: dict[str, int] = {}
                if not failed and churn_at and churn_at[0] == i:
                    writer = EventWriter(
                        poll_id=pid, detected_at=format_ts(finished), last_sequence=last, route=self.router
                    )
                    while churn_at and churn_at[0] == i:
                        churn_at.pop(0)
                        states.append(self._rename(writer, pid, finished))
                    events, outbox = writer.take()
                    queries.append_events(conn, events, outbox)
                    last = writer.sequence
                    by_type = {"customer.updated": len(events)}
                    self.events += len(events)
                    deliveries.append((last - len(events), last, format_ts(finished + timedelta(seconds=2))))
                error = (
                    "GET /v1/customers (active listing, page 3): HTTP 503: Service Unavailable"
                    if failed
                    else None
                )
                outcome = PollOutcome.FAILED if failed else PollOutcome.SUCCEEDED
                row: dict[str, Any] = {
                    "id": pid,
                    "started_at": format_ts(started),
                    "finished_at": format_ts(finished),
                    "outcome": outcome,
                    "baseline": False,
                    "pages": 0 if failed else self.pages,
                    "active": 0 if failed else self.active,
                    "archived": 0 if failed else self.archived,
                    "events": sum(by_type.values()),
                    "events_by_type": orjson.dumps(by_type).decode(),
                    "error": error,
                }
                runs.append(row)
                sources.append(
                    {
                        "poll_id": pid,
                        "source": Source.CUSTOMERS,
                        "outcome": outcome,
                        "finished_at": row["finished_at"],
                        "baseline": False,
                        "pages": row["pages"],
                        "items": row["active"] + row["archived"],
                        "events": row["events"],
                        "events_by_type": row["events_by_type"],
                        "error": error,
                    }
                )
            conn.execute(insert(PollRun), runs)
            conn.execute(insert(PollSource), sources)
            if states:
                conn.execute(
                    update(CustomerState).where(col(CustomerState.id) == bindparam("cid")),
                    states,
                )
            for first, upto, when in deliveries:
                conn.execute(
                    update(OutboxRow)
                    .where(col(OutboxRow.sequence) > first, col(OutboxRow.sequence) <= upto)
                    .values(
                        status=DeliveryState.DELIVERED, attempts=1, last_attempt_at=when, delivered_at=when
                    )
                )
        return poll_id + polls

    def _churn(self) -> int:
        """Changes this hour: ``--churn-per-hour`` on average (Poisson, as independent changes are)."""
        rate, n, t = self.args.churn_per_hour, 0, self.rng.expovariate(1.0)
        while t < rate:
            n += 1
            t += self.rng.expovariate(1.0)
        return n

    def _rename(self, writer: EventWriter, poll_id: int, at: datetime) -> dict[str, Any]:
        cid = self.rng.choice(self.ids)
        previous = self.records[cid]
        customer = {**previous, "name": f"{previous['name'].split(' #')[0]} #{self.rng.randrange(10**6)}"}
        customer["updated_at"] = format_ts(at)
        self.records[cid] = customer
        changes = [{"field": "name", "before": previous["name"], "after": customer["name"]}]
        writer.add("customer.updated", cid, customer, previous, changes)
        data = canonical(customer)
        return {
            "cid": cid,
            "record": data.decode(),
            "hash": record_hash(data),
            "changed_at": format_ts(at),
            "last_poll_id": poll_id,
        }


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-store-")) if args.db is None else args.db.parent
    db = args.db or workdir / "bench.db"
    if db.exists():
        raise SystemExit(f"{db} exists: the benchmark starts from an empty store")
    keep = StoreConfig(
        path=db,
        keep_deliveries=args.keep_deliveries,
        keep_polls=args.keep_polls,
        keep_events=None if args.keep_events == "none" else args.keep_events,
    )
    clock = [START]
    fake = SimulatedMetronome(token=TOKEN).start()
    try:
        fake.seed(args.customers, rng=random.Random(args.seed))
        store = Store(db)
        client = MetronomeClient(fake.url, TOKEN)
        baseline = Poller(store, client, diff=DiffConfig(), routes=[], clock=lambda: clock[0]).run()
        client.close()
        assert baseline.ok and baseline.baseline
        records = {c["id"]: c for c in fake.customers()}
    finally:
        fake.stop()
    year = Year(args, store, records)
    days = args.days
    hours = int(days * 24)
    prune_every = max(1, round(parse_duration(args.prune_every).total_seconds() / 3600))
    sample_every = max(1, round(parse_duration(args.sample_every).total_seconds() / 3600))
    tables_every = max(1, round(parse_duration(args.tables_every).total_seconds() / 3600))
    samples: list[dict[str, Any]] = []
    prunes: list[dict[str, Any]] = []
    longest_batches: list[float] = []
    totals = {"deliveries": 0, "events": 0, "polls": 0, "poll_sources": 0}
    poll_id = baseline.poll_id + 1
    write_seconds = 0.0
    t0 = time.perf_counter()
    for h in range(hours):
        at = START + timedelta(hours=h)
        t = time.perf_counter()
        poll_id = year.hour(at, poll_id)
        write_seconds += time.perf_counter() - t
        now = at + timedelta(hours=1)
        if (h + 1) % prune_every == 0:
            report = prune(store, keep, now=now, sleep=lambda _: None, pause=0)
            longest_batches.append(report.longest_batch)
            for k, v in report.counts().items():
                totals[k] += v
            prunes.append(
                {
                    "day": round((h + 1) / 24, 3),
                    "seconds": round(report.seconds, 4),
                    "longest_batch_seconds": round(report.longest_batch, 4),
                    "batches": report.batches,
                    **report.counts(),
                }
            )
        if (h + 1) % sample_every == 0 or h + 1 == hours:
            store.request_checkpoint()
            store.wait_for_checkpoint(60)
            sample: dict[str, Any] = {"day": round((h + 1) / 24, 3), **file_bytes(db), "rows": counts(store)}
            if (h + 1) % tables_every == 0 or h + 1 == hours:
                sample["tables"] = table_bytes(db)
            samples.append(sample)
            log(
                f"day {sample['day']:>7}: {sample['file_bytes'] / 1e6:8.1f} MB file, "
                f"{sample['freelist_pages']} free pages, rows {sample['rows']} "
                f"({time.perf_counter() - t0:.0f}s)"
            )
    store.close()
    elapsed = time.perf_counter() - t0
    prune_secs = [p["seconds"] for p in prunes]
    full = (
        max(
            parse_duration(args.keep_polls),
            parse_duration(args.keep_deliveries),
            parse_duration(args.keep_events) if args.keep_events != "none" else timedelta(0),
        ).total_seconds()
        / 86400
    )
    after = [s for s in samples if s["day"] >= full + 1]
    flat = None
    if len(after) >= 2:
        first, last = after[0], after[-1]
        flat = {
            "from_day": first["day"],
            "to_day": last["day"],
            "file_bytes_from": first["file_bytes"],
            "file_bytes_to": last["file_bytes"],
            "growth_ratio": round(last["file_bytes"] / first["file_bytes"], 4),
            "max_file_bytes": max(s["file_bytes"] for s in after),
            "min_file_bytes": min(s["file_bytes"] for s in after),
        }
    return {
        "date": "2026-12-02",
        "parameters": {
            "days": days,
            "interval_s": args.interval,
            "customers": args.customers,
            "churn_per_hour": args.churn_per_hour,
            "sinks": args.sinks,
            "failure_rate": args.failure_rate,
            "keep_deliveries": args.keep_deliveries,
            "keep_polls": args.keep_polls,
            "keep_events": args.keep_events,
            "prune_every": args.prune_every,
            "seed": args.seed,
        },
        "polls_written": poll_id - 1,
        "events_written": year.events,
        "pruned": totals,
        "prunes": {
            "runs": len(prunes),
            "median_seconds": round(statistics.median(prune_secs), 4) if prune_secs else None,
            "max_seconds": round(max(prune_secs), 4) if prune_secs else None,
            "median_longest_batch_seconds": round(statistics.median(longest_batches), 4) if prunes else None,
            "p99_longest_batch_seconds": round(quantile(longest_batches, 0.99), 4) if prunes else None,
            "max_batch_seconds": round(max(longest_batches), 4) if prunes else None,
            "slowest": sorted(prunes, key=lambda p: -p["longest_batch_seconds"])[:5],
            "batches": sum(p["batches"] for p in prunes),
        },
        "flat_once_full": flat,
        "samples": samples,
        "seconds": {"total": round(elapsed, 1), "writing": round(write_seconds, 1)},
        "database": str(db),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.bench_store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--days", type=float, default=365, help="simulated days (default 365)")
    parser.add_argument("--interval", type=float, default=10.0, help="poll interval in seconds (default 10)")
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--churn-per-hour", type=float, default=10.0, help="changed customers per hour")
    parser.add_argument("--sinks", type=int, default=2, help="outbox rows per event")
    parser.add_argument("--failure-rate", type=float, default=0.001, help="share of polls that fail")
    parser.add_argument("--keep-deliveries", default="30d")
    parser.add_argument("--keep-polls", default="90d")
    parser.add_argument("--keep-events", default="90d", help='a duration, or "none" (kept forever)')
    parser.add_argument("--prune-every", default="1h", help="simulated time between prunes (whole hours)")
    parser.add_argument("--sample-every", default="7d", help="simulated time between size samples")
    parser.add_argument("--tables-every", default="28d", help="... and between per-table sizes (dbstat)")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--db", type=Path, default=None, help="the SQLite file (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    configure_logging("warning", "json")  # to stderr: stdout is the report
    report = run(args)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
