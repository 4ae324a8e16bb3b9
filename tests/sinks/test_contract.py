"""One contract for every sink type: the delivery rules (DESIGN rule 6) hold for log, slack, http
and apprise.

Each test runs the real :class:`watcher.delivery.Deliverer` over a real :class:`watcher.store.Store`
(on each engine: a SQLite file in ``tmp_path``, a schema in PostgreSQL) whose events come from real
poll cycles, and each sink talks to a real receiver: a local HTTP server for ``slack``, ``http``
and ``apprise`` (through Apprise's ``json://``, which posts to any HTTP endpoint), a stream that
can fail like a full disk for ``log``. Time never passes by itself: the Deliverer's clock and the
Slack pacer's clock are moved by hand.

Some rules need a receiver that answers. That the *latest* error is the one reported holds for
every sink whose receiver answers (``ANSWERING``). A *permanent* refusal being dead at once, and
``Retry-After`` being honoured, hold for the sinks that can tell them (``TELLING``: ``slack`` and
``http``); Apprise answers a send with true or false only, so the ``apprise`` sink retries every
failure (``tests/sinks/test_apprise.py`` shows a refusal retried, reported and then delivered), and
a local stream can answer nothing.
"""

from __future__ import annotations

import io
import random
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
import pytest

from tests.receivers import FakeClock, FakeTime, Receiver, Reply
from watcher.config import DeliveryConfig
from watcher.delivery import Deliverer, replay
from watcher.events import Listing
from watcher.metronome import ListingPage
from watcher.poll import Poller
from watcher.routing import Route
from watcher.sinks import LogSink, Outcome, Sink
from watcher.sinks.apprise import AppriseSink
from watcher.sinks.http import HttpSink
from watcher.sinks.slack import SlackSink
from watcher.store import Store

SINK = "contract"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
N = 5
_EVENT_ID = re.compile(r"event `([0-9a-f-]{36})`")
#: The last line of an Apprise message, in Markdown or in plain text.
_APPRISE_EVENT_ID = re.compile(r"event `?([0-9a-f-]{36})")


class ProcessKilled(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way up may catch and carry on."""


# -- events from real poll cycles ------------------------------------------------------------------


class Source:
    """An in-memory Metronome for the Poller: one page of active customers."""

    def __init__(self, n: int) -> None:
        self.customers: dict[str, dict[str, Any]] = {
            f"cus-{i:03d}": {"id": f"cus-{i:03d}", "name": f"Customer {i}", "custom_fields": {"tier": "free"},
                             "archived_at": None}
            for i in range(n)
        }  # fmt: skip

    def pages(self, *, listing: Listing, sent: Any = None) -> Iterator[ListingPage]:
        yield ListingPage([] if listing else [dict(c) for c in self.customers.values()])

    def get_customer(self, customer_id: str) -> dict[str, Any] | None:
        return None


def record_events(store: Store, clock: FakeClock, n: int = N) -> list[str]:
    """A baseline, then a rename of ``n`` customers: ``n`` customer.updated events routed to SINK.
    Returns their ids in sequence order."""
    source = Source(n)
    poller = Poller(store, source, routes=[Route(SINK)], clock=clock, concurrent_listings=False)
    assert poller.run().baseline
    for c in source.customers.values():
        c["name"] += " (renamed)"
    assert poller.run().events == n
    return [e["id"] for e in store.query_events()]


# -- one rig per sink type: the sink plus its receiver -----------------------------------------


class Rig:
    kind: str
    #: Whether the sink tells a permanent refusal (dead at once) from a passing one (a retry).
    tells_permanent = True

    def new_sink(self) -> Sink:
        raise NotImplementedError

    def down(self) -> None:
        raise NotImplementedError

    def up(self) -> None:
        raise NotImplementedError

    def accepted_ids(self) -> list[str]:
        """Event ids the receiver accepted, in the order it accepted them."""
        raise NotImplementedError

    def attempts(self) -> int:
        raise NotImplementedError

    def refuse_next(self) -> None:
        raise NotImplementedError

    def throttle_next(self, seconds: int) -> None:
        raise NotImplementedError


class FlakyStream(io.StringIO):
    """A file that fails like a full disk while ``broken``."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        if self.broken:
            raise OSError(28, "No space left on device")
        return super().write(s)

    def flush(self) -> None:
        if self.broken:
            raise OSError(28, "No space left on device")


class LogRig(Rig):
    kind = "log"

    def __init__(self) -> None:
        self.stream = FlakyStream()

    def new_sink(self) -> Sink:
        return LogSink(SINK, stream=self.stream)

    def down(self) -> None:
        self.stream.broken = True

    def up(self) -> None:
        self.stream.broken = False

    def accepted_ids(self) -> list[str]:
        return [orjson.loads(line)["id"] for line in self.stream.getvalue().splitlines()]

    def attempts(self) -> int:
        return self.stream.writes


class ReceiverRig(Rig):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def down(self) -> None:
        self.receiver.stop()

    def up(self) -> None:
        self.receiver.start()

    def attempts(self) -> int:
        return len(self.receiver.requests)

    def event_id(self, body: bytes) -> str:
        raise NotImplementedError

    def attempted_ids(self) -> list[str]:
        return [self.event_id(r.body) for r in self.receiver.requests]

    def accepted_ids(self) -> list[str]:
        return [self.event_id(r.body) for r in self.receiver.requests if r.ok]


class HttpRig(ReceiverRig):
    kind = "http"

    def new_sink(self) -> Sink:
        return HttpSink(SINK, self.receiver.url, SECRET, timeout=5)

    def event_id(self, body: bytes) -> str:
        return str(orjson.loads(body)["id"])

    def refuse_next(self) -> None:
        self.receiver.script(Reply(400, b'{"error": "unknown customer"}'))

    def throttle_next(self, seconds: int) -> None:
        self.receiver.script(Reply(429, b"slow down", {"Retry-After": str(seconds)}))


class SlackRig(ReceiverRig):
    kind = "slack"

    def __init__(self, receiver: Receiver, fake_time: FakeTime) -> None:
        super().__init__(receiver)
        self.fake_time = fake_time

    def new_sink(self) -> Sink:
        # One message per event (threshold above the batch), so each event id is traceable.
        return SlackSink(SINK, self.receiver.url, digest_threshold=50, timeout=5,
                         sleep=self.fake_time.sleep, monotonic=self.fake_time.monotonic)  # fmt: skip

    def event_id(self, body: bytes) -> str:
        context = orjson.loads(body)["blocks"][-1]["elements"][0]["text"]
        m = _EVENT_ID.search(context)
        assert m, context
        return m.group(1)

    def refuse_next(self) -> None:
        self.receiver.script(Reply(400, "invalid_payload"))

    def throttle_next(self, seconds: int) -> None:
        self.receiver.script(Reply(429, "rate_limited", {"Retry-After": str(seconds)}))


class AppriseRig(ReceiverRig):
    kind = "apprise"
    tells_permanent = False

    def new_sink(self) -> Sink:
        # json:// posts {"title", "message", ...} to any HTTP endpoint; one message per event.
        return AppriseSink(SINK, "json://" + self.receiver.url.removeprefix("http://"), digest_threshold=50)

    def event_id(self, body: bytes) -> str:
        message = orjson.loads(body)["message"]
        m = _APPRISE_EVENT_ID.search(message)
        assert m, message
        return m.group(1)

    def refuse_next(self) -> None:
        self.receiver.script(Reply(400, b'{"error": "bad request"}'))

    def throttle_next(self, seconds: int) -> None:
        self.receiver.script(Reply(429, b"slow down", {"Retry-After": str(seconds)}))


@pytest.fixture
def rig(request: pytest.FixtureRequest, make_receiver: Callable[..., Receiver], fake_time: FakeTime) -> Rig:
    kind = request.param
    if kind == "log":
        return LogRig()
    if kind == "http":
        return HttpRig(make_receiver(Reply(204, b"")))
    if kind == "apprise":
        pytest.importorskip("apprise", reason="the apprise extra is not installed")
        return AppriseRig(make_receiver(Reply(200, b"ok")))
    return SlackRig(make_receiver(Reply(200, "ok"), path=f"/services/T0/B0/{uuid.uuid4().hex}"), fake_time)


ALL = pytest.mark.parametrize("rig", ["log", "slack", "http", "apprise"], indirect=True)
ANSWERING = pytest.mark.parametrize("rig", ["slack", "http", "apprise"], indirect=True)
TELLING = pytest.mark.parametrize("rig", ["slack", "http"], indirect=True)


class World:
    """A store with N pending events for the rig's sink, and a way to (re)start the process."""

    def __init__(self, path: str, rig: Rig, clock: FakeClock) -> None:
        self.path, self.rig, self.clock = path, rig, clock
        self.store = Store(path)
        self.ids = record_events(self.store, clock)
        self.deliverer = self.start()

    def start(self) -> Deliverer:
        return Deliverer(self.store, {SINK: self.rig.new_sink()}, config=DeliveryConfig(), clock=self.clock,
                         rng=random.Random(7))  # fmt: skip

    def restart(self) -> None:
        """A new process: new store handle, new sink, new Deliverer; only the database survives."""
        self.deliverer.close()
        self.store.close()
        self.store = Store(self.path)
        self.deliverer = self.start()

    def drain(self) -> Any:
        return self.deliverer.drain(SINK)

    def status(self) -> Any:
        (status,) = self.store.delivery_status(self.clock(), sinks=[SINK])
        return status

    def close(self) -> None:
        self.deliverer.close()
        self.store.close()


@pytest.fixture
def world(store_url: str, rig: Rig, clock: FakeClock) -> Iterator[World]:
    w = World(store_url, rig, clock)
    yield w
    w.close()


# -- the contract ----------------------------------------------------------------------------------


@ALL
def test_delivers_every_event_once_in_sequence_order(world: World, rig: Rig) -> None:
    report = world.drain()

    assert report.delivered == N
    assert rig.accepted_ids() == world.ids
    status = world.status()
    assert (status.pending, status.delivered, status.dead) == (0, N, 0)
    attempts = rig.attempts()
    assert world.drain().delivered == 0  # nothing is sent twice
    assert rig.attempts() == attempts


@ALL
def test_receiver_down_then_up_delivers_everything_with_the_same_ids(world: World, rig: Rig) -> None:
    rig.down()
    first = world.drain()
    assert (first.delivered, first.retried) == (0, 1)
    status = world.status()
    assert status.pending == N and status.next_attempt_at is not None and status.last_error

    attempts = rig.attempts()
    paused = world.drain()  # the sink backs off: no attempt before its next_attempt_at
    assert paused.skipped and paused.skipped.startswith("backing off")
    assert rig.attempts() == attempts

    world.clock.advance(60)
    assert world.drain().retried == 1  # still down: another failure, still nothing lost
    assert world.status().pending == N

    rig.up()
    world.clock.advance(3600)
    assert world.drain().delivered == N
    assert rig.accepted_ids() == world.ids  # all of them, once, in order, ids unchanged
    assert world.status().pending == 0


@TELLING
def test_retry_after_is_respected(world: World, rig: Rig) -> None:
    rig.throttle_next(120)
    report = world.drain()
    assert (report.delivered, report.retried) == (0, 1)
    attempts = rig.attempts()

    world.clock.advance(119)
    early = world.drain()
    assert early.skipped and early.skipped.startswith("backing off")
    assert rig.attempts() == attempts  # nothing was sent before Retry-After elapsed

    world.clock.advance(2)
    assert world.drain().delivered == N
    assert rig.accepted_ids() == world.ids


@TELLING
def test_permanent_failure_is_dead_at_once_reported_and_replayed_with_the_same_id(
    world: World, rig: Rig
) -> None:
    assert isinstance(rig, ReceiverRig)
    rig.refuse_next()
    report = world.drain()

    assert (report.dead, report.delivered) == (1, N - 1)  # a dead event does not hold up the rest
    refused_id = rig.attempted_ids()[0]
    assert refused_id == world.ids[0]
    status = world.status()
    assert (status.dead, status.pending, status.delivered) == (1, 0, N - 1)
    assert status.last_error and ("400" in status.last_error)

    assert replay(world.store, SINK, now=world.clock()) == 1
    assert world.drain().delivered == 1
    assert rig.accepted_ids()[-1] == refused_id  # the same event id, redelivered
    status = world.status()
    assert (status.dead, status.pending, status.delivered) == (0, 0, N)


class DiesMidBatch:
    """Wraps a sink: hands it the first ``after`` events of a batch, then the process dies."""

    def __init__(self, inner: Sink, after: int) -> None:
        self.inner, self.after = inner, after
        self.name, self.max_batch = inner.name, inner.max_batch

    def deliver(self, events: Sequence[Mapping[str, Any]]) -> Sequence[Outcome]:
        self.inner.deliver(events[: self.after])
        raise ProcessKilled

    def close(self) -> None:
        self.inner.close()


@contextmanager
def dies_on_first_write(store: Store) -> Iterator[None]:
    """The process dies right after the sink delivered, before the outbox row is marked."""

    @contextmanager
    def write() -> Iterator[Any]:
        raise ProcessKilled
        yield  # pragma: no cover

    original = store.write
    store.write = write  # type: ignore[method-assign]
    try:
        yield
    finally:
        store.write = original  # type: ignore[method-assign]


@ALL
@pytest.mark.parametrize("when", ["after_send_before_marking", "mid_batch"])
def test_killed_mid_delivery_redelivers_on_restart_and_skips_nothing(
    world: World, rig: Rig, when: str
) -> None:
    if when == "mid_batch":
        world.deliverer.sinks[SINK] = DiesMidBatch(world.deliverer.sinks[SINK], after=2)
        with pytest.raises(ProcessKilled):
            world.drain()
        assert rig.accepted_ids() == world.ids[:2]
    else:
        with dies_on_first_write(world.store), pytest.raises(ProcessKilled):
            world.drain()
        assert rig.accepted_ids() == world.ids  # the receiver has them all ...
    assert world.status().pending == N  # ... but none was marked delivered

    world.restart()
    assert world.drain().delivered == N

    seen = rig.accepted_ids()
    sent_before = 2 if when == "mid_batch" else N
    assert seen[sent_before:] == world.ids  # on restart every event goes out again, in order
    assert set(seen) == set(world.ids)  # at-least-once: duplicates allowed, gaps never
    assert world.status().delivered == N


@ALL
def test_gives_up_after_max_age_and_keeps_the_events_as_dead(world: World, rig: Rig) -> None:
    rig.down()
    assert world.drain().retried == 1

    world.clock.advance(71 * 3600)
    assert world.drain().dead == 0  # still inside the 72 h window: keep trying
    assert world.status().pending == N

    world.clock.advance(3600 + 1)
    report = world.drain()
    assert report.dead == N
    status = world.status()
    assert (status.pending, status.dead) == (0, N)

    rig.up()
    assert replay(world.store, SINK, now=world.clock()) == N
    assert world.drain().delivered == N
    assert rig.accepted_ids() == world.ids


@ANSWERING
def test_deliveries_reports_the_latest_error_not_an_older_one(world: World, rig: Rig) -> None:
    rig.throttle_next(1)
    rig.refuse_next()
    assert world.drain().retried == 1
    assert "429" in str(world.status().last_error)

    world.clock.advance(5)
    report = world.drain()
    assert (report.dead, report.retried) == ((1, 0) if rig.tells_permanent else (0, 1))
    last_error = str(world.status().last_error)
    assert "400" in last_error and "429" not in last_error  # the refusal, not the older throttle


class Recording:
    """Wraps a sink and records the size of every batch the engine hands it."""

    def __init__(self, inner: Sink) -> None:
        self.inner, self.name, self.max_batch = inner, inner.name, inner.max_batch
        self.batches: list[int] = []

    def deliver(self, events: Sequence[Mapping[str, Any]]) -> Sequence[Outcome]:
        self.batches.append(len(events))
        return self.inner.deliver(events)

    def close(self) -> None:
        self.inner.close()


@ALL
def test_a_round_never_exceeds_the_configured_batch_size(world: World, rig: Rig) -> None:
    world.deliverer.close()
    recording = Recording(rig.new_sink())
    config = DeliveryConfig(batch_size=2)
    world.deliverer = Deliverer(world.store, {SINK: recording}, config=config, clock=world.clock)

    assert world.drain().delivered == N
    assert recording.batches == [2, 2, 1]
    assert rig.accepted_ids() == world.ids
