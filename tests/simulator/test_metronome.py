"""The fake Metronome, exercised the way the watcher uses it: real HTTP over a real socket.

The demo, the poll-cycle tests and the benchmarks all trust this server, so its pagination,
its endpoints and its fault injection are pinned here against the OpenAPI contract.
"""

from __future__ import annotations

import base64
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from watcher import simulator
from watcher.simulator import Fault, SimulatedMetronome

TOKEN = "secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class SteppingClock:
    """A clock that moves one second per reading, so every mutation gets a distinct updated_at."""

    def __init__(self) -> None:
        self.now = datetime(2024, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def fake() -> Iterator[SimulatedMetronome]:
    with SimulatedMetronome(token=TOKEN, clock=SteppingClock(), default_limit=50) as server:
        yield server


@pytest.fixture
def client(fake: SimulatedMetronome) -> Iterator[httpx.Client]:
    # verify=False: plain HTTP anyway, and it skips loading CA certificates (~30 ms per client).
    with httpx.Client(base_url=fake.url, headers=AUTH, timeout=5, verify=False) as c:
        yield c


def make_customers(fake: SimulatedMetronome, n: int) -> list[str]:
    return [fake.create_customer(f"Customer {i}", ingest_aliases=[f"alias-{i}"])["id"] for i in range(n)]


def list_page(client: httpx.Client, cursor: str | None = None, **params: Any) -> dict[str, Any]:
    if cursor is not None:
        params["next_page"] = cursor
    response = client.get("/v1/customers", params=params)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def scan(
    client: httpx.Client,
    *,
    between_pages: Callable[[int], None] | None = None,
    **params: Any,
) -> list[str]:
    """Every id of one listing, following cursors; ``between_pages(n)`` runs after page n."""
    ids: list[str] = []
    cursor: str | None = None
    page = 0
    while True:
        body = list_page(client, cursor, **params)
        page += 1
        ids += [customer["id"] for customer in body["data"]]
        cursor = body["next_page"]
        if cursor is None:
            return ids
        if between_pages is not None:
            between_pages(page)


# -- auth and query validation -----------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_requests_without_the_bearer_token_get_401(fake: SimulatedMetronome, headers: dict[str, str]) -> None:
    response = httpx.get(f"{fake.url}/v1/customers", headers=headers, verify=False)

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"message": "Unauthorized"}
    assert fake.requests[-1].authorized is False
    assert fake.requests[-1].status == 401


def test_the_latest_requests_are_kept_and_all_are_counted() -> None:
    class Fake(SimulatedMetronome):
        RECORDED_REQUESTS = 3

    with Fake(token=TOKEN) as fake, httpx.Client(base_url=fake.url, headers=AUTH, verify=False) as client:
        for limit in range(1, 6):
            client.get("/v1/customers", params={"limit": limit})

        assert fake.served == 5
        assert [r.params["limit"] for r in fake.requests] == [["3"], ["4"], ["5"]]


def test_connections_are_kept_alive_even_after_errors(client: httpx.Client) -> None:
    def local_port(response: httpx.Response) -> int:
        port: int = response.extensions["network_stream"].get_extra_info("socket").getsockname()[1]
        return port

    ports = {
        local_port(client.get("/v1/customers")),
        local_port(client.post("/v1/customers", json={"name": "x"}, headers={"Authorization": "Bearer no"})),
        local_port(client.post("/v1/customers", content=b"{broken")),
        local_port(client.get("/v1/customers/unknown")),
        local_port(client.get("/v1/customers")),
    }

    assert len(ports) == 1


@pytest.mark.parametrize("limit", ["0", "101", "-1", "1.5", "ten", ""])
def test_limit_outside_1_to_100_is_a_400(client: httpx.Client, limit: str) -> None:
    response = client.get("/v1/customers", params={"limit": limit})

    assert response.status_code == 400
    assert "limit" in response.json()["message"]


def test_limit_bounds_and_default(fake: SimulatedMetronome, client: httpx.Client) -> None:
    fake.seed(120, archived_fraction=0, rng=random.Random(1))

    assert len(list_page(client, limit=1)["data"]) == 1
    assert len(list_page(client, limit=100)["data"]) == 100
    assert len(list_page(client)["data"]) == 50  # default_limit


def test_unknown_route_is_a_json_404(client: httpx.Client) -> None:
    response = client.get("/v1/nothing-here")

    assert response.status_code == 404
    assert response.json() == {"message": "Not found"}


# -- listings ------------------------------------------------------------------------------------------


def test_pagination_visits_every_customer_exactly_once_in_creation_order(
    fake: SimulatedMetronome, client: httpx.Client
) -> None:
    ids = make_customers(fake, 95)

    assert scan(client, limit=10) == ids
    listing = [r for r in fake.requests if r.path == "/v1/customers"]
    assert len(listing) == 10  # 9 full pages + 5; no empty trailing page
    assert listing[0].params == {"limit": ["10"]}


def test_last_page_has_null_next_page(fake: SimulatedMetronome, client: httpx.Client) -> None:
    make_customers(fake, 3)

    assert list_page(client, limit=3)["next_page"] is None
    assert list_page(client, limit=2)["next_page"] is not None


def test_empty_listing(client: httpx.Client) -> None:
    assert list_page(client) == {"data": [], "next_page": None}


def test_only_archived_lists_archived_customers_and_active_is_the_default(
    fake: SimulatedMetronome, client: httpx.Client
) -> None:
    ids = make_customers(fake, 6)
    for cid in ids[1::2]:
        fake.archive(cid)

    assert scan(client, limit=2) == ids[0::2]
    assert scan(client, limit=2, only_archived="false") == ids[0::2]
    assert scan(client, limit=2, only_archived="true") == ids[1::2]
    archived = list_page(client, only_archived="true")["data"]
    assert all(customer["archived_at"] is not None for customer in archived)


def test_customer_ids_and_ingest_alias_filters(fake: SimulatedMetronome, client: httpx.Client) -> None:
    ids = make_customers(fake, 10)
    fake.archive(ids[3])

    wanted = [ids[7], ids[3], ids[1], "unknown"]
    assert scan(client, limit=1, customer_ids=wanted) == [ids[1], ids[7]]
    assert scan(client, customer_ids=wanted, only_archived="true") == [ids[3]]
    assert scan(client, ingest_alias="alias-4") == [ids[4]]
    fake.update_config(ids[5], salesforce_account_id="0015500001WO1ZiABL")
    assert scan(client, salesforce_account_ids=["0015500001WO1ZiABL"]) == [ids[5]]
    too_many = client.get("/v1/customers", params={"customer_ids": [str(i) for i in range(101)]})
    assert too_many.status_code == 400


def test_seeded_customers_look_like_metronome_records(fake: SimulatedMetronome, client: httpx.Client) -> None:
    ids = fake.seed(300, archived_fraction=0.2, rng=random.Random(7))

    active = scan(client, limit=100)
    archived = scan(client, limit=100, only_archived="true")
    assert sorted(active + archived) == sorted(ids)
    assert 20 < len(archived) < 100
    record = list_page(client, limit=1)["data"][0]
    assert set(record) >= {
        "id", "external_id", "ingest_aliases", "name", "customer_config", "custom_fields",
        "created_at", "updated_at", "archived_at",
    }  # fmt: skip
    assert record["external_id"] == record["ingest_aliases"][0]
    assert set(record["custom_fields"]) <= {"tier", "region", "plan"}
    assert record["created_at"].endswith("Z") and len(record["created_at"]) == len("2024-01-01T00:00:00.000Z")
    assert any("current_billable_status" in c for c in fake.customers())
    assert any(c["customer_config"]["salesforce_account_id"] for c in fake.customers())
    assert SimulatedMetronome().seed(5, rng=random.Random(7)) == ids[:5]  # reproducible


@pytest.mark.parametrize(
    "state",
    [
        b"not base64 at all!",
        b"null",
        b'{"archived": false}',
        b'{"archived": false, "after": -1, "page": 2}',
        b'{"archived": false, "after": 3, "page": "2"}',
    ],
)
def test_a_cursor_we_did_not_issue_is_a_400(client: httpx.Client, state: bytes) -> None:
    cursor = base64.urlsafe_b64encode(state).decode()

    response = client.get("/v1/customers", params={"next_page": cursor})

    assert response.status_code == 400
    assert response.json() == {"message": "invalid next_page"}


def test_a_cursor_from_the_other_listing_is_a_400(fake: SimulatedMetronome, client: httpx.Client) -> None:
    make_customers(fake, 3)
    cursor = list_page(client, limit=1)["next_page"]

    response = client.get("/v1/customers", params={"next_page": cursor, "only_archived": "true"})

    assert response.status_code == 400
    assert response.json() == {"message": "invalid next_page"}


# -- cursors stay correct while customers change mid-scan ----------------------------------------------


def test_archiving_between_pages_skips_and_duplicates_nothing(
    fake: SimulatedMetronome, client: httpx.Client
) -> None:
    ids = make_customers(fake, 30)
    served, unserved = ids[2], ids[25]

    def archive_two(page: int) -> None:
        if page == 1:
            fake.archive(served)
            fake.archive(unserved)

    active = scan(client, limit=10, between_pages=archive_two)

    assert active == [cid for cid in ids if cid != unserved]
    assert scan(client, only_archived="true") == [served, unserved]


def test_creating_between_pages_appends_without_duplicates(
    fake: SimulatedMetronome, client: httpx.Client
) -> None:
    ids = make_customers(fake, 30)
    created: list[str] = []

    def create_one(page: int) -> None:
        created.append(fake.create_customer(f"New {page}")["id"])

    assert scan(client, limit=10, between_pages=create_one) == ids + created


def test_deleting_between_pages_skips_only_the_deleted(
    fake: SimulatedMetronome, client: httpx.Client
) -> None:
    ids = make_customers(fake, 30)

    def delete_some(page: int) -> None:
        if page == 1:
            fake.delete(ids[9])  # the last one already served: the cursor points at a gone customer
            fake.delete(ids[15])

    assert scan(client, limit=10, between_pages=delete_some) == [c for c in ids if c != ids[15]]


def test_on_page_runs_once_just_before_that_page(fake: SimulatedMetronome, client: httpx.Client) -> None:
    ids = make_customers(fake, 6)
    calls: list[int] = []

    def archive_fifth(server: SimulatedMetronome) -> None:
        calls.append(len(server.requests))
        server.archive(ids[4])

    fake.on_page(2, archive_fifth, archived=False)
    fake.on_page(1, lambda server: calls.append(-1), archived=True)  # never asked for: never runs

    assert scan(client, limit=2) == [ids[0], ids[1], ids[2], ids[3], ids[5]]
    assert scan(client, limit=2) == [ids[0], ids[1], ids[2], ids[3], ids[5]]
    assert calls == [1]  # once, after page 1 was recorded and before page 2 was


# -- get by id -------------------------------------------------------------------------------------------


def test_get_by_id_returns_active_and_archived_customers(
    fake: SimulatedMetronome, client: httpx.Client
) -> None:
    active, archived = make_customers(fake, 2)
    fake.archive(archived)

    assert client.get(f"/v1/customers/{active}").json() == {"data": fake.get(active)}
    body = client.get(f"/v1/customers/{archived}").json()
    assert body["data"]["id"] == archived
    assert body["data"]["archived_at"] is not None


def test_get_unknown_or_deleted_customer_is_a_404(fake: SimulatedMetronome, client: httpx.Client) -> None:
    (cid,) = make_customers(fake, 1)
    fake.delete(cid)

    for customer_id in (cid, "00000000-0000-4000-8000-000000000000"):
        response = client.get(f"/v1/customers/{customer_id}")
        assert response.status_code == 404
        assert response.json() == {"message": "Customer not found"}
    assert scan(client) == []
    assert scan(client, only_archived="true") == []
    with pytest.raises(KeyError):
        fake.get(cid)


# -- the POST endpoints --------------------------------------------------------------------------------


def test_create_customer_over_http(fake: SimulatedMetronome, client: httpx.Client) -> None:
    response = client.post(
        "/v1/customers",
        json={
            "name": "Example, Inc.",
            "ingest_aliases": ["team@example.com"],
            "custom_fields": {"tier": "pro"},
        },
    )

    assert response.status_code == 200
    data = response.json()["data"]
    assert data == fake.get(data["id"])
    assert data["external_id"] == "team@example.com"
    assert data["custom_fields"] == {"tier": "pro"}
    assert data["archived_at"] is None
    assert data["created_at"] == data["updated_at"]
    assert scan(client) == [data["id"]]


PostCase = tuple[str, Callable[[str], dict[str, Any]], Callable[[dict[str, Any]], bool]]
POST_CASES: dict[str, PostCase] = {
    "archive": (
        "/v1/customers/archive",
        lambda cid: {"id": cid},
        lambda c: c["archived_at"] is not None,
    ),
    "setName": (
        "/v1/customers/{id}/setName",
        lambda cid: {"name": "Renamed " + "x" * 200},
        lambda c: c["name"] == ("Renamed " + "x" * 200)[:160],
    ),
    "setIngestAliases": (
        "/v1/customers/{id}/setIngestAliases",
        lambda cid: {"ingest_aliases": ["a", "b"]},
        lambda c: c["ingest_aliases"] == ["a", "b"],
    ),
    "updateConfig": (
        "/v1/customers/{id}/updateConfig",
        lambda cid: {"salesforce_account_id": "0015500001WO1ZiABL"},
        lambda c: c["customer_config"] == {"salesforce_account_id": "0015500001WO1ZiABL"},
    ),
    "setBillableStatus": (
        "/v1/customers/setBillableStatus",
        lambda cid: {
            "customer_id": cid,
            "billable_status": "unbillable",
            "effective_at": "2024-02-01T00:00:00Z",
        },
        lambda c: (
            c["current_billable_status"] == {"value": "unbillable", "effective_at": "2024-02-01T00:00:00Z"}
        ),
    ),
    "setValues": (
        "/v1/customFields/setValues",
        lambda cid: {"entity": "customer", "entity_id": cid, "custom_fields": {"tier": "enterprise"}},
        lambda c: c["custom_fields"] == {"tier": "enterprise", "region": "eu"},
    ),
    "deleteValues": (
        "/v1/customFields/deleteValues",
        lambda cid: {"entity": "customer", "entity_id": cid, "keys": ["region", "absent"]},
        lambda c: c["custom_fields"] == {"tier": "free"},
    ),
}


@pytest.mark.parametrize("case", POST_CASES)
def test_each_post_endpoint_changes_the_record_and_bumps_updated_at(
    fake: SimulatedMetronome, client: httpx.Client, case: str
) -> None:
    path, body, changed = POST_CASES[case]
    cid = fake.create_customer("Before", custom_fields={"tier": "free", "region": "eu"})["id"]
    before = client.get(f"/v1/customers/{cid}").json()["data"]

    response = client.post(path.format(id=cid), json=body(cid))

    assert response.status_code == 200, response.text
    after = client.get(f"/v1/customers/{cid}").json()["data"]
    assert changed(after)
    assert after["updated_at"] > before["updated_at"]
    assert after["created_at"] == before["created_at"]


def test_post_responses_follow_the_openapi_shapes(fake: SimulatedMetronome, client: httpx.Client) -> None:
    cid = fake.create_customer("Before", ingest_aliases=["x"])["id"]

    renamed = client.post(f"/v1/customers/{cid}/setName", json={"name": "After"}).json()
    assert renamed == {
        "data": {"id": cid, "external_id": "x", "ingest_aliases": ["x"], "name": "After", "custom_fields": {}}
    }
    status = client.post(
        "/v1/customers/setBillableStatus",
        json={"customer_id": cid, "billable_status": "billable", "effective_at": "2024-01-01T00:00:00Z"},
    ).json()
    assert status == {"data": {"id": cid, "current_billable_status": "billable"}}
    assert client.post(f"/v1/customers/{cid}/setIngestAliases", json={"ingest_aliases": []}).json() == {}
    assert client.post("/v1/customers/archive", json={"id": cid}).json() == {"data": {"id": cid}}


@pytest.mark.parametrize(
    ("path", "content", "status"),
    [
        ("/v1/customers", b"{not json", 400),
        ("/v1/customers", b"[]", 400),
        ("/v1/customers", b'{"ingest_aliases": ["a"]}', 400),
        ("/v1/customers/{id}/setName", b"{}", 400),
        ("/v1/customers/{id}/setIngestAliases", b'{"ingest_aliases": "a"}', 400),
        ("/v1/customers/setBillableStatus", b'{"customer_id": "{id}", "billable_status": "maybe"}', 400),
        (
            "/v1/customFields/setValues",
            b'{"entity": "contract", "entity_id": "{id}", "custom_fields": {}}',
            400,
        ),
        ("/v1/customers/archive", b'{"id": "00000000-0000-4000-8000-000000000000"}', 404),
        ("/v1/customers/00000000-0000-4000-8000-000000000000/setName", b'{"name": "x"}', 404),
    ],
)
def test_bad_post_bodies_are_refused(
    fake: SimulatedMetronome, client: httpx.Client, path: str, content: bytes, status: int
) -> None:
    cid = fake.create_customer("Unchanged")["id"]
    before = fake.get(cid)

    response = client.post(path.replace("{id}", cid), content=content.replace(b"{id}", cid.encode()))

    assert response.status_code == status
    assert isinstance(response.json()["message"], str)
    assert fake.get(cid) == before


def test_archiving_twice_is_a_400(fake: SimulatedMetronome, client: httpx.Client) -> None:
    (cid,) = make_customers(fake, 1)
    fake.archive(cid)

    response = client.post("/v1/customers/archive", json={"id": cid})

    assert response.status_code == 400
    with pytest.raises(ValueError):
        fake.archive(cid)


def test_python_operations_bump_updated_at_and_unarchive_restores(fake: SimulatedMetronome) -> None:
    (cid,) = make_customers(fake, 1)
    stamps = [fake.get(cid)["updated_at"]]
    fake.touch(cid)
    stamps.append(fake.get(cid)["updated_at"])
    fake.archive(cid)
    fake.unarchive(cid)
    stamps.append(fake.get(cid)["updated_at"])

    assert stamps == sorted(set(stamps))
    assert fake.get(cid)["archived_at"] is None
    assert [c["id"] for c in fake.customers(archived=False)] == [cid]
    record = fake.get(cid)
    record["name"] = "mutating a copy"
    assert fake.get(cid)["name"] == "Customer 0"


def test_churn_makes_realistic_changes(fake: SimulatedMetronome, client: httpx.Client) -> None:
    fake.seed(50, rng=random.Random(3))
    before = {c["id"]: c for c in fake.customers()}
    rng = random.Random(4)

    lines = [fake.churn(rng) for _ in range(60)]

    assert all(isinstance(line, str) and line for line in lines)
    after = {c["id"]: c for c in fake.customers()}
    assert set(after) >= set(before)
    assert sum(after[cid] != before.get(cid) for cid in after) > 20
    assert sorted(scan(client, limit=100) + scan(client, limit=100, only_archived="true")) == sorted(after)


# -- fault injection -----------------------------------------------------------------------------------


def test_status_fault_with_retry_after_fires_once(fake: SimulatedMetronome, client: httpx.Client) -> None:
    fake.add_fault(Fault("status", status=429, message="slow down", retry_after="7"))

    response = client.get("/v1/customers")

    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json() == {"message": "slow down"}
    assert client.get("/v1/customers").status_code == 200


def test_malformed_fault_sends_a_200_that_is_not_json(client: httpx.Client, fake: SimulatedMetronome) -> None:
    fake.add_fault(Fault("malformed"))

    response = client.get("/v1/customers")

    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()


def test_bad_record_fault_drops_the_first_id_and_keeps_the_rest(
    client: httpx.Client, fake: SimulatedMetronome
) -> None:
    ids = make_customers(fake, 3)
    intact = list_page(client, limit=2)
    fake.add_fault(Fault("bad_record", times=2))

    response = client.get("/v1/customers", params={"limit": 2})
    single = client.get(f"/v1/customers/{ids[2]}").json()

    assert response.status_code == 200
    assert response.content.endswith(b',"next_page":"' + intact["next_page"].encode() + b'"}')
    broken = response.json()
    assert broken["data"][0] == {k: v for k, v in intact["data"][0].items() if k != "id"}
    assert broken["data"][1] == intact["data"][1]
    assert "id" not in single["data"] and single["data"]["name"] == "Customer 2"
    assert list_page(client, limit=2) == intact  # it has fired twice and is gone


def test_drop_fault_closes_the_connection_without_a_response(
    fake: SimulatedMetronome, client: httpx.Client
) -> None:
    assert client.get("/v1/customers").status_code == 200  # a pooled keep-alive connection
    fake.add_fault(Fault("drop"))

    with pytest.raises(httpx.TransportError):
        client.get("/v1/customers")

    assert fake.requests[-1].status == 0
    assert client.get("/v1/customers").status_code == 200


def test_latency_fault_and_global_latency(fake: SimulatedMetronome, client: httpx.Client) -> None:
    fake.add_fault(Fault("latency", delay=0.1))
    started = time.monotonic()
    assert client.get("/v1/customers").status_code == 200
    assert time.monotonic() - started >= 0.1

    fake.latency = 0.05
    started = time.monotonic()
    assert client.get("/v1/customers").status_code == 200
    assert time.monotonic() - started >= 0.05


def test_page_and_archived_matchers(fake: SimulatedMetronome, client: httpx.Client) -> None:
    ids = make_customers(fake, 8)
    for cid in ids[4:]:
        fake.archive(cid)
    fake.add_fault(Fault("status", status=503, page=2, archived=True))

    assert scan(client, limit=2) == ids[:4]  # the active listing's page 2 is untouched
    first = list_page(client, limit=2, only_archived="true")
    failed = client.get(
        "/v1/customers", params={"limit": 2, "only_archived": "true", "next_page": first["next_page"]}
    )
    assert failed.status_code == 503
    assert scan(client, limit=2, only_archived="true") == ids[4:]  # consumed: gone


def test_times_and_path_matchers(fake: SimulatedMetronome, client: httpx.Client) -> None:
    (cid,) = make_customers(fake, 1)
    fake.add_fault(Fault("status", status=500, times=2, path=f"/v1/customers/{cid}"))

    assert client.get("/v1/customers").status_code == 200
    assert [client.get(f"/v1/customers/{cid}").status_code for _ in range(3)] == [500, 500, 200]


def test_page_matcher_never_fires_outside_the_listing(fake: SimulatedMetronome, client: httpx.Client) -> None:
    (cid,) = make_customers(fake, 1)
    fake.add_fault(Fault("status", page=1))

    assert client.get(f"/v1/customers/{cid}").status_code == 200
    assert client.get("/v1/customers").status_code == 500


def test_faults_are_validated() -> None:
    with pytest.raises(ValueError):
        Fault("explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Fault("drop", times=0)


def test_clear_faults_disarms_everything(fake: SimulatedMetronome, client: httpx.Client) -> None:
    fake.add_fault(Fault("status", times=5))
    fake.on_page(1, lambda server: server.create_customer("never"))

    fake.clear_faults()

    assert list_page(client) == {"data": [], "next_page": None}


# -- lifecycle and the command line --------------------------------------------------------------------


def test_stop_is_idempotent_closes_connections_and_restarts_on_the_same_url() -> None:
    server = SimulatedMetronome(token=TOKEN).start()
    url = server.url
    with httpx.Client(base_url=url, headers=AUTH, verify=False) as c:
        assert c.get("/v1/customers").status_code == 200
        server.stop()
        server.stop()
        with pytest.raises(httpx.TransportError):
            c.get("/v1/customers")
        with server:
            assert server.url == url
            assert c.get("/v1/customers").status_code == 200
    with pytest.raises(RuntimeError):
        _ = server.url


def test_main_serves_seeded_customers_until_stopped() -> None:
    root = str(Path(simulator.__file__).resolve().parents[2])
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher.simulator", "--customers", "7", "--token", "cli-token"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=root,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer cli-token"}, verify=False) as c:
            active = c.get("/v1/customers").json()["data"]
            archived = c.get("/v1/customers", params={"only_archived": "true"}).json()["data"]
        assert len(active) + len(archived) == 7
    finally:
        proc.terminate()
        proc.wait(timeout=5)
