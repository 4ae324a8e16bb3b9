"""The ``slack`` sink against a real local stand-in for a Slack Incoming Webhook: message shape,
digests within Slack's limits, pacing, and what each of Slack's answers means."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.receivers import FakeTime, Receiver, Reply
from watcher.app import build_app
from watcher.config import parse_config
from watcher.sinks import Outcome
from watcher.sinks.slack import MAX_BLOCKS, MAX_SECTION_TEXT, SlackSink, build_digest

APP = "https://metronome.example.test"


def customer_event(
    seq: int = 1,
    etype: str = "customer.updated",
    *,
    name: str = "Acme & Co",
    changes: Any = None,
) -> dict[str, Any]:
    cid = f"cus-{seq:04d}"
    customer = {"id": cid, "external_id": f"acme-{seq}", "name": name, "custom_fields": {"tier": "growth"}}
    if changes is None:
        changes = [{"field": "custom_fields.tier", "before": "free", "after": "growth"}]
    return {
        "id": str(uuid.uuid4()), "type": etype, "sequence": seq, "detected_at": "2026-01-05T09:00:00.000000Z",
        "poll_id": 2, "customer_id": cid, "customer": customer, "previous": customer, "changes": changes,
    }  # fmt: skip


def notice(etype: str, detail: dict[str, Any], seq: int = 1) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()), "type": etype, "sequence": seq, "detected_at": "2026-01-05T09:00:00.000000Z",
        "poll_id": None, "customer_id": None, "customer": None, "previous": None, "changes": [],
        "detail": detail,
    }  # fmt: skip


@pytest.fixture
def slack(make_receiver: Callable[..., Receiver]) -> Receiver:
    # A unique path per test: the pacer is per webhook URL, and ports get reused between tests.
    return make_receiver(Reply(200, "ok"), path=f"/services/T0/B0/{uuid.uuid4().hex}")


@pytest.fixture
def make_sink(slack: Receiver, fake_time: FakeTime) -> Iterator[Callable[..., SlackSink]]:
    made: list[SlackSink] = []

    def make(**kw: Any) -> SlackSink:
        kw.setdefault("app_url", APP)
        kw.setdefault("sleep", fake_time.sleep)
        kw.setdefault("monotonic", fake_time.monotonic)
        sink = SlackSink("alerts", kw.pop("url", slack.url), **kw)
        made.append(sink)
        return sink

    yield make
    for s in made:
        s.close()


def sections(message: dict[str, Any]) -> list[str]:
    return [b["text"]["text"] for b in message["blocks"] if b["type"] == "section"]


def all_text(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


def assert_within_slack_limits(message: dict[str, Any]) -> None:
    assert message["text"]  # the plain fallback, for notifications and old clients
    assert 0 < len(message["blocks"]) <= MAX_BLOCKS
    for text in sections(message):
        assert 0 < len(text) <= MAX_SECTION_TEXT
    for block in message["blocks"]:
        if block["type"] == "header":
            assert len(block["text"]["text"]) <= 150


# -- one message per event -------------------------------------------------------------------------


def test_a_small_round_is_one_readable_message_per_event(
    slack: Receiver, make_sink: Callable[..., SlackSink]
) -> None:
    updated = customer_event(1)
    archived = customer_event(2, "customer.archived", changes=[
        {"field": "archived_at", "before": None, "after": "2026-01-05T08:59:00.000Z"}])  # fmt: skip

    assert make_sink(digest_threshold=5).deliver([updated, archived]) == [Outcome.ok()] * 2

    first, second = slack.bodies()
    assert_within_slack_limits(first)
    header = first["blocks"][0]
    assert header["type"] == "header" and header["text"]["text"] == ":pencil2: Customer updated: Acme & Co"
    who = sections(first)[0]
    assert f"<{APP}/customers/cus-0001|Acme &amp; Co>" in who  # the name, linked to the Metronome app
    assert "`cus-0001`" in who  # and the id
    assert "• `custom_fields.tier`: `free` -&gt; `growth`" in sections(first)[1]  # field: before -> after
    assert updated["id"] in first["blocks"][-1]["elements"][0]["text"]  # the event id, for replay --id
    assert (
        first["text"] == "Customer updated: Acme &amp; Co (cus-0001): custom_fields.tier: free -&gt; growth"
    )

    assert second["blocks"][0]["text"]["text"].startswith(":file_cabinet: Customer archived")
    assert "`archived_at`: _none_ -&gt; `2026-01-05T08:59:00.000Z`" in sections(second)[1]


def test_a_changed_list_says_which_items_were_added_and_removed(
    slack: Receiver, make_sink: Callable[..., SlackSink]
) -> None:
    long = "billing-department-of-a-very-long-company-name@example.com"
    aliases = customer_event(1, changes=[
        {"field": "ingest_aliases", "before": [long, "old@acme.example.com"],
         "after": [long, "new@acme.example.com", "more@acme.example.com"]}])  # fmt: skip

    assert make_sink().deliver([aliases]) == [Outcome.ok()]

    (message,) = slack.bodies()
    assert (
        "• `ingest_aliases`: added `new@acme.example.com`, `more@acme.example.com`; "
        "removed `old@acme.example.com`"
    ) in sections(message)[1]
    assert long not in all_text(message)  # unchanged items are not repeated
    assert message["text"].endswith(
        "ingest_aliases: added new@acme.example.com, more@acme.example.com; removed old@acme.example.com"
    )


@pytest.mark.parametrize(
    ("etype", "header", "says"),
    [
        ("customer.created", ":new: New customer", "`tier`: `growth`"),
        ("customer.deleted", ":wastebasket: Customer deleted", "No longer in Metronome"),
        ("customer.unarchived", ":recycle: Customer unarchived", "`archived_at`"),
    ],
)
def test_every_event_type_says_what_happened(
    slack: Receiver, make_sink: Callable[..., SlackSink], etype: str, header: str, says: str
) -> None:
    changes = (
        [{"field": "archived_at", "before": "2026-01-01T00:00:00Z", "after": None}]
        if etype == "customer.unarchived"
        else []
    )
    make_sink().deliver([customer_event(1, etype, changes=changes)])
    (message,) = slack.bodies()
    assert message["blocks"][0]["text"]["text"].startswith(header)
    assert says in all_text(message)


def test_customer_data_is_escaped_for_mrkdwn_and_long_values_are_cut(
    slack: Receiver, make_sink: Callable[..., SlackSink]
) -> None:
    ev = customer_event(1, name="<!channel> & <@U0123>", changes=[
        {"field": "custom_fields.notes", "before": "x" * 10_000, "after": "`rm -rf` <b>"}])  # fmt: skip
    make_sink().deliver([ev])

    (message,) = slack.bodies()
    assert_within_slack_limits(message)
    mrkdwn = "\n".join(sections(message)) + message["text"]
    assert "<!channel>" not in mrkdwn and "<@U0123>" not in mrkdwn  # no one gets pinged by a name
    assert "&lt;!channel&gt; &amp; &lt;@U0123&gt;" in mrkdwn
    assert "`'rm -rf' &lt;b&gt;`" in mrkdwn  # a backtick cannot break out of the code span
    assert max(len(line) for line in sections(message)[1].splitlines()) < 500
    assert "…" in sections(message)[1]


# -- plan events -----------------------------------------------------------------------------------


def plan_event(seq: int, etype: str, changes: list[dict[str, Any]], **plan: Any) -> dict[str, Any]:
    event = customer_event(seq, etype, name="Acme", changes=changes)
    membership = {
        "plan_id": "plan-1", "plan_name": "Growth", "customer_plan_id": f"cp-{seq}",
        "starting_on": "2026-01-01T00:00:00.000Z", "ending_before": None, "custom_fields": {}, **plan,
    }  # fmt: skip
    return {
        **event,
        "previous": None,
        "plan": membership,
        "previous_plan": {**membership, "ending_before": None},
    }


def test_an_end_date_that_appears_says_so_in_words(
    slack: Receiver, make_sink: Callable[..., SlackSink]
) -> None:
    ends = "2026-12-31T00:00:00.000Z"
    event = plan_event(
        1,
        "customer.plan_updated",
        [{"field": "plan.ending_before", "before": None, "after": ends}],
        ending_before=ends,
    )

    make_sink().deliver([event])

    (message,) = slack.bodies()
    assert_within_slack_limits(message)
    assert message["blocks"][0]["text"]["text"] == ":calendar: Customer's plan changed: Acme"
    assert sections(message)[1] == "*Plan Growth ends on 2026-12-31*"
    assert f"• `plan.ending_before`: _none_ -&gt; `{ends}`" in sections(message)[2]
    assert message["text"] == "Customer's plan changed: Acme (cus-0001): plan Growth ends on 2026-12-31"


@pytest.mark.parametrize(
    ("etype", "header", "words"),
    [
        (
            "customer.plan_added",
            ":inbox_tray: Customer added to a plan: Acme",
            "*Added to plan Growth from 2026-01-01*",
        ),
        ("customer.plan_ended", ":door: Customer's plan ended: Acme", "*Plan Growth ended on 2026-06-30*"),
        (
            "customer.plan_removed",
            ":outbox_tray: Customer removed from a plan: Acme",
            "*Removed from plan Growth*",
        ),
    ],
)
def test_every_plan_event_says_what_happened_to_whom(
    slack: Receiver, make_sink: Callable[..., SlackSink], etype: str, header: str, words: str
) -> None:
    ends = "2026-06-30T00:00:00.000Z" if etype == "customer.plan_ended" else None
    make_sink().deliver([plan_event(1, etype, [], ending_before=ends)])
    (message,) = slack.bodies()
    assert message["blocks"][0]["text"]["text"] == header
    assert words in sections(message)


def test_a_digest_shows_plan_events_in_words(slack: Receiver, make_sink: Callable[..., SlackSink]) -> None:
    ends = "2026-12-31T00:00:00.000Z"
    events = [
        plan_event(i, "customer.plan_ended", [], ending_before=ends) if i % 2 else customer_event(i)
        for i in range(1, 9)
    ]

    make_sink(digest_threshold=5).deliver(events)

    (digest,) = slack.bodies()
    assert digest["text"] == "8 customer changes: 4 updated, 4 plan ended"
    assert f"• :door: <{APP}/customers/cus-0001|Acme>: plan Growth ended on 2026-12-31" in all_text(digest)


# -- digests ---------------------------------------------------------------------------------------


def mixed_round(n: int) -> list[dict[str, Any]]:
    """``n`` events of every customer type, with long names and many changes (worst case for size)."""
    types = [
        "customer.updated",
        "customer.updated",
        "customer.archived",
        "customer.created",
        "customer.deleted",
    ]
    many = [{"field": f"custom_fields.k{i}", "before": "b" * 300, "after": "a" * 300} for i in range(40)]
    return [customer_event(i + 1, types[i % len(types)], name="N" * 400, changes=many) for i in range(n)]


def test_a_big_round_becomes_one_digest_within_slack_limits(
    slack: Receiver, make_sink: Callable[..., SlackSink]
) -> None:
    events = mixed_round(100)
    outcomes = make_sink(digest_threshold=5).deliver(events)

    assert outcomes == [Outcome.ok()] * 100  # the digest carries every event of the round
    (digest,) = slack.bodies()
    assert_within_slack_limits(digest)
    assert digest["blocks"][0]["text"]["text"] == ":bar_chart: 100 customer changes"
    by_type = sections(digest)[0]
    assert "*40* updated" in by_type and "*20* archived" in by_type and "*20* created" in by_type
    assert "*20* deleted" in by_type
    text = all_text(digest)
    assert "and 80 more" in text  # the first 20 items, then a count
    assert "metronome-watcher events --after-sequence 0" in text
    assert digest["text"] == "100 customer changes: 20 created, 40 updated, 20 archived, 20 deleted"


def test_a_digest_too_big_for_one_message_is_split_within_the_limits(
    slack: Receiver, make_sink: Callable[..., SlackSink], fake_time: FakeTime
) -> None:
    events = mixed_round(300)
    parts = build_digest(events, app_url=APP, items=300)
    assert len(parts) > 1
    for part in parts:
        assert_within_slack_limits(part)

    assert make_sink(digest_threshold=5, digest_items=300).deliver(events) == [Outcome.ok()] * 300
    assert len(slack.requests) == len(parts)
    assert fake_time.sleeps == [1.0] * (len(parts) - 1)  # paced like any other messages


def test_never_faster_than_one_message_per_second_per_webhook(
    make_receiver: Callable[..., Receiver], make_sink: Callable[..., SlackSink], fake_time: FakeTime
) -> None:
    a = make_sink()
    assert a.deliver([customer_event(1), customer_event(2), customer_event(3)]) == [Outcome.ok()] * 3
    assert fake_time.sleeps == [1.0, 1.0]  # nothing before the first, one second between the others

    b = make_sink()  # another sink posting to the same webhook shares its pace
    b.deliver([customer_event(4)])
    assert fake_time.sleeps == [1.0, 1.0, 1.0]

    other = make_receiver(Reply(200, "ok"), path=f"/services/T0/B1/{uuid.uuid4().hex}")
    fake_time.t += 0.5
    make_sink(url=other.url).deliver([customer_event(5)])
    assert fake_time.sleeps == [1.0, 1.0, 1.0]  # a different webhook is not held back


# -- Slack's answers -------------------------------------------------------------------------------


@pytest.mark.parametrize("reply", [Reply(200, ""), Reply(200, "<html>captive portal</html>"), Reply(302, "")])
def test_success_is_only_200_with_the_body_ok(
    slack: Receiver, make_sink: Callable[..., SlackSink], reply: Reply
) -> None:
    slack.script(reply)
    (outcome,) = make_sink().deliver([customer_event()])
    assert outcome.kind == "retry"


def test_429_is_a_retry_after_retry_after_and_ends_the_round(
    slack: Receiver, make_sink: Callable[..., SlackSink]
) -> None:
    slack.script(Reply(200, "ok"), Reply(429, "rate_limited", {"Retry-After": "17"}))
    outcomes = make_sink().deliver([customer_event(1), customer_event(2), customer_event(3)])
    assert [o.kind for o in outcomes] == ["delivered", "retry"]
    assert outcomes[1].retry_after == 17
    assert len(slack.requests) == 2


def test_server_and_transport_errors_are_retries_that_never_show_the_webhook_url(
    slack: Receiver, make_sink: Callable[..., SlackSink]
) -> None:
    sink = make_sink(timeout=0.3)
    secret_part = slack.path.rsplit("/", 1)[1]
    slack.script(Reply(500, "rollup_error"), Reply(hang=5))
    errors = [sink.deliver([customer_event()])[0] for _ in range(2)]
    slack.stop()
    errors.append(sink.deliver([customer_event()])[0])

    assert [o.kind for o in errors] == ["retry"] * 3
    assert "rollup_error" in str(errors[0].error)
    assert "Timeout" in str(errors[1].error) and "ConnectError" in str(errors[2].error)
    for text in [*(o.error for o in errors), repr(sink)]:
        assert secret_part not in str(text) and slack.path not in str(text)


def test_a_message_slack_refuses_is_dead_and_the_round_goes_on(
    slack: Receiver, make_sink: Callable[..., SlackSink]
) -> None:
    slack.script(Reply(400, "invalid_payload"))
    outcomes = make_sink().deliver([customer_event(1), customer_event(2)])
    assert [o.kind for o in outcomes] == ["dead", "delivered"]
    assert "invalid_payload" in str(outcomes[0].error)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(404, "no_service"), Reply(410, "no_service"), Reply(404, "channel_not_found"),
        Reply(410, "channel_is_archived"), Reply(403, "invalid_token"), Reply(403, "action_prohibited"),
    ],
)  # fmt: skip
def test_a_dead_webhook_makes_the_whole_round_dead_at_once_without_sending_more(
    slack: Receiver, make_sink: Callable[..., SlackSink], reply: Reply
) -> None:
    slack.script(reply)
    outcomes = make_sink().deliver([customer_event(1), customer_event(2), customer_event(3)])
    assert [o.kind for o in outcomes] == ["dead"] * 3
    assert len(slack.requests) == 1  # one refusal is enough; the rest are not sent to be refused
    assert str(reply.body) in str(outcomes[0].error) and "fix it, then replay" in str(outcomes[0].error)


def test_a_refused_digest_makes_every_event_it_carries_dead(
    slack: Receiver, make_sink: Callable[..., SlackSink]
) -> None:
    slack.script(Reply(400, "invalid_payload"))
    outcomes = make_sink(digest_threshold=2).deliver([customer_event(i) for i in range(1, 5)])
    assert [o.kind for o in outcomes] == ["dead"] * 4


# -- watcher notices -------------------------------------------------------------------------------


def test_poll_failing_and_recovered_notices_are_readable(
    slack: Receiver, make_sink: Callable[..., SlackSink]
) -> None:
    # The detail the daemon records (watcher.daemon), plus a key no one knows yet.
    failing = notice("watcher.poll_failing", {
        "poll_id": 7, "consecutive_failures": 3, "failing_after": 3, "since": "2026-01-05T08:45:00.000000Z",
        "last_error": "Metronome answered HTTP 503 <html>", "region": "eu"}, seq=1)  # fmt: skip
    back = {"poll_id": 9, "failed_polls": 3, "since": "2026-01-05T08:45:00.000000Z", "down_seconds": 905.2}
    recovered = notice("watcher.poll_recovered", back, seq=2)
    make_sink().deliver([failing, recovered])

    first, second = slack.bodies()
    assert_within_slack_limits(first)
    assert first["blocks"][0]["text"]["text"] == ":rotating_light: Metronome polling is failing"
    details = sections(first)[0]
    assert "*consecutive failures:* 3" in details and "*region:* eu" in details
    assert "*last error:* Metronome answered HTTP 503 &lt;html&gt;" in details
    assert first["text"] == "Metronome polling is failing: Metronome answered HTTP 503 &lt;html&gt;"
    assert failing["id"] in first["blocks"][-1]["elements"][0]["text"]

    assert_within_slack_limits(second)
    assert second["blocks"][0]["text"]["text"] == ":white_check_mark: Metronome polling recovered"
    assert "*failed polls:* 3" in sections(second)[0] and "*down:* 15m 5s" in sections(second)[0]
    assert second["text"] == "Metronome polling recovered after 3 failed polls"


# -- wiring ----------------------------------------------------------------------------------------


def test_build_app_gives_the_slack_sink_the_configured_metronome_app_url(
    tmp_path: Path, slack: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config(
        {
            "metronome": {"base_url": "http://127.0.0.1:9", "app_url": "https://app.eu.metronome.test/"},
            "store": {"path": str(tmp_path / "w.db")},
            "sinks": [
                {"type": "slack", "name": "alerts", "webhook_url": "${SLACK_URL}", "digest_threshold": 3}
            ],
        },
        env={"SLACK_URL": slack.url},
    )
    app = build_app(config, "token-for-the-test")
    try:
        sink = app.sinks["alerts"]
        assert isinstance(sink, SlackSink) and sink.digest_threshold == 3
        assert slack.path not in repr(sink)
        sink.deliver([customer_event(1)])
    finally:
        app.close()
    (message,) = slack.bodies()
    assert "<https://app.eu.metronome.test/customers/cus-0001|Acme &amp; Co>" in sections(message)[0]
