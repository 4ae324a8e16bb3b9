"""The simulated Metronome's plans, over real HTTP: ``GET /v1/plans`` and
``GET /v1/planDetails/{plan_id}/customers`` as seed page 004 and the plans issue describe them."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.receivers import FakeClock
from watcher.simulator import Fault, SimulatedMetronome

TOKEN = "secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def fake(clock: FakeClock) -> Iterator[SimulatedMetronome]:
    with SimulatedMetronome(token=TOKEN, clock=clock, default_limit=50) as server:
        yield server


@pytest.fixture
def client(fake: SimulatedMetronome) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, headers=AUTH, timeout=5, verify=False) as c:
        yield c


def members(client: httpx.Client, plan_id: str, **params: Any) -> list[dict[str, Any]]:
    """Every membership of a plan, page by page."""
    out: list[dict[str, Any]] = []
    while True:
        response = client.get(f"/v1/planDetails/{plan_id}/customers", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"data", "next_page"}
        out += body["data"]
        if body["next_page"] is None:
            return out
        params["next_page"] = body["next_page"]


def cpids(items: list[dict[str, Any]]) -> list[str]:
    return [m["plan_details"]["customer_plan_id"] for m in items]


@pytest.fixture
def plan(fake: SimulatedMetronome) -> dict[str, Any]:
    """A plan with a past, a current, an ending and an upcoming member (in that order)."""
    record = fake.create_plan("Growth", description="for growing teams", custom_fields={"motion": "sales"})
    a, b, c, d = (fake.create_customer(f"Customer {i}")["id"] for i in range(4))
    fake.add_to_plan(
        a, record["id"], starting_on="2025-01-01T00:00:00Z", ending_before="2026-01-01T00:00:00Z"
    )
    fake.add_to_plan(b, record["id"], starting_on="2025-06-01T00:00:00Z")
    fake.add_to_plan(
        c, record["id"], starting_on="2026-01-01T00:00:00Z", ending_before="2026-12-31T00:00:00Z"
    )
    fake.add_to_plan(d, record["id"], starting_on="2026-09-01T00:00:00Z")
    return record


def test_plans_are_listed_and_paged(fake: SimulatedMetronome, client: httpx.Client) -> None:
    made = [fake.create_plan(f"Plan {i}", plan_id=f"plan-{i}") for i in range(5)]
    seen, cursor = [], None
    while True:
        page = client.get(
            "/v1/plans", params={"limit": 2, **({"next_page": cursor} if cursor else {})}
        ).json()
        seen += page["data"]
        if (cursor := page["next_page"]) is None:
            break
    assert seen == made == fake.plans()
    assert made[0] == {"id": "plan-0", "name": "Plan 0", "description": "", "custom_fields": {}}
    assert client.get("/v1/plans", params={"limit": 101}).status_code == 400
    assert client.get("/v1/plans", params={"next_page": "bogus"}).status_code == 400


def test_a_membership_is_listed_as_the_seed_page_shows_it(
    fake: SimulatedMetronome, client: httpx.Client, plan: dict[str, Any]
) -> None:
    item = members(client, plan["id"], status="all")[2]

    assert set(item) == {"customer_details", "plan_details"}
    assert item["customer_details"] == fake.customers()[2]
    details = item["plan_details"]
    assert details == {
        "id": plan["id"],
        "name": "Growth",
        "custom_fields": {"motion": "sales"},
        "customer_plan_id": details["customer_plan_id"],
        "starting_on": "2026-01-01T00:00:00.000Z",
        "ending_before": "2026-12-31T00:00:00.000Z",
    }
    assert "ending_before" not in members(client, plan["id"], status="all")[1]["plan_details"], (
        "absent, no end"
    )


@pytest.mark.parametrize(
    ("status", "which"),
    [
        (None, [1, 2]),  # active is the default
        ("active", [1, 2]),
        ("ended", [0]),
        ("upcoming", [3]),
        ("all", [0, 1, 2, 3]),
        ("active,ended", [0, 1, 2]),
        ("active,upcoming", [1, 2, 3]),
    ],
)
def test_status_picks_past_current_and_upcoming_members(
    fake: SimulatedMetronome, client: httpx.Client, plan: dict[str, Any], status: str | None, which: list[int]
) -> None:
    everyone = cpids(members(client, plan["id"], status="all"))
    params = {} if status is None else {"status": status}
    assert cpids(members(client, plan["id"], **params)) == [everyone[i] for i in which]


@pytest.mark.parametrize("status", ["ended,upcoming", "active,ended,upcoming", "gone", ""])
def test_unsupported_statuses_are_a_400(client: httpx.Client, plan: dict[str, Any], status: str) -> None:
    response = client.get(f"/v1/planDetails/{plan['id']}/customers", params={"status": status})
    assert response.status_code == 400 and response.json()["message"]


def test_an_unknown_plan_is_a_404(client: httpx.Client) -> None:
    response = client.get("/v1/planDetails/no-such-plan/customers")
    assert (response.status_code, response.json()) == (404, {"message": "Plan not found"})


def test_a_members_cursor_is_for_its_plan_and_status_only(
    fake: SimulatedMetronome, client: httpx.Client, plan: dict[str, Any]
) -> None:
    other = fake.create_plan("Other")["id"]
    path = f"/v1/planDetails/{plan['id']}/customers"
    cursor = client.get(path, params={"limit": 1, "status": "all"}).json()["next_page"]
    assert client.get(path, params={"limit": 1, "status": "all", "next_page": cursor}).status_code == 200
    assert client.get(path, params={"status": "active", "next_page": cursor}).status_code == 400
    assert client.get(f"/v1/planDetails/{other}/customers", params={"next_page": cursor}).status_code == 400


def test_paging_is_exact_while_memberships_come_and_go(
    fake: SimulatedMetronome, client: httpx.Client, plan: dict[str, Any]
) -> None:
    everyone = cpids(members(client, plan["id"], status="all"))
    late = fake.create_customer("Late")["id"]

    def change(server: SimulatedMetronome) -> None:
        server.remove_from_plan(everyone[0])  # already served: nothing shifts
        server.add_to_plan(late, plan["id"])

    fake.on_page(2, change, path=f"/v1/planDetails/{plan['id']}/customers")
    seen = cpids(members(client, plan["id"], status="all", limit=1))

    assert seen[:4] == everyone and len(seen) == 5 and len(set(seen)) == 5


def test_data_operations_end_lift_move_and_remove(
    fake: SimulatedMetronome, client: httpx.Client, plan: dict[str, Any], clock: FakeClock
) -> None:
    current = cpids(members(client, plan["id"], status="active"))[0]
    fake.set_plan_end(current, NOW - timedelta(days=1))
    assert current in cpids(members(client, plan["id"], status="ended"))
    fake.set_plan_end(current, None)
    assert "ending_before" not in fake.membership(current)["plan_details"]
    fake.set_plan_start(current, "2026-08-01T00:00:00Z")
    assert current in cpids(members(client, plan["id"], status="upcoming"))
    clock.advance(90 * 86400)
    assert current in cpids(members(client, plan["id"], status="active")), "the fake's clock decides"
    fake.remove_from_plan(current)
    assert current not in cpids(members(client, plan["id"], status="all"))
    with pytest.raises(KeyError):
        fake.membership(current)
    with pytest.raises(ValueError, match="after starting_on"):
        fake.set_plan_end(cpids(members(client, plan["id"], status="all"))[0], "2024-01-01T00:00:00Z")
    with pytest.raises(ValueError, match="RFC 3339"):
        fake.add_to_plan(fake.customers()[0]["id"], plan["id"], starting_on="next tuesday")


def test_a_membership_shows_its_customer_as_now_and_goes_with_it(
    fake: SimulatedMetronome, client: httpx.Client, plan: dict[str, Any]
) -> None:
    cid = fake.customers()[1]["id"]
    fake.set_name(cid, "Renamed Co")
    fake.rename_plan(plan["id"], "Growth 2026")
    item = next(m for m in members(client, plan["id"], status="all") if m["customer_details"]["id"] == cid)
    assert item["customer_details"]["name"] == "Renamed Co"
    assert item["plan_details"]["name"] == "Growth 2026"

    fake.delete(cid)
    assert cid not in {m["customer_details"]["id"] for m in members(client, plan["id"], status="all")}
    fake.delete_plan(plan["id"])
    assert client.get(f"/v1/planDetails/{plan['id']}/customers").status_code == 404
    assert fake.plans() == []


def test_faults_reach_a_plans_members_pages_by_path_and_page(
    fake: SimulatedMetronome, client: httpx.Client, plan: dict[str, Any]
) -> None:
    path = f"/v1/planDetails/{plan['id']}/customers"
    fake.add_fault(Fault("status", status=503, page=2, path=path))
    fake.add_fault(Fault("bad_record", page=1, path=path))

    first = client.get(path, params={"limit": 1, "status": "all"}).json()
    assert "customer_plan_id" not in first["data"][0]["plan_details"]
    assert (
        client.get(path, params={"limit": 1, "status": "all", "next_page": first["next_page"]}).status_code
        == 503
    )
    assert client.get("/v1/customers", params={"limit": 1}).status_code == 200, (
        "the page fault was the plan's"
    )


def test_seed_plans_puts_every_customer_on_one_plan(fake: SimulatedMetronome, client: httpx.Client) -> None:
    ids = fake.seed(30, rng=random.Random(1))
    plans = fake.seed_plans(4, rng=random.Random(2))

    on = [m["customer_details"]["id"] for p in plans for m in members(client, p, status="all")]
    assert sorted(on) == sorted(ids)
    assert [p["id"] for p in fake.plans()] == plans


def test_churn_changes_plans_once_there_are_plans(fake: SimulatedMetronome) -> None:
    fake.seed(40, rng=random.Random(3))
    fake.seed_plans(3, rng=random.Random(4))
    rng = random.Random(5)
    lines = [fake.churn(rng) for _ in range(60)]
    assert any("plan" in line for line in lines)
    ended = [
        m for p in fake.plans() for m in fake.plan_members(p["id"]) if "ending_before" in m["plan_details"]
    ]
    assert ended
