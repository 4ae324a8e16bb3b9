"""SQLite underneath the store: the file's engine, its connection settings and its checkpoints.

One file holds everything so that a single transaction can cover a whole cycle (DESIGN rule 5):
the new state of every changed customer, its audit events and one outbox row per (event, sink)
land together or not at all. WAL mode lets ``events`` and ``status`` read while the daemon
writes; writers take the lock up front (``BEGIN IMMEDIATE``) so that two writers queue politely
instead of failing half-way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import create_engine

from ..errors import StoreError, StoreErrorKind
from ._checkpoint import Checkpointer
from ._cycle_sqlite import SqliteCycleSession
from ._errors import Where, install
from ._marker import check_file
from ._plans_sqlite import SqlitePlanSession
from .lease import Fence

__all__ = ["SqliteEngine"]

log = structlog.get_logger("watcher.store")

#: Bytes the WAL file is truncated back to after a checkpoint has emptied it.
_WAL_SIZE_LIMIT = 16 * 1024 * 1024
#: How long closing the store lets a checkpoint in progress run (the daemon exits within 10 s).
_CLOSE_CHECKPOINT_WAIT = 5.0


class SqliteEngine:
    """The engine of one SQLite file, with its own WAL checkpointer."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, busy_timeout: float) -> None:
        self.path = path
        self.description = str(path)
        self.where = Where(self.description, path)
        # Before the first connection, which switches the file to WAL: another program's file is
        # refused untouched.
        check_file(path, self.where)
        try:
            if path.parent and not path.parent.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                f"sqlite:///{path}",
                connect_args={"check_same_thread": False, "timeout": busy_timeout},
            )
        except (OSError, SQLAlchemyError) as exc:
            raise StoreError(f"cannot open {path}: {exc}", kind=StoreErrorKind.UNAVAILABLE) from exc
        install(self.engine, self.where)
        event.listen(self.engine, "connect", _on_connect)
        event.listen(self.engine, "begin", _on_begin)
        self._checkpointer = Checkpointer(self.where, lambda db: _on_connect(db, None))

    def begin_write(self, conn: Connection) -> None:
        """Nothing to do: ``Store.write`` asks for ``BEGIN IMMEDIATE`` (see ``_on_begin``)."""

    def session(self, fence: Fence | None) -> SqliteCycleSession:
        """The customers' cycle's session (a SQLite store is never fenced: one process polls it)."""
        return SqliteCycleSession(self.engine)

    def plan_session(self, fence: Fence | None) -> SqlitePlanSession:
        return SqlitePlanSession(self.engine)

    def request_checkpoint(self) -> None:
        self._checkpointer.request()

    def wait_for_checkpoint(self, timeout: float | None) -> bool:
        return self._checkpointer.wait(timeout)

    def close(self) -> None:
        if not self._checkpointer.close(timeout=_CLOSE_CHECKPOINT_WAIT):
            log.warning("store.checkpoint_unfinished", waited_s=_CLOSE_CHECKPOINT_WAIT)
        self.engine.dispose()


def _on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Let us issue BEGIN ourselves (pysqlite's implicit transactions are not what we want).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed cycle is the audit log; it must survive a power cut, and we commit rarely.
    cur.execute("PRAGMA synchronous=FULL")
    # A baseline writes the whole account in one transaction, so the WAL grows to about the size
    # of the database; without a limit the file would keep that size for as long as the daemon runs.
    cur.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _on_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("watcher_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")
