"""Housekeeping (``watcher.store.prune``, ``store prune``): what the ``keep_*`` windows let go, and
everything the watcher still needs kept, on both engines, with the cycle's own rows on a fake clock."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from watcher._time import format_ts
from watcher.cli import main
from watcher.config import StoreConfig, parse_config
from watcher.errors import ConfigError
from watcher.events import DeliveryState, EventType
from watcher.notices import failure_streak, record_notice
from watcher.simulator import Fault, SimulatedMetronome
from watcher.store import Store, queries
from watcher.store.check import check_store
from watcher.store.prune import prune

from ..conftest import Harness, rows
from ..receivers import FakeClock

DAY = 86400


@pytest.fixture
def timed(fake: SimulatedMetronome, store_url: str, clock: FakeClock) -> Harness:
    """A harness whose polls are stamped by ``clock``, on an account of 5 customers."""
    fake.seed(5)
    h = Harness(fake, store_url, poll_clock=clock)
    yield h  # type: ignore[misc]
    h.close()


def change(h: Harness, clock: FakeClock, *, days: float = 1) -> int:
    """One renamed customer, polled ``days`` after the last poll; returns the event's sequence."""
    clock.advance(days * DAY)
    customer = h.fake.customers()[0]
    h.fake.set_name(customer["id"], customer["name"] + "+")
    result = h.poll()
    assert result.ok and result.events == 1
    return queries_last_sequence(h.store)


def queries_last_sequence(store: Store) -> int:
    with store.read() as conn:
        return queries.last_sequence(conn)


def outbox_row(store: Store, sequence: int) -> int:
    ((row_id,),) = rows(store, f"SELECT id FROM outbox WHERE sequence = {sequence}")
    return int(row_id)


def mark(store: Store, sequence: int, state: DeliveryState, clock: FakeClock) -> None:
    with store.write() as conn:
        queries.mark_attempt(conn, outbox_row(store, sequence), at=format_ts(clock()), state=state, error="x")


def keep(**windows: str) -> StoreConfig:
    return StoreConfig(**windows)  # type: ignore[arg-type]


def test_delivered_rows_past_keep_deliveries_go_and_pending_and_dead_rows_stay(
    timed: Harness, clock: FakeClock
) -> None:
    h = timed
    assert h.poll().baseline
    delivered, dead, pending = (change(h, clock) for _ in range(3))
    mark(h.store, delivered, DeliveryState.DELIVERED, clock)
    mark(h.store, dead, DeliveryState.DEAD, clock)
    recent = change(h, clock, days=40)
    mark(h.store, recent, DeliveryState.DELIVERED, clock)
    clock.advance(5 * DAY)

    dry = prune(h.store, keep(), now=clock(), dry_run=True)
    assert (dry.deliveries, dry.events, dry.dry_run) == (1, 0, True)
    assert len(rows(h.store, "SELECT id FROM outbox")) == 4  # a dry run deletes nothing
    report = prune(h.store, keep(), now=clock(), pause=0)

    assert (report.deliveries, report.events, report.complete) == (1, 0, True)
    left = dict(rows(h.store, "SELECT sequence, status FROM outbox"))
    assert left == {dead: "dead", pending: "pending", recent: "delivered"}
    # The audit log is kept forever by default: every event is still there.
    assert len(h.events()) == 4


def test_poll_runs_past_keep_polls_go_with_their_sources_but_not_what_status_and_notices_count(
    timed: Harness, clock: FakeClock
) -> None:
    h = timed
    for _ in range(6):  # six successes, a day apart
        assert h.poll().ok
        clock.advance(DAY)
    h.fake.add_fault(Fault(kind="status", status=500, times=100_000))
    for _ in range(100):  # then a hundred days of failures: the streak is older than the window
        assert not h.poll().ok
        clock.advance(DAY)
    before = failure_streak(h.store)
    assert before.failures == 100

    report = prune(h.store, keep(keep_polls="30d"), now=clock(), pause=0)

    # The first four successes go; the one before the last, the last and the streak after it stay.
    assert (report.polls, report.poll_sources) == (4, 4)
    assert failure_streak(h.store) == before
    assert h.store.has_baseline()
    assert rows(h.store, "SELECT count(*) FROM poll_runs") == [(102,)]
    assert rows(h.store, "SELECT count(*) FROM poll_sources") == [(102,)]


def test_old_polls_of_a_steady_daemon_go_and_the_failure_streak_is_unchanged(
    timed: Harness, clock: FakeClock
) -> None:
    h = timed
    for day in range(100):
        if day % 10 == 9:
            h.fake.add_fault(Fault(kind="status", status=500, times=100_000))
        assert h.poll().ok is not (day % 10 == 9)
        h.fake.clear_faults()
        clock.advance(DAY)
    before = failure_streak(h.store)
    cutoff = clock() - timedelta(days=30)

    report = prune(h.store, keep(keep_polls="30d"), now=clock(), pause=0)

    assert report.polls == report.poll_sources == 70
    starts = [s for (s,) in rows(h.store, "SELECT started_at FROM poll_runs")]
    assert len(starts) == 30 and min(starts) >= cutoff.isoformat().replace("+00:00", "")[:19]
    assert failure_streak(h.store) == before


def test_events_go_only_when_keep_events_says_and_never_one_still_owed_the_newest_or_a_notice(
    timed: Harness, clock: FakeClock
) -> None:
    h = timed
    assert h.poll().baseline
    gone = change(h, clock)
    mark(h.store, gone, DeliveryState.DELIVERED, clock)
    pending = change(h, clock)
    dead = change(h, clock)
    mark(h.store, dead, DeliveryState.DEAD, clock)
    delivered_late = change(h, clock)
    clock.advance(2 * DAY)
    # Routed to no sink (no outbox row): only its being the newest notice keeps it.
    notice = record_notice(h.store, EventType.POLL_FAILING, [], now=clock(), detail={"poll_id": 1})
    newest = change(h, clock)
    mark(h.store, newest, DeliveryState.DELIVERED, clock)
    clock.advance(80 * DAY)
    mark(h.store, delivered_late, DeliveryState.DELIVERED, clock)  # a replay delivered it lately
    clock.advance(5 * DAY)

    assert prune(h.store, keep(), now=clock(), pause=0).events == 0  # keep_events unset: forever
    windows = keep(keep_deliveries="30d", keep_events="30d")
    dry = prune(h.store, windows, now=clock(), dry_run=True)
    report = prune(h.store, windows, now=clock(), pause=0)

    assert report.events == dry.events == 1
    left = [e["sequence"] for e in h.events()]
    assert left == [pending, dead, delivered_late, notice["sequence"], newest]
    assert gone not in left
    # The next event follows the newest, never reusing a pruned sequence; the store checks out.
    assert change(h, clock) == newest + 1
    assert [f for f in check_store(h.store) if not f.ok] == []


def test_batches_are_short_transactions_with_a_rest_between_them_and_stop_when_asked(
    timed: Harness, clock: FakeClock
) -> None:
    h = timed
    for _ in range(25):
        assert h.poll().ok
        clock.advance(DAY)
    clock.advance(100 * DAY)
    assert h.poll().ok
    sleeps: list[float] = []

    stopped = prune(
        h.store, keep(), now=clock(), batch=10, should_stop=lambda: bool(sleeps), sleep=sleeps.append
    )
    assert (stopped.polls, stopped.complete, len(sleeps)) == (10, False, 1)

    report = prune(h.store, keep(), now=clock(), batch=10, pause=0.25, sleep=sleeps.append)
    # 14 runs left to go (the one before the last success and the last stay): 10, then 4.
    assert (report.polls, report.complete) == (14, True)
    assert report.batches == 1 + 2  # the deliveries' (none to delete), then the polls' two
    assert len(sleeps) == 2 and sleeps[-1] >= 0.25


def test_keep_windows_are_validated_naming_the_key() -> None:
    base = {"metronome": {"base_url": "https://api.metronome.com"}}
    config = parse_config(base, env={})
    assert (config.store.keep_deliveries, config.store.keep_polls, config.store.keep_events) == (
        timedelta(days=30),
        timedelta(days=90),
        None,
    )
    with pytest.raises(ConfigError, match=r"store\.keep_polls"):
        parse_config({**base, "store": {"keep_polls": "0s"}}, env={})
    with pytest.raises(ConfigError, match="keep_events must be at least keep_deliveries"):
        parse_config({**base, "store": {"keep_events": "7d"}}, env={})
    with pytest.raises(ConfigError, match=r"store\.keep_everything"):
        parse_config({**base, "store": {"keep_everything": "7d"}}, env={})


def test_store_prune_prints_what_it_deleted_and_a_dry_run_deletes_nothing(
    fake: SimulatedMetronome, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.seed(5)
    db = tmp_path / "w.db"
    harness = Harness(fake, db)
    for _ in range(3):
        assert harness.poll().ok
    harness.close()
    config = tmp_path / "w.toml"
    config.write_text(
        f'[metronome]\nbase_url = "{fake.url}"\n[store]\npath = "{db}"\nkeep_polls = "0.001s"\n'
    )

    capsys.readouterr()
    assert main(["--config", str(config), "store", "prune", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would delete: 0 delivered outbox row(s) older than 30d; 1 poll run(s)")
    assert "the audit log is kept (keep_events unset)" in out
    assert main(["--config", str(config), "store", "prune"]) == 0
    assert capsys.readouterr().out.startswith(
        "deleted: 0 delivered outbox row(s) older than 30d; 1 poll run(s)"
    )
    with Store(db) as store:
        assert [p.id for p in store.last_polls()] == [3, 2]
