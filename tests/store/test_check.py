"""``metronome-watcher store check``: a sound store passes every check; a damaged file and each broken
invariant (written with raw SQL, on both engines) fail with a line naming what is wrong."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from watcher.cli import main
from watcher.simulator import SimulatedMetronome
from watcher.store import Store
from watcher.store.check import check_store

from ..conftest import Harness, sqlite_only


@pytest.fixture
def busy(seeded: Harness, fake: SimulatedMetronome) -> Iterator[Harness]:
    """The seeded store after a few polls with changes: events and outbox rows to check."""
    for c in fake.customers()[:10]:
        fake.set_name(c["id"], c["name"] + " (renamed)")
        assert seeded.poll().ok
    yield seeded


def failures(store: Store) -> dict[str, str]:
    return {f.name: f.detail for f in check_store(store) if not f.ok}


def raw(store: Store, *statements: str) -> None:
    """Statements the store would never run, with the foreign keys not enforced: a plain sqlite3
    connection (they are off unless asked for), or a PostgreSQL session that skips its triggers."""
    if store.path is not None:
        db = sqlite3.connect(store.path)
        try:
            with db:
                for sql in statements:
                    db.execute(sql)
        finally:
            db.close()
        return
    with store.engine.connect() as conn, conn.begin():
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        for sql in statements:
            conn.execute(text(sql))


def test_a_sound_store_passes_every_check(busy: Harness) -> None:
    findings = check_store(busy.store)
    assert [f.name for f in findings if not f.ok] == []
    names = {f.name for f in findings}
    assert {"audit log sequences strictly increasing", "every outbox row has its event"} <= names
    assert ("integrity_check" in names) is (busy.store.dialect == "sqlite")


def test_an_outbox_row_without_its_event_fails_naming_it(busy: Harness) -> None:
    raw(
        busy.store,
        "INSERT INTO outbox (sequence, sink, status, attempts, created_at, next_attempt_at) "
        "VALUES (9999, 'audit', 'pending', 0, '2026-01-01', '2026-01-01')",
    )
    found = failures(busy.store)
    assert (
        found["every outbox row has its event"]
        == "1 outbox row(s) without their event (first: sequence 9999)"
    )


def test_sequences_out_of_step_with_their_payloads_fail_naming_the_event(busy: Harness) -> None:
    (last,) = [e["sequence"] for e in busy.events()][-1:]
    raw(busy.store, "DELETE FROM outbox", f"UPDATE events SET sequence = {last + 5} WHERE sequence = {last}")
    found = failures(busy.store)
    assert found["audit log sequences strictly increasing"].startswith(
        f"event at sequence {last + 5} carries"
    )


def test_a_customer_in_an_unknown_state_or_under_another_id_fails(
    busy: Harness, fake: SimulatedMetronome
) -> None:
    a, b = sorted(c["id"] for c in fake.customers())[:2]
    raw(busy.store, f"UPDATE customers SET status = 'limbo' WHERE id = '{a}'")
    assert failures(busy.store)["no customer in two states"] == f"customer {a} has status 'limbo'"
    raw(
        busy.store,
        f"UPDATE customers SET status = 'active' WHERE id = '{a}'",
        f"UPDATE customers SET record = (SELECT record FROM customers WHERE id = '{b}') WHERE id = '{a}'",
    )
    assert failures(busy.store)["no customer in two states"] == f"customer {a}'s record is another customer's"


def test_a_membership_of_a_missing_plan_and_a_source_row_of_a_missing_poll_fail(busy: Harness) -> None:
    raw(
        busy.store,
        "INSERT INTO plan_members (customer_plan_id, plan_id, customer_id, hash, record, ended, "
        "first_seen_at, changed_at, last_poll_id) VALUES ('cp1', 'no-such-plan', 'c', 1, '{}', false, "
        "'2026-01-01', '2026-01-01', 1)",
        "INSERT INTO poll_sources (poll_id, source, outcome, baseline, pages, items, events, events_by_type) "
        "VALUES (4242, 'plans', 'succeeded', false, 0, 0, 0, '{}')",
    )
    found = failures(busy.store)
    assert (
        found["every plan membership has its plan"]
        == "1 membership(s) of a plan not stored (e.g. no-such-plan)"
    )
    assert (
        found["every source's row has its poll run"]
        == "1 source row(s) of a poll run not stored (e.g. poll 4242)"
    )


@sqlite_only
def test_a_damaged_file_fails_integrity_check_and_the_command_exits_1(
    busy: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Path(busy.db)
    with busy.store.read() as conn:
        (page,) = conn.exec_driver_sql(
            "SELECT rootpage FROM sqlite_master WHERE name = 'ix_events_type_sequence'"
        ).one()
        (size,) = conn.exec_driver_sql("PRAGMA page_size").one()
    busy.close()
    with open(db, "r+b") as f:  # the last keys on the index's page overwritten: entries out of order
        f.seek(page * size - 48)
        f.write(b"\x00" * 40)
    config = tmp_path / "w.toml"
    config.write_text(f'[metronome]\nbase_url = "http://127.0.0.1:9"\n[store]\npath = "{db}"\n')
    capsys.readouterr()

    assert main(["--config", str(config), "store", "check"]) == 1

    out = capsys.readouterr().out.splitlines()
    (line,) = [x for x in out if x.startswith("FAILED integrity_check")]
    assert "missing from index ix_events_type_sequence" in line
    assert out[-1].startswith("store check: ") and out[-1].endswith("FAILED")
    assert "ok     every outbox row has its event" in out  # the other checks still ran
