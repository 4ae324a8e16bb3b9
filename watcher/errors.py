"""Every exception metronome-watcher raises on purpose.

The tree, in the manner of httpx's::

    WatcherError
    ├── ConfigError          bad or missing configuration (exit code 2)
    ├── APIError             Metronome could not give us a trustworthy answer (exit code 1)
    │   ├── APIStatusError       an HTTP error status (4xx/5xx) after retries
    │   ├── APITransportError    connect/read/timeout failures after retries
    │   └── APIDataError         a body that is not JSON or not the documented shape,
    │                            a repeated cursor, too many pages
    ├── PollRefused          the picture was complete but implausible (mass vanish guard), or
    │                        another poll holds the database
    ├── PollCancelled        the cycle was abandoned on request (shutdown, poll timeout)
    ├── NotLeader            this replica does not hold the leader lease (any more): it committed
    │                        nothing
    └── StoreError           the database cannot be used (exit code 1); ``kind`` says why
                             (``StoreErrorKind``): disk_full, read_only, busy, corrupt, io,
                             unavailable (cannot open or connect), foreign (another program's
                             database: exit code 2), other (e.g. written by a newer release)

Third-party exceptions (httpx, sqlite3, psycopg, SQLAlchemy, pydantic) are translated at the
boundary with ``raise ... from exc`` so callers only ever need to know this tree: every database
error is translated by the store (:mod:`watcher.store._errors`); one that is not a database's
(a bug) stays what it is. No message built here may contain a secret: errors are logged and
stored in the poll history.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "APIDataError",
    "APIError",
    "APIStatusError",
    "APITransportError",
    "ConfigError",
    "NotLeader",
    "PollCancelled",
    "PollRefused",
    "StoreError",
    "StoreErrorKind",
    "WatcherError",
]


class WatcherError(Exception):
    """Base class of every error metronome-watcher raises on purpose."""


class ConfigError(WatcherError):
    """The configuration is missing, malformed or refers to an unset environment variable.

    ``str(err)`` is one line that names the offending key's path.
    """


class APIError(WatcherError):
    """Metronome did not give a usable answer.

    ``status`` is the HTTP status when there was one; ``message`` is Metronome's own
    ``message`` field when it sent one. Neither ever contains the bearer token.
    """

    def __init__(self, reason: str, *, status: int | None = None, message: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.message = message


class APIStatusError(APIError):
    """An HTTP error status, after the retry budget was spent when it was retryable."""


class APITransportError(APIError):
    """The connection failed, timed out or was dropped, after the retry budget was spent."""


class APIDataError(APIError):
    """The body was not JSON, not the documented shape, or pagination misbehaved."""


class PollRefused(WatcherError):
    """The listings were complete but the result is implausible; nothing was committed."""


class PollCancelled(WatcherError):
    """The cycle was abandoned on request (shutdown, poll timeout); nothing was committed."""


class NotLeader(WatcherError):
    """A write of a replica that does not hold the leader lease, or no longer holds the epoch it
    began with (it was paused or cut off, and another replica took over): rolled back, nothing of
    it was committed."""


class StoreErrorKind(StrEnum):
    """What went wrong with the database, in the words an operator acts on."""

    DISK_FULL = "disk_full"
    READ_ONLY = "read_only"
    #: Another process holds a lock longer than we wait (SQLite), a lock or deadlock timeout.
    BUSY = "busy"
    #: The file is damaged, or is not a database at all.
    CORRUPT = "corrupt"
    IO = "io"
    #: The file cannot be opened, or the server cannot be reached (or the connection was lost).
    UNAVAILABLE = "unavailable"
    #: Another program's database: other tables and no metronome-watcher marker.
    FOREIGN = "foreign"
    OTHER = "other"


class StoreError(WatcherError):
    """The database cannot be used as it is: ``str(err)`` is one line that names the database
    (its file, or its URL without the password) and says what happened; ``kind`` classifies it."""

    def __init__(self, message: str, *, kind: StoreErrorKind = StoreErrorKind.OTHER) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def reason(self) -> str:
        """The line operators see (``status``, ``/readyz``, the CLI, the logs)."""
        return f"database error: {self}"
