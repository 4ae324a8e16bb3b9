"""The store marks its database as the watcher's, and refuses another program's without writing a
byte to it: real SQLite files (in rollback-journal and WAL mode) and real PostgreSQL schemas."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from watcher.errors import StoreError, StoreErrorKind
from watcher.store import SCHEMA_VERSION, Store
from watcher.store._marker import APPLICATION_ID

from ..conftest import create_schema, drop_schemas, postgres_only, rows, sqlite_only

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _files(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of the database (with its -wal, -shm, -journal): bytes and mtime."""
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.parent.iterdir())
        if p.name.startswith(path.name)
    }


def _application_id(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[68:72], "big")


def _foreign_sqlite(path: Path, *, wal: bool) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    if wal:
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    db.execute("CREATE TABLE meta (key TEXT, value TEXT)")  # a meta table of its own, without our version
    db.execute("INSERT INTO notes (body) VALUES ('keep me')")
    db.close()


def test_a_new_store_is_marked_on_each_engine(store_url: str) -> None:
    store = Store(store_url)
    try:
        assert rows(store, "SELECT value FROM meta WHERE key = 'application'") == [("metronome-watcher",)]
        if store.path is not None:
            store.close()
            assert _application_id(store.path) == APPLICATION_ID
    finally:
        store.close()


@sqlite_only
@pytest.mark.parametrize("wal", [False, True], ids=["rollback-journal", "wal"])
def test_another_programs_sqlite_file_is_refused_and_left_byte_for_byte(
    engine: str, tmp_path: Path, wal: bool
) -> None:
    path = tmp_path / "notes.db"
    _foreign_sqlite(path, wal=wal)
    before = _files(path)

    with pytest.raises(StoreError) as raised:
        Store(path)

    err = raised.value
    assert err.kind is StoreErrorKind.FOREIGN
    assert str(err) == (
        f"{path} is not a metronome-watcher database: it has other tables (meta, notes) and no "
        "metronome-watcher marker; nothing was written to it (check [store] path)"
    )
    assert _files(path) == before  # no byte, no mtime, no -wal or -shm left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


@sqlite_only
def test_a_file_that_another_program_claimed_in_its_header_is_refused(engine: str, tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA application_id = 1234")  # no tables yet, but not ours
    db.close()
    with pytest.raises(StoreError, match=r"its header names another program \(application_id 0x000004d2\)"):
        Store(path)


@sqlite_only
def test_an_empty_file_and_an_empty_database_become_stores(engine: str, tmp_path: Path) -> None:
    empty_file = tmp_path / "touched.db"
    empty_file.touch()
    empty_db = tmp_path / "empty.db"
    sqlite3.connect(empty_db).execute("PRAGMA user_version = 0").connection.close()
    for path in (empty_file, empty_db):
        Store(path).close()
        assert _application_id(path) == APPLICATION_ID


@sqlite_only
def test_a_store_of_an_earlier_release_is_marked_on_first_open_and_keeps_working(
    engine: str, tmp_path: Path
) -> None:
    path = tmp_path / "watcher.db"
    shutil.copy(FIXTURES / "upgrade_v3" / "watcher.db", path)
    assert _application_id(path) == 0

    store = Store(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        assert len(store.query_events()) > 0
    finally:
        store.close()
    assert _application_id(path) == APPLICATION_ID
    Store(path).close()  # and opens again, as ours


@postgres_only
def test_another_programs_postgresql_schema_is_refused_and_left_as_it_was(
    engine: str, pg_server: str
) -> None:
    import psycopg

    schema, url = create_schema(pg_server)
    try:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {schema}.invoices (id int)")

        def tables() -> list[str]:
            with psycopg.connect(pg_server) as conn:
                found = conn.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1",
                    (schema,),
                ).fetchall()
            return [t for (t,) in found]

        with pytest.raises(StoreError) as raised:
            Store(url)

        err = raised.value
        assert err.kind is StoreErrorKind.FOREIGN
        assert "is not a metronome-watcher database: it has other tables (invoices)" in str(err)
        assert "(check [store] url)" in str(err)
        password = make_url(pg_server).password
        assert password and str(password) not in str(err)  # named without its password
        assert tables() == ["invoices"]
    finally:
        drop_schemas(pg_server, [schema])


@postgres_only
def test_a_postgresql_store_without_the_marker_is_an_earlier_release_and_gets_it(
    engine: str, store_url: str
) -> None:
    Store(store_url).close()
    store = Store(store_url)
    try:
        with store.write() as conn:  # as an earlier release left it
            conn.execute(text("DELETE FROM meta WHERE key = 'application'"))
    finally:
        store.close()

    store = Store(store_url)
    try:
        assert rows(store, "SELECT value FROM meta WHERE key = 'application'") == [("metronome-watcher",)]
    finally:
        store.close()
