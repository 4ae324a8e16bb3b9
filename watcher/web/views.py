"""What the pages show, worked out in Python so that the templates only lay it out.

* :func:`event_view`: one audit event as a row: who, what, when, and each change as before -> after,
  a changed list as the items added and removed (:func:`watcher.events.list_change`, the same rule
  the CLI table and Slack follow).
* :func:`poll_chart`: the geometry of the ``/status`` chart (one bar per poll for its duration, a
  line for its events), drawn as SVG by the template: no script, no image files.
* :func:`record_facts`: a customer record's main fields, for the top of its page.

Every string here is data; the templates escape it (Jinja autoescaping), never this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .._time import parse_ts
from ..events import EventType, customer_name, customer_record, list_change, plain_value
from ..store import PollRun

__all__ = [
    "Bar",
    "ChangeView",
    "Chart",
    "EventView",
    "event_view",
    "poll_chart",
    "poll_seconds",
    "record_facts",
    "short_time",
]

#: type -> (what happened, in a word or two; the row's CSS class)
_KINDS: dict[str, tuple[str, str]] = {
    EventType.CUSTOMER_CREATED: ("created", "created"),
    EventType.CUSTOMER_UPDATED: ("updated", "updated"),
    EventType.CUSTOMER_ARCHIVED: ("archived", "archived"),
    EventType.CUSTOMER_UNARCHIVED: ("unarchived", "unarchived"),
    EventType.CUSTOMER_DELETED: ("deleted", "deleted"),
    EventType.POLL_FAILING: ("polling failing", "notice"),
    EventType.POLL_RECOVERED: ("polling recovered", "notice"),
}


def short_time(ts: str | None) -> str:
    """``2026-11-22T03:04:05.123456Z`` -> ``2026-11-22 03:04:05``."""
    if not ts:
        return ""
    return ts[:19].replace("T", " ")


@dataclass(frozen=True)
class ChangeView:
    field: str
    #: Plain text of each side; None is shown as "none".
    before: str | None
    after: str | None
    #: For a changed list: the items added and removed (and ``is_list``).
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    is_list: bool = False


def _text(value: Any) -> str | None:
    return None if value is None else plain_value(value)


def change_view(change: Mapping[str, Any]) -> ChangeView:
    field = str(change.get("field", "?"))
    delta = list_change(change)
    if delta is not None:
        return ChangeView(
            field,
            None,
            None,
            added=tuple(plain_value(v) for v in delta.added),
            removed=tuple(plain_value(v) for v in delta.removed),
            is_list=True,
        )
    return ChangeView(field, _text(change.get("before")), _text(change.get("after")))


@dataclass(frozen=True)
class EventView:
    sequence: int
    id: str
    type: str
    label: str
    kind: str
    detected_at: str
    customer_id: str | None
    name: str
    external_id: str | None
    changes: tuple[ChangeView, ...]
    #: A notice's details, as ``label: value`` lines.
    notes: tuple[str, ...]


def event_view(event: Mapping[str, Any]) -> EventView:
    etype = str(event.get("type", "?"))
    label, kind = _KINDS.get(etype, (etype, "notice" if not etype.startswith("customer.") else "updated"))
    record = customer_record(event)
    external = record.get("external_id")
    cid = event.get("customer_id")
    changes = tuple(change_view(c) for c in event.get("changes") or [] if isinstance(c, Mapping))
    detail = event.get("detail")
    notes: tuple[str, ...] = ()
    if isinstance(detail, Mapping):
        notes = tuple(
            f"{str(k).replace('_', ' ')}: {plain_value(v)}" for k, v in detail.items() if v is not None
        )
    return EventView(
        sequence=int(event.get("sequence") or 0),
        id=str(event.get("id", "")),
        type=etype,
        label=label,
        kind=kind,
        detected_at=short_time(str(event.get("detected_at", ""))),
        customer_id=str(cid) if cid else None,
        name=customer_name(event),
        external_id=str(external) if external and external != cid else None,
        changes=changes,
        notes=notes,
    )


def record_facts(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, text) for the fields people look for first; the whole record follows on the page."""
    facts: list[tuple[str, str]] = []

    def add(label: str, value: Any) -> None:
        if value is not None and value != "" and value != [] and value != {}:
            facts.append((label, plain_value(value)))

    add("name", record.get("name"))
    add("external id", record.get("external_id"))
    aliases = record.get("ingest_aliases")
    if isinstance(aliases, list):
        add("ingest aliases", ", ".join(plain_value(a) for a in aliases))
    config = record.get("customer_config")
    if isinstance(config, Mapping):
        add("Salesforce account", config.get("salesforce_account_id"))
    status = record.get("current_billable_status")
    if isinstance(status, Mapping):
        add("billable status", status.get("value"))
    fields = record.get("custom_fields")
    if isinstance(fields, Mapping):
        for key, value in fields.items():
            add(f"custom_fields.{key}", value)
    add("created at", record.get("created_at"))
    add("archived at", record.get("archived_at"))
    return facts


def pretty_json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


# -- the /status chart ----------------------------------------------------------------------------


def poll_seconds(poll: PollRun) -> float | None:
    if not poll.finished_at:
        return None
    return max(0.0, (parse_ts(poll.finished_at) - parse_ts(poll.started_at)).total_seconds())


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    outcome: str
    title: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    #: The plot's top and bottom (labels sit outside it).
    top: float
    bottom: float
    bars: tuple[Bar, ...]
    #: ``x,y x,y ...`` of the events line, and the dots on it.
    points: str
    dots: tuple[tuple[float, float], ...]
    max_seconds: float
    max_events: int
    first_poll: int | None
    last_poll: int | None


def poll_chart(polls: Sequence[PollRun], *, width: int = 640, height: int = 180) -> Chart:
    """The last polls, oldest on the left: a bar per poll for its duration (coloured by outcome)
    and a line for the events it recorded, each on its own scale (the largest reaches the top)."""
    ordered = sorted(polls, key=lambda p: p.id or 0)
    top, bottom, left, right = 22.0, float(height - 18), 4.0, float(width - 4)
    plot = bottom - top
    seconds = [poll_seconds(p) or 0.0 for p in ordered]
    max_seconds = max(seconds, default=0.0)
    max_events = max((p.events for p in ordered), default=0)
    n = max(len(ordered), 1)
    slot = (right - left) / n
    bars: list[Bar] = []
    dots: list[tuple[float, float]] = []
    for i, (poll, secs) in enumerate(zip(ordered, seconds, strict=True)):
        h = plot * secs / max_seconds if max_seconds > 0 else 0.0
        h = max(h, 1.0)  # a poll that took no measurable time still shows where it is
        x = left + i * slot
        title = f"poll #{poll.id}: {poll.outcome}, {secs:.2f} s, {poll.events} events"
        bars.append(
            Bar(
                round(x + slot * 0.1, 2),
                round(bottom - h, 2),
                round(slot * 0.8, 2),
                round(h, 2),
                poll.outcome,
                title,
            )
        )
        ey = bottom - (plot * poll.events / max_events if max_events > 0 else 0.0)
        dots.append((round(x + slot / 2, 2), round(ey, 2)))
    return Chart(
        width=width,
        height=height,
        top=top,
        bottom=bottom,
        bars=tuple(bars),
        points=" ".join(f"{x},{y}" for x, y in dots),
        dots=tuple(dots),
        max_seconds=max_seconds,
        max_events=max_events,
        first_poll=ordered[0].id if ordered else None,
        last_poll=ordered[-1].id if ordered else None,
    )
