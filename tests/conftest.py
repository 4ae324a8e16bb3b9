"""Shared fixtures: a real fake Metronome on a local port and a real SQLite file per test."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from watcher.client import MetronomeClient, RetryPolicy
from watcher.config import DiffConfig
from watcher.fake_metronome import FakeMetronome
from watcher.poll import Poller, PollResult
from watcher.routing import Route
from watcher.store import Store

#: Looks like a real token so that a leak would be unmistakable in any output.
TOKEN = "mtr_test_Zq8v1SECRETtoken42xY"


def page_memo(db: Path) -> tuple[dict[bool, bool], dict[bool, list[int]]]:
    """``page_memo`` as stored (see ``store.PageMemo``): listing -> complete, and every
    fingerprint on that listing's pages, sorted."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT archived, complete, pages FROM page_memo").fetchall()
    finally:
        con.close()
    complete, fingerprints = {}, {}
    for archived, is_complete, pages in rows:
        complete[bool(archived)] = bool(is_complete)
        found: list[int] = []
        while pages:
            n = int.from_bytes(pages[16:20], "little")
            found += [
                int.from_bytes(pages[i : i + 8], "little", signed=True) for i in range(20, 20 + 8 * n, 8)
            ]
            pages = pages[20 + 8 * n :]
        fingerprints[bool(archived)] = sorted(found)
    return complete, fingerprints


def stored_fingerprints(db: Path) -> dict[bool, list[int]]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT status, hash FROM customers WHERE status != 'deleted'").fetchall()
    finally:
        con.close()
    by_listing: dict[bool, list[int]] = {False: [], True: []}
    for status, h in rows:
        by_listing[status == "archived"].append(h)
    return {archived: sorted(hashes) for archived, hashes in by_listing.items()}


def check_page_memo(db: Path) -> None:
    """The page memo may only call itself complete when it holds exactly the stored fingerprints:
    a cycle then trusts it instead of the customers table."""
    complete, fingerprints = page_memo(db)
    if complete and all(complete.values()):
        assert fingerprints == stored_fingerprints(db)


@pytest.fixture
def fake() -> Iterator[FakeMetronome]:
    with FakeMetronome(token=TOKEN) as server:
        yield server


class Harness:
    """The poll cycle wired as the daemon wires it, with a recording ``sleep``."""

    def __init__(
        self,
        fake: FakeMetronome,
        db: Path,
        *,
        page_limit: int = 10,
        concurrent: bool = True,
        max_attempts: int = 3,
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
        )

    def poll(self) -> PollResult:
        result = self.poller.run()
        check_page_memo(self.db)
        return result

    def events(self, **kw: Any) -> list[dict[str, Any]]:
        return self.store.query_events(**kw)

    def snapshot(self) -> dict[str, Any]:
        """Everything a cycle may change, to prove a failed one changed nothing."""
        con = sqlite3.connect(self.db)
        try:
            return {
                table: con.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in ("customers", "events", "outbox")
            }
        finally:
            con.close()

    def close(self) -> None:
        self.client.close()
        self.store.close()


@pytest.fixture
def harness(fake: FakeMetronome, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(fake, tmp_path / "watcher.db")
    yield h
    h.close()


@pytest.fixture
def seeded(fake: FakeMetronome, harness: Harness) -> Harness:
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


def db_bytes(db: Path) -> tuple[int, int]:
    """Bytes in the database file, and bytes of the database as a reader sees it (WAL included)."""
    with sqlite3.connect(db) as con:
        (count,) = con.execute("PRAGMA page_count").fetchone()
        (size,) = con.execute("PRAGMA page_size").fetchone()
    return db.stat().st_size, count * size
