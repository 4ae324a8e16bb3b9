"""Prometheus metrics, in one registry of our own.

The registry is module-level because a process runs one watcher; it is not prometheus-client's
global default so that importing this package never pollutes an embedding application's
registry. ``/metrics`` (see :mod:`watcher.health`) renders :data:`REGISTRY`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "API_PAGES",
    "API_REQUESTS",
    "API_RETRIES",
    "CUSTOMERS",
    "DELIVERIES",
    "EVENTS",
    "LAST_SUCCESSFUL_POLL",
    "LEADER",
    "LEASE_ACQUIRED",
    "LEASE_LOST",
    "LEASE_RENEW_FAILURES",
    "OUTBOX_BACKLOG",
    "OUTBOX_OLDEST_PENDING_AGE",
    "POLLS",
    "POLL_DURATION",
    "REGISTRY",
    "STORE_ERRORS",
]

REGISTRY = CollectorRegistry(auto_describe=True)

POLLS = Counter("watcher_polls", "Poll cycles by outcome.", ["outcome"], registry=REGISTRY)
POLL_DURATION = Histogram(
    "watcher_poll_duration_seconds",
    "Wall time of a poll cycle.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "watcher_api_requests",
    "Metronome API requests by endpoint and status.",
    ["endpoint", "status"],
    registry=REGISTRY,
)
API_PAGES = Counter("watcher_api_pages", "Listing pages received by listing.", ["listing"], registry=REGISTRY)
API_RETRIES = Counter(
    "watcher_api_retries", "Metronome API retries by endpoint.", ["endpoint"], registry=REGISTRY
)
CUSTOMERS = Gauge("watcher_customers", "Customers tracked, by status.", ["status"], registry=REGISTRY)
EVENTS = Counter("watcher_events", "Audit events recorded, by type.", ["type"], registry=REGISTRY)
DELIVERIES = Counter(
    "watcher_deliveries", "Delivery attempts by sink and outcome.", ["sink", "outcome"], registry=REGISTRY
)
OUTBOX_BACKLOG = Gauge("watcher_outbox_backlog", "Pending outbox rows per sink.", ["sink"], registry=REGISTRY)
OUTBOX_OLDEST_PENDING_AGE = Gauge(
    "watcher_outbox_oldest_pending_age_seconds",
    "Age of the oldest pending outbox row per sink.",
    ["sink"],
    registry=REGISTRY,
)
LAST_SUCCESSFUL_POLL = Gauge(
    "watcher_last_successful_poll_timestamp_seconds",
    "Unix time of the last successful poll.",
    registry=REGISTRY,
)
LEADER = Gauge(
    "watcher_leader",
    "1 while this replica holds the leader lease (PostgreSQL store), else 0.",
    registry=REGISTRY,
)
LEASE_ACQUIRED = Counter(
    "watcher_lease_acquired", "Times this replica took the leader lease.", registry=REGISTRY
)
LEASE_LOST = Counter(
    "watcher_lease_lost",
    "Times this replica lost the leader lease while holding it (not counting a clean release).",
    registry=REGISTRY,
)
LEASE_RENEW_FAILURES = Counter(
    "watcher_lease_renew_failures",
    "Renewals of the leader lease that failed (the database unreachable, or the lease gone).",
    registry=REGISTRY,
)
STORE_ERRORS = Counter(
    "watcher_store_errors",
    "Database errors by kind (disk_full, read_only, busy, corrupt, io, unavailable, foreign, other).",
    ["kind"],
    registry=REGISTRY,
)
