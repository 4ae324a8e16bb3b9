"""Upgrades lose nothing: a database written by an older release opens, migrates in place, and carries on.

``tests/fixtures/upgrade_v3`` was written by schema version 3 (its README says how and when): a
baseline, a round of changes, a notice, and a sink (``crm``) whose receiver was down, so its three
events are still pending.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from standardwebhooks import Webhook

from tests.conftest import TOKEN as HARNESS_TOKEN
from tests.conftest import Harness
from tests.receivers import FakeClock, Receiver, Reply
from watcher.cli import main
from watcher.config import DeliveryConfig, PlansConfig
from watcher.delivery import Deliverer
from watcher.simulator import SimulatedMetronome
from watcher.sinks.http import HttpSink
from watcher.store import SCHEMA_VERSION, Store, queries

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "upgrade_v3"
TOKEN = "fixture-token"
SECRET = "whsec_dXBncmFkZS1maXh0dXJlLXNpZ25pbmcta2V5"


def indexes(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as con:
        return dict(
            con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        )


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as con:
        return {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


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
        assert store.schema_version() == SCHEMA_VERSION
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
        # The leader lease of replicas (version 6): there, and held by no one.
        assert con.execute("SELECT count(*) FROM leases").fetchone() == (0,)
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
    assert tables(migrated) == tables(new)


@pytest.fixture
def upgraded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_receiver: Callable[..., Receiver]
) -> Iterator[tuple[Path, Receiver, SimulatedMetronome]]:
    db = tmp_path / "watcher.db"
    shutil.copy(FIXTURE / "watcher.db", db)
    fake = SimulatedMetronome(token=TOKEN).start()
    fake.load(orjson.loads((FIXTURE / "customers.json").read_bytes()))
    crm = make_receiver(Reply(204, b""))
    config = tmp_path / "watcher.toml"
    config.write_text(
        f'[metronome]\nbase_url = "{fake.url}"\n[store]\npath = "{db}"\n'
        '[logging]\nlevel = "warning"\nformat = "json"\n'
        f'[[sinks]]\ntype = "log"\nname = "audit"\npath = "{tmp_path / "audit.jsonl"}"\n'
        f'[[sinks]]\ntype = "http"\nname = "crm"\nurl = "{crm.url}"\nsecret = "${{CRM_SECRET}}"\n'
        'events = ["customer.archived", "customer.deleted", "watcher.*"]\n'
    )
    monkeypatch.setenv("METRONOME_BEARER_TOKEN", TOKEN)
    monkeypatch.setenv("CRM_SECRET", SECRET)
    yield config, crm, fake
    fake.stop()


def run(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    code = main(["--config", str(config), *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_an_older_store_reads_back_polls_delivers_and_numbers_on_without_losing_anything(
    upgraded: tuple[Path, Receiver, SimulatedMetronome], capsys: pytest.CaptureFixture[str]
) -> None:
    config, crm, fake = upgraded

    # The audit log reads back exactly as the older release printed it.
    assert run(config, capsys, "events", "--format", "jsonl") == (FIXTURE / "events.jsonl").read_text()

    # The same account: a poll finds nothing new, and the deliveries left pending go out now,
    # in order, with their original ids (and nothing already delivered is sent again).
    assert run(config, capsys, "poll").endswith("no changes\n")
    pending = (FIXTURE / "pending_crm.txt").read_text().split()
    assert [r.headers["webhook-id"] for r in crm.requests] == pending
    for r in crm.requests:
        Webhook(SECRET).verify(r.body, r.headers)
    deliveries = {d["sink"]: d for d in orjson.loads(run(config, capsys, "deliveries", "--format", "json"))}
    assert (deliveries["crm"]["pending"], deliveries["crm"]["delivered"]) == (0, 3)
    assert (deliveries["audit"]["pending"], deliveries["audit"]["delivered"]) == (0, 6)

    # The next change gets the next sequence number.
    last = max(orjson.loads(line)["sequence"] for line in (FIXTURE / "events.jsonl").read_text().splitlines())
    cid = fake.customers(archived=False)[0]["id"]
    fake.set_name(cid, "After The Upgrade")
    assert "1 customer.updated" in run(config, capsys, "poll")
    (new,) = [
        orjson.loads(line)
        for line in run(
            config, capsys, "events", "--format", "jsonl", "--after-sequence", str(last)
        ).splitlines()
    ]
    assert (new["sequence"], new["type"], new["customer_id"]) == (last + 1, "customer.updated", cid)
    with Store(config.parent / "watcher.db") as store:
        assert store.schema_version() == SCHEMA_VERSION


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
        assert store.schema_version() == SCHEMA_VERSION
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
    with SimulatedMetronome(token=HARNESS_TOKEN) as fake:
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
