"""``watcher.store.schema``: the schema's version is recorded, a newer one refused, older ones migrated."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import pytest
from sqlalchemy import insert, inspect, text

from tests.conftest import Harness, rows, sqlite_only
from watcher.errors import StoreError
from watcher.fingerprint import record_hash
from watcher.simulator import SimulatedMetronome
from watcher.store import SCHEMA_VERSION, PollRun, Store


def test_schema_version_is_recorded_and_a_newer_database_is_refused(store_url: str) -> None:
    store = Store(store_url)
    assert rows(store, "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    with store.write() as conn:
        conn.execute(text("UPDATE meta SET value='999' WHERE key='schema_version'"))
    store.close()
    with pytest.raises(StoreError, match="newer than this release"):
        Store(store_url)


@sqlite_only
def test_schema_1_fingerprints_are_recomputed_on_upgrade(fake: SimulatedMetronome, harness: Harness) -> None:
    fake.seed(25)
    assert harness.poll().ok
    harness.store.close()
    con = sqlite3.connect(harness.db)
    with con:
        con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        con.execute("UPDATE customers SET hash = 12345")  # what an older fingerprint would look like
    con.close()

    store = Store(harness.db)

    assert store.schema_version() == SCHEMA_VERSION
    con = sqlite3.connect(harness.db)
    rows = con.execute("SELECT hash, record, last_poll_id FROM customers").fetchall()
    con.close()
    assert rows and all(h == record_hash(r.encode()) for h, r, _ in rows)
    # The next cycle recognises every customer: nothing is staged, nothing rewritten.
    harness.store = harness.poller.store = store
    result = harness.poll()
    assert result.ok and result.events == 0
    con = sqlite3.connect(harness.db)
    assert con.execute("SELECT DISTINCT last_poll_id FROM customers").fetchall() == [(rows[0][2],)]
    con.close()


def shape(store: Store) -> dict[str, list[str]]:
    """Every table and its indexes (columns, uniqueness, the partial ones' conditions), as the engine
    reports them."""
    with store.read() as conn:
        found = inspect(conn)
        return {
            table: sorted(
                f"{i['name']} {i['column_names']} unique={bool(i['unique'])} "
                + " ".join(f"{k}={v}" for k, v in sorted(i.get("dialect_options", {}).items()))
                for i in found.get_indexes(table)
            )
            for table in sorted(found.get_table_names())
        }


def test_the_steps_after_version_3_upgrade_a_store_on_either_engine(
    store_url: str, new_store_url: Callable[[], str]
) -> None:
    """A PostgreSQL store is created at the latest version, so no step has had one to upgrade yet;
    the steps are written for both engines all the same. Here a store is taken back to version 3's
    tables (no outbox status indexes, no sources' outcomes, no plans, no lease) and reopened."""
    store = Store(store_url)
    with store.write() as conn:
        for outcome in ("succeeded", "failed", "running"):
            conn.execute(
                insert(PollRun).values(
                    started_at="2026-01-01T00:00:00Z", outcome=outcome, active=3, archived=1, error=None
                )
            )
        for table in ("leases", "plan_page_memo", "plan_members", "plans", "poll_sources"):
            conn.execute(text(f"DROP TABLE {table}"))
        for index in ("ix_outbox_pending", "ix_outbox_errors"):
            conn.execute(text(f"DROP INDEX {index}"))
        conn.execute(text("UPDATE meta SET value = '3' WHERE key = 'schema_version'"))
    store.close()

    store = Store(store_url)
    fresh = Store(new_store_url())
    try:
        assert store.schema_version() == SCHEMA_VERSION
        # Each finished poll became the customers' row; the one left running did not.
        assert rows(store, "SELECT poll_id, source, outcome, items FROM poll_sources ORDER BY 1") == [
            (1, "customers", "succeeded", 4),
            (2, "customers", "failed", 4),
        ]
        assert rows(store, "SELECT count(*) FROM leases") == [(0,)]
        assert shape(store) == shape(fresh)
    finally:
        store.close()
        fresh.close()
