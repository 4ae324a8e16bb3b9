"""The watcher's vocabulary, and the v1 event contract built from it.

- The names the rest of the package speaks in: event types, the two listings, a customer's status,
  a poll's outcome, an outbox row's state and a sink's verdict on one event. They are string (or
  integer) enums, so they compare equal to, and are stored as, the plain values the database and the
  event contract have always held.
- :func:`new_event`: the v1 payload, key for key (DESIGN's event contract).
- :class:`EventWriter`: numbers a cycle's events, routes each one to the sinks that want it, and
  hands the rows over to be written in the cycle's one transaction (:mod:`watcher.store` writes them).
- :func:`change_line`: ``field: before -> after``, the one way every channel writes a change; a
  changed list (``ingest_aliases``) as the items added and removed (:func:`list_change`);
  :func:`plan_headline`: what a plan event means, in words (``plan Growth ends on 2026-12-31``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import IntEnum, StrEnum
from typing import Any, NamedTuple

import orjson

from ._time import parse_ts

__all__ = [
    "CustomerStatus",
    "DeliveryState",
    "EventRow",
    "EventType",
    "EventWriter",
    "ListChange",
    "Listing",
    "OutboxEntry",
    "OutcomeKind",
    "PollOutcome",
    "Router",
    "Source",
    "change_line",
    "customer_name",
    "customer_record",
    "is_customer_event",
    "is_plan_event",
    "list_change",
    "membership",
    "new_event",
    "plain_value",
    "plan_headline",
    "readable_time",
]


class EventType(StrEnum):
    """Every ``type`` an event of the audit log can have."""

    CUSTOMER_CREATED = "customer.created"
    CUSTOMER_UPDATED = "customer.updated"
    CUSTOMER_ARCHIVED = "customer.archived"
    CUSTOMER_UNARCHIVED = "customer.unarchived"
    CUSTOMER_DELETED = "customer.deleted"
    #: Plan memberships (the plans source): a customer put on a plan, its dates or plan name changed,
    #: its end date passed, or the membership gone.
    CUSTOMER_PLAN_ADDED = "customer.plan_added"
    CUSTOMER_PLAN_UPDATED = "customer.plan_updated"
    CUSTOMER_PLAN_ENDED = "customer.plan_ended"
    CUSTOMER_PLAN_REMOVED = "customer.plan_removed"
    #: Notices: the watcher talking about itself, not a customer change.
    POLL_FAILING = "watcher.poll_failing"
    POLL_RECOVERED = "watcher.poll_recovered"


def is_customer_event(event_type: str) -> bool:
    """A change to a customer (``customer.*``, plans included), not a notice (``watcher.*``)."""
    return event_type.startswith("customer.")


def is_plan_event(event_type: str) -> bool:
    """A change to a customer's plan memberships (``customer.plan_*``)."""
    return event_type.startswith("customer.plan_")


class Source(StrEnum):
    """The sources a poll reads, each a complete picture of its own (``poll_sources.source``)."""

    CUSTOMERS = "customers"
    PLANS = "plans"


class Listing(IntEnum):
    """The two listings of ``GET /v1/customers``; the integer is the page memo's ``archived`` column."""

    ACTIVE = 0
    ARCHIVED = 1

    @property
    def label(self) -> str:
        return self.name.lower()


class CustomerStatus(StrEnum):
    ACTIVE = "active"
    ARCHIVED = "archived"
    DELETED = "deleted"


class PollOutcome(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REFUSED = "refused"
    #: Stopped from outside (shutdown, a process that died mid-cycle); says nothing about Metronome.
    ABANDONED = "abandoned"


class DeliveryState(StrEnum):
    """Where one event stands with one sink (an outbox row's ``status``)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


class OutcomeKind(StrEnum):
    """A sink's verdict on one event it attempted (see ``watcher.sinks.Outcome``)."""

    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"
    DISABLE = "disable"


def new_event(
    event_type: str,
    *,
    sequence: int,
    detected_at: str,
    poll_id: int | None,
    customer_id: str | None,
    customer: Any,
    previous: Any,
    changes: list[dict[str, Any]],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A v1 event: a fresh id, and the contract's keys in the contract's order, then ``extra``."""
    event: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": str(event_type),
        "sequence": sequence,
        "detected_at": detected_at,
        "poll_id": poll_id,
        "customer_id": customer_id,
        "customer": customer,
        "previous": previous,
        "changes": changes,
    }
    if extra:
        event.update(extra)
    return event


class EventRow(NamedTuple):
    """One audit-log row: the event's indexed keys and its payload as JSON text."""

    sequence: int
    id: str
    type: str
    customer_id: str | None
    poll_id: int | None
    detected_at: str
    payload: str


class OutboxEntry(NamedTuple):
    """One delivery to queue: the event's sequence, the sink, and when it was queued."""

    sequence: int
    sink: str
    created_at: str


#: ``(event type, changed fields) -> names of the sinks that take it`` (``watcher.routing``).
Router = Callable[[str, Sequence[str]], Iterable[str]]


class EventWriter:
    """Numbers events consecutively from ``last_sequence`` and routes each to its sinks.

    Rows accumulate until :meth:`take`; whoever holds the transaction writes them, so that events
    and their outbox rows land with the state they describe (DESIGN rule 5).
    """

    def __init__(self, *, poll_id: int | None, detected_at: str, last_sequence: int, route: Router) -> None:
        self.poll_id = poll_id
        self.detected_at = detected_at
        self.sequence = last_sequence
        self._route = route
        self._events: list[EventRow] = []
        self._outbox: list[OutboxEntry] = []

    def add(
        self,
        event_type: str,
        customer_id: str | None,
        customer: Any,
        previous: Any,
        changes: list[dict[str, Any]],
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        self.sequence += 1
        event = new_event(
            event_type,
            sequence=self.sequence,
            detected_at=self.detected_at,
            poll_id=self.poll_id,
            customer_id=customer_id,
            customer=customer,
            previous=previous,
            changes=changes,
            extra=extra,
        )
        self._events.append(
            EventRow(
                self.sequence,
                event["id"],
                event["type"],
                customer_id,
                self.poll_id,
                self.detected_at,
                orjson.dumps(event).decode(),
            )
        )
        for sink in self._route(event["type"], [c["field"] for c in changes]):
            self._outbox.append(OutboxEntry(self.sequence, sink, self.detected_at))
        return event

    def take(self) -> tuple[list[EventRow], list[OutboxEntry]]:
        """The rows added since the last call, to be written now."""
        rows, self._events = self._events, []
        outbox, self._outbox = self._outbox, []
        return rows, outbox


# -- reading an event, as the channels that show it to people do ----------------------------------


def customer_record(event: Mapping[str, Any]) -> Mapping[str, Any]:
    """The customer as now seen (for ``deleted``, the last record seen); empty for a notice."""
    for key in ("customer", "previous"):
        value = event.get(key)
        if isinstance(value, Mapping):
            return value
    return {}


def customer_name(event: Mapping[str, Any]) -> str:
    """The customer's name, or "" when the record has none."""
    name = customer_record(event).get("name")
    return str(name) if name else ""


def plain_value(value: Any) -> str:
    """A before/after value as text: strings as they are, anything else as compact JSON."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


class ListChange(NamedTuple):
    """What changed in a list: the items only in the new one, and those only in the old one."""

    added: tuple[Any, ...]
    removed: tuple[Any, ...]


def list_change(change: Mapping[str, Any]) -> ListChange | None:
    """The items added and removed when ``before`` and ``after`` are lists (a missing list counts
    as empty); None for any other change, and for a list that was only reordered."""
    before, after = change.get("before"), change.get("after")
    if not (isinstance(before, list) or isinstance(after, list)):
        return None
    if not (isinstance(before, list | None) and isinstance(after, list | None)):
        return None  # a list on one side only: a change of kind, shown as before -> after

    def keyed(items: list[Any] | None) -> dict[bytes, Any]:
        # Items compared as canonical JSON, so that dicts in a list compare too.
        return {orjson.dumps(i, option=orjson.OPT_SORT_KEYS): i for i in items or []}

    old, new = keyed(before), keyed(after)
    delta = ListChange(
        added=tuple(v for k, v in new.items() if k not in old),
        removed=tuple(v for k, v in old.items() if k not in new),
    )
    return delta if delta.added or delta.removed else None


def change_line(
    change: Mapping[str, Any],
    *,
    value: Callable[[Any], str] = plain_value,
    field: Callable[[str], str] = str,
    arrow: str = "->",
) -> str:
    """``field: before -> after``, or for a list ``field: added x, y; removed z``; each channel
    passes how it writes a value (or a list's item), a field and the arrow."""
    name = field(str(change.get("field", "?")))
    delta = list_change(change)
    if delta is not None:
        parts = [
            f"{word} {', '.join(value(v) for v in items)}"
            for word, items in (("added", delta.added), ("removed", delta.removed))
            if items
        ]
        return f"{name}: {'; '.join(parts)}"
    return f"{name}: {value(change.get('before'))} {arrow} {value(change.get('after'))}"


def membership(event: Mapping[str, Any]) -> Mapping[str, Any]:
    """A plan event's membership: ``plan`` (as now), else ``previous_plan``; empty for other events."""
    for key in ("plan", "previous_plan"):
        value = event.get(key)
        if isinstance(value, Mapping):
            return value
    return {}


def readable_time(value: Any) -> str:
    """A timestamp as a person reads it: ``2026-12-31`` at midnight UTC, else ``2026-12-31 15:30 UTC``.

    Anything that is not an RFC 3339 timestamp is shown as it is.
    """
    if not isinstance(value, str):
        return plain_value(value)
    try:
        moment = parse_ts(value)
    except ValueError:
        return value
    if (moment.hour, moment.minute, moment.second, moment.microsecond) == (0, 0, 0, 0):
        return moment.strftime("%Y-%m-%d")
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def plan_headline(event: Mapping[str, Any]) -> str:
    """What a ``customer.plan_*`` event means, in words; "" for any other event.

    ``added to plan Growth from 2026-01-01``, ``plan Growth ends on 2026-12-31`` (an end date that
    appears: the early churn notice), ``plan Growth ended on 2026-12-31``, ``removed from plan
    Growth``. The channels that show events to people (the CLI, Slack, the demo) all say it this way.
    """
    etype = str(event.get("type", ""))
    if not is_plan_event(etype):
        return ""
    plan = membership(event)
    name = str(plan.get("plan_name") or plan.get("plan_id") or "?")
    starts, ends = plan.get("starting_on"), plan.get("ending_before")
    if etype == EventType.CUSTOMER_PLAN_ADDED:
        text = f"added to plan {name}"
        if starts:
            text += f" from {readable_time(starts)}"
        return text + (f", ends on {readable_time(ends)}" if ends else "")
    if etype == EventType.CUSTOMER_PLAN_ENDED:
        return f"plan {name} ended on {readable_time(ends)}" if ends else f"plan {name} ended"
    if etype == EventType.CUSTOMER_PLAN_REMOVED:
        return f"removed from plan {name}"
    if etype != EventType.CUSTOMER_PLAN_UPDATED:
        return f"plan {name}: {etype}"
    changes = {str(c.get("field")): c for c in event.get("changes") or [] if isinstance(c, Mapping)}
    parts: list[str] = []
    if (c := changes.get("plan.plan_name")) is not None:
        parts.append(f"plan {plain_value(c.get('before'))} renamed to {plain_value(c.get('after'))}")
    if (c := changes.get("plan.ending_before")) is not None:
        before, after = c.get("before"), c.get("after")
        if before is None:
            parts.append(f"plan {name} ends on {readable_time(after)}")
        elif after is None:
            parts.append(f"plan {name} no longer ends (it was to end on {readable_time(before)})")
        else:
            parts.append(f"plan {name} now ends on {readable_time(after)} (was {readable_time(before)})")
    if (c := changes.get("plan.starting_on")) is not None:
        parts.append(
            f"plan {name} now starts on {readable_time(c.get('after'))} "
            f"(was {readable_time(c.get('before'))})"
        )
    return "; ".join(parts) or f"plan {name} changed"
