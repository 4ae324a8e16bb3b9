"""The store's WAL checkpoints, on a thread and a connection of their own.

A poll cycle's connection does not checkpoint when it commits (``wal_autocheckpoint=0``): its
commit returns once the cycle is durable in the WAL (``synchronous=FULL``), and copying the WAL
back into the database file, as large as the commit (a baseline's is the whole account), happens
here, while the daemon delivers the cycle's events and waits for the next one. SQLite's own WAL
documentation suggests this split for applications that want their commits fast.

The connection stays open from the first checkpoint until :meth:`Checkpointer.close`. That matters
as much as the thread: the last connection to close checkpoints the whole WAL as it goes, and
without this one that would be the cycle's own.

The other connections keep SQLite's automatic checkpoint, so the WAL stays bounded even if this
thread were to stop.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable

import structlog

from ._errors import Where, translate

__all__ = ["Checkpointer"]

log = structlog.get_logger("watcher.store")


class Checkpointer:
    """Runs ``PRAGMA wal_checkpoint(PASSIVE)`` on request, one at a time, on a daemon thread.

    PASSIVE never waits for a lock: readers and writers go on meanwhile, and a checkpoint that a
    reader's snapshot holds back copies what it can and leaves the rest for the next one.
    """

    def __init__(self, where: Where, configure: Callable[[sqlite3.Connection], None]) -> None:
        assert where.path is not None
        self._where = where
        self._path = where.path
        self._configure = configure
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._closing = False
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        """Ask for a checkpoint; returns at once. Requests made while one runs are merged.

        Never raises: it is called once a cycle has committed, and a checkpoint that cannot be had
        must not turn that cycle into a failure. (The connection closing last then checkpoints.)
        """
        with self._cond:
            if self._closing:
                return
            if self._thread is None:
                # The connection is opened here, in the caller's thread, so that it is open before
                # the caller closes its own (see the module docstring).
                db = None
                try:
                    db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
                    self._configure(db)
                except sqlite3.Error as exc:
                    if db is not None:
                        db.close()
                    log.warning("store.checkpoint_failed", error=self._describe(exc))
                    return
                self._thread = threading.Thread(
                    target=self._run, args=(db,), daemon=True, name=f"wal-checkpoint {self._path}"
                )
                self._thread.start()
            self._requested += 1
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every checkpoint requested so far has run; False on timeout."""
        with self._cond:
            target = self._requested
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Run what was requested, then stop; False if that outlasted ``timeout``.

        A checkpoint cut short by the process ending is harmless: SQLite picks the WAL up where it
        was on the next open.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _describe(self, exc: sqlite3.Error) -> str:
        error = translate(exc, self._where)
        return f"{type(exc).__name__}: {exc}" if error is None else error.reason

    def _run(self, db: sqlite3.Connection) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._requested > self._done or self._closing)
                    if self._requested == self._done:
                        return  # closing, and nothing left to do
                    target = self._requested
                try:
                    busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:
                    log.warning("store.checkpoint_failed", error=self._describe(exc))
                else:
                    log.debug("store.checkpointed", frames=frames, copied=copied, busy=bool(busy))
                with self._cond:
                    self._done = target
                    self._cond.notify_all()
        finally:
            db.close()
