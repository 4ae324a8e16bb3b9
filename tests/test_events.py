"""The vocabulary's words for people: how a plan event reads, wherever it is shown."""

from __future__ import annotations

from typing import Any

import pytest

from watcher.events import EventType, plan_headline, readable_time


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


def change(field: str, before: Any, after: Any) -> dict[str, Any]:
    return {"field": field, "before": before, "after": after}


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
    plan_types = [t for t in EventType if t.is_plan]
    assert [t.value for t in plan_types] == [
        "customer.plan_added",
        "customer.plan_updated",
        "customer.plan_ended",
        "customer.plan_removed",
    ]
    assert all(t.is_customer for t in plan_types)


def test_readable_time() -> None:
    assert readable_time("2026-12-31T00:00:00Z") == "2026-12-31"
    assert readable_time("2026-12-31T05:00:00+05:00") == "2026-12-31", "in UTC"
    assert readable_time("2026-12-31T15:30:10.5Z") == "2026-12-31 15:30 UTC"
    assert readable_time("whenever") == "whenever"
