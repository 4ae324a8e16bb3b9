"""Delivery end to end, through the command line an operator uses.

Every test runs ``metronome-watcher`` (``watcher.cli.main``) with a config file against the fake
Metronome, and real local receivers stand in for Slack and for a webhook consumer. Slack's
one-message-per-second pacing runs on a fake clock, and where the Deliverer backs off, freezegun
moves the clock forward: nothing here sleeps to wait for a back-off.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from freezegun import freeze_time
from standardwebhooks import Webhook

from tests.receivers import FakeTime, Receiver, Reply
from watcher.cli import main
from watcher.simulator import SimulatedMetronome
from watcher.sinks.slack import MAX_BLOCKS, MAX_SECTION_TEXT, set_pacing_clock

SECRET = "whsec_" + base64.b64encode(b"e2e-signing-key-for-the-webhook!").decode()
APP = "https://app.metronome.test"
_EVENT_ID = re.compile(r"event `([0-9a-f-]{36})`")


class Cli:
    """``metronome-watcher --config <file> ...`` in-process; every output is kept for leak checks."""

    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config, self.capsys = config, capsys
        self.outputs: list[str] = []

    def __call__(self, *args: str) -> str:
        code = main(["--config", str(self.config), *args])
        out, err = self.capsys.readouterr()
        self.outputs += [out, err]
        assert code == 0, f"{args}: exit {code}\n{out}\n{err}"
        return out

    def deliveries(self) -> dict[str, dict[str, Any]]:
        return {s["sink"]: s for s in orjson.loads(self("deliveries", "--format", "json"))}

    def event_ids(self) -> list[str]:
        return [orjson.loads(line)["id"] for line in self("events", "--format", "jsonl").splitlines()]


@pytest.fixture
def setup(
    tmp_path: Path,
    fake: SimulatedMetronome,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fake_time: FakeTime,
) -> Callable[..., Cli]:
    """``setup(*sink_tables)``: write a config with these ``[[sinks]]`` and return the CLI for it."""
    monkeypatch.setenv("METRONOME_BEARER_TOKEN", fake.token)
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
    # Slack's pacing (one message a second) on a fake clock: sleeping moves it, nothing waits.
    set_pacing_clock(fake_time.monotonic, fake_time.sleep)

    def make(*sinks: str) -> Cli:
        config = tmp_path / "watcher.toml"
        config.write_text(
            f'[metronome]\nbase_url = "{fake.url}"\napp_url = "{APP}"\n'
            f'[store]\npath = "{tmp_path / "watcher.db"}"\n'
            '[logging]\nlevel = "warning"\nformat = "json"\n' + "".join(f"\n[[sinks]]\n{s}\n" for s in sinks)
        )
        return Cli(config, capsys)

    return make


def slack_sink(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, extra: str = "", name: str = "slack"
) -> str:
    monkeypatch.setenv("SLACK_WEBHOOK_URL", receiver.url)
    return f'type = "slack"\nname = "{name}"\nwebhook_url = "${{SLACK_WEBHOOK_URL}}"\n{extra}'


def http_sink(receiver: Receiver, extra: str = "") -> str:
    return (
        f'type = "http"\nname = "hooks"\nurl = "{receiver.url}"\nsecret = "${{WEBHOOK_SECRET}}"\n'
        f'headers = {{ "X-Team" = "billing" }}\n{extra}'
    )


@pytest.fixture
def slack(make_receiver: Callable[..., Receiver]) -> Receiver:
    return make_receiver(Reply(200, "ok"), path="/services/T0E2E/B0E2E/s3cr3tWebhookToken")


@pytest.fixture
def hooks(make_receiver: Callable[..., Receiver]) -> Receiver:
    return make_receiver(Reply(204, b""))


def slack_event_ids(receiver: Receiver, *, ok_only: bool = True) -> list[str]:
    ids = []
    for r in receiver.requests:
        if r.ok or not ok_only:
            m = _EVENT_ID.search(r.json()["blocks"][-1]["elements"][0]["text"])
            assert m
            ids.append(m.group(1))
    return ids


def sections(message: dict[str, Any]) -> list[str]:
    return [b["text"]["text"] for b in message["blocks"] if b["type"] == "section"]


def customers(fake: SimulatedMetronome, n: int) -> list[str]:
    return [
        fake.create_customer(f"Customer {i}", custom_fields={"tier": "free"}, ingest_aliases=[f"c{i}"])["id"]
        for i in range(n)
    ]


# -- the happy path --------------------------------------------------------------------------------


def test_a_poll_delivers_its_events_to_slack_and_to_the_signed_webhook(
    setup: Callable[..., Cli], fake: SimulatedMetronome, slack: Receiver, hooks: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    cli = setup(slack_sink(slack, monkeypatch), http_sink(hooks))
    a, b, c = customers(fake, 3)
    assert "baseline recorded" in cli("poll")
    assert slack.requests == [] and hooks.requests == []  # a baseline emits nothing

    fake.set_custom_fields(a, {"tier": "enterprise"})
    fake.archive(b)
    fake.set_name(c, "Renamed & Co")
    cli("poll")

    ids = cli.event_ids()
    assert len(ids) == 3
    # The webhook: the contract, in sequence order, each signed and verified by standardwebhooks.
    bodies = [Webhook(SECRET).verify(r.body, r.headers) for r in hooks.requests]
    assert [body["id"] for body in bodies] == ids
    assert [r.headers["webhook-id"] for r in hooks.requests] == ids
    assert all(r.headers["x-team"] == "billing" for r in hooks.requests)
    assert {body["customer_id"]: body["type"] for body in bodies} == {
        a: "customer.updated",
        b: "customer.archived",
        c: "customer.updated",
    }
    # Slack: one readable message per event, linked to the customer in the Metronome app.
    assert slack_event_ids(slack) == ids
    by_customer = {body["customer_id"]: m for body, m in zip(bodies, slack.bodies(), strict=True)}
    assert f"<{APP}/customers/{a}|Customer 0>" in sections(by_customer[a])[0]
    assert "`custom_fields.tier`: `free` -&gt; `enterprise`" in sections(by_customer[a])[1]
    assert by_customer[b]["blocks"][0]["text"]["text"] == ":file_cabinet: Customer archived: Customer 1"
    assert f"<{APP}/customers/{c}|Renamed &amp; Co>" in sections(by_customer[c])[0]

    status = cli.deliveries()
    assert {n: (s["pending"], s["delivered"], s["dead"]) for n, s in status.items()} == {
        "slack": (0, 3, 0), "hooks": (0, 3, 0)
    }  # fmt: skip


# -- failures an operator must see -----------------------------------------------------------------


def test_410_disables_the_webhook_and_no_service_kills_slack_events_as_deliveries_reports(
    setup: Callable[..., Cli], fake: SimulatedMetronome, slack: Receiver, hooks: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    cli = setup(slack_sink(slack, monkeypatch), http_sink(hooks))
    a, b = customers(fake, 2)
    cli("poll")
    slack.default, hooks.default = Reply(404, "no_service"), Reply(410, b"gone")
    fake.set_name(a, "A2")
    fake.set_name(b, "B2")
    cli("poll")  # delivery trouble never fails the poll

    status = cli.deliveries()
    assert status["hooks"]["disabled"] is True and status["hooks"]["pending"] == 2
    assert "410" in status["hooks"]["last_error"]
    assert (status["slack"]["dead"], status["slack"]["pending"]) == (2, 0)
    assert "no_service" in status["slack"]["last_error"]
    assert len(hooks.requests) == 1  # disabled at the first 410
    assert len(slack.requests) == 1  # the webhook is gone: the rest died without being sent
    table = cli("deliveries")
    assert re.search(r"^hooks\s+2\s+0\s+0\s+\S+\s+disabled\s+HTTP 410", table, re.M)
    assert re.search(r"^slack\s+0\s+0\s+2\s+-\s+\S+.*no_service", table, re.M)

    # The operator fixes both receivers: enable-sink brings back the pending events, replay the dead.
    ids = cli.event_ids()
    slack.default, hooks.default = Reply(200, "ok"), Reply(204, b"")
    cli("enable-sink", "hooks")
    assert "re-queued 2" in cli("replay", "--sink", "slack")
    cli("poll")
    assert [r.headers["webhook-id"] for r in hooks.requests] == [ids[0], *ids]
    assert slack_event_ids(slack) == ids
    status = cli.deliveries()
    assert (status["hooks"]["delivered"], status["slack"]["delivered"]) == (2, 2)
    assert not status["hooks"]["disabled"]


def test_a_dead_slack_webhook_does_not_delay_the_http_sink(
    setup: Callable[..., Cli], fake: SimulatedMetronome, slack: Receiver, hooks: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    cli = setup(slack_sink(slack, monkeypatch, 'timeout = "500ms"'), http_sink(hooks))
    ids = customers(fake, 3)
    cli("poll")
    slack.default = Reply(hang=30)  # Slack accepts the connection and never answers
    for cid in ids:
        fake.set_custom_fields(cid, {"tier": "growth"})
    cli("poll")

    (stuck,) = slack.requests
    assert stuck.ended is not None  # the Slack request hung until the sink gave up on it ...
    assert len(hooks.requests) == 3 and all(r.ok for r in hooks.requests)
    # ... and every webhook arrived before Slack's request ended: none waited for Slack's time-out.
    assert all(r.arrival < stuck.ended for r in hooks.requests)
    status = cli.deliveries()
    assert (status["hooks"]["delivered"], status["hooks"]["pending"]) == (3, 0)
    assert status["slack"]["pending"] == 3 and "Timeout" in status["slack"]["last_error"]

    # Slack comes back; once its back-off has passed (the clock moves, nobody waits) it catches up.
    slack.default = Reply(200, "ok")
    with freeze_time(datetime.now(UTC) + timedelta(minutes=5), tick=True):
        cli("poll")
    assert slack_event_ids(slack) == cli.event_ids()
    assert len(hooks.requests) == 3  # nothing was sent to the webhook twice
    assert not any(slack.path in out for out in cli.outputs)  # the webhook URL is never printed or logged


# -- volume ----------------------------------------------------------------------------------------


def test_500_changes_in_one_cycle_become_a_handful_of_slack_digests_within_the_limits(
    setup: Callable[..., Cli], fake: SimulatedMetronome, slack: Receiver, monkeypatch: pytest.MonkeyPatch,
    fake_time: FakeTime,
) -> None:  # fmt: skip
    cli = setup(slack_sink(slack, monkeypatch))
    ids = fake.seed(520, archived_fraction=0.0)
    cli("poll")
    for cid in ids[:500]:
        fake.set_custom_fields(cid, {"tier": "migrated"})
    assert "500 customer.updated" in cli("poll")

    messages = slack.bodies()
    assert 2 <= len(messages) <= 6  # a handful, not 500
    covered = 0
    for message in messages:
        assert len(message["blocks"]) <= MAX_BLOCKS
        assert all(len(text) <= MAX_SECTION_TEXT for text in sections(message))
        header = message["blocks"][0]["text"]["text"]
        m = re.fullmatch(r":bar_chart: (\d+) customer changes", header)
        assert m, header
        covered += int(m.group(1))
        assert "more" in orjson.dumps(message).decode()  # the first items, then "and N more"
    assert covered == 500
    assert fake_time.sleeps == [1.0] * (len(messages) - 1)  # one message a second
    assert cli.deliveries()["slack"]["delivered"] == 500


# -- filters ---------------------------------------------------------------------------------------


def test_filters_let_through_exactly_what_they_name(
    setup: Callable[..., Cli], fake: SimulatedMetronome, slack: Receiver, hooks: Receiver, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    log_path = tmp_path / "created.jsonl"
    cli = setup(
        slack_sink(slack, monkeypatch, 'events = ["customer.archived", "customer.deleted"]'),
        http_sink(hooks, 'fields = ["custom_fields.tier"]'),
        f'type = "log"\nname = "created-log"\npath = "{log_path}"\nevents = ["customer.created"]',
    )
    archived, tier, renamed, deleted, both = customers(fake, 5)
    cli("poll")
    fake.archive(archived)
    fake.set_custom_fields(tier, {"tier": "growth"})
    fake.set_name(renamed, "Renamed")
    fake.delete(deleted)
    fake.set_custom_fields(both, {"tier": "enterprise", "region": "eu"})
    fake.set_name(both, "Both")
    new = fake.create_customer("Brand New", custom_fields={"tier": "free"})["id"]
    cli("poll")

    def seen(bodies: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return sorted((b["type"], b["customer_id"]) for b in bodies)

    assert len(cli.event_ids()) == 6  # everything is in the audit log; filters only pick for sinks
    slack_seen = [(m["blocks"][-1]["elements"][0]["text"]) for m in slack.bodies()]
    assert len(slack_seen) == 2
    assert "customer.archived" in slack_seen[0] and "customer.deleted" in slack_seen[1]
    assert seen(hooks.bodies()) == sorted([("customer.updated", tier), ("customer.updated", both)])
    logged = [orjson.loads(line) for line in log_path.read_text().splitlines()]
    assert seen(logged) == [("customer.created", new)]


# -- replay ----------------------------------------------------------------------------------------


def test_replay_redelivers_with_the_same_event_id(
    setup: Callable[..., Cli], fake: SimulatedMetronome, hooks: Receiver
) -> None:
    cli = setup(http_sink(hooks))
    a, b = customers(fake, 2)
    cli("poll")
    hooks.script(Reply(400, b'{"error": "unknown tenant"}'))
    fake.set_name(a, "A2")
    fake.set_name(b, "B2")
    cli("poll")
    first, second = cli.event_ids()
    status = cli.deliveries()["hooks"]
    assert (status["dead"], status["delivered"]) == (1, 1)
    assert "unknown tenant" in status["last_error"]

    assert "re-queued 1" in cli("replay", "--sink", "hooks")  # every dead event
    cli("poll")
    assert "re-queued 1" in cli("replay", "--sink", "hooks", "--id", second)  # a delivered one, by id
    cli("poll")

    assert [r.headers["webhook-id"] for r in hooks.requests] == [first, second, first, second]
    assert [r.json()["id"] for r in hooks.requests] == [first, second, first, second]
    for r in hooks.requests:
        Webhook(SECRET).verify(r.body, r.headers)
    status = cli.deliveries()["hooks"]
    assert (status["dead"], status["delivered"], status["pending"]) == (0, 2, 0)


@pytest.fixture(autouse=True)
def _real_pacing_afterwards() -> Iterator[None]:
    """The pacing clock is process-wide: give the next test the real one back."""
    yield
    set_pacing_clock()
