"""One poll at a time per database, across processes: an exclusive ``flock`` on ``<db>.lock``.

Two pollers on one database would each see the other's changes as their own and emit them twice.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ..errors import PollRefused, StoreError, StoreErrorKind

__all__ = ["PollLock"]


class PollLock:
    """``with PollLock(db_path):`` (or :meth:`acquire`) holds the lock, or raises
    :class:`~watcher.errors.PollRefused` when another process holds it."""

    def __init__(self, db_path: Path) -> None:
        self.path = Path(f"{db_path}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as exc:  # beside the database: its directory's trouble is the database's
            kind = {
                errno.ENOSPC: StoreErrorKind.DISK_FULL,
                errno.EROFS: StoreErrorKind.READ_ONLY,
                errno.EACCES: StoreErrorKind.READ_ONLY,
                errno.EPERM: StoreErrorKind.READ_ONLY,
            }.get(exc.errno or 0, StoreErrorKind.UNAVAILABLE)
            raise StoreError(
                f"cannot open the poll lock {self.path}: {exc.strerror or exc}", kind=kind
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PollRefused("another poll is already running against this database") from None
        self._fd = fd

    def __enter__(self) -> PollLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
