"""A database written by an older release opens, migrates in place and loses nothing.

``tests/fixtures/upgrade_v3`` was written by schema version 3 (its README says how and when): a
baseline, a round of changes, a notice, and a sink with deliveries still pending.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import orjson

from watcher.store import SCHEMA_VERSION, Store, queries

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "upgrade_v3"


def indexes(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as con:
        return dict(
            con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        )


def test_a_version_3_database_migrates_to_this_release_and_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "watcher.db"
    shutil.copy(FIXTURE / "watcher.db", db)
    with sqlite3.connect(db) as con:
        before = {
            table: con.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("customers", "events", "outbox", "poll_runs", "sink_state", "page_memo")
        }
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("3",)
    assert "ix_outbox_pending" not in indexes(db)

    with Store(db) as store:
        assert store.schema_version() == SCHEMA_VERSION == 4
        # The audit log reads back exactly as `events --format jsonl` printed it under version 3.
        printed = (FIXTURE / "events.jsonl").read_text().splitlines()
        assert [orjson.dumps(e).decode() for e in store.query_events()] == printed
        # ... and as stored, byte for byte: the change feed sends the stored text as it is.
        assert store.event_page(after=0, limit=100, parse=False).payloads[::-1] == printed
        # The sink that could not deliver still has its three events pending, in order.
        pending = (FIXTURE / "pending_crm.txt").read_text().split()
        (crm,) = store.delivery_status(datetime(2026, 12, 2, tzinfo=UTC), sinks=["crm"])
        assert crm.pending == len(pending) == 3 and crm.delivered == 0
        with store.read() as conn:
            due = queries.due_deliveries(conn, "crm", 10)
        assert [json.loads(payload)["id"] for _, _, payload in due] == pending
        # What the web view's first page shows: the newest events, newest first.
        page = store.event_page(limit=3)
        assert [e["sequence"] for e in page.events] == [json.loads(p)["sequence"] for p in printed[::-1][:3]]

    with sqlite3.connect(db) as con:
        after = {table: con.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall() for table in before}
    assert after == before
    found = indexes(db)
    assert found["ix_outbox_pending"].endswith("WHERE status = 'pending'")
    assert found["ix_outbox_errors"].endswith("WHERE last_error IS NOT NULL")


def test_a_migrated_database_is_the_same_shape_as_a_new_one(tmp_path: Path) -> None:
    migrated = tmp_path / "migrated.db"
    shutil.copy(FIXTURE / "watcher.db", migrated)
    Store(migrated).close()
    new = tmp_path / "new.db"
    Store(new).close()
    assert indexes(migrated) == indexes(new)
