"""The store: current state (customers, plan memberships), poll history, the append-only audit log
and the outbox, in SQLite (a file, the default) or PostgreSQL (for replicas).

:class:`Store` opens the database and hands out transactions; :mod:`~watcher.store.queries` holds
every statement run in them, :mod:`~watcher.store.cycle` and :mod:`~watcher.store.plans` what the
sources' sessions offer (each engine's sessions beside them), :mod:`~watcher.store.schema` the
tables and their migrations, :mod:`~watcher.store.lease` the leader lease of replicas and
:mod:`~watcher.store.transfer` the move from SQLite to PostgreSQL. No SQL lives outside this
package.
"""

from .database import Store
from .queries import EventPage, SinkStatus
from .schema import (
    SCHEMA_VERSION,
    CustomerState,
    EventRecord,
    OutboxRow,
    Plan,
    PlanMember,
    PollRun,
    PollSource,
    SinkState,
)

__all__ = [
    "SCHEMA_VERSION",
    "CustomerState",
    "EventPage",
    "EventRecord",
    "OutboxRow",
    "Plan",
    "PlanMember",
    "PollRun",
    "PollSource",
    "SinkState",
    "SinkStatus",
    "Store",
]
