"""A store written by an older release opens in this one and has lost nothing (``tests/fixtures``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson

from tests.conftest import TOKEN, rows
from watcher.metronome import MetronomeClient
from watcher.poll import Poller
from watcher.routing import Route
from watcher.simulator import SimulatedMetronome
from watcher.store import SCHEMA_VERSION, Store

FIXTURE = Path(__file__).parent.parent / "fixtures" / "upgrade_v3"


def v3_copy(tmp_path: Path) -> Path:
    db = tmp_path / "watcher.db"
    shutil.copy(FIXTURE / "watcher.db", db)
    return db


def test_a_version_3_store_gains_the_lease_table_and_keeps_everything(
    fake: SimulatedMetronome, tmp_path: Path
) -> None:
    store = Store(v3_copy(tmp_path))
    try:
        assert store.schema_version() == SCHEMA_VERSION == 4
        assert rows(store, "SELECT count(*) FROM leases") == [(0,)]
        expected = [orjson.loads(line) for line in (FIXTURE / "events.jsonl").read_text().splitlines()]
        assert store.query_events() == expected
        pending = rows(
            store,
            "SELECT e.id FROM outbox o JOIN events e USING (sequence) "
            "WHERE o.sink = 'crm' AND o.status = 'pending' ORDER BY o.sequence",
        )
        assert [r[0] for r in pending] == (FIXTURE / "pending_crm.txt").read_text().split()

        # The same account served again: nothing is news, the fingerprints and the memo still hold.
        fake.load(orjson.loads((FIXTURE / "customers.json").read_bytes()))
        with MetronomeClient(fake.url, TOKEN) as client:
            result = Poller(store, client, routes=[Route("audit")]).run()
        assert result.ok and result.events == 0 and not result.baseline
    finally:
        store.close()
