"""``metronome-watcher store backup FILE``: a consistent copy of a SQLite store while the daemon runs.

SQLite's online backup API copies the pages in steps of ``STEP_PAGES``, all from one read
transaction that :func:`backup` opens first: in WAL mode a reader never blocks the daemon's
writers, and holding that one snapshot keeps the copy from restarting whenever the daemon commits
(which it would between steps otherwise). The copy is written beside ``FILE`` under a temporary
name, switched to a single self-contained file (no ``-wal``), checked (``integrity_check``, and the
schema version it must have), synced, and only then put in place: a file that exists is refused
unless ``force``, and a half-made copy never has the name. A PostgreSQL store is backed up with
``pg_dump`` (docs/operations.md): its own tool does it better than we could.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import StoreError
from ._errors import Where, translate
from .database import Store

__all__ = ["BackupReport", "backup"]

#: Pages copied per step of the backup API (4 MiB at SQLite's default page size).
STEP_PAGES = 1024


@dataclass(frozen=True)
class BackupReport:
    path: Path
    bytes: int
    schema_version: int
    last_sequence: int
    seconds: float


def backup(store: Store, target: Path, *, force: bool = False) -> BackupReport:
    """Copy the SQLite store into ``target``, check the copy, and only then name it ``target``."""
    if store.path is None:
        raise StoreError("store backup copies a SQLite store; back up PostgreSQL with pg_dump")
    if target.exists() and not force:
        raise FileExistsError(target)
    if target.resolve() == store.path.resolve():
        raise StoreError(f"{target} is the store itself")
    t0 = time.perf_counter()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        version, last = _copy(store.path, tmp)
        _check_copy(tmp, version)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails if the name was taken meanwhile: never overwritten
            tmp.unlink()
        _sync_dir(target.parent)
    except sqlite3.Error as exc:
        # Writing the copy is what usually fails (a full or read-only target): name the copy.
        error = translate(exc, Where(f"the backup {target}", target))
        if error is None:
            raise
        raise error from exc
    finally:
        tmp.unlink(missing_ok=True)
    return BackupReport(target, target.stat().st_size, version, last, time.perf_counter() - t0)


def _copy(source: Path, tmp: Path) -> tuple[int, int]:
    """The backup itself, from one snapshot; returns the snapshot's schema version and last sequence."""
    src = sqlite3.connect(source, isolation_level=None, timeout=30.0)
    try:
        dst = sqlite3.connect(tmp, isolation_level=None)
        try:
            src.execute("BEGIN")  # one read transaction: every step copies this snapshot
            version = int(src.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
            last = int(src.execute("SELECT coalesce(max(sequence), 0) FROM events").fetchone()[0])
            src.backup(dst, pages=STEP_PAGES)
            src.execute("COMMIT")
            dst.execute("PRAGMA journal_mode=DELETE")  # one file, as a backup should be
        finally:
            dst.close()
    finally:
        src.close()
    return version, last


def _check_copy(path: Path, version: int) -> None:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        result = [r[0] for r in db.execute("PRAGMA integrity_check(5)")]
        if result != ["ok"]:
            raise StoreError(f"the copy fails integrity_check ({'; '.join(result)}); nothing was kept")
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or int(row[0]) != version:
            raise StoreError(f"the copy has schema version {row and row[0]}, not {version}; nothing was kept")
    finally:
        db.close()


def _sync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
