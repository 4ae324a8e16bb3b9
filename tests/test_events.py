"""``watcher.events``: the v1 payload, the event writer's numbering and routing, the change line
(a changed list as the items added and removed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from watcher.events import (
    EventType,
    EventWriter,
    ListChange,
    change_line,
    customer_name,
    is_customer_event,
    is_plan_event,
    list_change,
    new_event,
    plan_headline,
    readable_time,
)
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


def test_the_customer_name_comes_from_the_record_as_now_seen_else_the_last_one() -> None:
    assert customer_name({"customer": {"name": "Acme"}, "previous": {"name": "Old"}}) == "Acme"
    assert customer_name({"customer": None, "previous": {"name": "Old"}}) == "Old"
    assert customer_name({"customer": None, "previous": None}) == ""


def change(field: str, before: Any, after: Any) -> dict[str, Any]:
    return {"field": field, "before": before, "after": after}


def test_a_plain_change_is_field_before_arrow_after() -> None:
    assert change_line(change("name", "Acme", "Acme Inc")) == "name: Acme -> Acme Inc"
    assert change_line(change("archived_at", None, "2026-01-01")) == "archived_at: null -> 2026-01-01"
    assert change_line(change("x", 1, 2), value=lambda v: f"<{v}>", arrow="=>") == "x: <1> => <2>"


def test_a_changed_list_is_the_items_added_and_removed() -> None:
    aliases = change("ingest_aliases", ["a@x.com", "b@x.com"], ["b@x.com", "c@x.com", "d@x.com"])
    assert list_change(aliases) == ListChange(added=("c@x.com", "d@x.com"), removed=("a@x.com",))
    assert change_line(aliases) == "ingest_aliases: added c@x.com, d@x.com; removed a@x.com"
    # Each item passes the channel's own writer (the CLI cuts long values one by one).
    assert change_line(aliases, value=lambda v: f"`{v}`") == (
        "ingest_aliases: added `c@x.com`, `d@x.com`; removed `a@x.com`"
    )


@pytest.mark.parametrize(
    ("before", "after", "line"),
    [
        (["a"], ["a", "b"], "ingest_aliases: added b"),
        (["a", "b"], ["a"], "ingest_aliases: removed b"),
        (None, ["a"], "ingest_aliases: added a"),
        (["a"], None, "ingest_aliases: removed a"),
        ([{"k": 1}], [{"k": 1}, {"k": 2}], 'ingest_aliases: added {"k":2}'),
    ],
)
def test_lists_that_grow_or_shrink_or_appear(before: Any, after: Any, line: str) -> None:
    assert change_line(change("ingest_aliases", before, after)) == line


def test_a_reordered_list_or_a_change_of_kind_stays_before_and_after() -> None:
    assert list_change(change("l", ["a", "b"], ["b", "a"])) is None
    assert change_line(change("l", ["a", "b"], ["b", "a"])) == 'l: ["a","b"] -> ["b","a"]'
    assert list_change(change("l", "a", ["a"])) is None
    assert change_line(change("l", "a", ["a"])) == 'l: a -> ["a"]'


def plan_event(etype: str, changes: list[dict[str, Any]] | None = None, **plan: Any) -> dict[str, Any]:
    membership = {
        "plan_id": "p1",
        "plan_name": "Growth",
        "customer_plan_id": "m1",
        "starting_on": "2026-01-01T00:00:00.000Z",
        "ending_before": None,
        "custom_fields": {},
        **plan,
    }
    return {"type": etype, "plan": membership, "previous_plan": membership, "changes": changes or []}


@pytest.mark.parametrize(
    ("event", "words"),
    [
        (plan_event("customer.plan_added"), "added to plan Growth from 2026-01-01"),
        (
            plan_event("customer.plan_added", ending_before="2026-07-01T12:30:00Z"),
            "added to plan Growth from 2026-01-01, ends on 2026-07-01 12:30 UTC",
        ),
        (
            plan_event(
                "customer.plan_updated",
                [change("plan.ending_before", None, "2026-12-31T00:00:00.000Z")],
                ending_before="2026-12-31T00:00:00.000Z",
            ),
            "plan Growth ends on 2026-12-31",
        ),
        (
            plan_event("customer.plan_updated", [change("plan.ending_before", "2026-12-31T00:00:00Z", None)]),
            "plan Growth no longer ends (it was to end on 2026-12-31)",
        ),
        (
            plan_event(
                "customer.plan_updated",
                [change("plan.ending_before", "2026-12-31T00:00:00Z", "2027-03-31T00:00:00Z")],
            ),
            "plan Growth now ends on 2027-03-31 (was 2026-12-31)",
        ),
        (
            plan_event(
                "customer.plan_updated",
                [
                    change("plan.plan_name", "Growth", "Growth 2027"),
                    change("plan.starting_on", "a", "2026-02-01"),
                ],
                plan_name="Growth 2027",
            ),
            "plan Growth renamed to Growth 2027; plan Growth 2027 now starts on 2026-02-01 (was a)",
        ),
        (
            plan_event("customer.plan_updated", [change("plan.custom_fields.x", None, "y")]),
            "plan Growth changed",
        ),
        (
            plan_event("customer.plan_ended", ending_before="2026-12-31T00:00:00.000Z"),
            "plan Growth ended on 2026-12-31",
        ),
        (plan_event("customer.plan_removed"), "removed from plan Growth"),
        ({"type": "customer.archived", "changes": []}, ""),
    ],
)
def test_a_plan_event_in_words(event: dict[str, Any], words: str) -> None:
    assert plan_headline(event) == words


def test_every_plan_type_is_a_customer_event_of_the_plans() -> None:
    plan_types = [t for t in EventType if is_plan_event(t)]
    assert [t.value for t in plan_types] == [
        "customer.plan_added",
        "customer.plan_updated",
        "customer.plan_ended",
        "customer.plan_removed",
    ]
    assert all(is_customer_event(t) for t in plan_types)


def test_readable_time() -> None:
    assert readable_time("2026-12-31T00:00:00Z") == "2026-12-31"
    assert readable_time("2026-12-31T05:00:00+05:00") == "2026-12-31", "in UTC"
    assert readable_time("2026-12-31T15:30:10.5Z") == "2026-12-31 15:30 UTC"
    assert readable_time("whenever") == "whenever"
