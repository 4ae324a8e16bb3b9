"""The store: current state, poll history, the append-only audit log and the outbox, in SQLite
(a file, the default) or PostgreSQL (for replicas).

:class:`Store` opens the database and hands out transactions; :mod:`~watcher.store.queries` holds
every statement run in them, :mod:`~watcher.store.cycle` what the poll cycle's session offers (each
engine's session beside it), :mod:`~watcher.store.schema` the tables and their migrations,
:mod:`~watcher.store.lease` the leader lease of replicas and :mod:`~watcher.store.transfer` the move
from SQLite to PostgreSQL. No SQL lives outside this package.
"""

from .database import Store
from .queries import SinkStatus
from .schema import SCHEMA_VERSION, CustomerState, EventRecord, OutboxRow, PollRun, SinkState

__all__ = [
    "SCHEMA_VERSION",
    "CustomerState",
    "EventRecord",
    "OutboxRow",
    "PollRun",
    "SinkState",
    "SinkStatus",
    "Store",
]
