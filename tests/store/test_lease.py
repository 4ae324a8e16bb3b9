"""The leader lease of replicas on one PostgreSQL store, and the fence on every commit.

Each test plays two replicas in one process: two ``Store`` objects on one database, each with its
own :class:`LeaseKeeper`. A leader that is "paused" is one whose keeper stops renewing; its lease is
expired by hand (an UPDATE of the row, as the passing of its length would), so no test sleeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from tests.conftest import TOKEN, postgres_only, rows
from tests.receivers import FakeClock, Receiver
from watcher import metrics
from watcher.config import DeliveryConfig, PlansConfig
from watcher.delivery import Deliverer
from watcher.errors import NotLeader
from watcher.metronome import MetronomeClient
from watcher.poll import Poller
from watcher.routing import Route
from watcher.simulator import SimulatedMetronome
from watcher.sinks.http import HttpSink
from watcher.store import Store, queries
from watcher.store.lease import LeaseKeeper, current

pytestmark = postgres_only

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass
class Replica:
    store: Store
    keeper: LeaseKeeper
    client: MetronomeClient

    def poller(self, *, plans: bool = False) -> Poller:
        return Poller(
            self.store,
            self.client,
            routes=[Route("hooks")],
            concurrent_listings=False,
            plans=PlansConfig(watch=plans),
            plan_source=self.client,
        )

    def close(self) -> None:
        self.client.close()
        self.store.close()


@pytest.fixture
def replicas(store_url: str, fake: SimulatedMetronome) -> Iterator[tuple[Replica, Replica]]:
    made = []
    for name in ("a", "b"):
        store = Store(store_url)
        keeper = LeaseKeeper(store, ttl=15, holder=f"replica-{name}")
        store.fence = keeper._fence_after  # as ``start()`` leaves it: writes refused until leading
        made.append(Replica(store, keeper, MetronomeClient(fake.url, TOKEN, page_limit=10)))
    yield made[0], made[1]
    for r in made:
        r.close()


def expire(store: Store) -> None:
    """The leader's lease runs out (it was paused, or cut off, for longer than the lease)."""
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE leases SET expires_at = clock_timestamp() - interval '1 second'"))


def test_one_leader_at_a_time_and_a_standby_writes_nothing(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    assert a.keeper.try_acquire() and a.keeper.epoch == 1 and a.keeper.is_leader
    assert not b.keeper.try_acquire() and not b.keeper.is_leader
    assert b.keeper.seen is not None and b.keeper.seen.holder == "replica-a"

    with a.store.write() as conn:  # the leader's writes land
        queries.set_sink_state(conn, "hooks", last_error="from the leader")
    with pytest.raises(NotLeader), b.store.write() as conn:
        queries.set_sink_state(conn, "hooks", last_error="from a standby")
    assert rows(a.store, "SELECT last_error FROM sink_state") == [("from the leader",)]

    assert a.keeper.renew_once() and a.keeper.is_leader


def test_a_lease_that_ran_out_is_taken_with_a_new_epoch_and_the_old_leader_steps_down(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    assert a.keeper.try_acquire()
    lost_before = metrics.LEASE_LOST._value.get()
    expire(a.store)

    assert b.keeper.try_acquire() and b.keeper.epoch == 2
    with capture_logs() as logs:
        assert not a.keeper.renew_once()

    assert not a.keeper.is_leader
    (lost,) = [e for e in logs if e["event"] == "ha.lease_lost"]
    assert lost["epoch"] == 1 and "replica-b at epoch 2" in lost["reason"]
    assert metrics.LEASE_LOST._value.get() == lost_before + 1
    with pytest.raises(NotLeader), a.store.write():
        pass


def test_a_clean_release_lets_a_standby_take_over_at_once(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    assert a.keeper.try_acquire()
    a.keeper.release()
    assert b.keeper.try_acquire() and b.keeper.epoch == 2
    with b.store.engine.connect() as conn:
        state = current(conn)
    assert state is not None and state.holder == "replica-b" and state.valid


def test_a_paused_leader_commits_nothing_of_its_cycle_and_the_new_leader_reports_the_change_once(
    replicas: tuple[Replica, Replica], fake: SimulatedMetronome
) -> None:
    a, b = replicas
    for i in range(25):  # three pages of active customers
        fake.create_customer(f"Customer {i}")
    assert a.keeper.try_acquire()
    assert a.poller().run().baseline
    cid = fake.customers(archived=False)[0]["id"]
    fake.set_name(cid, "Renamed While A Slept")
    before = rows(a.store, "SELECT count(*) FROM events"), rows(a.store, "SELECT * FROM customers ORDER BY 1")

    def take_over(_: SimulatedMetronome) -> None:
        # A is "paused" in the middle of its scan: its lease runs out and B takes it.
        expire(b.store)
        assert b.keeper.try_acquire()

    fake.on_page(3, take_over, archived=False)
    result = a.poller().run()

    assert result.outcome == "abandoned" and "lease of epoch 1 is lost" in (result.error or "")
    assert (
        rows(a.store, "SELECT count(*) FROM events"),
        rows(a.store, "SELECT * FROM customers ORDER BY 1"),
    ) == before

    assert b.poller().run().events == 1
    (event,) = b.store.query_events()
    assert event["customer_id"] == cid and event["sequence"] == 1
    # A's run, if it was recorded before the take-over, is marked abandoned by B's; none is running.
    outcomes = [o for (o,) in rows(b.store, "SELECT outcome FROM poll_runs ORDER BY id")]
    assert outcomes[0] == outcomes[-1] == "succeeded" and set(outcomes[1:-1]) <= {"abandoned"}


def test_a_paused_leader_commits_nothing_of_its_plans_read_and_the_new_leader_reports_it_once(
    replicas: tuple[Replica, Replica], fake: SimulatedMetronome
) -> None:
    a, b = replicas
    plan = fake.create_plan("Growth")["id"]
    members = [fake.add_to_plan(fake.create_customer(f"Customer {i}")["id"], plan) for i in range(25)]
    assert a.keeper.try_acquire()
    first = a.poller(plans=True).run()
    assert first.ok and first.plans is not None and first.plans.memberships == 25
    cpid = members[0]["plan_details"]["customer_plan_id"]
    fake.set_plan_end(cpid, "2027-01-01T00:00:00Z")
    plan_tables = ("plans", "plan_members", "plan_page_memo")
    before = {t: rows(a.store, f"SELECT * FROM {t} ORDER BY 1") for t in (*plan_tables, "events")}

    def take_over(_: SimulatedMetronome) -> None:
        # A is "paused" in the middle of its plans read: its lease runs out and B takes it.
        expire(b.store)
        assert b.keeper.try_acquire()

    fake.on_page(3, take_over, path=f"/v1/planDetails/{plan}/customers")
    with capture_logs() as logs:
        result = a.poller(plans=True).run()

    assert result.outcome == "abandoned" and "lease of epoch 1 is lost" in (result.error or "")
    assert {t: rows(a.store, f"SELECT * FROM {t} ORDER BY 1") for t in before} == before
    assert [e for e in logs if e["event"] == "poll.not_leader"]
    assert not [e for e in logs if e["event"] == "poll.source_failed"], "nothing recorded as A's failure"

    second = b.poller(plans=True).run()
    assert second.ok and second.events_by_type == {"customer.plan_updated": 1}
    (event,) = b.store.query_events()
    assert event["plan"]["customer_plan_id"] == cpid and event["sequence"] == 1
    outcomes = [o for (o,) in rows(b.store, "SELECT outcome FROM poll_runs ORDER BY id")]
    assert outcomes[0] == outcomes[-1] == "succeeded" and set(outcomes[1:-1]) <= {"abandoned"}


def test_a_delivery_by_a_leader_that_lost_the_lease_is_not_marked_and_goes_out_again_with_its_id(
    replicas: tuple[Replica, Replica], fake: SimulatedMetronome, receiver: Receiver
) -> None:
    a, b = replicas
    fake.seed(12)
    assert a.keeper.try_acquire()
    assert a.poller().run().baseline
    fake.set_name(fake.customers(archived=False)[3]["id"], "Delivered Twice")
    assert a.poller().run().events == 1

    def take_over(_: object) -> None:
        # The request is in flight when A is cut off and B takes over.
        expire(b.store)
        assert b.keeper.try_acquire()

    receiver.on_request = lambda r: take_over(r)
    clock = FakeClock()
    sink = {"hooks": HttpSink("hooks", receiver.url, SECRET, timeout=5)}
    report = Deliverer(a.store, sink, config=DeliveryConfig(), clock=clock).drain("hooks")
    receiver.on_request = None

    assert report.delivered == 0 and any("lease" in e for e in report.errors)
    (status,) = b.store.delivery_status(clock(), sinks=["hooks"])
    assert status.pending == 1  # A's mark did not land

    assert Deliverer(b.store, sink, config=DeliveryConfig(), clock=clock).drain("hooks").delivered == 1
    ids = [r.json()["id"] for r in receiver.requests]
    assert len(ids) == 2 and ids[0] == ids[1]  # the one in flight, sent again with the same id
