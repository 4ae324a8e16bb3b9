"""Crash tests of our own (issue 16): real processes SIGKILLed at random moments, many times, one seed.

1. ``metronome-watcher poll`` is killed ``POLL_KILLS`` times, each time after a round of known
   changes on the simulated Metronome (the truth: the list of changes applied). One poll without a
   kill first measures the cycle's phases (``PHASES``); the kills then take turns aiming at the
   scan, the commit before its transaction (the lookups, the diff), the transaction itself (``CHANGES``
   changed customers make it long enough to hit) and the delivery, each at a moment drawn from a
   seeded ``random.Random`` over the phase's length. Where each kill really landed is read from what
   the process did (the pages it asked for, SQLite's write lock held or not the moment before the
   kill, its poll run's row, the receiver's requests), and the summary says how many landed in each
   phase. After each kill the database passes ``PRAGMA integrity_check``, and the next poll, run to
   completion, brings the audit log to exactly one event per change applied, of the right type: none
   lost, none twice, none invented, and the stored customers to the simulator's.
2. ``metronome-watcher run`` is killed ``DELIVERY_KILLS`` times during its delivery rounds (a slow
   receiver, failing for a while every third round) and restarted each time, then left running
   until everything is delivered.

Delivery is at-least-once: the receiver may get an event again (the kill came between sending a
batch and recording it), always with the same id and a body identical to every other copy and to
the audit log's event; every event of the audit log reaches it with its original id. A request cut
short by the kill (its body shorter than its ``Content-Length``) is not a delivery. SQLite only:
the replicas' kill test (``test_ha.py``) kills a leader mid-poll and mid-delivery on PostgreSQL.
"""

from __future__ import annotations

import fcntl
import math
import os
import random
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.receivers import Received, Receiver, Reply
from tests.test_daemon import DaemonProcess, base_env, wait_until
from watcher._time import utcnow
from watcher.app import build_app
from watcher.config import load_config
from watcher.simulator import SimulatedMetronome
from watcher.store import Store

pytestmark = pytest.mark.slow

SEED = 16
POLL_KILLS = 25
DELIVERY_KILLS = 12
CUSTOMERS = 1200
#: Customers changed in each round of the poll kills: enough for a commit that kills can land in.
CHANGES = 240
#: Customers changed in each round of the delivery kills.
DELIVERY_CHANGES = 40
#: Seconds the simulator takes over each answer in the poll kills, as a real API would.
LATENCY = 0.02
#: The API client's page size (``MetronomeClient``'s default).
PAGE = 100
SECRET = "whsec_Y3Jhc2gtdGVzdHMtc2VjcmV0LTAxMjM0NQ"
#: Where a kill can land: before the first page; reading the listings; from the last page's request
#: to the commit's write transaction (the lookups of vanished customers, the diff); inside that
#: transaction (the poll holds the database's write lock); after the commit, delivering.
PHASES = ("start-up", "scan", "commit", "transaction", "delivery")
EPOCH = datetime(2026, 12, 2, tzinfo=UTC)

#: ``struct flock`` (type, whence, start, length, pid), and where SQLite's WAL write lock is.
_FLOCK = "hhqqi4x"
_WAL_WRITE_LOCK = 120

Change = tuple[str, str]  # (event type, customer id)


def config_text(fake: SimulatedMetronome, db: Path, hook: str) -> str:
    return f"""
[metronome]
base_url = "{fake.url}"
max_attempts = 2
max_retry_wait = "1s"

[store]
path = "{db}"

[schedule]
interval = "1s"
delivery_interval = "1s"

[delivery]
first_backoff = "1s"
max_backoff = "2s"

[logging]
level = "info"
format = "json"

[[sinks]]
type = "http"
name = "hooks"
url = "{hook}"
secret = "${{CRASH_HOOK_SECRET}}"
timeout = "5s"
"""


class Truth:
    """Known changes applied to the simulator between polls, and the events they must produce."""

    def __init__(self, fake: SimulatedMetronome, rng: random.Random) -> None:
        self.fake = fake
        self.rng = rng
        self.expected: list[Change] = []
        self.touched: set[str] = set()
        self.stamps = 0
        self.events: list[dict[str, Any]] = []

    def apply(self, n: int, *, fresh: bool = False) -> list[Change]:
        """``n`` changes, each on a customer of its own (``fresh``: one never changed before): creates,
        field edits, archives, unarchives, a few deletes, and ``updated_at``-only noise (no event)."""
        fake, rng = self.fake, self.rng
        spent = self.touched if fresh else set()
        active = [c["id"] for c in fake.customers(archived=False) if c["id"] not in spent]
        archived = [c["id"] for c in fake.customers(archived=True) if c["id"] not in spent]
        n_unarchive = min(len(archived) // 2, n // 20)
        n_delete = min(2, len(archived) - n_unarchive)
        n_create = n // 6
        picked = rng.sample(active, n - n_unarchive - n_delete - n_create)
        gone = rng.sample(archived, n_unarchive + n_delete)
        changes: list[Change] = []
        for cid in gone[:n_unarchive]:
            fake.unarchive(cid)
            changes.append(("customer.unarchived", cid))
        for cid in gone[n_unarchive:]:
            fake.delete(cid)
            changes.append(("customer.deleted", cid))
        for i in range(n_create):
            cid = fake.create_customer(f"New {len(self.expected)}-{i}", custom_fields={"tier": "trial"})["id"]
            changes.append(("customer.created", cid))
        for cid in picked:
            kind = rng.choices(
                ("archive", "rename", "tier", "salesforce", "billable", "touch"), (3, 3, 3, 2, 2, 2)
            )[0]
            if kind == "archive":
                fake.archive(cid)
                changes.append(("customer.archived", cid))
                continue
            if kind == "touch":
                fake.touch(cid)  # noise: refreshed in the store, never an event
            elif kind == "rename":
                fake.set_name(cid, f"Renamed {rng.getrandbits(32):08x}")
            elif kind == "tier":
                fake.set_custom_fields(cid, {"tier": f"tier-{rng.getrandbits(24):06x}"})
            elif kind == "salesforce":
                fake.update_config(cid, salesforce_account_id=f"0015500001{rng.getrandbits(32):08X}")
            else:
                # A new effective_at each time, so that setting the same value again is still a change.
                self.stamps += 1
                effective_at = (EPOCH + timedelta(seconds=self.stamps)).strftime("%Y-%m-%dT%H:%M:%SZ")
                fake.set_billable_status(cid, rng.choice(("billable", "unbillable")), effective_at)
            if kind != "touch":
                changes.append(("customer.updated", cid))
            self.touched.add(cid)
        self.touched.update(cid for _, cid in changes)
        self.expected.extend(changes)
        return changes

    def check(self, db: Path, *, whole: bool = False) -> list[dict[str, Any]]:
        """The audit log is exactly the changes applied: none lost, none twice, none invented. It is
        read from where the last check ended (``whole``: read all of it again, to compare)."""
        with Store(db) as store:
            last = self.events[-1]["sequence"] if self.events else None
            self.events += store.query_events(after_sequence=last)
            if whole:
                assert store.query_events() == self.events
            counts = store.customer_counts()
        events = self.events
        got = Counter((e["type"], e["customer_id"]) for e in events)
        want = Counter(self.expected)
        lost, extra = sorted((want - got).elements()), sorted((got - want).elements())
        assert got == want, f"lost: {lost[:5]}, twice or invented: {extra[:5]}"
        sequences = [e["sequence"] for e in events]
        assert sequences == sorted(set(sequences)), "sequences are not strictly increasing"
        assert len({e["id"] for e in events}) == len(events), "two events share an id"
        # The state too: each listing's customers, as many as the simulator has.
        assert counts.get("active") == len(self.fake.customers(archived=False)), counts
        assert counts.get("archived") == len(self.fake.customers(archived=True)), counts
        return events


def integrity(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return str(con.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        con.close()


def writing(db: Path) -> bool:
    """Whether another process holds the database's write lock, so is inside a write transaction.

    SQLite's WAL write lock is a POSIX lock on byte 120 of the ``-shm`` file; ``F_GETLK`` asks
    about it without taking it, so the poll is never held up. (Closing the file drops this
    process's own locks on it: call it only while this process has the database closed.)
    """
    try:
        fd = os.open(f"{db}-shm", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _WAL_WRITE_LOCK, 1, 0)
        return bool(struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0] != fcntl.F_UNLCK)
    finally:
        os.close(fd)


def exited(daemon: DaemonProcess) -> Callable[[], bool]:
    return lambda: daemon.proc.poll() is not None


def succeeded_polls(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT count(*) FROM poll_runs WHERE outcome = 'succeeded'").fetchone()[0])
    finally:
        con.close()


def complete(receiver: Receiver) -> list[Received]:
    """The requests that arrived whole: a sender killed while writing one leaves it short of its
    ``Content-Length``, which an HTTP server refuses (the receiver here records it anyway)."""
    return [r for r in receiver.requests if len(r.body) == int(r.headers.get("content-length", -1))]


def delivered_as_recorded(receiver: Receiver, events: list[dict[str, Any]]) -> Counter[str]:
    """Every event reached the receiver with its original id, and every copy of one id is the same
    body, the audit log's event; returns how many times each id was sent."""
    requests = complete(receiver)
    bodies: dict[str, set[bytes]] = {}
    for r in requests:
        bodies.setdefault(r.headers.get("webhook-id", ""), set()).add(r.body)
    accepted = {r.headers.get("webhook-id") for r in requests if r.ok}
    missing = [e["id"] for e in events if e["id"] not in accepted]
    assert not missing, f"{len(missing)} of {len(events)} events never reached the receiver: {missing[:3]}"
    by_id = {e["id"]: e for e in events}
    for event_id, seen in bodies.items():
        assert event_id in by_id, f"the receiver got an event the audit log does not hold: {event_id}"
        assert len(seen) == 1, f"event {event_id} was sent with {len(seen)} different bodies"
        assert orjson.loads(next(iter(seen))) == by_id[event_id]
    return Counter(r.headers.get("webhook-id", "") for r in requests)


class PollProcess:
    """One ``poll`` subprocess, with the moments it reached each phase as this process saw them
    (the first page requested, the last page of both listings requested, the first delivery
    received), killed ``kill[1]`` seconds after it reached phase ``kill[0]``, if given; for the
    delivery, after the receiver got its ``kill[2]``-th request."""

    def __init__(
        self,
        config: Path,
        db: Path,
        env: dict[str, str],
        fake: SimulatedMetronome,
        receiver: Receiver,
        kill: tuple[str, float, int] | None = None,
    ) -> None:
        self.marks: dict[str, float] = {}
        self.killed_at = math.inf
        #: Whether the poll held the write lock the moment before it was killed.
        self.writing = False
        self.held_until = math.nan
        self.db = db
        self._kill = kill
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch_write_lock, daemon=True)
        last = {
            archived: max(1, math.ceil(len(fake.customers(archived=archived)) / PAGE))
            for archived in (False, True)
        }
        listed = []

        def last_page(_: SimulatedMetronome) -> None:
            with self._lock:
                listed.append(1)
                done = len(listed) == 2
            if done:
                self._mark("commit")
                self._watcher.start()

        requests = []

        def received(_: Received) -> Reply | None:
            requests.append(1)
            self._mark("delivery", nth=len(requests))
            return None

        fake.on_page(1, lambda _: self._mark("scan"))
        for archived, page in last.items():
            fake.on_page(page, last_page, archived=archived)
        receiver.on_request = received
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "--config", str(config), "poll"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _mark(self, phase: str, nth: int = 1) -> None:
        with self._lock:
            first = phase not in self.marks
            self.marks.setdefault(phase, time.monotonic() - self.t0)
        if phase == "delivery":
            first = True  # each request counts (``nth``)
        if first and self._kill is not None and self._kill[0] == phase and self._kill[2] == nth:
            timer = threading.Timer(self._kill[1], self._sigkill)
            timer.daemon = True
            timer.start()

    def _watch_write_lock(self) -> None:
        """From the last page's request to the first delivery: when the poll holds the write lock
        (its one transaction), as first and last seen."""
        while "delivery" not in self.marks and self.proc.poll() is None:
            if writing(self.db):
                self._mark("transaction")
                self.held_until = time.monotonic() - self.t0
            time.sleep(0.0005)

    def _sigkill(self) -> None:
        if self.proc.poll() is None and self.killed_at == math.inf:
            self.writing = writing(self.db)
            self.killed_at = time.monotonic() - self.t0
            self.proc.send_signal(signal.SIGKILL)

    def wait(self) -> int:
        rc = self.proc.wait(timeout=60)
        self.exited_at = time.monotonic() - self.t0
        if self._watcher.ident is not None:
            self._watcher.join()  # it must be done with the -shm file before this process opens the database
        return rc

    def landed(self, committed: bool) -> str:
        """The phase the kill landed in: ``committed`` says whether the poll's commit had landed."""
        if self.proc.returncode != -signal.SIGKILL:
            return "after exit"
        if committed:
            return "delivery"
        reached = [p for p in ("scan", "commit") if self.marks.get(p, math.inf) < self.killed_at]
        phase = reached[-1] if reached else "start-up"
        return "transaction" if phase == "commit" and self.writing else phase


@pytest.fixture
def hooks(make_receiver: Callable[..., Receiver]) -> Receiver:
    return make_receiver(Reply(204, b""))


@pytest.fixture
def env(fake: SimulatedMetronome) -> dict[str, str]:
    return {**base_env(CRASH_HOOK_SECRET=SECRET), "METRONOME_BEARER_TOKEN": fake.token}


def poll_to_completion(config: Path, env: dict[str, str]) -> None:
    """One poll and its deliveries, as ``poll`` runs them, in this process (it saves a start-up)."""
    app = build_app(load_config(config, env=env), env["METRONOME_BEARER_TOKEN"])
    try:
        result = app.poller.run()
        app.deliverer.deliver_due()
    finally:
        app.close()
    assert result.ok, result.error


def run_poll(config: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "watcher", "--config", str(config), "poll"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.timeout(400)
def test_polls_killed_at_random_moments_lose_nothing_report_nothing_twice_and_invent_nothing(
    fake: SimulatedMetronome, hooks: Receiver, env: dict[str, str], tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    fake.seed(CUSTOMERS, archived_fraction=0.1, rng=random.Random(SEED))
    fake.latency = LATENCY  # a scan long enough to be killed in
    db = tmp_path / "watcher.db"
    config = tmp_path / "watcher.toml"
    config.write_text(config_text(fake, db, hooks.url))
    run_poll(config, env)  # the baseline
    truth = Truth(fake, rng)

    # Calibration: one round polled without a kill, to see how long each phase takes here.
    truth.apply(CHANGES)
    calibration = PollProcess(config, db, env, fake, hooks)
    assert calibration.wait() == 0
    marks = calibration.marks
    assert set(marks) == {"scan", "commit", "transaction", "delivery"}, marks
    # A kill aimed at a phase comes at a moment drawn over the phase's length (as the calibration
    # measured it) from the moment the phase begins; one aimed at the delivery, after a random one
    # of the round's requests and before the next (the delivery's length varies with the load:
    # a kill drawn over all of it could come after the end).
    windows = {
        "scan": marks["commit"] - marks["scan"],
        "commit": marks["transaction"] - marks["commit"],
        "transaction": calibration.held_until - marks["transaction"],
        "delivery": (calibration.exited_at - marks["delivery"]) / len(hooks.requests),
    }
    truth.check(db)

    landed: Counter[str] = Counter()
    aimed: Counter[tuple[str, str]] = Counter()  # (aimed at, landed in)
    for i in range(POLL_KILLS):
        changes = truth.apply(CHANGES)
        polls_before = succeeded_polls(db)
        target = PHASES[1 + i % 4]
        nth = rng.randrange(1, len(changes)) if target == "delivery" else 1
        # Into the transaction's first three quarters: a kill drawn close to its end would often
        # come after the commit on a slower run.
        spread = 0.75 if target == "transaction" else 1.0
        delay = rng.uniform(0.0, spread * windows[target])
        run = PollProcess(config, db, env, fake, hooks, kill=(target, delay, nth))
        run.wait()
        fake.clear_faults()  # the page hooks a killed scan never reached
        hooks.on_request = None
        phase = run.landed(committed=succeeded_polls(db) > polls_before)
        landed[phase] += 1
        aimed[target, phase] += 1
        assert integrity(db) == "ok", f"kill {i}: the database is damaged after a kill"
        poll_to_completion(config, env)  # the next poll
        assert integrity(db) == "ok"
        truth.check(db)

    events = truth.check(db, whole=True)
    sent = delivered_as_recorded(hooks, events)
    again = sum(1 for n in sent.values() if n > 1)
    summary = ", ".join(f"{landed[p]} in {p}" for p in (*PHASES, "after exit"))
    summary += f"; {again} of {len(events)} ids sent more than once; aimed -> landed: "
    summary += ", ".join(f"{a} -> {p} {n}" for (a, p), n in sorted(aimed.items()))
    phases = ", ".join(f"{p} {1000 * s:.0f} ms" for p, s in windows.items() if p != "delivery")
    print(
        f"\npoll kills: {summary}; calibration: {phases}, delivery {1000 * windows['delivery']:.1f} ms/event"
    )
    assert landed["after exit"] == 0 and all(landed[p] >= 3 for p in PHASES[1:]), summary
    assert again >= 1, summary  # the kills during delivery made events go out again


@pytest.mark.timeout(300)
def test_a_daemon_killed_during_delivery_rounds_delivers_every_event_with_its_original_id(
    fake: SimulatedMetronome, hooks: Receiver, env: dict[str, str], tmp_path: Path
) -> None:
    rng = random.Random(SEED + 1)
    fake.seed(CUSTOMERS // 2, archived_fraction=0.1, rng=random.Random(SEED + 1))
    db = tmp_path / "watcher.db"
    config = tmp_path / "watcher.toml"
    config.write_text(config_text(fake, db, hooks.url))
    run_poll(config, env)  # the baseline
    truth = Truth(fake, rng)
    argv = [sys.executable, "-m", "watcher", "run", "--config", str(config)]
    daemons: list[DaemonProcess] = []

    def start() -> DaemonProcess:
        daemons.append(DaemonProcess(argv, env=env, cwd=tmp_path))
        return daemons[-1]

    # A slow receiver, so that a round is in flight for a second or more.
    hooks.default = Reply(204, b"", hang=0.03)
    killed: list[int] = []

    def kill_at(
        daemon: DaemonProcess, nth: int, delay: float, failing: int
    ) -> Callable[[Received], Reply | None]:
        """The receiver's behaviour for one round: it fails the first ``failing`` requests, and the
        daemon is killed ``delay`` seconds after the ``nth``."""
        seen: list[Received] = []

        def kill() -> None:
            daemon.proc.kill()
            killed.append(nth)

        def on_request(r: Received) -> Reply | None:
            seen.append(r)
            if len(seen) == nth and not delay:  # now, while the receiver holds the request
                kill()
            elif len(seen) == nth:
                timer = threading.Timer(delay, kill)
                timer.daemon = True
                timer.start()
            return Reply(503, b"down for a while") if len(seen) <= failing else None

        return on_request

    try:
        for i in range(DELIVERY_KILLS):
            # On customers no earlier round changed; its events are sent at least once, so the
            # receiver gets at least as many requests.
            changes = truth.apply(DELIVERY_CHANGES, fresh=True)
            failing = 2 if i % 3 == 1 else 0  # every third round, the receiver fails for a while
            # Every other kill comes while the receiver holds a request; the others at a moment
            # drawn over the next 45 ms, about the time one request takes.
            delay = rng.uniform(0.0, 0.045) if i % 2 else 0.0
            hooks.on_request = kill_at(daemon := start(), rng.randrange(1, len(changes)), delay, failing)
            wait_until(exited(daemon), f"kill {i}", timeout=60, context=daemon.tail)
            hooks.on_request = None
            assert daemon.proc.returncode == -signal.SIGKILL, daemon.tail()
            assert integrity(db) == "ok", f"kill {i}: the database is damaged after a kill"

        # The last restart runs until everything is delivered, then stops cleanly.
        daemon = start()

        def all_delivered() -> bool:
            with Store(db) as store:
                (status,) = store.delivery_status(utcnow(), sinks=["hooks"])
                done = status.pending == 0 and status.dead == 0
                return done and len(store.query_events()) == len(truth.expected)

        wait_until(all_delivered, "every event to be delivered", timeout=120, context=daemon.tail)
        assert daemon.terminate()[0] == 0
    finally:
        for d in daemons:
            d.kill()
    assert len(killed) == DELIVERY_KILLS
    assert integrity(db) == "ok"
    events = truth.check(db, whole=True)
    sent = delivered_as_recorded(hooks, events)
    in_flight = sum(1 for r in hooks.requests if r.status == 0)
    torn = len(hooks.requests) - len(complete(hooks))
    again = sum(1 for n in sent.values() if n > 1)
    summary = (
        f"{len(killed)} kills, {in_flight} with a request in flight ({torn} of them cut short); "
        f"{again} of {len(events)} ids sent more than once"
    )
    print(f"\ndelivery kills: {summary}")
    assert in_flight >= DELIVERY_KILLS // 2, summary
