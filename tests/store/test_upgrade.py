"""A database written by an older release opens in this one, migrated in place, and loses nothing.

``tests/fixtures/upgrade_v3`` was written by schema version 3 (see its README): a baseline, a round of
changes, a notice, and a sink (``crm``) whose three deliveries were still pending. The fixture is copied,
never opened in place.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TOKEN, Harness
from tests.receivers import FakeClock, Receiver
from watcher.config import DeliveryConfig, PlansConfig
from watcher.delivery import Deliverer
from watcher.simulator import SimulatedMetronome
from watcher.sinks.http import HttpSink
from watcher.store import SCHEMA_VERSION, Store

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "upgrade_v3"
#: The fixture's crm sink signed with this secret (``make.py``); any valid one will do here.
SECRET = "whsec_dXBncmFkZS1maXh0dXJlLXNpZ25pbmcta2V5"
#: The tables version 3 had, and so everything that could be lost.
V3_TABLES = ("customers", "events", "outbox", "sink_state", "poll_runs", "page_memo")


def dump(db: Path, tables: tuple[str, ...] = V3_TABLES) -> dict[str, list[tuple[Any, ...]]]:
    con = sqlite3.connect(db)
    try:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}
    finally:
        con.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    copy = tmp_path / "watcher.db"
    shutil.copyfile(FIXTURE / "watcher.db", copy)
    return copy


def test_the_fixture_is_a_version_3_database(db: Path) -> None:
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [("3",)]
        tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()
    assert "poll_sources" not in tables and "plan_members" not in tables


def test_a_version_3_database_migrates_and_loses_nothing(db: Path) -> None:
    before = dump(db)

    store = Store(db)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 4
        events = store.query_events()
        counts = store.customer_counts()
    finally:
        store.close()

    assert dump(db) == before, "every row of every older table is as it was"
    expected = [json.loads(line) for line in (FIXTURE / "events.jsonl").read_text().splitlines()]
    assert events == expected
    records = json.loads((FIXTURE / "customers.json").read_text())
    archived = sum(r["archived_at"] is not None for r in records)
    assert counts == {"active": len(records) - archived, "archived": archived, "deleted": 1}
    con = sqlite3.connect(db)
    try:
        sources = con.execute(
            "SELECT poll_id, source, outcome, baseline, pages, items, events FROM poll_sources ORDER BY 1"
        ).fetchall()
        runs = con.execute(
            "SELECT id, outcome, baseline, pages, active + archived, events FROM poll_runs ORDER BY 1"
        ).fetchall()
        pending = [
            event_id
            for (event_id,) in con.execute(
                "SELECT e.id FROM outbox o JOIN events e USING (sequence) "
                "WHERE o.sink = 'crm' AND o.status = 'pending' ORDER BY o.sequence"
            )
        ]
        plans = con.execute(
            "SELECT (SELECT count(*) FROM plans) + (SELECT count(*) FROM plan_members)"
        ).fetchone()
    finally:
        con.close()
    # Every earlier poll read the customers alone: each is now that source's row, as it was.
    assert sources == [(poll_id, "customers", *rest) for poll_id, *rest in runs]
    assert [s[2] for s in sources] == ["succeeded", "succeeded"]
    assert pending == (FIXTURE / "pending_crm.txt").read_text().split()
    assert plans == (0,)


def test_an_upgraded_database_goes_on_where_it_stopped(db: Path, tmp_path: Path, receiver: Receiver) -> None:
    """The next poll of the same account finds no change (the customers' baseline is kept), the
    first plans read is a silent baseline, and the pending deliveries go out with their ids."""
    records = json.loads((FIXTURE / "customers.json").read_text())
    with SimulatedMetronome(token=TOKEN) as fake:
        fake.load(records)
        fake.seed_plans(2)
        h = Harness(fake, db, plans=PlansConfig(watch=True))
        try:
            result = h.poll()
            assert result.ok and not result.baseline and result.events == 0
            assert result.plans is not None and result.plans.baseline
            assert result.plans.memberships == len(fake.customers()) == len(records)
            assert (result.active, result.archived) == (
                len(fake.customers(archived=False)),
                len(fake.customers(archived=True)),
            )
        finally:
            h.close()

    store = Store(db)
    sink = HttpSink("crm", receiver.url, SECRET, timeout=5.0)
    later = FakeClock(datetime(2026, 12, 1, 12, 0, tzinfo=UTC))
    deliverer = Deliverer(store, {"crm": sink}, config=DeliveryConfig(), clock=later)
    try:
        deliverer.deliver_due()
    finally:
        deliverer.close()
        store.close()
    delivered = [body["id"] for body in receiver.bodies()]
    assert delivered == (FIXTURE / "pending_crm.txt").read_text().split()
