"""The store's own machinery, on a real SQLite file: opening, closing, and its WAL checkpoints."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path

from structlog.testing import capture_logs

from watcher.store import PollRun, Store


def _write_some(store: Store, n: int) -> None:
    with store.write() as conn:
        for i in range(n):
            conn.execute(PollRun.__table__.insert().values(started_at=f"2026-12-02T00:00:{i:02d}Z"))  # type: ignore[attr-defined]


def _polls_in_the_file_alone(db: Path) -> int:
    """The poll runs a copy of the database file alone holds, without its WAL: what a checkpoint
    has copied there."""
    copy = db.with_name("file-only.db")
    shutil.copy(db, copy)
    con = sqlite3.connect(copy)
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'poll_runs'").fetchone():
            return 0
        return int(con.execute("SELECT count(*) FROM poll_runs").fetchone()[0])
    finally:
        con.close()
        copy.unlink()


def test_a_requested_checkpoint_puts_what_was_committed_into_the_database_file(tmp_path: Path) -> None:
    db = tmp_path / "watcher.db"
    store = Store(db)
    try:
        _write_some(store, 50)
        assert _polls_in_the_file_alone(db) == 0  # committed, but in the WAL only

        store.request_checkpoint()
        assert store.wait_for_checkpoint(timeout=10)

        assert _polls_in_the_file_alone(db) == 50
    finally:
        store.close()


def test_closing_the_store_runs_what_was_requested_and_leaves_no_thread_behind(tmp_path: Path) -> None:
    threads_before = threading.active_count()
    db = tmp_path / "watcher.db"
    store = Store(db)
    _write_some(store, 5)
    store.request_checkpoint()

    store.close()

    assert threading.active_count() == threads_before
    assert store.wait_for_checkpoint(timeout=0)  # nothing requested was left undone
    assert _polls_in_the_file_alone(db) == 5


def test_a_checkpoint_that_cannot_be_had_is_logged_not_raised(tmp_path: Path) -> None:
    # It is asked for once a cycle has committed: raising would turn that cycle into a failure.
    db = tmp_path / "gone" / "watcher.db"
    store = Store(db)
    shutil.rmtree(db.parent)  # the connection the checkpointer opens cannot be opened
    try:
        with capture_logs() as logs:
            store.request_checkpoint()
        (entry,) = [e for e in logs if e["event"] == "store.checkpoint_failed"]
        assert entry["log_level"] == "warning" and "unable to open" in entry["error"]
        assert store.wait_for_checkpoint(timeout=0)  # nothing is left pending
    finally:
        store.close()
