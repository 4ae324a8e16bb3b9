"""The plans source, end to end: the simulated Metronome over a real socket, a real store on each
engine (a SQLite file, a PostgreSQL schema: ``store_url``), and the poll's own clock, injected (the
simulator shares it, so "now" is the same on both sides)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from tests.conftest import TOKEN, Harness
from tests.receivers import FakeClock
from watcher.config import PlansConfig
from watcher.events import plan_headline
from watcher.health import Health
from watcher.metronome import MetronomeClient, PageBody
from watcher.notices import announce
from watcher.poll import Poller
from watcher.routing import Route
from watcher.simulator import Fault, SimulatedMetronome

WATCH = PlansConfig(watch=True)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(clock: FakeClock) -> Iterator[SimulatedMetronome]:
    with SimulatedMetronome(token=TOKEN, clock=clock) as server:
        yield server


class Account:
    """20 customers (4 archived): 12 on Growth, 8 on Starter, plus a plan nobody is on yet."""

    def __init__(self, fake: SimulatedMetronome, clock: FakeClock) -> None:
        self.fake = fake
        self.clock = clock
        self.growth = fake.create_plan("Growth", custom_fields={"motion": "sales-led"})["id"]
        self.starter = fake.create_plan("Starter")["id"]
        self.empty = fake.create_plan("Scale")["id"]
        start = clock() - timedelta(days=90)
        self.customers = [fake.create_customer(f"Customer {i:02d}")["id"] for i in range(20)]
        for cid in self.customers[16:]:
            fake.archive(cid)
        self.cpids = [
            fake.add_to_plan(cid, self.growth if i < 12 else self.starter, starting_on=start)["plan_details"][
                "customer_plan_id"
            ]
            for i, cid in enumerate(self.customers)
        ]

    def member(self, cpid: str) -> dict[str, Any]:
        return self.fake.membership(cpid)


@pytest.fixture
def account(fake: SimulatedMetronome, clock: FakeClock) -> Account:
    return Account(fake, clock)


def make_harness(fake: SimulatedMetronome, target: str, clock: FakeClock, **kw: Any) -> Harness:
    kw.setdefault("plans", WATCH)
    return Harness(fake, target, poll_clock=clock, **kw)


@pytest.fixture
def harness(fake: SimulatedMetronome, store_url: str, clock: FakeClock) -> Iterator[Harness]:
    h = make_harness(fake, store_url, clock)
    yield h
    h.close()


@pytest.fixture
def watched(account: Account, harness: Harness) -> Harness:
    """The account's baseline, taken."""
    result = harness.poll()
    assert result.ok and result.plans is not None and result.plans.baseline
    return harness


def only(events: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    assert len(events) == 1, events
    for key, value in match.items():
        assert events[0][key] == value, (key, events[0][key], value)
    return events[0]


def rows(h: Harness, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Rows of a query with ``:name`` parameters, through the harness's store (either engine)."""
    with h.store.read() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


def view(item: dict[str, Any]) -> dict[str, Any]:
    """The ``plan`` of an event, as the issue lists it, for a membership as the API lists it."""
    d = item["plan_details"]
    return {
        "plan_id": d["id"],
        "plan_name": d["name"],
        "customer_plan_id": d["customer_plan_id"],
        "starting_on": d["starting_on"],
        "ending_before": d.get("ending_before"),
        "custom_fields": d["custom_fields"],
    }


def iso(moment: Any) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the baseline ------------------------------------------------------------------------------


def test_the_first_plans_read_is_a_silent_baseline(account: Account, harness: Harness) -> None:
    result = harness.poll()

    assert result.ok and result.baseline
    assert result.plans is not None and result.plans.ok and result.plans.baseline
    assert (result.plans.plans, result.plans.memberships) == (3, 20)
    assert harness.events() == []
    assert harness.store.plan_counts() == (3, 20, 0)
    sources = rows(harness, "SELECT source, outcome, baseline, items FROM poll_sources ORDER BY source")
    assert sources == [("customers", "succeeded", 1, 20), ("plans", "succeeded", 1, 20)]
    second = harness.poll()
    assert second.ok and second.plans is not None and not second.plans.baseline and second.events == 0


def test_baseline_events_when_asked(
    account: Account, fake: SimulatedMetronome, store_url: str, clock: FakeClock
) -> None:
    h = make_harness(fake, store_url, clock, emit_baseline_events=True)
    try:
        h.poll()
        added = h.events(types=["customer.plan_added"])
    finally:
        h.close()
    assert sorted(e["plan"]["customer_plan_id"] for e in added) == sorted(account.cpids)


def test_plans_off_is_the_customer_cycle_alone(
    account: Account, fake: SimulatedMetronome, store_url: str
) -> None:
    h = Harness(fake, store_url)
    try:
        result = h.poll()
    finally:
        h.close()
    assert result.ok and result.plans is None
    assert not [r for r in fake.requests if r.path.startswith(("/v1/plans", "/v1/planDetails"))]
    assert rows(h, "SELECT count(*) FROM plan_members") == [(0,)]
    assert rows(h, "SELECT source FROM poll_sources") == [("customers",)]


# -- each event, with its payload ----------------------------------------------------------------


def test_added(account: Account, fake: SimulatedMetronome, watched: Harness) -> None:
    cid = account.customers[3]
    item = fake.add_to_plan(cid, account.empty, starting_on="2026-02-01T00:00:00Z")

    result = watched.poll()

    e = only(watched.events(), type="customer.plan_added", customer_id=cid, previous=None, changes=[])
    assert e["customer"] == item["customer_details"] == fake.get(cid)
    assert e["plan"] == view(item) and e["plan"]["ending_before"] is None
    assert e["previous_plan"] is None
    assert e["poll_id"] == result.poll_id
    assert plan_headline(e) == "added to plan Scale from 2026-02-01"
    assert result.plans is not None and result.plans.events_by_type == {"customer.plan_added": 1}


def test_an_end_date_that_appears_is_the_early_churn_notice(
    account: Account, fake: SimulatedMetronome, watched: Harness
) -> None:
    cpid = account.cpids[2]
    before = account.member(cpid)
    fake.set_plan_end(cpid, "2026-12-31T00:00:00Z")

    watched.poll()

    e = only(watched.events(), type="customer.plan_updated", customer_id=account.customers[2])
    assert e["changes"] == [
        {"field": "plan.ending_before", "before": None, "after": "2026-12-31T00:00:00.000Z"}
    ]
    assert e["previous"] is None
    assert e["previous_plan"] == view(before)
    assert e["plan"] == view(account.member(cpid))
    assert plan_headline(e) == "plan Growth ends on 2026-12-31"


def test_plan_ended_comes_once_when_the_end_passes_by_the_polls_clock(
    account: Account, fake: SimulatedMetronome, watched: Harness, clock: FakeClock
) -> None:
    cpid = account.cpids[5]
    fake.set_plan_end(cpid, "2026-01-07T00:00:00Z")  # the clock starts at 2026-01-05 09:00
    watched.poll()
    only(watched.events(), type="customer.plan_updated")
    requests = fake.served

    clock.advance(86400)
    assert watched.poll().events == 0, "not yet"
    clock.advance(86400)
    ended = watched.poll()
    clock.advance(3600)
    again = watched.poll()

    assert ended.events_by_type == {"customer.plan_ended": 1} and again.events == 0
    e = only(watched.events(types=["customer.plan_ended"]), customer_id=account.customers[5], changes=[])
    assert e["plan"] == e["previous_plan"] == view(account.member(cpid))
    assert plan_headline(e) == "plan Growth ended on 2026-01-07"
    assert fake.served > requests  # the API was read, and said nothing new
    assert rows(watched, "SELECT ended FROM plan_members WHERE customer_plan_id = :cpid", cpid=cpid) == [(1,)]


def test_an_end_date_set_straight_into_the_past_is_plan_ended_with_the_change(
    account: Account, fake: SimulatedMetronome, watched: Harness, clock: FakeClock
) -> None:
    cpid = account.cpids[13]
    ends = clock() - timedelta(days=1)
    fake.set_plan_end(cpid, ends)

    watched.poll()
    watched.poll()

    e = only(watched.events(), type="customer.plan_ended", customer_id=account.customers[13])
    assert e["changes"] == [{"field": "plan.ending_before", "before": None, "after": iso(ends)}]
    assert plan_headline(e) == f"plan Starter ended on {ends.strftime('%Y-%m-%d %H:%M')} UTC"


def test_an_end_lifted_after_it_passed_is_an_update(
    account: Account, fake: SimulatedMetronome, watched: Harness, clock: FakeClock
) -> None:
    cpid = account.cpids[0]
    ends = clock() - timedelta(hours=1)
    fake.set_plan_end(cpid, ends)
    watched.poll()
    fake.set_plan_end(cpid, None)

    watched.poll()

    ended, lifted = watched.events()
    assert ended["type"] == "customer.plan_ended"
    assert lifted["type"] == "customer.plan_updated"
    assert lifted["changes"] == [{"field": "plan.ending_before", "before": iso(ends), "after": None}]
    assert plan_headline(lifted).startswith("plan Growth no longer ends")
    assert rows(
        watched, "SELECT ended, ends_at FROM plan_members WHERE customer_plan_id = :cpid", cpid=cpid
    ) == [(0, None)]


def test_removed(account: Account, fake: SimulatedMetronome, watched: Harness) -> None:
    cpid = account.cpids[7]
    last = account.member(cpid)
    fake.remove_from_plan(cpid)

    watched.poll()
    watched.poll()

    e = only(watched.events(), type="customer.plan_removed", customer_id=account.customers[7], changes=[])
    assert e["customer"] == last["customer_details"] and e["previous"] is None
    assert e["plan"] == e["previous_plan"] == view(last)
    assert plan_headline(e) == "removed from plan Growth"
    assert rows(watched, "SELECT count(*) FROM plan_members") == [(19,)]


def test_a_plan_gone_from_the_listing_takes_its_memberships_with_it(
    account: Account, fake: SimulatedMetronome, watched: Harness
) -> None:
    small = fake.create_plan("Pilot")["id"]
    cpids = [
        fake.add_to_plan(cid, small)["plan_details"]["customer_plan_id"] for cid in account.customers[:3]
    ]
    watched.poll()
    assert {e["plan"]["customer_plan_id"] for e in watched.events()} == set(cpids), (
        "a new plan's members are news"
    )

    fake.delete_plan(small)
    result = watched.poll()

    removed = watched.events(types=["customer.plan_removed"])
    assert {e["plan"]["customer_plan_id"] for e in removed} == set(cpids)
    assert result.plans is not None and result.plans.plans == 3
    assert rows(watched, "SELECT listed, watched FROM plans WHERE id = :id", id=small) == [(0, 0)]


def test_a_rename_of_the_plan_updates_each_membership_unless_ignored(
    account: Account,
    fake: SimulatedMetronome,
    watched: Harness,
    new_store_url: Callable[[], str],
    clock: FakeClock,
) -> None:
    fake.rename_plan(account.starter, "Starter 2027")

    watched.poll()

    updated = watched.events()
    assert len(updated) == 8 and {e["type"] for e in updated} == {"customer.plan_updated"}
    assert updated[0]["changes"] == [
        {"field": "plan.plan_name", "before": "Starter", "after": "Starter 2027"}
    ]
    assert plan_headline(updated[0]) == "plan Starter renamed to Starter 2027"

    other = make_harness(fake, new_store_url(), clock, ignore_fields=["updated_at", "plan.plan_name"])
    try:
        other.poll()
        fake.rename_plan(account.starter, "Starter 2028")
        assert other.poll().events == 0
        stored = rows(
            other, "SELECT record FROM plan_members WHERE plan_id = :id LIMIT 1", id=account.starter
        )
        assert '"Starter 2028"' in stored[0][0], "the stored record is still refreshed"
    finally:
        other.close()


def test_a_customer_change_alone_is_the_customers_news_not_the_plans(
    account: Account, fake: SimulatedMetronome, watched: Harness
) -> None:
    cid = account.customers[1]
    fake.set_name(cid, "Renamed Corp")

    watched.poll()

    only(watched.events(), type="customer.updated", customer_id=cid)
    (record,) = rows(watched, "SELECT record FROM plan_members WHERE customer_id = :cid", cid=cid)[0]
    assert '"Renamed Corp"' in record


def test_a_plan_created_after_the_baseline_reports_its_members_as_added(
    account: Account, fake: SimulatedMetronome, watched: Harness
) -> None:
    late = fake.create_plan("Late")["id"]
    fake.add_to_plan(account.customers[4], late)

    watched.poll()

    only(watched.events(), type="customer.plan_added", customer_id=account.customers[4])


# -- which plans ---------------------------------------------------------------------------------


def test_plan_ids_picks_the_plans_and_a_plan_added_to_it_later_is_a_silent_baseline(
    account: Account, fake: SimulatedMetronome, store_url: str, clock: FakeClock
) -> None:
    h = make_harness(fake, store_url, clock, plans=PlansConfig(watch=True, plan_ids=(account.starter,)))
    try:
        assert h.poll().ok
        member_reads = {r.path for r in fake.requests if r.path.startswith("/v1/planDetails/")}
        assert member_reads == {f"/v1/planDetails/{account.starter}/customers"}
        assert h.store.plan_counts() == (1, 8, 0)

        h.poller.plans = PlansConfig(watch=True, plan_ids=(account.starter, account.growth))
        fake.set_plan_end(account.cpids[12], "2027-01-01T00:00:00Z")  # on Starter: news
        fake.set_plan_end(account.cpids[0], "2027-01-01T00:00:00Z")  # on Growth: part of its baseline
        assert h.poll().ok
        only(h.events(), type="customer.plan_updated", customer_id=account.customers[12])
        assert h.store.plan_counts() == (2, 20, 0)

        h.poller.plans = PlansConfig(watch=True, plan_ids=(account.growth,))
        result = h.poll()
        assert result.ok and result.plans is not None and result.plans.memberships == 12
        assert len(h.events()) == 1, "a plan no longer watched is forgotten silently"
    finally:
        h.close()


def test_a_plan_id_no_plan_has_is_refused_and_holds_back_no_customer_event(
    account: Account, fake: SimulatedMetronome, store_url: str, clock: FakeClock
) -> None:
    h = make_harness(fake, store_url, clock, plans=PlansConfig(watch=True, plan_ids=("no-such-plan",)))
    try:
        first = h.poll()
        assert first.outcome == "refused" and first.failed_sources == ("plans",)
        assert first.error == (
            "plans: plans.plan_ids names plan 'no-such-plan', which GET /v1/plans does not list "
            "(3 plans listed)"
        )
        assert first.customers_ok and first.baseline
        fake.create_customer("Newcomer")
        second = h.poll()
        only(h.events(), type="customer.created")
        assert second.outcome == "refused"
    finally:
        h.close()


# -- one source's trouble is its own --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault(kind="status", status=500, times=100, page=2), "HTTP 500"),
        (Fault(kind="malformed", times=100, page=2), "not JSON"),
        (Fault(kind="bad_record", page=2), "data[0].plan_details.customer_plan_id is not a non-empty string"),
        (Fault(kind="drop", times=100, page=2), ""),
    ],
    ids=["500-beyond-retries", "malformed", "bad-record", "dropped-connection"],
)
def test_a_failed_plans_read_commits_nothing_of_the_plans_and_holds_back_no_customer_event(
    account: Account, fake: SimulatedMetronome, watched: Harness, fault: Fault, reason: str
) -> None:
    fake.set_name(account.customers[0], "Renamed")
    fake.set_plan_end(account.cpids[11], "2027-03-01T00:00:00Z")  # Growth's second page (10 a page)
    plans_before = {t: v for t, v in watched.snapshot().items() if t.startswith("plan")}
    fake.add_fault(dataclasses.replace(fault, path=f"/v1/planDetails/{account.growth}/customers"))

    failed = watched.poll()

    assert failed.outcome == "failed" and failed.failed_sources == ("plans",)
    assert failed.error is not None and failed.error.startswith(
        f"plans: GET /v1/planDetails/{account.growth}/customers (members of plan {account.growth}, page 2)"
    )
    assert reason in failed.error
    assert failed.customers_ok and failed.plans is not None and not failed.plans.ok
    only(watched.events(), type="customer.updated", customer_id=account.customers[0])
    assert {t: v for t, v in watched.snapshot().items() if t.startswith("plan")} == plans_before
    (run,) = watched.store.last_polls(1)
    assert (run.outcome, run.error, run.events) == ("failed", failed.error, 1)
    assert rows(
        watched, "SELECT source, outcome FROM poll_sources WHERE poll_id = :id ORDER BY source", id=run.id
    ) == [
        ("customers", "succeeded"),
        ("plans", "failed"),
    ]

    fake.clear_faults()
    assert watched.poll().ok
    assert [e["type"] for e in watched.events()] == ["customer.updated", "customer.plan_updated"]


def test_a_failed_customer_read_holds_back_no_plan_event(
    account: Account, fake: SimulatedMetronome, watched: Harness
) -> None:
    fake.set_name(account.customers[0], "Renamed")
    fake.remove_from_plan(account.cpids[15])
    fake.add_fault(Fault(kind="status", status=503, times=100, page=1, archived=True))

    failed = watched.poll()

    assert failed.outcome == "failed" and failed.failed_sources == ("customers",)
    assert failed.error is not None and failed.error.startswith(
        "customers: GET /v1/customers (archived listing"
    )
    assert failed.plans is not None and failed.plans.ok and not failed.customers_ok
    only(watched.events(), type="customer.plan_removed")

    fake.clear_faults()
    assert watched.poll().ok
    assert [e["type"] for e in watched.events()] == ["customer.plan_removed", "customer.updated"]


def test_a_mass_vanish_of_memberships_is_refused(
    account: Account, fake: SimulatedMetronome, watched: Harness
) -> None:
    for cpid in account.cpids[:12]:
        fake.remove_from_plan(cpid)
    fake.create_customer("Newcomer")
    plans_before = {t: v for t, v in watched.snapshot().items() if t.startswith("plan")}

    result = watched.poll()

    assert result.outcome == "refused" and result.failed_sources == ("plans",)
    assert result.error == (
        "plans: 12 of 20 known plan memberships are gone (0 with plans no longer listed; more than 10% and "
        "more than 10); refusing to treat them as removed"
    )
    only(watched.events(), type="customer.created")
    assert {t: v for t, v in watched.snapshot().items() if t.startswith("plan")} == plans_before


def test_a_cancel_abandons_the_plans_read_and_commits_nothing_of_it(
    account: Account, fake: SimulatedMetronome, watched: Harness
) -> None:
    cancel = threading.Event()
    fake.set_plan_end(account.cpids[3], "2027-01-01T00:00:00Z")
    fake.on_page(1, lambda _: cancel.set(), path=f"/v1/planDetails/{account.starter}/customers")

    result = watched.poller.run(cancel=cancel)

    assert result.outcome == "abandoned"
    assert result.error is not None and result.error.endswith("poll abandoned: shutting down")
    assert watched.events(types=["customer.plan_updated"]) == []
    assert watched.poll().ok
    only(watched.events(types=["customer.plan_updated"]))


# -- a read that finds nothing changed costs its requests, and writes nothing ---------------------


class CountedPage:
    """A members page that says when it is parsed."""

    def __init__(self, body: PageBody, parsed: Callable[[], None]) -> None:
        self.body, self.parsed = body, parsed

    @property
    def digest(self) -> bytes | None:
        return self.body.digest

    def parse(self) -> list[dict[str, Any]]:
        self.parsed()
        return self.body.parse()


class Counting(MetronomeClient):
    """The real client, counting the members pages it parsed (by plan)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.parsed: list[str] = []

    def member_pages(  # type: ignore[override]
        self, plan_id: str, *, sent: Callable[[], None] | None = None
    ) -> Iterator[CountedPage]:
        for body in super().member_pages(plan_id, sent=sent):
            yield CountedPage(body, lambda: self.parsed.append(plan_id))


def test_only_the_members_pages_not_seen_before_byte_for_byte_are_parsed_and_nothing_is_rewritten(
    account: Account, fake: SimulatedMetronome, store_url: str, clock: FakeClock
) -> None:
    h = make_harness(fake, store_url, clock)
    client = Counting(fake.url, TOKEN, page_limit=5)
    h.poller = Poller(
        h.store, h.client, routes=[Route("audit")], clock=clock, plans=WATCH, plan_source=client
    )
    try:
        h.poll()
        assert len(client.parsed) == 3 + 2 + 1, "the baseline parses every page (Growth, Starter, Scale)"
        client.parsed.clear()
        state = rows(h, "SELECT customer_plan_id, last_poll_id, changed_at FROM plan_members ORDER BY 1")
        memo = rows(h, "SELECT * FROM plan_page_memo ORDER BY 1")
        plans = rows(h, "SELECT * FROM plans ORDER BY 1")

        assert h.poll().events == 0
        assert client.parsed == []
        assert (
            rows(h, "SELECT customer_plan_id, last_poll_id, changed_at FROM plan_members ORDER BY 1") == state
        )
        assert rows(h, "SELECT * FROM plan_page_memo ORDER BY 1") == memo
        assert rows(h, "SELECT * FROM plans ORDER BY 1") == plans

        fake.set_plan_end(account.cpids[6], "2027-01-01T00:00:00Z")  # Growth's second page of five
        assert h.poll().events == 1
        assert client.parsed == [account.growth]
    finally:
        client.close()
        h.close()


# -- what the operator sees about a failing source -----------------------------------------------


def test_the_failing_notice_and_readyz_name_the_failing_source(
    account: Account, fake: SimulatedMetronome, watched: Harness, clock: FakeClock
) -> None:
    fake.add_fault(Fault(kind="status", status=503, times=100, path="/v1/plans"))
    for _ in range(2):
        assert watched.poll().failed_sources == ("plans",)

    (notice,) = announce(watched.store, [Route("audit", ("watcher.*",))], failing_after=2, now=clock())

    assert notice["type"] == "watcher.poll_failing"
    assert notice["detail"]["failed_sources"] == ["plans"]
    assert notice["detail"]["last_error"].startswith("plans: GET /v1/plans (plans listing, page 1): HTTP 503")
    health = Health(watched.store, max_age=timedelta(minutes=5), clock=clock)
    ready, body = health.readiness()
    assert ready, "the last successful poll is recent"
    assert body["failed_sources"] == ["plans"] and body["last_error"].startswith("plans: ")
    clock.advance(600)
    ready, body = health.readiness()
    assert not ready and body["failed_sources"] == ["plans"]
