"""The poll cycle against the fake Metronome over a real socket, on a real store of each engine."""

from __future__ import annotations

import copy
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import xxhash
from sqlalchemy import event
from structlog.testing import capture_logs

from tests.conftest import TOKEN, Harness, check_page_memo, page_memo, rows, sqlite_only, stored_fingerprints
from watcher.events import Listing
from watcher.metronome import ListingPage, MetronomeClient, PageBody
from watcher.poll import Poller, PollResult
from watcher.poll.memo import pack, unpack
from watcher.routing import Route
from watcher.simulator import Fault, SimulatedMetronome
from watcher.store import Store


class HidingSource:
    """The real listings without one customer (by id it is still there); with ``digests``, the
    pages carry digests of what they hold, as the client's do."""

    def __init__(self, real: MetronomeClient, hidden: str, *, digests: bool = False) -> None:
        self.real, self.hidden, self.digests = real, hidden, digests

    def pages(self, *, listing: Listing, sent: Any = None) -> Iterator[ListingPage]:
        for page in self.real.iter_pages(archived=bool(listing)):
            kept = [r for r in page if r["id"] != self.hidden]
            yield ListingPage(kept, xxhash.xxh3_128_digest(orjson.dumps(kept)) if self.digests else None)

    def get_customer(self, customer_id: str) -> dict[str, Any] | None:
        return self.real.get_customer(customer_id)


def only(events: list[dict], **match: object) -> dict:
    assert len(events) == 1, events
    for k, v in match.items():
        assert events[0][k] == v, (k, events[0][k], v)
    return events[0]


# -- rule 2: the baseline ----------------------------------------------------------------------


def test_first_poll_is_a_baseline_without_events(fake: SimulatedMetronome, harness: Harness) -> None:
    ids = [fake.create_customer(f"C{i}")["id"] for i in range(12)]
    fake.archive(ids[0])

    result = harness.poll()

    assert result.ok and result.baseline
    assert (result.active, result.archived, result.events) == (11, 1, 0)
    assert harness.events() == []
    assert harness.store.customer_counts() == {"active": 11, "archived": 1}
    assert harness.poll().baseline is False


def test_baseline_events_when_asked(fake: SimulatedMetronome, store_url: str) -> None:
    ids = {fake.create_customer(f"C{i}")["id"] for i in range(3)}
    h = Harness(fake, store_url, emit_baseline_events=True)
    try:
        h.poll()
        events = h.events()
    finally:
        h.close()
    assert {e["customer_id"] for e in events} == ids
    assert {e["type"] for e in events} == {"customer.created"}


# -- each event type, with its exact changes --------------------------------------------------


def test_created(fake: SimulatedMetronome, seeded: Harness) -> None:
    c = fake.create_customer(
        "Brand New Co", ingest_aliases=["new@example.com"], custom_fields={"tier": "gold"}
    )

    result = seeded.poll()

    e = only(seeded.events(), type="customer.created", customer_id=c["id"], previous=None, changes=[])
    assert e["customer"] == fake.get(c["id"])
    assert e["poll_id"] == result.poll_id
    assert result.events_by_type == {"customer.created": 1}


def test_updated_name(fake: SimulatedMetronome, seeded: Harness) -> None:
    cid = fake.customers(archived=False)[3]["id"]
    before = fake.get(cid)
    fake.set_name(cid, "Renamed Inc.")

    seeded.poll()

    e = only(seeded.events(), type="customer.updated", customer_id=cid)
    assert e["changes"] == [{"field": "name", "before": before["name"], "after": "Renamed Inc."}]
    assert e["previous"] == before
    assert e["customer"] == fake.get(cid)


def test_updated_nested_fields(fake: SimulatedMetronome, seeded: Harness) -> None:
    cid = fake.customers(archived=False)[0]["id"]
    fake.set_custom_fields(cid, {"tier": "enterprise", "region": "eu"})
    fake.update_config(cid, salesforce_account_id="0015500001WO1ZiABL")
    fake.set_billable_status(cid, "unbillable", "2026-01-01T00:00:00Z")
    fake.set_ingest_aliases(cid, ["a@example.com", "b@example.com"])
    before = seeded.store.get_customer(cid)
    assert before is not None

    seeded.poll()

    e = only(seeded.events(), type="customer.updated", customer_id=cid)
    now = fake.get(cid)
    assert e["changes"] == [
        {
            "field": "current_billable_status.effective_at",
            "before": None,
            "after": now["current_billable_status"]["effective_at"],
        },
        {"field": "current_billable_status.value", "before": None, "after": "unbillable"},
        {"field": "custom_fields.region", "before": None, "after": "eu"},
        {"field": "custom_fields.tier", "before": "starter", "after": "enterprise"},
        {"field": "customer_config.salesforce_account_id", "before": None, "after": "0015500001WO1ZiABL"},
        {
            "field": "ingest_aliases",
            "before": [f"c{0}@example.com"],
            "after": ["a@example.com", "b@example.com"],
        },
    ]


def test_archived_with_a_rename_riding_along(fake: SimulatedMetronome, seeded: Harness) -> None:
    cid = fake.customers(archived=False)[5]["id"]
    old_name = fake.get(cid)["name"]
    fake.set_name(cid, "Churned Corp")
    fake.archive(cid)

    seeded.poll()

    e = only(seeded.events(), type="customer.archived", customer_id=cid)
    archived_at = fake.get(cid)["archived_at"]
    assert archived_at
    assert e["changes"] == [
        {"field": "archived_at", "before": None, "after": archived_at},
        {"field": "name", "before": old_name, "after": "Churned Corp"},
    ]
    assert seeded.store.customer_counts() == {"active": 24, "archived": 6}


def test_unarchived(fake: SimulatedMetronome, seeded: Harness) -> None:
    cid = fake.customers(archived=True)[0]["id"]
    archived_at = fake.get(cid)["archived_at"]
    fake.unarchive(cid)

    seeded.poll()

    e = only(seeded.events(), type="customer.unarchived", customer_id=cid)
    assert {"field": "archived_at", "before": archived_at, "after": None} in e["changes"]


def test_deleted_only_after_a_404_by_id(fake: SimulatedMetronome, seeded: Harness) -> None:
    cid = fake.customers(archived=False)[7]["id"]
    last = fake.get(cid)
    fake.delete(cid)

    seeded.poll()

    e = only(seeded.events(), type="customer.deleted", customer_id=cid, changes=[])
    assert e["customer"] == last and e["previous"] == last
    lookups = [r for r in fake.requests if r.path == f"/v1/customers/{cid}"]
    assert [r.status for r in lookups] == [404]
    assert seeded.store.customer_counts() == {"active": 24, "archived": 5, "deleted": 1}
    seeded.poll()
    assert len(seeded.events()) == 1, "a deleted customer is reported once"


def test_vanished_but_lookup_fails_means_no_conclusion(fake: SimulatedMetronome, seeded: Harness) -> None:
    cid = fake.customers(archived=False)[7]["id"]
    fake.delete(cid)
    fake.add_fault(Fault(kind="status", status=503, times=100, path=f"/v1/customers/{cid}"))

    result = seeded.poll()

    assert result.ok and result.unresolved == 1
    assert seeded.events() == []
    assert seeded.store.customer_counts()["active"] == 25

    fake.clear_faults()
    seeded.poll()
    only(seeded.events(), type="customer.deleted", customer_id=cid)


def test_vanished_from_listings_but_found_by_id_is_used_as_seen(
    fake: SimulatedMetronome, seeded: Harness
) -> None:
    # Absent is not archived: a listing that misses a customer (eventual consistency, say) must not
    # turn into an event. The source below hides one customer from the listings only.
    cid = fake.customers(archived=False)[2]["id"]
    seeded.poller.source = HidingSource(seeded.client, cid)
    assert seeded.poll().events == 0
    fake.set_name(cid, "Still Here")
    seeded.poll()
    e = only(seeded.events(), type="customer.updated", customer_id=cid)
    assert e["changes"][0]["after"] == "Still Here"


# -- rule 4: noise is not change ---------------------------------------------------------------


def test_no_event_without_changes(seeded: Harness) -> None:
    before = seeded.snapshot()
    result = seeded.poll()
    assert result.ok and result.events == 0
    assert seeded.snapshot() == before


def test_updated_at_alone_is_not_an_event_but_is_stored(fake: SimulatedMetronome, seeded: Harness) -> None:
    cid = fake.customers(archived=False)[1]["id"]
    fake.touch(cid)

    result = seeded.poll()

    assert result.events == 0 and seeded.events() == []
    stored = seeded.store.get_customer(cid)
    assert stored is not None
    import orjson

    assert orjson.loads(stored.record)["updated_at"] == fake.get(cid)["updated_at"]


def test_ignore_list_is_configurable(fake: SimulatedMetronome, store_url: str) -> None:
    h = Harness(fake, store_url, ignore_fields=("updated_at", "custom_fields"))
    try:
        cid = fake.create_customer("X", custom_fields={"tier": "a"})["id"]
        h.poll()
        fake.set_custom_fields(cid, {"tier": "b"})
        assert h.poll().events == 0
        fake.set_name(cid, "Y")
        h.poll()
        e = only(h.events(), type="customer.updated")
        assert [c["field"] for c in e["changes"]] == ["name"]
    finally:
        h.close()


# -- rule 1: only complete pictures are diffed ------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault(kind="status", status=500, times=100, page=2, archived=False), "HTTP 500"),
        (Fault(kind="malformed", times=100, page=2, archived=False), "not JSON"),
        # Well-formed up to its cursor, which the client follows before the page is parsed.
        (Fault(kind="bad_record", page=2, archived=False), "data[0] has no non-empty string 'id'"),
        (Fault(kind="status", status=401, message="Unauthorized", page=2, archived=False), "401"),
        (Fault(kind="drop", times=100, page=2, archived=False), ""),
    ],
    ids=["500-beyond-retries", "malformed", "bad-record", "401", "dropped-connection"],
)
def test_failed_page_commits_nothing_then_next_poll_catches_up(
    fake: SimulatedMetronome, seeded: Harness, fault: Fault, reason: str
) -> None:
    active = fake.customers(archived=False)
    renamed, archived = active[1]["id"], active[2]["id"]
    fake.set_name(renamed, "New Name")
    fake.archive(archived)
    created = fake.create_customer("Late Arrival")["id"]
    before = seeded.snapshot()
    fake.add_fault(fault)

    failed = seeded.poll()

    assert failed.outcome == "failed"
    assert reason in (failed.error or "")
    assert seeded.snapshot() == before, "a failed cycle must leave state, events and outbox untouched"
    runs = seeded.store.last_polls(1)
    assert runs[0].outcome == "failed" and runs[0].error == failed.error

    fake.clear_faults()
    ok = seeded.poll()

    assert ok.ok
    got = {(e["type"], e["customer_id"]) for e in seeded.events()}
    assert got == {
        ("customer.updated", renamed),
        ("customer.archived", archived),
        ("customer.created", created),
    }


@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "sequential"])
def test_a_cancel_abandons_the_cycle_while_a_request_still_hangs(
    fake: SimulatedMetronome, store_url: str, concurrent: bool
) -> None:
    for i in range(25):
        fake.create_customer(f"Customer {i:02d}")
    h = Harness(fake, store_url, concurrent=concurrent)
    try:
        assert h.poll().ok
        fake.set_name(fake.customers(archived=False)[0]["id"], "Renamed")
        before = h.snapshot()
        hanging, release, cancel = threading.Event(), threading.Event(), threading.Event()
        answered = threading.Event()

        def hang(_: SimulatedMetronome) -> None:
            hanging.set()
            release.wait(30)
            answered.set()

        fake.on_page(2, hang, archived=False)
        threading.Thread(target=lambda: hanging.wait(30) and cancel.set(), daemon=True).start()

        result = h.poller.run(cancel=cancel)
        still_hanging = not answered.is_set()
        release.set()

        assert result.outcome == "abandoned"
        assert still_hanging, "the cycle waited for the request in flight"
        assert h.snapshot() == before
    finally:
        release.set()
        h.close()


def test_behind_latency_a_cycle_reports_the_same_changes_and_refuses_a_bad_page(
    fake: SimulatedMetronome, seeded: Harness
) -> None:
    # 10 ms a page is past the hand-over threshold: every page goes to the cycle's thread unparsed,
    # its cursor read from the end of the body, and is parsed there while the next is in flight.
    fake.latency = 0.01
    active = fake.customers(archived=False)
    renamed, archived = active[12]["id"], active[3]["id"]
    fake.set_name(renamed, "New Name")
    fake.archive(archived)
    created = fake.create_customer("Late Arrival")["id"]
    fake.add_fault(Fault(kind="bad_record", page=3, archived=False))
    before = seeded.snapshot()

    failed = seeded.poll()

    assert failed.outcome == "failed"
    assert "(active listing, page 3): data[0] has no non-empty string 'id'" in (failed.error or "")
    assert seeded.snapshot() == before

    ok = seeded.poll()

    assert ok.ok and ok.pages == 4
    got = {(e["type"], e["customer_id"]) for e in seeded.events()}
    assert got == {
        ("customer.updated", renamed),
        ("customer.archived", archived),
        ("customer.created", created),
    }


def test_429_with_retry_after_is_waited_out(fake: SimulatedMetronome, seeded: Harness) -> None:
    fake.add_fault(Fault(kind="status", status=429, retry_after="7", page=2, archived=False))
    cid = fake.create_customer("After The Wait")["id"]

    result = seeded.poll()

    assert result.ok
    assert any(s >= 7 for s in seeded.sleeps), seeded.sleeps
    only(seeded.events(), type="customer.created", customer_id=cid)


# -- rule 3: mid-scan changes, vanishing --------------------------------------------------------


@pytest.mark.parametrize("concurrent", [False, True], ids=["sequential", "concurrent"])
@pytest.mark.parametrize("which", ["not-yet-listed", "already-listed"])
def test_archived_between_two_page_requests_yields_one_event(
    fake: SimulatedMetronome, store_url: str, concurrent: bool, which: str
) -> None:
    for i in range(30):
        fake.create_customer(f"C{i:02d}")
    h = Harness(fake, store_url, concurrent=concurrent)
    try:
        h.poll()
        ids = [c["id"] for c in fake.customers(archived=False)]
        victim = ids[25] if which == "not-yet-listed" else ids[0]
        fake.on_page(2, lambda f: f.archive(victim), archived=False)

        result = h.poll()
        assert result.ok
        if not concurrent:
            # Read one after the other, the picture is complete at once.
            only(h.events(), type="customer.archived", customer_id=victim)
        # Read concurrently, the archived listing may be done before the archive happens: the
        # change is then seen on the next cycle. Either way: exactly one event, never two.
        assert h.poll().ok
        only(h.events(), type="customer.archived", customer_id=victim)
        assert h.poll().events == 0
    finally:
        h.close()


def test_customer_in_both_listings_counts_as_archived(fake: SimulatedMetronome, seeded: Harness) -> None:
    # Seen on page 1 of the active listing, archived before the archived listing is read.
    cid = fake.customers(archived=False)[0]["id"]
    fake.on_page(2, lambda f: f.archive(cid), archived=False)
    seeded.poller.concurrent_listings = False

    result = seeded.poll()

    only(seeded.events(), type="customer.archived", customer_id=cid)
    stored = seeded.store.get_customer(cid)
    assert stored is not None and stored.status == "archived"
    assert (result.active, result.archived) == (24, 6), "counted once, as archived"


def test_mass_vanish_is_refused(fake: SimulatedMetronome, seeded: Harness) -> None:
    for c in fake.customers(archived=False)[:15]:
        fake.delete(c["id"])
    before = seeded.snapshot()

    result = seeded.poll()

    assert result.outcome == "refused"
    assert "15 of 30 known customers are missing" in (result.error or "")
    assert seeded.snapshot() == before
    assert not [r for r in fake.requests if r.path.startswith("/v1/customers/")], "no storm of lookups either"


# -- rule 5 and the audit log ------------------------------------------------------------------


def test_sequence_strictly_increases_and_ids_are_unique(fake: SimulatedMetronome, seeded: Harness) -> None:
    for round_ in range(3):
        for c in fake.customers(archived=False)[:4]:
            fake.set_name(c["id"], f"{c['name']} r{round_}")
        fake.create_customer(f"Round {round_}")
        seeded.poll()
    events = seeded.events()
    seqs = [e["sequence"] for e in events]
    assert len(events) == 15
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] == 1
    assert len({e["id"] for e in events}) == 15


def test_one_outbox_row_per_event_and_sink(fake: SimulatedMetronome, seeded: Harness) -> None:
    fake.create_customer("Outboxed")
    seeded.poll()
    got = rows(seeded.store, "SELECT o.sink, o.status, e.type FROM outbox o JOIN events e USING (sequence)")
    assert got == [("audit", "pending", "customer.created")]


def test_a_second_poller_on_the_same_database_is_refused(fake: SimulatedMetronome, seeded: Harness) -> None:
    other = Harness(fake, seeded.db)
    try:
        fake.on_page(2, lambda f: results.append(other.poll()), archived=False)
        results: list = []
        seeded.poller.concurrent_listings = False
        assert seeded.poll().ok
        assert results[0].outcome == "refused"
        assert "another poll is already running" in (results[0].error or "")
    finally:
        other.close()


# -- sightings the fast path cannot settle alone ------------------------------------------------
#
# The scan pops each customer's stored fingerprint as it sees it and keeps no other record of the
# customers it settled, so a second sighting of one of them is only recognised when its staged row
# meets the stored state. A scripted source (``CustomerSource`` is a Protocol) makes those
# sightings happen on demand, in a chosen order.


class ScriptedSource:
    """Serves fixed pages; with ``archived_first`` the active listing waits for the archived one."""

    def __init__(self, active: list[dict], archived: list[dict], *, archived_first: bool = False) -> None:
        self.listed = {
            Listing.ACTIVE: [active[i : i + 3] for i in range(0, len(active), 3)],
            Listing.ARCHIVED: [archived],
        }
        self.archived_first = archived_first
        self.archived_done = threading.Event()

    def pages(self, *, listing: Listing, sent: Any = None) -> Iterator[ListingPage]:
        if self.archived_first and listing is Listing.ACTIVE:
            assert self.archived_done.wait(10)
        for page in self.listed[listing]:
            yield ListingPage(copy.deepcopy(page))
        if listing is Listing.ARCHIVED:
            self.archived_done.set()

    def get_customer(self, customer_id: str) -> dict[str, Any] | None:
        raise AssertionError(f"no lookup expected ({customer_id})")


@dataclass
class Scripted:
    store: Store
    active: list[dict]
    archived: list[dict]


@pytest.fixture
def scripted(fake: SimulatedMetronome, store_url: str) -> Iterator[Scripted]:
    """8 customers (2 archived) served by a ScriptedSource, baseline taken."""
    for i in range(8):
        fake.create_customer(f"Scripted {i}")
    for c in fake.customers(archived=False)[:2]:
        fake.archive(c["id"])
    active, archived = fake.customers(archived=False), fake.customers(archived=True)
    store = Store(store_url)
    assert scripted_poll(store, ScriptedSource(active, archived)).ok
    yield Scripted(store, active, archived)
    store.close()


def scripted_poll(store: Store, source: ScriptedSource, *, concurrent: bool = False) -> PollResult:
    result = Poller(store, source, routes=[Route("audit")], concurrent_listings=concurrent).run()
    check_page_memo(store)
    return result


def archived_copy(record: dict) -> dict:
    return {**record, "archived_at": "2026-11-01T00:00:00.000Z"}


def test_a_customer_listed_twice_unchanged_counts_once_and_changes_nothing(scripted: Scripted) -> None:
    store, active, archived = scripted.store, scripted.active, scripted.archived
    before = store.get_customer(active[0]["id"])

    result = scripted_poll(store, ScriptedSource([*active, active[0]], archived))

    assert result.ok and result.events == 0
    assert (result.active, result.archived) == (len(active), len(archived))
    assert store.get_customer(active[0]["id"]) == before  # not even rewritten


def test_a_customer_listed_twice_with_a_change_in_between_gives_one_update(scripted: Scripted) -> None:
    store, active, archived = scripted.store, scripted.active, scripted.archived
    renamed = {**active[0], "name": "Renamed Between Two Pages"}

    result = scripted_poll(store, ScriptedSource([*active, renamed], archived))

    assert result.ok and (result.active, result.archived) == (len(active), len(archived))
    event = only(store.query_events(), type="customer.updated", customer_id=active[0]["id"])
    assert event["customer"]["name"] == "Renamed Between Two Pages"


def test_archived_listing_read_first_then_a_stale_active_sighting_still_archives(scripted: Scripted) -> None:
    store, active, archived = scripted.store, scripted.active, scripted.archived
    victim = active[3]

    # Archived mid-scan: the archived listing (read first) has it, the active one still does too.
    source = ScriptedSource(active, [*archived, archived_copy(victim)], archived_first=True)
    result = scripted_poll(store, source, concurrent=True)

    assert result.ok
    assert (result.active, result.archived) == (len(active) - 1, len(archived) + 1)
    only(store.query_events(), type="customer.archived", customer_id=victim["id"])
    stored = store.get_customer(victim["id"])
    assert stored is not None and stored.status == "archived"


def test_an_archived_customer_also_seen_active_mid_scan_stays_archived(scripted: Scripted) -> None:
    store, active, archived = scripted.store, scripted.active, scripted.archived
    ghost = {**archived[0], "archived_at": None}

    # Seen unchanged in the archived listing (read first), then active: archived wins, as when
    # the two sightings come the other way round; the next cycle settles it.
    source = ScriptedSource([*active, ghost], archived, archived_first=True)
    result = scripted_poll(store, source, concurrent=True)

    assert result.ok and result.events == 0
    assert (result.active, result.archived) == (len(active), len(archived))
    stored = store.get_customer(archived[0]["id"])
    assert stored is not None and stored.status == "archived"


def test_a_failed_baseline_commits_nothing_and_the_next_one_starts_afresh(
    fake: SimulatedMetronome, harness: Harness
) -> None:
    fake.seed(45)
    fake.add_fault(Fault("status", status=400, message="bad request", page=3, archived=False))

    failed = harness.poll()

    assert failed.outcome == "failed"
    assert harness.store.customer_counts() == {}
    fake.clear_faults()
    ok = harness.poll()
    assert ok.ok and ok.baseline
    assert sum(harness.store.customer_counts().values()) == 45
    assert (ok.active, ok.archived) == (
        len(fake.customers(archived=False)),
        len(fake.customers(archived=True)),
    )


# -- the silent baseline, written while it is fetched ------------------------------------------


@pytest.mark.parametrize("archived_first", [False, True], ids=["active-first", "archived-first"])
def test_a_silent_baseline_stores_a_customer_seen_in_both_listings_once_as_archived(
    fake: SimulatedMetronome, store_url: str, archived_first: bool
) -> None:
    for i in range(7):
        fake.create_customer(f"Baseline {i}")
    active = fake.customers(archived=False)
    moved = archived_copy(active[4])
    store = Store(store_url)
    try:
        source = ScriptedSource(active, [moved], archived_first=archived_first)
        result = scripted_poll(store, source, concurrent=archived_first)

        assert result.ok and result.baseline and result.events == 0
        assert (result.active, result.archived) == (6, 1)
        assert store.customer_counts() == {"active": 6, "archived": 1}
        stored = store.get_customer(moved["id"])
        assert stored is not None and stored.status == "archived"
        assert orjson.loads(stored.record)["archived_at"] == moved["archived_at"]
    finally:
        store.close()


def test_a_silent_baseline_keeps_the_later_of_two_active_sightings(
    fake: SimulatedMetronome, store_url: str
) -> None:
    for i in range(5):
        fake.create_customer(f"Baseline {i}")
    active = fake.customers(archived=False)
    renamed = {**active[0], "name": "Renamed Mid-Scan"}
    store = Store(store_url)
    try:
        result = scripted_poll(store, ScriptedSource([*active, renamed], []))

        assert result.ok and (result.active, result.archived) == (5, 0)
        stored = store.get_customer(renamed["id"])
        assert stored is not None and orjson.loads(stored.record)["name"] == "Renamed Mid-Scan"
    finally:
        store.close()


# -- the page memo -------------------------------------------------------------------------------
#
# ``Harness.poll`` checks after every cycle that a memo calling itself complete holds exactly the
# stored fingerprints (``check_page_memo``). These tests make sure that it is complete when it
# should be, so that the check is not vacuous, and never when it must not be.


def memo_is_complete(store: Store) -> bool:
    complete, _ = page_memo(store)
    return complete == {False: True, True: True}


def test_the_memo_is_complete_after_ordinary_cycles_of_every_kind(
    fake: SimulatedMetronome, seeded: Harness
) -> None:
    assert memo_is_complete(seeded.store)
    ids = [c["id"] for c in fake.customers(archived=False)]
    archived_id = fake.customers(archived=True)[0]["id"]
    changes = [
        lambda: None,
        lambda: fake.set_name(ids[3], "Renamed"),
        lambda: fake.touch(ids[4]),
        lambda: fake.archive(ids[5]),
        lambda: fake.unarchive(archived_id),
        lambda: fake.delete(ids[6]),
        lambda: fake.create_customer("Newcomer"),
    ]
    for change in changes:
        change()
        assert seeded.poll().ok
        assert memo_is_complete(seeded.store)
        _, fingerprints = page_memo(seeded.store)
        assert fingerprints == stored_fingerprints(seeded.store)
    assert {e["type"] for e in seeded.events()} == {
        "customer.updated",
        "customer.archived",
        "customer.unarchived",
        "customer.deleted",
        "customer.created",
    }


def test_a_second_sighting_leaves_the_memo_incomplete_until_a_clean_cycle(
    fake: SimulatedMetronome, seeded: Harness
) -> None:
    cid = fake.customers(archived=False)[0]["id"]
    fake.on_page(2, lambda f: f.archive(cid), archived=False)
    seeded.poller.concurrent_listings = False

    assert seeded.poll().ok  # seen active on page 1, then archived: the stale sighting is on a page

    assert not memo_is_complete(seeded.store)
    assert seeded.poll().ok
    assert memo_is_complete(seeded.store)
    only(seeded.events(), type="customer.archived", customer_id=cid)


def test_a_customer_found_only_by_id_leaves_the_memo_incomplete(
    fake: SimulatedMetronome, seeded: Harness
) -> None:
    cid = fake.customers(archived=False)[2]["id"]
    real = seeded.client
    seeded.poller.source = HidingSource(real, cid, digests=True)
    assert seeded.poll().events == 0
    assert not memo_is_complete(seeded.store)  # the stored customer is on no page

    seeded.poller.source = real
    assert seeded.poll().events == 0
    assert memo_is_complete(seeded.store)


def test_a_damaged_memo_costs_time_but_hides_nothing_and_is_repaired(
    fake: SimulatedMetronome, seeded: Harness
) -> None:
    with seeded.store.cycle() as session, session.transaction("IMMEDIATE"):
        for listing, _, blob in session.page_memo():  # every page keeps its digest, wrong fingerprints
            damaged = pack((digest, bytes(len(packed))) for digest, packed in unpack(blob))
            session.save_page_memo(listing, complete=False, pages=damaged)
    before = seeded.snapshot()
    cid = fake.customers(archived=False)[8]["id"]

    assert seeded.poll().events == 0
    assert seeded.snapshot() == before  # nothing rewritten
    assert memo_is_complete(seeded.store)

    fake.set_name(cid, "Seen Anyway")
    seeded.poll()
    only(seeded.events(), type="customer.updated", customer_id=cid)


def test_a_change_reverted_is_two_changes(fake: SimulatedMetronome, seeded: Harness) -> None:
    cid = fake.customers(archived=False)[9]["id"]
    original = fake.get(cid)["name"]

    fake.set_name(cid, "Briefly Renamed")
    seeded.poll()
    fake.set_name(cid, original)
    seeded.poll()
    assert seeded.poll().events == 0

    names = [(e["changes"][0]["before"], e["changes"][0]["after"]) for e in seeded.events()]
    assert names == [(original, "Briefly Renamed"), ("Briefly Renamed", original)]


def test_a_page_repeated_by_the_listing_is_a_second_sighting_not_a_change(
    fake: SimulatedMetronome, seeded: Harness
) -> None:
    real = seeded.client
    expected = (len(fake.customers(archived=False)), len(fake.customers(archived=True)))

    class RepeatingSource:
        """The real listings, with the first active page served twice (same bytes, same digest)."""

        def pages(self, *, listing: Listing, sent: Any = None) -> Iterator[ListingPage]:
            for i, page in enumerate(real.iter_pages(archived=bool(listing))):
                yield page
                if i == 0 and listing is Listing.ACTIVE:
                    yield page

        def get_customer(self, customer_id: str) -> dict[str, Any] | None:
            return real.get_customer(customer_id)

    assert memo_is_complete(seeded.store)
    seeded.poller.source = RepeatingSource()
    result = seeded.poll()

    assert result.ok and result.events == 0
    assert (result.active, result.archived) == expected
    assert not memo_is_complete(seeded.store)  # a second sighting: the memo no longer holds exactly the state


class RecordingClient(MetronomeClient):
    """The real client, keeping every page body it hands out.

    ``parsed_when_next_sent[listing][k]``: whether page ``k`` of that listing had been parsed when
    the request after it was first reported on the wire (before the caller's ``sent`` ran).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bodies: list[PageBody] = []
        self.parsed_when_next_sent: dict[Listing, dict[int, bool]] = {
            Listing.ACTIVE: {},
            Listing.ARCHIVED: {},
        }

    def pages(self, *, listing: Listing, sent: Callable[[], None] | None = None) -> Iterator[PageBody]:
        mine: list[PageBody] = []
        noted = self.parsed_when_next_sent[listing]

        def on_sent() -> None:
            if mine and len(mine) not in noted:
                noted[len(mine)] = mine[-1].parsed
            if sent is not None:
                sent()

        for page in super().pages(listing=listing, sent=on_sent):
            mine.append(page)
            self.bodies.append(page)
            yield page


@pytest.mark.parametrize("memo", ["complete", "incomplete"])
def test_only_the_pages_not_seen_before_byte_for_byte_are_parsed(
    fake: SimulatedMetronome, seeded: Harness, memo: str
) -> None:
    if memo == "incomplete":  # the pages settle against the set of stored fingerprints instead
        with seeded.store.cycle() as session, session.transaction("IMMEDIATE"):
            for listing, _, blob in session.page_memo():
                session.save_page_memo(listing, complete=False, pages=blob)
    client = RecordingClient(fake.url, TOKEN, page_limit=10)
    seeded.poller.source = client
    cid = fake.customers(archived=False)[13]["id"]  # on the second of three active pages

    with client:
        assert seeded.poll().events == 0
        assert len(client.bodies) == 4 and not any(b.parsed for b in client.bodies)

        client.bodies.clear()
        fake.set_name(cid, "Renamed Inc.")
        result = seeded.poll()

    only(seeded.events(), type="customer.updated", customer_id=cid)
    assert (result.active, result.archived) == (25, 5)
    (parsed,) = [b for b in client.bodies if b.parsed]
    assert cid in [r["id"] for r in parsed.parse()]


def test_a_slow_page_is_handed_over_only_once_the_next_request_is_on_the_wire(
    fake: SimulatedMetronome, harness: Harness
) -> None:
    # Handed over sooner, the thread that parses it takes the GIL while the request is still being
    # built, and the parsing goes in front of the request instead of inside its latency.
    for i in range(25):
        fake.create_customer(f"Customer {i:02d}")
    fake.latency = 0.02  # every page is slow: each goes to the calling thread, unparsed
    client = RecordingClient(fake.url, TOKEN, page_limit=10)
    harness.poller.source = client

    with client:
        result = harness.poll()

    assert result.ok and result.baseline and result.active == 25
    assert len(client.bodies) == 4 and all(b.parsed for b in client.bodies)
    assert client.parsed_when_next_sent == {Listing.ACTIVE: {1: False, 2: False}, Listing.ARCHIVED: {}}


@sqlite_only
def test_a_cycles_changes_reach_the_database_file_while_others_hold_it_open(
    fake: SimulatedMetronome, seeded: Harness
) -> None:
    # The cycle's commit does not copy the WAL into the database file (that would hold the cycle up
    # by a copy as large as its commit), and with another connection open (a `status`, the health
    # endpoint) closing its own does not either: the checkpoint the cycle asks for does.
    fake.set_name(fake.customers(archived=False)[0]["id"], "Renamed Inc.")
    reader = sqlite3.connect(seeded.db)
    try:
        reader.execute("SELECT count(*) FROM customers").fetchone()
        assert seeded.poller.run().events == 1
        assert seeded.store.wait_for_checkpoint(timeout=10)
        copy = seeded.db.with_name("file-alone.db")
        shutil.copy(seeded.db, copy)  # the database file without its WAL
    finally:
        reader.close()
    with sqlite3.connect(copy) as con:
        names = [orjson.loads(r)["name"] for (r,) in con.execute("SELECT record FROM customers")]
    assert "Renamed Inc." in names


def test_empty_listings_share_a_digest_and_are_each_settled_in_their_own_listing(
    fake: SimulatedMetronome, harness: Harness
) -> None:
    assert harness.poll().ok and harness.poll().ok  # no customers at all: two empty pages
    assert memo_is_complete(harness.store)
    assert harness.poll().events == 0

    cid = fake.create_customer("First Customer")["id"]
    fake.archive(cid)
    harness.poll()

    only(harness.events(), type="customer.created", customer_id=cid)
    assert harness.store.customer_counts() == {"archived": 1}


# -- the database failing ---------------------------------------------------------------------------


@sqlite_only
def test_a_full_database_fails_the_poll_with_its_reason_and_the_next_poll_gets_each_change_once(
    fake: SimulatedMetronome, engine: str, seeded: Harness
) -> None:
    # A page limit on every connection of the store is a real SQLITE_FULL, wherever it is hit.
    limit: list[int | None] = [None]

    def cap(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {limit[0] or 1_000_000_000}")

    event.listen(seeded.store.engine, "checkout", cap)
    changed = [c["id"] for c in fake.customers(archived=False)[:20]]
    for cid in changed:
        fake.set_name(cid, "Renamed " + "x" * 2000)
    before = seeded.snapshot()
    limit[0] = int(rows(seeded.store, "PRAGMA page_count")[0][0])

    with capture_logs() as logs:
        failed = seeded.poll()

    assert failed.outcome == "failed" and failed.recorded
    assert (failed.error or "").startswith(f"database error: database or disk is full writing {seeded.db} (")
    assert seeded.snapshot() == before, "nothing of the cycle may land"
    assert seeded.store.last_polls(1)[0].error == failed.error
    (line,) = [e for e in logs if e["event"] == "poll.failed"]
    assert line["error"] == failed.error and line["log_level"] == "error" and "exc_info" not in line

    limit[0] = None  # room again
    ok = seeded.poll()

    assert ok.ok
    assert sorted((e["type"], e["customer_id"]) for e in seeded.events()) == sorted(
        ("customer.updated", cid) for cid in changed
    )


@sqlite_only
def test_a_poll_that_cannot_even_be_recorded_fails_in_memory_and_the_next_one_goes_on(
    fake: SimulatedMetronome, engine: str, seeded: Harness
) -> None:
    # Another process holds the write lock beyond the store's patience: nothing can be recorded.
    store = Store(seeded.db, busy_timeout=0.1)
    poller = Poller(store, seeded.client, routes=[Route("audit")])
    renamed = fake.customers(archived=False)[0]["id"]
    fake.set_name(renamed, "Renamed")
    holder = sqlite3.connect(seeded.db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with capture_logs() as logs:
            failed = poller.run()
        holder.execute("ROLLBACK")

        assert (failed.outcome, failed.recorded, failed.poll_id) == ("failed", False, 0)
        assert (
            failed.error
            == f"database error: {seeded.db} is locked by another connection for too long: database is locked"
        )
        (line,) = [e for e in logs if e["event"] == "poll.failed"]
        assert line["recorded"] is False and line["error"] == failed.error and "exc_info" not in line

        ok = poller.run()
        assert ok.ok and ok.recorded
        assert [(e["type"], e["customer_id"]) for e in store.query_events()] == [
            ("customer.updated", renamed)
        ]
    finally:
        holder.close()
        store.close()


@sqlite_only
def test_a_poll_lock_that_cannot_be_opened_is_a_failed_poll_in_one_line(
    fake: SimulatedMetronome, engine: str, harness: Harness
) -> None:
    lock = Path(f"{harness.db}.lock")
    lock.mkdir()  # in the way of the lock file

    result = harness.poller.run()

    assert (result.outcome, result.recorded) == ("failed", False)
    assert result.error == f"database error: cannot open the poll lock {lock}: Is a directory"
