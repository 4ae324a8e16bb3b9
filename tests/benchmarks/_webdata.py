"""An audit log of any size, written as a long-running watcher would have written it.

``build(path, events=1_000_000, customers=100_000)`` makes a database (through ``Store``, so the
schema and its indexes are the release's) holding ``customers`` customers and ``events`` v1 events
spread over one poll per 500 events: mostly updates (names, tiers, Salesforce ids, billable status,
ingest aliases), with creations, archives, unarchives and deletions, a few notices, and a skew
(a twentieth of the customers get half of the events), every event routed to an ``audit`` sink
(delivered) and the churn types to ``churn`` (the last thousand still pending). The rows are
written with ``sqlite3`` in large transactions: 1M events take a minute or two, not a million cycles.
"""

from __future__ import annotations

import random
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from watcher._time import format_ts
from watcher.events import EventType, EventWriter
from watcher.store import Store
from watcher.store._cycle_sqlite import INSERT_EVENT, INSERT_OUTBOX

__all__ = ["CHURN_TYPES", "START", "build"]

START = datetime(2026, 1, 1, tzinfo=UTC)
EVENTS_PER_POLL = 500
CHURN_TYPES = (EventType.CUSTOMER_ARCHIVED, EventType.CUSTOMER_DELETED, EventType.POLL_FAILING)
_HEADS = ("Acme", "Blue Harbor", "Cobalt", "Driftwood", "Ember", "Granite", "Helix", "Juniper", "Nimbus")
_TAILS = ("Labs", "Systems", "Analytics", "Foods", "Logistics", "Health", "Cloud", "Media", "Energy")
_TIERS = ("starter", "growth", "enterprise", "strategic")


def _record(rng: random.Random, n: int, created: str) -> dict[str, Any]:
    name = f"{rng.choice(_HEADS)} {rng.choice(_TAILS)} {n}"
    slug = name.lower().replace(" ", "-")
    return {
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "external_id": f"billing@{slug}.example.com",
        "ingest_aliases": [f"billing@{slug}.example.com"],
        "name": name,
        "customer_config": {"salesforce_account_id": None},
        "custom_fields": {"tier": rng.choice(_TIERS), "region": rng.choice(("us", "eu", "apac"))},
        "created_at": created,
        "updated_at": created,
        "archived_at": None,
    }


def _change(rng: random.Random, record: dict[str, Any], now: str) -> tuple[str, list[dict[str, Any]]]:
    """Change ``record`` in place; returns the event type and its changes."""
    archived = record["archived_at"] is not None
    kind = rng.choices(("name", "tier", "aliases", "sfdc", "archive"), weights=(25, 35, 15, 15, 10))[0]
    if kind == "archive":
        before, after = record["archived_at"], None if archived else now
        record["archived_at"] = after
        etype = EventType.CUSTOMER_UNARCHIVED if archived else EventType.CUSTOMER_ARCHIVED
        return etype, [{"field": "archived_at", "before": before, "after": after}]
    if kind == "name":
        field, before = "name", record["name"]
        record["name"] = after = f"{rng.choice(_HEADS)} {rng.choice(_TAILS)} {rng.randrange(10**6)}"
    elif kind == "tier":
        field, before = "custom_fields.tier", record["custom_fields"]["tier"]
        record["custom_fields"]["tier"] = after = rng.choice([t for t in _TIERS if t != before])
    elif kind == "aliases":
        field, before = "ingest_aliases", list(record["ingest_aliases"])
        record["ingest_aliases"] = after = [*before, f"acct_{rng.getrandbits(32):08x}"]
    else:
        field, before = (
            "customer_config.salesforce_account_id",
            record["customer_config"]["salesforce_account_id"],
        )
        record["customer_config"]["salesforce_account_id"] = after = f"001{rng.getrandbits(48):012X}"
    return EventType.CUSTOMER_UPDATED, [{"field": field, "before": before, "after": after}]


def build(path: Path, *, events: int, customers: int, seed: int = 7) -> dict[str, Any]:
    """Write the database at ``path`` (which must not exist); returns what a benchmark needs to know."""
    rng = random.Random(seed)
    Store(path).close()  # the schema, exactly as the release creates it
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    records: list[dict[str, Any]] = []
    status: dict[str, str] = {}
    first_seen: dict[str, str] = {}
    changed: dict[str, str] = {}
    hot = max(1, customers // 20)
    written = 0
    poll_id = 0
    moment = START
    outbox_churn = 0
    by_type: dict[str, int] = {}
    db.execute("BEGIN")
    while written < events:
        poll_id += 1
        moment += timedelta(minutes=5)
        now = format_ts(moment)
        db.execute(
            "INSERT INTO poll_runs (id, started_at, finished_at, outcome, baseline, pages, active, archived, "
            "events, events_by_type) VALUES (?, ?, ?, 'succeeded', 0, 0, 0, 0, 0, '{}')",
            (poll_id, format_ts(moment - timedelta(seconds=rng.uniform(2, 20))), now),
        )
        last = db.execute("SELECT coalesce(max(sequence), 0) FROM events").fetchone()[0]

        def route(etype: str, _fields: Any) -> list[str]:
            return ["audit", "churn"] if etype in CHURN_TYPES else ["audit"]

        writer = EventWriter(poll_id=poll_id, detected_at=now, last_sequence=last, route=route)
        for _ in range(min(EVENTS_PER_POLL, events - written)):
            roll = rng.random()
            if len(records) < customers and (roll < 0.08 or len(records) < 10):
                record = _record(rng, len(records), now)
                records.append(record)
                cid = record["id"]
                status[cid], first_seen[cid], changed[cid] = "active", now, now
                writer.add(EventType.CUSTOMER_CREATED, cid, record, None, [])
            elif roll < 0.0805 and poll_id % 50 == 0:
                writer.add(EventType.POLL_FAILING, None, None, None, [], {"detail": {"poll_id": poll_id}})
            else:
                i = (
                    rng.randrange(min(hot, len(records)))
                    if rng.random() < 0.5
                    else rng.randrange(len(records))
                )
                record = records[i]
                cid = record["id"]
                if status[cid] == "deleted":
                    continue
                previous = orjson.loads(orjson.dumps(record))
                if roll > 0.995:
                    status[cid], changed[cid] = "deleted", now
                    writer.add(EventType.CUSTOMER_DELETED, cid, previous, previous, [])
                    written += 1
                    continue
                record["updated_at"] = now
                etype, changes = _change(rng, record, now)
                status[cid] = "archived" if record["archived_at"] else "active"
                changed[cid] = now
                writer.add(etype, cid, record, previous, changes)
            written += 1
        rows, outbox = writer.take()
        for row in rows:
            by_type[row.type] = by_type.get(row.type, 0) + 1
        outbox_churn += sum(1 for o in outbox if o.sink == "churn")
        db.executemany(INSERT_EVENT, rows)
        db.executemany(INSERT_OUTBOX, outbox)
        db.execute("UPDATE poll_runs SET events = ? WHERE id = ?", (len(rows), poll_id))
        if poll_id % 200 == 0:
            db.execute("COMMIT")
            db.execute("BEGIN")
    # Every delivery done, but the churn sink's last thousand, as a sink that is backing off.
    db.execute("UPDATE outbox SET status = 'delivered', attempts = 1, delivered_at = created_at")
    pending = min(1000, outbox_churn)
    db.execute(
        "UPDATE outbox SET status = 'pending', delivered_at = NULL, last_error = 'HTTP 503' "
        "WHERE id IN (SELECT id FROM outbox WHERE sink = 'churn' ORDER BY id DESC LIMIT ?)",
        (pending,),
    )
    db.executemany(
        "INSERT INTO customers (id, status, hash, record, first_seen_at, changed_at, last_poll_id) "
        "VALUES (?, ?, 0, ?, ?, ?, ?)",
        (
            (
                r["id"],
                status[r["id"]],
                orjson.dumps(r).decode(),
                first_seen[r["id"]],
                changed[r["id"]],
                poll_id,
            )
            for r in records
        ),
    )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    hot_ids = [r["id"] for r in records[:hot]]
    return {
        "events": written,
        "customers": len(records),
        "polls": poll_id,
        "by_type": by_type,
        "hot_customer": hot_ids[0],
        "cold_customer": records[-1]["id"],
        "name_fragment": records[-1]["name"].split()[-1],
    }
