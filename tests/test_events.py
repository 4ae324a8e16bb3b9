"""``watcher.events``: the v1 payload, the event writer's numbering and routing, the change line."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from watcher.events import EventType, EventWriter, change_line, customer_name, new_event
from watcher.routing import Route, Router


def test_a_v1_event_has_the_contract_keys_in_order_and_a_fresh_id() -> None:
    kw = {
        "sequence": 3,
        "detected_at": "t",
        "poll_id": 1,
        "customer_id": "c",
        "customer": {},
        "previous": None,
    }
    a = new_event(EventType.CUSTOMER_CREATED, changes=[], **kw)
    b = new_event(EventType.CUSTOMER_CREATED, changes=[], **kw)
    keys = [
        "id",
        "type",
        "sequence",
        "detected_at",
        "poll_id",
        "customer_id",
        "customer",
        "previous",
        "changes",
    ]
    assert list(a) == keys
    assert a["type"] == "customer.created" and type(a["type"]) is str
    assert a["id"] != b["id"]


def test_the_writer_numbers_events_on_from_the_last_sequence_and_routes_each_to_its_sinks() -> None:
    routes = [
        Route("all"),
        Route("churn", events=("customer.archived",)),
        Route("tiers", fields=("custom_fields",)),
    ]
    seen: list[tuple[str, Sequence[str]]] = []

    def route(event_type: str, fields: Sequence[str]) -> list[str]:
        seen.append((event_type, list(fields)))
        return Router(routes)(event_type, fields)

    writer = EventWriter(poll_id=9, detected_at="2026-12-02T00:00:00.000000Z", last_sequence=41, route=route)
    writer.add(
        EventType.CUSTOMER_ARCHIVED,
        "a",
        {"id": "a"},
        {"id": "a"},
        [{"field": "archived_at", "before": None, "after": "x"}],
    )
    writer.add(
        EventType.CUSTOMER_UPDATED,
        "b",
        {"id": "b"},
        {"id": "b"},
        [{"field": "custom_fields.tier", "before": 1, "after": 2}],
    )
    events, outbox = writer.take()

    assert [(e.sequence, e.type, e.customer_id, e.poll_id) for e in events] == [
        (42, "customer.archived", "a", 9),
        (43, "customer.updated", "b", 9),
    ]
    assert [orjson.loads(e.payload)["sequence"] for e in events] == [42, 43]
    assert [(o.sequence, o.sink) for o in outbox] == [(42, "all"), (42, "churn"), (43, "all"), (43, "tiers")]
    assert seen == [("customer.archived", ["archived_at"]), ("customer.updated", ["custom_fields.tier"])]
    assert writer.take() == ([], [])  # taken once


def test_a_change_line_is_field_before_arrow_after_as_each_channel_writes_them() -> None:
    change = {"field": "custom_fields.tier", "before": None, "after": {"a": 1}}
    assert change_line(change) == 'custom_fields.tier: null -> {"a":1}'
    assert change_line(change, value=lambda v: "-" if v is None else "<v>", field=str.upper, arrow="=>") == (
        "CUSTOM_FIELDS.TIER: - => <v>"
    )


def test_the_customer_name_comes_from_the_record_as_now_seen_else_the_last_one() -> None:
    assert customer_name({"customer": {"name": "Acme"}, "previous": {"name": "Old"}}) == "Acme"
    assert customer_name({"customer": None, "previous": {"name": "Old"}}) == "Old"
    assert customer_name({"customer": None, "previous": None}) == ""
