"""``watcher.store.schema``: the schema's version is recorded, a newer one refused, older ones migrated."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.conftest import Harness
from watcher.errors import StoreError
from watcher.fingerprint import record_hash
from watcher.simulator import SimulatedMetronome
from watcher.store import SCHEMA_VERSION, Store


def test_schema_version_is_recorded_and_a_newer_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    Store(db).close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    con.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="newer than this release"):
        Store(db)


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
