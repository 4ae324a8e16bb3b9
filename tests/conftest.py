"""Shared fixtures: the simulated Metronome on a local port and a real SQLite file per test."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from watcher._time import Clock
from watcher.config import DiffConfig, PlansConfig
from watcher.events import Listing
from watcher.metronome import MetronomeClient, RetryPolicy
from watcher.poll import Poller, PollResult
from watcher.poll.memo import fingerprints_of, unpack
from watcher.routing import Route
from watcher.simulator import SimulatedMetronome
from watcher.store import Store

# The receivers' fixtures, for every test (``make_receiver``, ``receiver``, ``clock``, ``fake_time``).
from .receivers import clock, fake_time, make_receiver, receiver  # noqa: F401

#: Looks like a real token so that a leak would be unmistakable in any output.
TOKEN = "mtr_test_Zq8v1SECRETtoken42xY"


def page_memo(store: Store) -> tuple[dict[Listing, bool], dict[Listing, list[int]]]:
    """The page memo as stored: listing -> complete, and every fingerprint on that listing's
    pages, sorted (read through ``watcher.poll.memo``, which alone knows its layout)."""
    with store.cycle() as session:
        rows = session.page_memo()
    complete, fingerprints = {}, {}
    for listing, is_complete, blob in rows:
        complete[listing] = is_complete
        fingerprints[listing] = sorted(f for _, packed in unpack(blob) for f in fingerprints_of(packed))
    return complete, fingerprints


def stored_fingerprints(store: Store) -> dict[Listing, list[int]]:
    with store.cycle() as session:
        return {listing: sorted(hashes) for listing, hashes in session.stored_fingerprints().items()}


def check_page_memo(store: Store) -> None:
    """The page memo may only call itself complete when it holds exactly the stored fingerprints:
    a cycle then trusts it instead of the customers table."""
    complete, fingerprints = page_memo(store)
    if complete and all(complete.values()):
        assert fingerprints == stored_fingerprints(store)


@pytest.fixture
def fake() -> Iterator[SimulatedMetronome]:
    with SimulatedMetronome(token=TOKEN) as server:
        yield server


class Harness:
    """The poll cycle wired as the daemon wires it, with a recording ``sleep``."""

    def __init__(
        self,
        fake: SimulatedMetronome,
        db: Path,
        *,
        page_limit: int = 10,
        concurrent: bool = True,
        max_attempts: int = 3,
        plans: PlansConfig | None = None,
        poll_clock: Clock | None = None,
        **diff: Any,
    ) -> None:
        self.fake = fake
        self.db = db
        self.sleeps: list[float] = []
        self.store = Store(db)
        self.client = MetronomeClient(
            fake.url,
            TOKEN,
            page_limit=page_limit,
            sleep=self.sleeps.append,
            retry=RetryPolicy(max_attempts=max_attempts, max_delay=30.0, max_total_wait=60.0),
        )
        self.poller = Poller(
            self.store,
            self.client,
            diff=DiffConfig(**diff),
            routes=[Route("audit")],
            concurrent_listings=concurrent,
            plans=plans,
            plan_source=self.client,
            **({"clock": poll_clock} if poll_clock is not None else {}),
        )

    def poll(self) -> PollResult:
        result = self.poller.run()
        check_page_memo(self.store)
        return result

    def events(self, **kw: Any) -> list[dict[str, Any]]:
        return self.store.query_events(**kw)

    def snapshot(self) -> dict[str, Any]:
        """Everything a cycle may change, to prove a failed one changed nothing."""
        con = sqlite3.connect(self.db)
        try:
            return {
                table: con.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in ("customers", "events", "outbox", "plans", "plan_members", "plan_page_memo")
            }
        finally:
            con.close()

    def close(self) -> None:
        self.client.close()
        self.store.close()


@pytest.fixture
def harness(fake: SimulatedMetronome, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(fake, tmp_path / "watcher.db")
    yield h
    h.close()


@pytest.fixture
def seeded(fake: SimulatedMetronome, harness: Harness) -> Harness:
    """25 active and 5 archived customers (3 pages of 10 in the active listing), baseline taken."""
    for i in range(25):
        fake.create_customer(
            f"Customer {i:02d}", ingest_aliases=[f"c{i}@example.com"], custom_fields={"tier": "starter"}
        )
    for i in range(5):
        c = fake.create_customer(f"Old Customer {i}")
        fake.archive(c["id"])
    result = harness.poll()
    assert result.ok and result.baseline
    return harness
