"""Unit tests for watcher.client against an in-process httpx.MockTransport (no sockets, no real sleeps).

One test runs over a real socket, against the fake Metronome: what only httpx's own transport reports.
"""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from freezegun import freeze_time
from structlog.testing import capture_logs

from watcher.errors import APIDataError, APIError, APIStatusError, APITransportError
from watcher.events import Listing
from watcher.metrics import REGISTRY
from watcher.metronome import MetronomeClient, RetryPolicy
from watcher.simulator import SimulatedMetronome

BASE = "https://metronome.test"
TOKEN = "sk_live_SUPER-SECRET-token-0123456789"

Handler = Callable[[httpx.Request], httpx.Response]


class MaxRng(random.Random):
    """Jitter that always picks the upper bound, so backoff waits are exact and predictable."""

    def uniform(self, a: float, b: float) -> float:
        return b


class FakeSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


class Recorder:
    """Serves scripted responses in order and records every request it saw."""

    def __init__(self, *steps: httpx.Response | Exception | Handler) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if not self.steps:
            raise AssertionError(f"unexpected extra request {request.url}")
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        if isinstance(step, httpx.Response):
            return step
        return step(request)


def customer(cid: str, **extra: Any) -> dict[str, Any]:
    return {"id": cid, "name": f"Customer {cid}", "custom_fields": {}, **extra}


def page(ids: list[str], next_page: str | None) -> httpx.Response:
    return httpx.Response(200, json={"data": [customer(i) for i in ids], "next_page": next_page})


def error(status: int, message: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"message": message} if message is not None else {}
    return httpx.Response(status, json=body, headers=headers)


def raw(status: int, content: bytes) -> httpx.Response:
    return httpx.Response(status, content=content, headers={"Content-Type": "application/json"})


@pytest.fixture
def sleep() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
def make_client(sleep: FakeSleep) -> Iterator[Callable[..., tuple[MetronomeClient, Recorder]]]:
    made: list[MetronomeClient] = []

    def make(*steps: httpx.Response | Exception | Handler, **kwargs: Any) -> tuple[MetronomeClient, Recorder]:
        recorder = Recorder(*steps)
        http = kwargs.pop("http", None) or httpx.Client(transport=httpx.MockTransport(recorder))
        kwargs.setdefault("sleep", sleep)
        kwargs.setdefault("rng", MaxRng())
        client = MetronomeClient(BASE, TOKEN, http=http, **kwargs)
        made.append(client)
        return client, recorder

    yield make
    for client in made:
        client.close()


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- RetryPolicy ---------------------------------------------------------------------------------------


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="base_delay"):
        RetryPolicy(base_delay=-1)


# -- pagination ----------------------------------------------------------------------------------------


def test_pagination_follows_next_page_until_null_active(make_client: Any) -> None:
    client, rec = make_client(page(["a", "b"], "cur-1"), page(["c"], "cur 2/+="), page([], None))
    before = counter("watcher_api_pages_total", listing="active")

    pages = list(client.iter_pages(archived=False))

    assert [[c["id"] for c in p] for p in pages] == [["a", "b"], ["c"], []]
    assert pages[0][0] == customer("a")  # records come back exactly as sent
    assert [r.url.path for r in rec.requests] == ["/v1/customers"] * 3
    params = [dict(r.url.params) for r in rec.requests]
    assert params == [
        {"limit": "100"},
        {"limit": "100", "next_page": "cur-1"},
        {"limit": "100", "next_page": "cur 2/+="},
    ]
    assert counter("watcher_api_pages_total", listing="active") - before == 3


def test_archived_listing_sends_only_archived_true_on_every_page(make_client: Any) -> None:
    client, rec = make_client(page(["x"], "n1"), page(["y"], None))
    before = counter("watcher_api_requests_total", endpoint="list_archived", status="200")

    ids = [c["id"] for p in client.iter_pages(archived=True) for c in p]

    assert ids == ["x", "y"]
    assert [r.url.params.get("only_archived") for r in rec.requests] == ["true", "true"]
    assert [r.url.params.get("limit") for r in rec.requests] == ["100", "100"]
    assert rec.requests[1].url.params.get("next_page") == "n1"
    assert counter("watcher_api_requests_total", endpoint="list_archived", status="200") - before == 2


def test_unknown_fields_are_data_not_errors(make_client: Any) -> None:
    record = customer("a", brand_new_field={"nested": [1, 2]}, archived_at=None)
    body = {"data": [record], "next_page": None, "total": 1, "extra": "x"}
    client, _ = make_client(httpx.Response(200, json=body))
    assert list(client.iter_pages(archived=False)) == [[record]]


def test_repeated_cursor_raises_data_error(make_client: Any) -> None:
    client, rec = make_client(page(["a"], "c1"), page(["b"], "c2"), page(["c"], "c1"))
    pages = client.iter_pages(archived=False)
    assert next(pages) and next(pages) and next(pages)
    with pytest.raises(APIDataError, match=r"page 3\).*repeats the cursor page 1 returned"):
        next(pages)
    assert len(rec.requests) == 3  # did not go round again


def test_cursor_equal_to_own_is_caught_immediately(make_client: Any) -> None:
    client, rec = make_client(page(["a"], "same"), page(["a"], "same"))
    with pytest.raises(APIDataError, match="repeats"):
        list(client.iter_pages(archived=False))
    assert len(rec.requests) == 2


def test_max_pages_exceeded_raises_data_error(make_client: Any) -> None:
    client, rec = make_client(page(["a"], "c1"), page(["b"], "c2"), page(["c"], "c3"), max_pages=2)
    got: list[list[dict[str, Any]]] = []
    with pytest.raises(APIDataError, match=r"page 3\).*max_pages=2"):
        got.extend(client.iter_pages(archived=False))
    assert len(got) == 2
    assert len(rec.requests) == 2  # the third page is never requested


def body(records: list[dict[str, Any]], next_page: str | None, *, cursor_first: bool = False) -> bytes:
    data, cursor = orjson.dumps(records), orjson.dumps(next_page)
    if cursor_first:
        return b'{"next_page":' + cursor + b',"data":' + data + b"}"
    return b'{"data":' + data + b',"next_page":' + cursor + b"}"


def test_a_page_digest_stands_for_its_records_whatever_its_cursor(make_client: Any) -> None:
    a, b = [customer("a")], [customer("a", name="Renamed")]
    client, _ = make_client(raw(200, body(a, "cursor-1")), raw(200, body(b, None)), raw(200, body(a, None)))

    first, second = client.iter_pages(archived=False)
    (again,) = client.iter_pages(archived=False)

    assert first == again == a and second == b  # pages are the records, as parsed
    assert first.digest == again.digest  # the same records, behind another cursor
    assert second.digest != first.digest
    assert first.digest is not None and len(first.digest) == 16


def test_a_body_that_does_not_end_with_its_cursor_is_digested_whole(make_client: Any) -> None:
    a = [customer("a")]
    client, _ = make_client(
        raw(200, body(a, "cursor-1", cursor_first=True)),
        raw(200, body(a, None, cursor_first=True)),
        raw(200, body(a, None, cursor_first=True)),
    )

    first, last = client.iter_pages(archived=False)
    (again,) = client.iter_pages(archived=False)

    assert first == last == a
    assert first.digest != last.digest == again.digest  # the cursor is part of what was digested


def test_a_page_ending_with_its_cursor_has_its_digest_on_arrival(make_client: Any) -> None:
    a = [customer("a")]
    client, _ = make_client(raw(200, body(a, "cursor-1")), raw(200, body(a, None)))

    first, last = client.pages(listing=Listing(False))

    assert not first.parsed and not last.parsed
    assert first.digest is not None and first.digest == last.digest  # the same records
    digest = first.digest
    assert first.parse() == a and first.parsed
    assert first.digest == digest == first.parse().digest  # parsing does not change it


def test_a_digest_of_a_whole_body_is_never_that_of_the_bytes_before_a_cursor(make_client: Any) -> None:
    # A body digested whole parsed fine; the same bytes with a cursor member after them are no JSON.
    # Were the two digests equal, a caller that skips parsing pages it has seen parse would take the
    # second for the first (``PageBody.digest``).
    whole = body([customer("a")], "cursor-1", cursor_first=True)
    client, _ = make_client(raw(200, whole), raw(200, whole + b',"next_page":null}'))

    first, broken = client.pages(listing=Listing(False))

    assert first.parsed and not broken.parsed
    assert first.digest is not None and broken.digest is not None
    assert first.digest != broken.digest
    with pytest.raises(APIDataError, match="body is not JSON"):
        broken.parse()


def test_page_bodies_request_the_next_page_before_this_one_is_parsed(make_client: Any) -> None:
    broken = b'{"data":[{"name":"no id"}],"next_page":"cursor-1"}'
    client, rec = make_client(raw(200, broken), page(["b"], None))

    first, second = client.pages(listing=Listing(False))  # both fetched, nothing parsed yet

    assert len(rec.requests) == 2
    assert rec.requests[1].url.params["next_page"] == "cursor-1"  # read from the end of the body
    assert (first.next_page, second.next_page) == ("cursor-1", None)
    assert second.parse() == [customer("b")]
    with pytest.raises(APIDataError, match=r"page 1\): data\[0\] has no non-empty string 'id'"):
        first.parse()


def test_sent_is_called_once_each_attempt_has_ended_when_the_transport_does_not_say_sooner(
    make_client: Any, sleep: FakeSleep
) -> None:
    client, rec = make_client(error(503), page(["a"], "cursor-1"), page(["b"], None))
    seen: list[str] = []

    def sent() -> None:
        seen.append(f"sent {len(rec.requests)}")

    for body in client.pages(listing=Listing(False), sent=sent):
        seen.append(f"page {body.parse()[0]['id']}")

    # The 503 was retried: its attempt is reported too, before the wait for the next one.
    assert seen == ["sent 1", "sent 2", "page a", "sent 3", "page b"]
    assert len(sleep.calls) == 1


def test_sent_is_called_while_each_request_is_in_flight() -> None:
    calls = 0
    reported = threading.Condition()

    def sent() -> None:
        nonlocal calls
        with reported:
            calls += 1
            reported.notify_all()

    in_flight: list[bool] = []

    def before_serving(page: int) -> Callable[[SimulatedMetronome], None]:
        # Each request is reported twice, on the wire and then ended: page ``page``'s request is
        # the ``2 * page - 1``th call. The fake answers only once this returns, so had ``sent`` waited
        # for the answer, the wait would time out.
        def check(_: SimulatedMetronome) -> None:
            with reported:
                in_flight.append(reported.wait_for(lambda: calls >= 2 * page - 1, timeout=5))

        return check

    with SimulatedMetronome(token=TOKEN) as fake:
        for i in range(25):
            fake.create_customer(f"Customer {i:02d}")
        for n in (1, 2, 3):
            fake.on_page(n, before_serving(n), archived=False)
        with MetronomeClient(fake.url, TOKEN, page_limit=10) as client:
            sizes = [len(b.parse()) for b in client.pages(listing=Listing(False), sent=sent)]

    assert sizes == [10, 10, 5]
    assert in_flight == [True, True, True]
    assert calls == 6


def test_iter_pages_parses_each_page_before_requesting_the_next(make_client: Any) -> None:
    broken = b'{"data":[{"name":"no id"}],"next_page":"cursor-1"}'
    client, rec = make_client(raw(200, broken), page(["b"], None))

    with pytest.raises(APIDataError, match="has no non-empty string 'id'"):
        list(client.iter_pages(archived=False))
    assert len(rec.requests) == 1


@pytest.mark.parametrize(
    ("content", "followed"),
    [
        (body([customer("a")], "c/1", cursor_first=True), "c/1"),  # another member last
        (b'{"data":[],"next_page":"c\\/1"}', "c/1"),  # an escape in the cursor
        (b'{"data": [], "next_page": "c1"}', "c1"),  # spaces
    ],
    ids=["cursor-first", "escaped", "spaces"],
)
def test_a_body_that_does_not_end_plainly_is_parsed_before_its_cursor_is_followed(
    make_client: Any, content: bytes, followed: str
) -> None:
    client, rec = make_client(raw(200, content), page(["b"], None))

    first, second = client.pages(listing=Listing(False))

    assert first.next_page == followed
    assert rec.requests[1].url.params["next_page"] == followed
    first.parse()
    assert second.parse() == [customer("b")]


def test_a_cursor_read_from_the_end_is_the_one_the_parser_keeps(make_client: Any) -> None:
    # Two ``next_page`` members: orjson keeps the last, which is the one at the end of the body.
    # (Were it ever to keep the first, ``parse`` would refuse the page rather than let the listing
    # follow a cursor its body does not say.)
    client, rec = make_client(raw(200, b'{"data":[],"next_page":"A","next_page":"c1"}'), page(["b"], None))

    first, last = client.pages(listing=Listing(False))

    assert rec.requests[1].url.params["next_page"] == "c1"
    assert first.parse() == [] and first.next_page == "c1"
    assert last.parse() == [customer("b")]


def test_a_bad_body_without_a_plain_end_raises_on_arrival(make_client: Any) -> None:
    client, rec = make_client(raw(200, b'{"next_page":"c1","data":[{"name":"no id"}]}'))
    bodies = client.pages(listing=Listing(False))
    with pytest.raises(APIDataError, match="has no non-empty string 'id'"):
        next(bodies)
    assert len(rec.requests) == 1  # its cursor was never followed


def test_page_limit_is_sent(make_client: Any) -> None:
    client, rec = make_client(page([], None), page_limit=25)
    list(client.iter_pages(archived=False))
    assert rec.requests[0].url.params["limit"] == "25"
    with pytest.raises(ValueError, match="page_limit"):
        MetronomeClient(BASE, TOKEN, page_limit=101)


# -- get_customer --------------------------------------------------------------------------------------


def test_get_customer_returns_data_and_quotes_id(make_client: Any) -> None:
    client, rec = make_client(httpx.Response(200, json={"data": customer("a/b c?"), "extra": 1}))
    assert client.get_customer("a/b c?") == customer("a/b c?")
    assert rec.requests[0].url.raw_path == b"/v1/customers/a%2Fb%20c%3F"


def test_get_customer_404_is_none_and_not_retried(make_client: Any, sleep: FakeSleep) -> None:
    client, rec = make_client(error(404, "Customer not found"))
    assert client.get_customer("gone") is None
    assert len(rec.requests) == 1
    assert sleep.calls == []


def test_get_customer_refuses_ids_that_would_address_another_resource(make_client: Any) -> None:
    client, rec = make_client()
    for bad in ("", ".", ".."):
        with pytest.raises(ValueError):
            client.get_customer(bad)
    assert rec.requests == []


def test_listing_404_is_a_status_error(make_client: Any) -> None:
    client, _ = make_client(error(404, "no such route"))
    with pytest.raises(APIStatusError) as info:
        list(client.iter_pages(archived=False))
    assert info.value.status == 404


# -- non-retryable statuses ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 422])
def test_client_errors_are_not_retried(make_client: Any, sleep: FakeSleep, status: int) -> None:
    client, rec = make_client(error(status, "nope"))
    before = counter("watcher_api_retries_total", endpoint="list_active")
    with pytest.raises(APIStatusError) as info:
        list(client.iter_pages(archived=False))
    assert info.value.status == status
    assert info.value.message == "nope"
    assert len(rec.requests) == 1
    assert sleep.calls == []
    assert counter("watcher_api_retries_total", endpoint="list_active") == before


@pytest.mark.parametrize("status", [401, 403])
def test_refused_token_is_named_in_reason(make_client: Any, status: int) -> None:
    client, _ = make_client(error(status, "Unauthorized"))
    with pytest.raises(APIStatusError, match="refused the bearer token") as info:
        client.get_customer("a")
    assert info.value.reason.startswith(f"GET /v1/customers/a: HTTP {status}")
    assert TOKEN not in str(info.value)


def test_get_customer_400_not_retried(make_client: Any, sleep: FakeSleep) -> None:
    client, rec = make_client(error(400, "bad id"))
    with pytest.raises(APIStatusError) as info:
        client.get_customer("a")
    assert (info.value.status, info.value.message, len(rec.requests), sleep.calls) == (400, "bad id", 1, [])


# -- retries -------------------------------------------------------------------------------------------


def test_500_then_success_is_retried_with_backoff(make_client: Any, sleep: FakeSleep) -> None:
    client, rec = make_client(error(500, "boom"), error(502), page(["a"], None))
    before_retries = counter("watcher_api_retries_total", endpoint="list_active")
    before_500 = counter("watcher_api_requests_total", endpoint="list_active", status="500")
    with capture_logs() as logs:
        pages = list(client.iter_pages(archived=False))
    assert [c["id"] for c in pages[0]] == ["a"]
    assert len(rec.requests) == 3
    assert sleep.calls == [0.5, 1.0]  # base_delay, then doubled (MaxRng picks the jitter bound)
    assert counter("watcher_api_retries_total", endpoint="list_active") - before_retries == 2
    assert counter("watcher_api_requests_total", endpoint="list_active", status="500") - before_500 == 1
    retries = [e for e in logs if e["event"] == "api.retry"]
    assert [(e["endpoint"], e["attempt"], e["status"], e["delay"]) for e in retries] == [
        ("list_active", 1, 500, 0.5),
        ("list_active", 2, 502, 1.0),
    ]


def test_5xx_exhausting_attempts_raises_status_error_with_message(make_client: Any, sleep: FakeSleep) -> None:
    client, rec = make_client(*[error(500, "injected failure") for _ in range(6)], page(["a"], None))
    pages = client.iter_pages(archived=False)
    with capture_logs() as logs, pytest.raises(APIStatusError) as info:
        next(pages)
    err = info.value
    assert err.status == 500
    assert err.message == "injected failure"
    assert (
        err.reason
        == "GET /v1/customers (active listing, page 1): HTTP 500: injected failure after 6 attempts"
    )
    assert len(rec.requests) == 6
    assert sleep.calls == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert [e["event"] for e in logs].count("api.giving_up") == 1


def test_error_on_later_page_names_the_page(make_client: Any) -> None:
    client, _ = make_client(page(["a"], "c1"), error(503, "later"), retry=RetryPolicy(max_attempts=1))
    with pytest.raises(
        APIStatusError, match=r"^GET /v1/customers \(active listing, page 2\): HTTP 503: later"
    ):
        list(client.iter_pages(archived=False))


def test_429_retry_after_seconds_is_a_minimum_wait(make_client: Any, sleep: FakeSleep) -> None:
    client, rec = make_client(error(429, "slow down", {"Retry-After": "7"}), page(["a"], None))
    assert len(list(client.iter_pages(archived=False))) == 1
    assert sleep.calls == [7.0]  # not the 0.5 s backoff
    assert len(rec.requests) == 2


def test_retry_after_shorter_than_backoff_keeps_backoff(make_client: Any, sleep: FakeSleep) -> None:
    client, _ = make_client(
        error(503, headers={"Retry-After": "0"}),
        error(503, headers={"Retry-After": "0"}),
        httpx.Response(200, json={"data": customer("a")}),
    )
    assert client.get_customer("a") == customer("a")
    assert sleep.calls == [0.5, 1.0]


@freeze_time("2024-03-01 12:00:00", tz_offset=0)
def test_429_retry_after_http_date_is_honoured(make_client: Any, sleep: FakeSleep) -> None:
    client, _ = make_client(
        error(429, headers={"Retry-After": "Fri, 01 Mar 2024 12:00:12 GMT"}),
        error(429, headers={"Retry-After": "Fri, 01 Mar 2024 11:00:00 GMT"}),  # in the past: no minimum
        httpx.Response(200, json={"data": customer("a")}),
    )
    assert client.get_customer("a") == customer("a")
    assert sleep.calls == [12.0, 1.0]


def test_unreadable_retry_after_falls_back_to_backoff(make_client: Any, sleep: FakeSleep) -> None:
    client, _ = make_client(error(429, headers={"Retry-After": "soon-ish"}), page([], None))
    list(client.iter_pages(archived=False))
    assert sleep.calls == [0.5]


def test_retry_after_above_max_delay_gives_up(make_client: Any, sleep: FakeSleep) -> None:
    client, rec = make_client(error(429, "rate limited", {"Retry-After": "600"}), page([], None))
    with capture_logs() as logs, pytest.raises(APIStatusError) as info:
        list(client.iter_pages(archived=False))
    assert info.value.status == 429
    assert info.value.message == "rate limited"
    assert "Retry-After asks for 600s, more than max_delay=30s" in info.value.reason
    assert len(rec.requests) == 1
    assert sleep.calls == []
    assert any(e["event"] == "api.giving_up" and e["endpoint"] == "list_active" for e in logs)


def test_total_wait_budget_exhaustion_gives_up(make_client: Any, sleep: FakeSleep) -> None:
    policy = RetryPolicy(max_attempts=10, base_delay=1.0, max_delay=30.0, max_total_wait=5.0)
    client, rec = make_client(*[error(503) for _ in range(10)], retry=policy)
    with pytest.raises(APIStatusError) as info:
        client.get_customer("a")
    assert info.value.status == 503
    assert sleep.calls == [1.0, 2.0]  # a further 4 s would take the total to 7 s > 5 s
    assert len(rec.requests) == 3
    assert "max_total_wait=5s retry budget" in info.value.reason
    assert "after 3 attempts" in info.value.reason


def test_retry_after_counts_against_total_budget(make_client: Any, sleep: FakeSleep) -> None:
    policy = RetryPolicy(max_attempts=10, max_delay=30.0, max_total_wait=40.0)
    steps = [error(429, headers={"Retry-After": "25"}) for _ in range(3)]
    client, rec = make_client(*steps, retry=policy)
    with pytest.raises(APIStatusError, match="retry budget"):
        client.get_customer("a")
    assert sleep.calls == [25.0]
    assert len(rec.requests) == 2


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.ConnectTimeout("timed out"),
        httpx.PoolTimeout("pool exhausted"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadError("connection reset by peer"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transport_error_retried_then_succeeds(make_client: Any, sleep: FakeSleep, exc: Exception) -> None:
    client, rec = make_client(exc, page(["a"], None))
    before = counter("watcher_api_requests_total", endpoint="list_active", status="error")
    with capture_logs() as logs:
        assert [c["id"] for p in client.iter_pages(archived=False) for c in p] == ["a"]
    assert len(rec.requests) == 2
    assert sleep.calls == [0.5]
    assert counter("watcher_api_requests_total", endpoint="list_active", status="error") - before == 1
    assert [(e["event"], e["error"]) for e in logs] == [("api.retry", type(exc).__name__)]


def test_transport_error_exhausting_attempts_raises_transport_error(
    make_client: Any, sleep: FakeSleep
) -> None:
    client, rec = make_client(
        *[httpx.ConnectError("connection refused") for _ in range(3)], retry=RetryPolicy(3)
    )
    with pytest.raises(APITransportError) as info:
        client.get_customer("a")
    assert info.value.status is None
    assert info.value.reason == "GET /v1/customers/a: ConnectError: connection refused after 3 attempts"
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(rec.requests) == 3
    assert sleep.calls == [0.5, 1.0]


def test_permanent_transport_error_is_not_retried(make_client: Any, sleep: FakeSleep) -> None:
    client, rec = make_client(httpx.UnsupportedProtocol("Request URL has an unsupported protocol"))
    with pytest.raises(APITransportError, match="UnsupportedProtocol"):
        client.get_customer("a")
    assert (len(rec.requests), sleep.calls) == (1, [])


def test_mixed_failures_share_one_attempt_budget(make_client: Any, sleep: FakeSleep) -> None:
    client, rec = make_client(
        httpx.ReadTimeout("t"), error(500), httpx.ConnectError("c"), retry=RetryPolicy(max_attempts=3)
    )
    with pytest.raises(APITransportError, match="after 3 attempts"):
        client.get_customer("a")
    assert len(rec.requests) == 3


# -- bad bodies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"<html>oops</html>", "body is not JSON"),
        (b"", "body is not JSON"),
        (b"[]", "body is an array, not an object"),
        (b'{"next_page": null}', "body has no 'data' key"),
        (b'{"data": null, "next_page": null}', "'data' is null, not an array"),
        (b'{"data": {"id": "a"}, "next_page": null}', "'data' is an object, not an array"),
        (b'{"data": ["a"], "next_page": null}', r"data\[0\] is a string, not an object"),
        (
            b'{"data": [{"id": "a"}, {"name": "x"}], "next_page": null}',
            r"data\[1\] has no non-empty string 'id'",
        ),
        (b'{"data": [{"id": ""}], "next_page": null}', r"data\[0\] has no non-empty string 'id'"),
        (b'{"data": [{"id": 7}], "next_page": null}', r"data\[0\] has no non-empty string 'id'"),
        (b'{"data": []}', "body has no 'next_page' key"),
        (b'{"data": [], "next_page": 2}', "'next_page' is a number, not a string or null"),
        (b'{"data": [], "next_page": ""}', "'next_page' is an empty string"),
    ],
)
def test_bad_listing_bodies_raise_data_error(make_client: Any, content: bytes, problem: str) -> None:
    client, rec = make_client(raw(200, content))
    with pytest.raises(APIDataError, match=problem) as info:
        list(client.iter_pages(archived=False))
    assert info.value.reason.startswith("GET /v1/customers (active listing, page 1): ")
    assert info.value.status == 200
    assert len(rec.requests) == 1  # a bad body is not retried


def test_bad_body_on_page_three_names_page_and_listing(make_client: Any) -> None:
    client, _ = make_client(page(["a"], "1"), page(["b"], "2"), raw(200, b"not json"))
    with pytest.raises(
        APIDataError, match=r"^GET /v1/customers \(archived listing, page 3\): body is not JSON"
    ):
        list(client.iter_pages(archived=True))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"nope", "body is not JSON"),
        (b'"a"', "body is a string, not an object"),
        (b"{}", "body has no 'data' key"),
        (b'{"data": []}', "'data' is an array, not an object"),
        (b'{"data": {"name": "x"}}', "'data' has no non-empty string 'id'"),
        (b'{"data": {"id": "someone-else"}}', "'data.id' is 'someone-else', not the requested 'a'"),
    ],
)
def test_bad_get_bodies_raise_data_error(make_client: Any, content: bytes, problem: str) -> None:
    client, _ = make_client(raw(200, content))
    with pytest.raises(APIDataError, match=problem):
        client.get_customer("a")


def test_non_json_error_body_has_no_message(make_client: Any) -> None:
    client, _ = make_client(httpx.Response(502, text="<html>Bad Gateway</html>"), retry=RetryPolicy(1))
    with pytest.raises(APIStatusError) as info:
        client.get_customer("a")
    assert info.value.message is None
    assert info.value.reason == "GET /v1/customers/a: HTTP 502 Bad Gateway after 1 attempt"


# -- the bearer token ----------------------------------------------------------------------------------


def test_bearer_header_on_every_request_with_injected_client(make_client: Any, sleep: FakeSleep) -> None:
    recorder = Recorder(error(500), page(["a"], "n"), page(["b"], None), error(404))
    # An injected client with its own (wrong) default Authorization must not win over ours.
    http = httpx.Client(transport=httpx.MockTransport(recorder), headers={"Authorization": "Bearer wrong"})
    client = MetronomeClient(BASE, TOKEN, http=http, sleep=sleep, rng=MaxRng())
    list(client.iter_pages(archived=False))
    assert client.get_customer("x") is None
    assert len(recorder.requests) == 4
    assert [r.headers["Authorization"] for r in recorder.requests] == [f"Bearer {TOKEN}"] * 4
    assert all(r.headers["Accept"] == "application/json" for r in recorder.requests)
    client.close()
    assert not http.is_closed  # not ours to close
    http.close()


def test_own_client_sends_bearer_and_is_closed(monkeypatch: pytest.MonkeyPatch, sleep: FakeSleep) -> None:
    recorder = Recorder(page(["a"], None), error(404))
    monkeypatch.setattr(
        httpx, "Client", functools.partial(httpx.Client, transport=httpx.MockTransport(recorder))
    )
    with MetronomeClient(BASE + "/", TOKEN, sleep=sleep) as client:
        assert next(client.iter_pages(archived=False))[0]["id"] == "a"
        assert client.get_customer("a") is None
        http = client._http
    assert http.is_closed
    assert [str(r.url.copy_with(query=None)) for r in recorder.requests] == [
        f"{BASE}/v1/customers",
        f"{BASE}/v1/customers/a",
    ]
    assert [r.headers["Authorization"] for r in recorder.requests] == [f"Bearer {TOKEN}"] * 2


def test_base_url_path_prefix_is_kept(make_client: Any) -> None:
    recorder = Recorder(page([], None))
    http = httpx.Client(transport=httpx.MockTransport(recorder))
    client = MetronomeClient("https://proxy.test/metronome/", TOKEN, http=http)
    list(client.iter_pages(archived=False))
    assert recorder.requests[0].url.path == "/metronome/v1/customers"
    with pytest.raises(ValueError, match="base_url"):
        MetronomeClient("api.metronome.com", TOKEN)


def _echo_token(request: httpx.Request) -> httpx.Response:
    # A hostile or buggy server that echoes the Authorization header into its error message.
    return error(403, f"token {request.headers['Authorization']} is not allowed")


def test_token_never_leaks(make_client: Any, sleep: FakeSleep) -> None:
    """Every error kind, including servers and transports that echo the token back, stays clean."""
    list_active: Callable[[MetronomeClient], Any] = lambda c: list(c.iter_pages(archived=False))  # noqa: E731
    get_a: Callable[[MetronomeClient], Any] = lambda c: c.get_customer("a")  # noqa: E731
    token_id = b'{"data": {"id": "' + TOKEN.encode() + b'"}}'
    scenarios: list[tuple[list[Any], Callable[[MetronomeClient], Any], dict[str, Any]]] = [
        ([error(401, "Unauthorized")], list_active, {}),
        ([_echo_token], get_a, {}),
        ([error(400, f"bad request {TOKEN}")], get_a, {}),
        ([error(500, "boom")] * 6, lambda c: list(c.iter_pages(archived=True)), {}),
        ([error(429, "slow", {"Retry-After": "999"})], get_a, {}),
        ([error(503)] * 10, get_a, {}),
        ([httpx.ConnectError(f"refused while sending {TOKEN}")] * 6, get_a, {}),
        ([httpx.UnsupportedProtocol("nope")], get_a, {}),
        ([raw(200, b"not json " + TOKEN.encode())], list_active, {}),
        ([raw(200, b'{"data": 1, "next_page": null}')], list_active, {}),
        ([raw(200, token_id)], get_a, {}),
        ([page(["a"], "c"), page(["b"], "c")], list_active, {}),
        ([page(["a"], "c")], list_active, {"max_pages": 1}),
    ]
    seen_kinds: set[type[APIError]] = set()
    with capture_logs() as logs:
        for steps, call, kwargs in scenarios:
            client, _ = make_client(*steps, **kwargs)
            with pytest.raises(APIError) as info:
                call(client)
            err = info.value
            seen_kinds.add(type(err))
            for text in (str(err), repr(err), err.reason, err.message or "", repr(client)):
                assert TOKEN not in text, text
    assert seen_kinds == {APIStatusError, APITransportError, APIDataError}
    assert any(e["event"] == "api.retry" for e in logs)
    assert any(e["event"] == "api.giving_up" for e in logs)
    assert TOKEN not in repr(logs)


def test_token_redaction_keeps_message_useful(make_client: Any) -> None:
    client, _ = make_client(_echo_token)
    with pytest.raises(APIStatusError) as info:
        client.get_customer("a")
    assert info.value.message == "token Bearer [redacted] is not allowed"
    assert "[redacted]" in info.value.reason


def test_repr_shows_base_url_only() -> None:
    client = MetronomeClient(BASE, TOKEN, http=httpx.Client(transport=httpx.MockTransport(Recorder())))
    assert repr(client) == f"MetronomeClient(base_url='{BASE}')"


def test_full_page_of_100_records_is_yielded_in_order(make_client: Any) -> None:
    ids = [f"c{i:03d}" for i in range(100)]
    body = orjson.dumps({"data": [customer(i) for i in ids], "next_page": None})
    client, _ = make_client(raw(200, body))
    assert [c["id"] for p in client.iter_pages(archived=False) for c in p] == ids


# -- the plans source ----------------------------------------------------------------------------------


def membership(cid: str, cpid: str, plan_id: str = "p 1/x", **details: Any) -> dict[str, Any]:
    return {
        "customer_details": customer(cid),
        "plan_details": {
            "id": plan_id,
            "name": "Growth",
            "custom_fields": {},
            "customer_plan_id": cpid,
            "starting_on": "2026-01-01T00:00:00Z",
            **details,
        },
    }


def members_page(items: list[dict[str, Any]], next_page: str | None) -> httpx.Response:
    return httpx.Response(200, json={"data": items, "next_page": next_page})


def test_member_pages_read_every_status_of_one_plan_page_by_page(make_client: Any) -> None:
    client, rec = make_client(
        members_page([membership("a", "m1"), membership("b", "m2", ending_before=None)], "cur-1"),
        members_page([membership("c", "m3", ending_before="2026-12-31T00:00:00.000Z")], None),
        page_limit=2,
    )
    before = counter("watcher_api_pages_total", listing="plan_members")

    pages = [body.parse() for body in client.member_pages("p 1/x")]

    assert [[m["plan_details"]["customer_plan_id"] for m in p] for p in pages] == [["m1", "m2"], ["m3"]]
    assert [r.url.raw_path.split(b"?")[0] for r in rec.requests] == [
        b"/v1/planDetails/p%201%2Fx/customers"
    ] * 2
    assert [dict(r.url.params) for r in rec.requests] == [
        {"limit": "2", "status": "all"},
        {"limit": "2", "status": "all", "next_page": "cur-1"},
    ]
    assert counter("watcher_api_pages_total", listing="plan_members") == before + 2


def test_plan_pages_list_the_plans(make_client: Any) -> None:
    plans = [{"id": "p1", "name": "Growth", "description": "", "custom_fields": {}}]
    client, rec = make_client(httpx.Response(200, json={"data": plans, "next_page": None}))
    assert [body.parse() for body in client.plan_pages()] == [plans]
    assert rec.requests[0].url.path == "/v1/plans"


def test_member_pages_refuse_ids_that_would_address_another_resource(make_client: Any) -> None:
    client, rec = make_client()
    for bad in ("", ".", ".."):
        with pytest.raises(ValueError, match="not a usable plan id"):
            list(client.member_pages(bad))
    assert rec.requests == []


def test_a_plan_that_is_gone_is_a_status_error_naming_it(make_client: Any) -> None:
    client, _ = make_client(error(404, "Plan not found"))
    with pytest.raises(
        APIStatusError, match=r"^GET /v1/planDetails/p1/customers \(members of plan p1, page 1\)"
    ):
        list(client.member_pages("p1"))


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ({"plan_details": {}}, r"data\[0\].customer_details is null, not an object"),
        (
            {**membership("a", "m1"), "customer_details": {"name": "x"}},
            r"data\[0\].customer_details.id is not",
        ),
        ({"customer_details": customer("a")}, r"data\[0\].plan_details is null, not an object"),
        (membership("a", ""), r"data\[0\].plan_details.customer_plan_id is not a non-empty string"),
        (
            membership("a", "m1", plan_id="another"),
            r"data\[0\].plan_details.id is 'another', not the plan asked",
        ),
        (membership("a", "m1", starting_on="soon"), r"data\[0\].plan_details.starting_on is not an RFC 3339"),
        (membership("a", "m1", ending_before=7), r"data\[0\].plan_details.ending_before is not an RFC 3339"),
    ],
)
def test_bad_memberships_raise_data_error(make_client: Any, item: dict[str, Any], problem: str) -> None:
    client, _ = make_client(members_page([item], None))
    with pytest.raises(APIDataError, match=problem) as info:
        for body in client.member_pages("p 1/x"):
            body.parse()
    assert info.value.reason.startswith(
        "GET /v1/planDetails/p%201%2Fx/customers (members of plan p 1/x, page 1): "
    )


def test_unknown_membership_fields_are_data(make_client: Any) -> None:
    item = membership("a", "m1", trial_info={"ends": "soon"})
    item["extra"] = 1
    client, _ = make_client(members_page([item], None))
    assert [body.parse() for body in client.member_pages("p 1/x")] == [[item]]
