"""Database errors leave the store as one line in the watcher's own words: real errors of a real
SQLite file (a page limit is a real ``SQLITE_FULL``), of a real PostgreSQL server, and bugs that
stay bugs."""

from __future__ import annotations

import socket
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from watcher import metrics
from watcher.errors import StoreError, StoreErrorKind
from watcher.store import Store
from watcher.store._errors import Where, translate

from ..conftest import create_schema, drop_schemas
from ..disks import SmallDisk

#: Big enough that a few rows need new pages.
_BIG = "x" * 50_000


def _counted(kind: StoreErrorKind) -> float:
    return metrics.REGISTRY.get_sample_value("watcher_store_errors_total", {"kind": kind}) or 0.0


def _one_line(err: StoreError) -> str:
    message = err.reason
    assert "\n" not in message and "sqlalche.me" not in message and "Background on this error" not in message
    return message


def _limit_to_current_size(db: sqlite3.Connection) -> None:
    """A real ``SQLITE_FULL`` on any growth: this connection may not add a page to the file."""
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count = {pages}")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "watcher.db")
    yield s
    s.close()


def _error(exc: BaseException, path: Path) -> StoreError:
    error = translate(exc, Where(str(path), path))
    assert error is not None, exc
    return error


def _raised(path: Path, sql: str, *, uri: bool = False, timeout: float = 5.0) -> sqlite3.Error:
    try:
        db = sqlite3.connect(str(path), uri=uri, timeout=timeout, isolation_level=None)
    except sqlite3.Error as exc:
        return exc
    try:
        db.execute(sql)
    except sqlite3.Error as exc:
        return exc
    finally:
        db.close()
    raise AssertionError(f"{sql} did not fail")


# -- through the store's own doors ------------------------------------------------------------------


def test_a_full_database_in_a_write_is_one_line_with_the_file_and_its_free_space(
    store: Store, tmp_path: Path
) -> None:
    before = _counted(StoreErrorKind.DISK_FULL)
    with pytest.raises(StoreError) as raised, store.write() as conn:
        _limit_to_current_size(conn.connection.dbapi_connection)  # type: ignore[arg-type]
        conn.execute(text("INSERT INTO meta (key, value) VALUES ('big', :v)"), {"v": _BIG})

    err = raised.value
    assert err.kind is StoreErrorKind.DISK_FULL
    line = _one_line(err)
    assert line.startswith(f"database error: database or disk is full writing {tmp_path / 'watcher.db'} (")
    assert " free on its filesystem" in line
    assert isinstance(err.__cause__, sqlite3.OperationalError)  # the driver's error, translated
    assert _counted(StoreErrorKind.DISK_FULL) == before + 1
    with store.read() as conn:  # nothing of the transaction landed
        assert conn.execute(text("SELECT count(*) FROM meta WHERE key = 'big'")).scalar() == 0


def test_a_full_database_in_the_cycles_own_connection_is_translated(store: Store) -> None:
    # The session runs on the raw sqlite3 connection beneath SQLAlchemy: its errors are sqlite3's.
    with pytest.raises(StoreError) as raised, store.cycle() as session:
        poll_id = session.begin_poll("2026-12-02T00:00:00Z")
        _limit_to_current_size(session._db)  # type: ignore[attr-defined]
        with session.transaction("IMMEDIATE"):
            session.append_events(
                [(1, str(uuid.uuid4()), "customer.created", "c1", poll_id, "2026-12-02T00:00:00Z", _BIG)], []
            )
    assert raised.value.kind is StoreErrorKind.DISK_FULL
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
    assert store.query_events() == []


def test_a_full_database_in_the_plans_session_is_translated(store: Store) -> None:
    # The plans' session outlives any one ``with`` block of the store: it translates on its own.
    session = store.plan_session()
    try:
        _limit_to_current_size(session._db)  # type: ignore[attr-defined]
        with pytest.raises(StoreError) as raised, session.transaction("IMMEDIATE") as conn:
            conn.execute(text("INSERT INTO meta (key, value) VALUES ('big', :v)"), {"v": _BIG})
        assert raised.value.kind is StoreErrorKind.DISK_FULL
        session.create_staging()
        session._db.execute("PRAGMA temp.max_page_count = 2")  # type: ignore[attr-defined]
        with pytest.raises(StoreError) as raw:  # a method on the raw sqlite3 connection
            session.stage([("p1", f"cp{i}", "c1", i, _BIG.encode(), None) for i in range(20)])
        assert raw.value.kind is StoreErrorKind.DISK_FULL
        assert isinstance(raw.value.__cause__, sqlite3.OperationalError)
    finally:
        session.close()


def test_a_bug_stays_a_bug(store: Store) -> None:
    with pytest.raises(IntegrityError), store.write() as conn:  # a constraint our code broke
        conn.execute(text("INSERT INTO meta (key, value) VALUES ('schema_version', '1')"))
    with pytest.raises(OperationalError, match="no such table"), store.read() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    with pytest.raises(ValueError), store.write():
        raise ValueError("not the database's")
    with pytest.raises(sqlite3.ProgrammingError), store.cycle() as session:
        session._db.execute("SELECT ?", ())  # type: ignore[attr-defined]


# -- each of SQLite's own failures, as the driver raises it ------------------------------------------


def test_each_kind_of_sqlite_failure_in_words(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("CREATE TABLE t (x)")
    con.execute("BEGIN IMMEDIATE")  # holds the write lock
    busy = _error(_raised(db, "BEGIN IMMEDIATE", timeout=0.05), db)
    con.execute("ROLLBACK")
    con.close()
    read_only = _error(_raised(Path(f"file:{db}?mode=ro"), "INSERT INTO t VALUES (1)", uri=True), db)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database\n" * 100)
    corrupt = _error(_raised(garbage, "SELECT * FROM sqlite_master"), garbage)
    missing = tmp_path / "no-such-dir" / "w.db"
    cannot_open = _error(_raised(missing, "SELECT 1"), missing)

    assert (busy.kind, read_only.kind, corrupt.kind, cannot_open.kind) == (
        StoreErrorKind.BUSY,
        StoreErrorKind.READ_ONLY,
        StoreErrorKind.CORRUPT,
        StoreErrorKind.UNAVAILABLE,
    )
    assert (
        _one_line(busy)
        == f"database error: {db} is locked by another connection for too long: database is locked"
    )
    assert _one_line(read_only).startswith(
        f"database error: cannot write {db}: attempt to write a readonly database"
    )
    assert _one_line(corrupt) == (
        f"database error: {garbage} is damaged or is not a SQLite database: file is not a database"
    )
    assert _one_line(cannot_open).startswith(
        f"database error: cannot open {missing}: unable to open database file"
    )


def test_a_non_database_error_is_not_translated(tmp_path: Path) -> None:
    where = Where(str(tmp_path / "w.db"), tmp_path / "w.db")
    assert translate(ValueError("x"), where) is None
    closed = sqlite3.connect(":memory:")
    closed.close()
    with pytest.raises(sqlite3.ProgrammingError) as raised:
        closed.execute("SELECT 1")
    assert translate(raised.value, where) is None  # the sqlite3 module's own: a bug of ours


def test_a_disk_that_fills_up_says_disk_full_with_the_free_space(small_disk: SmallDisk) -> None:
    # An I/O error with next to nothing free is the full disk it is (SQLite reports some as I/O).
    db = small_disk.root / "store.db"  # (another test registers "metronome-watcher" as a secret)
    store = Store(db)
    try:
        small_disk.fill(leave=16 * 1024)
        with pytest.raises(StoreError) as raised, store.write() as conn:
            conn.execute(text("INSERT INTO meta (key, value) VALUES ('big', :v)"), {"v": _BIG * 20})
    finally:
        small_disk.free_up()
        store.close()
    assert raised.value.kind is StoreErrorKind.DISK_FULL
    assert _one_line(raised.value).startswith(f"database error: disk full writing {db} (")
    assert _one_line(raised.value).endswith(" free)")


# -- PostgreSQL -------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_postgresql_server_that_does_not_answer_is_named_without_its_password() -> None:
    password = "pw-" + uuid.uuid4().hex
    url = f"postgresql://watcher:{password}@127.0.0.1:{_closed_port()}/watcher"

    with pytest.raises(StoreError) as raised:
        Store(url)

    err = raised.value
    assert err.kind is StoreErrorKind.UNAVAILABLE
    line = _one_line(err)
    port = url.rsplit(":", 1)[1]
    assert line.startswith(f"database error: cannot connect to postgresql://watcher:***@127.0.0.1:{port}: ")
    assert "Connection refused" in line
    assert password not in line


@pytest.mark.parametrize("engine", ["postgresql"])
def test_a_read_only_postgresql_database_says_so(engine: str, pg_server: str) -> None:
    schema, url = create_schema(pg_server)
    read_only = f"{url}{quote(' -cdefault_transaction_read_only=on')}"
    try:
        with pytest.raises(StoreError) as raised:
            Store(read_only)
    finally:
        drop_schemas(pg_server, [schema])
    assert raised.value.kind is StoreErrorKind.READ_ONLY
    assert "cannot execute CREATE TABLE in a read-only transaction" in _one_line(raised.value)
