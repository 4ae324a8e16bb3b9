"""The store's own machinery, on a real SQLite file: its WAL checkpoints (``watcher._checkpoint``)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from structlog.testing import capture_logs

from tests.conftest import db_bytes
from watcher.store import PollRun, Store


def _write_some(store: Store, n: int) -> None:
    with store.write() as conn:
        for i in range(n):
            conn.execute(PollRun.__table__.insert().values(started_at=f"2026-12-02T00:00:{i:02d}Z"))  # type: ignore[attr-defined]


def _checkpoint_threads(db: Path) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"wal-checkpoint {db}"]


def test_a_requested_checkpoint_copies_the_wal_into_the_database_file(tmp_path: Path) -> None:
    db = tmp_path / "watcher.db"
    store = Store(db)
    try:
        _write_some(store, 50)
        in_file, whole = db_bytes(db)
        assert in_file < whole  # the schema and the rows are still in the WAL only

        store.request_checkpoint()
        assert store.wait_for_checkpoint(timeout=10)

        in_file, whole = db_bytes(db)
        assert in_file == whole
    finally:
        store.close()


def test_closing_the_store_runs_what_was_requested_and_stops_the_thread(tmp_path: Path) -> None:
    db = tmp_path / "watcher.db"
    store = Store(db)
    _write_some(store, 5)
    store.request_checkpoint()
    assert _checkpoint_threads(db)

    store.close()

    assert not _checkpoint_threads(db)
    assert store.wait_for_checkpoint(timeout=0)  # nothing requested was left undone
    in_file, whole = db_bytes(db)
    assert in_file == whole


def test_a_store_only_read_from_starts_no_thread(tmp_path: Path) -> None:
    db = tmp_path / "watcher.db"
    store = Store(db)
    try:
        assert store.customer_counts() == {}
        assert not _checkpoint_threads(db)
    finally:
        store.close()


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
        assert not _checkpoint_threads(db)
        assert store.wait_for_checkpoint(timeout=0)  # nothing is left pending
    finally:
        store.close()
