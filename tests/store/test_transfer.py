"""``metronome-watcher store migrate --to postgresql://...``: a SQLite store moved into PostgreSQL.

The source is the version 3 store of ``tests/fixtures/upgrade_v3`` (a baseline, a round of
changes, a notice, and three deliveries still pending for a sink whose receiver was down), so the
move is proven on a store with history, not on an empty one; the first test has it watch plans
for a poll first, so that the plans' tables and the sources' outcomes move too.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from tests.conftest import TOKEN, Harness, postgres_only, rows
from tests.store.test_upgrade import FIXTURE
from watcher.cli import main
from watcher.config import PlansConfig
from watcher.metronome import MetronomeClient
from watcher.poll import Poller
from watcher.routing import Route
from watcher.simulator import SimulatedMetronome
from watcher.store import Store
from watcher.store.transfer import TABLES


def v3_copy(tmp_path: Path) -> Path:
    db = tmp_path / "watcher.db"
    shutil.copy(FIXTURE / "watcher.db", db)
    return db


def config(tmp_path: Path, store: str, name: str = "watcher.toml") -> Path:
    path = tmp_path / name
    path.write_text(f'[store]\n{store}\n[logging]\nlevel = "warning"\nformat = "json"\n')
    return path


@postgres_only
def test_migrate_copies_everything_and_the_watcher_carries_on_in_postgres(
    fake: SimulatedMetronome,
    tmp_path: Path,
    store_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = v3_copy(tmp_path)
    # One poll with plans watched on SQLite first: the plans' baseline, and each source's outcome.
    fake.load(orjson.loads((FIXTURE / "customers.json").read_bytes()))
    fake.seed_plans(2)
    on_sqlite = Harness(fake, db, plans=PlansConfig(watch=True))
    try:
        polled = on_sqlite.poll()
    finally:
        on_sqlite.close()
    assert polled.ok and polled.events == 0 and polled.plans is not None and polled.plans.baseline
    sqlite_config = config(tmp_path, f'path = "{db}"')
    # The password travels as ${VAR}, as an operator would pass it; it is never printed.
    password = store_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    monkeypatch.setenv("TARGET_PASSWORD", password)
    target = store_url.replace(f":{password}@", ":${TARGET_PASSWORD}@")

    assert main(["--config", str(sqlite_config), "store", "migrate", "--to", target]) == 0
    out, err = capsys.readouterr()
    assert "7 events" in out and "last sequence 7" in out and "verified" in out
    assert f"2 plans, {polled.plans.memberships} plan_members, 2 plan_page_memo" in out
    assert password not in out + err

    pg = Store(store_url)
    sqlite = Store(db)
    try:
        assert {t.name for t in TABLES} == {
            "customers",
            "poll_runs",
            "poll_sources",
            "events",
            "outbox",
            "sink_state",
            "page_memo",
            "plans",
            "plan_members",
            "plan_page_memo",
        }
        for table in TABLES:
            query = f"SELECT * FROM {table.name} ORDER BY 1, 2"
            copied = rows(pg, query)
            assert copied == rows(sqlite, query), table.name
            assert copied or table.name == "sink_state", f"{table.name}: the test copies no rows of it"
        expected = [orjson.loads(line) for line in (FIXTURE / "events.jsonl").read_text().splitlines()]
        assert pg.query_events() == expected
        assert pg.plan_counts() == sqlite.plan_counts()
        (crm,) = pg.delivery_status(datetime(2026, 11, 30, 12, 10, tzinfo=UTC), sinks=["crm"])
        assert (crm.pending, crm.next_attempt_at) == (3, "2026-11-30T12:06:01.035642Z")

        # The next cycle on PostgreSQL sees the same account and the same plans: no change (the
        # page memos hold), and new events carry on the sequence and the poll ids where SQLite
        # left them.
        with MetronomeClient(fake.url, TOKEN) as client:
            poller = Poller(
                pg, client, routes=[Route("audit")], plans=PlansConfig(watch=True), plan_source=client
            )
            first = poller.run()
            last_poll = max(r[0] for r in rows(sqlite, "SELECT id FROM poll_runs"))
            assert first.ok and first.events == 0 and first.poll_id == last_poll + 1
            assert first.plans is not None and not first.plans.baseline
            assert first.plans.memberships == polled.plans.memberships
            fake.set_name(fake.customers(archived=False)[0]["id"], "Moved Along Inc.")
            assert poller.run().events == 1
        (event,) = pg.query_events(after_sequence=7)
        assert event["sequence"] == 8 and event["type"] == "customer.updated"
    finally:
        pg.close()
        sqlite.close()


@postgres_only
def test_migrate_refuses_a_target_that_is_not_empty_and_writes_nothing(
    tmp_path: Path, store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = v3_copy(tmp_path)
    sqlite_config = config(tmp_path, f'path = "{db}"')
    assert main(["--config", str(sqlite_config), "store", "migrate", "--to", store_url]) == 0
    capsys.readouterr()
    pg = Store(store_url)
    before = rows(pg, "SELECT count(*), max(sequence) FROM events")

    assert main(["--config", str(sqlite_config), "store", "migrate", "--to", store_url]) == 1
    _, err = capsys.readouterr()
    assert "is not empty (poll_runs: " in err and "events: 7 rows" in err
    assert "store migrate copies only into an empty store" in err
    assert rows(pg, "SELECT count(*), max(sequence) FROM events") == before
    pg.close()


def test_migrate_needs_a_sqlite_source_and_a_postgres_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sqlite_config = config(tmp_path, f'path = "{tmp_path / "w.db"}"')
    assert main(["--config", str(sqlite_config), "store", "migrate", "--to", str(tmp_path / "other.db")]) == 2
    assert "--to: must be a PostgreSQL URL" in capsys.readouterr().err
    pg_config = config(tmp_path, 'url = "postgresql://watcher@db.internal:5432/watcher"', "pg.toml")
    assert main(["--config", str(pg_config), "store", "migrate", "--to", "postgresql://h/db"]) == 2
    assert "store.url: this config's store is PostgreSQL already" in capsys.readouterr().err
