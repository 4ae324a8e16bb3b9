"""``queries.event_page``, the web view's one reader of the audit log, against brute force: every
filter, both paging directions and each of its plans (a few customers, many common ones walked in
order, many rare ones read as a set) give exactly the events a plain scan would, in order. On each
engine (``module_store_url``): standby replicas serve the web view from PostgreSQL."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from watcher._time import format_ts
from watcher.events import EventType, EventWriter
from watcher.store import Store, queries

START = datetime(2026, 3, 1, tzinfo=UTC)
FILLER = 20_050  # customers: enough that a rare name's 51st match lies past queries._COMMON_MATCH


def record(i: int, name: str) -> dict[str, Any]:
    return {"id": f"cus-{i:06d}", "name": name, "external_id": f"ext-{i:06d}", "ingest_aliases": []}


@pytest.fixture(scope="module")
def store(module_store_url: str) -> Iterator[Store]:
    """20,050 quiet customers; then customers 0-99 named "Common Co N" and the last 60 "Rare Ltd N",
    with 1,500 events among them and a few notices over 30 polls an hour apart."""
    rng = random.Random(5)
    s = Store(module_store_url)
    records = [record(i, f"Quiet {i}") for i in range(FILLER)]
    for i in range(100):
        records[i]["name"] = f"Common Co {i}"
    for i in range(FILLER - 60, FILLER):
        records[i]["name"] = f"Rare Ltd {i}"
    ts = format_ts(START)
    with s.cycle() as session, session.transaction("IMMEDIATE"):
        session.upsert_states([(r["id"], "active", 0, orjson.dumps(r).decode(), ts, ts, 1) for r in records])
    chosen = records[:100] + records[-60:] + records[5000:5010]
    seq = 0
    for poll in range(30):
        writer = EventWriter(
            poll_id=poll + 1,
            detected_at=format_ts(START + timedelta(hours=poll)),
            last_sequence=seq,
            route=lambda _t, _f: [],
        )
        for _ in range(50):
            r = rng.choice(chosen)
            etype = rng.choice([EventType.CUSTOMER_UPDATED] * 6 + [EventType.CUSTOMER_ARCHIVED])
            writer.add(etype, r["id"], r, r, [{"field": "name", "before": "x", "after": r["name"]}])
        if poll % 7 == 0:
            writer.add(EventType.POLL_FAILING, None, None, None, [], {"detail": {"poll_id": poll}})
        rows, outbox = writer.take()
        seq = rows[-1].sequence
        with s.write() as conn:
            queries.append_events(conn, rows, outbox)
    yield s
    s.close()


def names(store: Store) -> dict[str, dict[str, Any]]:
    with store.read() as conn:
        return {
            r.id: orjson.loads(r.record)
            for r in [queries.get_customer(conn, f"cus-{i:06d}") for i in range(FILLER)]
            if r
        }


@pytest.fixture(scope="module")
def everything(store: Store) -> list[dict[str, Any]]:
    return store.query_events()


@pytest.fixture(scope="module")
def customers(store: Store) -> dict[str, dict[str, Any]]:
    return names(store)


def brute(
    events: list[dict[str, Any]],
    customers: dict[str, dict[str, Any]],
    *,
    types: tuple[str, ...] = (),
    text: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> list[int]:
    """Sequences of the matching events, newest first, by a plain scan."""
    out = []
    for e in events:
        if types and e["type"] not in types:
            continue
        if (since and e["detected_at"] < since) or (until and e["detected_at"] >= until):
            continue
        if text is not None:
            c = customers.get(e["customer_id"] or "")
            if c is None:
                continue
            if e["customer_id"] != text and not any(
                text.lower() in str(c.get(k) or "").lower() for k in ("id", "name", "external_id")
            ):
                continue
            if text in customers and e["customer_id"] != text:
                continue
        out.append(e["sequence"])
    return out[::-1]


def pages(store: Store, limit: int = 17, **filters: Any) -> list[int]:
    """Every page from the newest, following ``before`` to the end; checks ``after`` comes back."""
    seen: list[int] = []
    page = store.event_page(limit=limit, **filters)
    first = None
    while page.events:
        got = [e["sequence"] for e in page.events]
        assert got == page.sequences and got == sorted(got, reverse=True)
        if first is not None:  # the page before, seen from this one, is the one we came from
            back = store.event_page(limit=limit, after=got[0], **filters)
            assert back.sequences == first and back.older
        seen += got
        first = got
        if not page.older:
            break
        page = store.event_page(limit=limit, before=got[-1], **filters)
    return seen


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"types": ("customer.archived",)},
        {"types": ("customer.archived", "watcher.poll_failing")},
        {"since": format_ts(START + timedelta(hours=10)), "until": format_ts(START + timedelta(hours=13))},
        {"since": format_ts(START + timedelta(hours=25)), "types": ("customer.updated", "customer.archived")},
    ],
    ids=["all", "one-type", "two-types", "time-range", "since-and-types"],
)
def test_pages_of_the_log_are_exactly_a_plain_scan(
    store: Store,
    everything: list[dict[str, Any]],
    customers: dict[str, dict[str, Any]],
    filters: dict[str, Any],
) -> None:
    assert pages(store, **filters) == brute(everything, customers, **filters)


@pytest.mark.parametrize(
    "text",
    [
        "cus-000005",  # an id: that customer only
        "ext-005003",  # part of an external id: one customer
        "rare ltd 2000",  # a few customers (the few plan: each one's own index entries)
        "common co",  # 100 customers among the first rows (walked in order, each event checked)
        "RARE LTD",  # 60 customers past the first 20,000 (read once as a set)
        "no such text",
    ],
)
def test_the_customer_text_filter_is_exactly_a_plain_scan(
    store: Store, everything: list[dict[str, Any]], customers: dict[str, dict[str, Any]], text: str
) -> None:
    expected = brute(everything, customers, text=text)
    assert pages(store, customer_text=text) == expected
    if text != "no such text":
        assert expected


def test_which_plan_each_text_takes(store: Store) -> None:
    with store.read() as conn:
        assert len(queries.match_customers(conn, "rare ltd 2000")) == 10
        common, read_common = queries._matching(conn, "common co", queries.MANY_CUSTOMERS + 1)
        rare, read_rare = queries._matching(conn, "rare ltd", queries.MANY_CUSTOMERS + 1)
    assert len(common) == len(rare) == queries.MANY_CUSTOMERS + 1
    assert read_common is not None and read_common <= queries._COMMON_MATCH
    assert read_rare is not None and read_rare > queries._COMMON_MATCH


def test_text_with_like_wildcards_and_quotes_is_matched_literally(store: Store) -> None:
    with store.read() as conn:
        assert queries.match_customers(conn, "%") == []
        assert queries.match_customers(conn, "_") == []
        assert queries.match_customers(conn, '"') == []
        assert queries.match_customers(conn, "   ") == []
