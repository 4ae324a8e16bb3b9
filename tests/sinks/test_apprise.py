"""The ``apprise`` sink against real local receivers (Apprise's ``json://`` and ``form://`` post to any
HTTP endpoint, so no outside service is needed): one delivery target per URL, messages in words in
the markup each service takes, the digest, every failure a retry with Apprise's reason, secrets
never shown, and Apprise's logging routed into ours and redacted.

That a config naming the sink is refused when Apprise is not installed is in ``tests/test_config.py``
(it needs no Apprise, and runs where there is none).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from tests.receivers import FakeClock, Receiver, Reply
from tests.test_cli import cli, write_config
from watcher._secrets import redact
from watcher.cli import main
from watcher.config import DeliveryConfig, parse_config
from watcher.delivery import Deliverer
from watcher.errors import ConfigError
from watcher.events import Listing, OutcomeKind
from watcher.metronome import ListingPage
from watcher.poll import Poller
from watcher.routing import routes_from_config
from watcher.simulator import SimulatedMetronome
from watcher.sinks import Outcome, build_sinks
from watcher.sinks.apprise import AppriseSink, Shape, build_digest, build_event_message
from watcher.sinks.slack import build_digest as slack_digest
from watcher.store import Store

pytest.importorskip("apprise", reason="the apprise extra is not installed: pip install -e '.[apprise]'")

APP = "https://metronome.example.test"


def customer_event(
    seq: int = 1, etype: str = "customer.updated", *, name: str = "Acme & Co", changes: Any = None
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


def url_of(receiver: Receiver, scheme: str = "json", query: str = "format=markdown") -> str:
    """An Apprise URL that posts to ``receiver``."""
    return f"{scheme}://{receiver.url.removeprefix('http://')}" + (f"?{query}" if query else "")


def posted(receiver: Receiver) -> list[dict[str, str]]:
    """What Apprise posted, json:// or form://: ``title``, ``message``, ``type``."""
    out = []
    for r in receiver.requests:
        if r.headers.get("content-type", "").startswith("application/json"):
            out.append(r.json())
        else:
            out.append({k: v[0] for k, v in parse_qs(r.body.decode()).items()})
    return out


@pytest.fixture
def receiver(make_receiver: Callable[..., Receiver]) -> Receiver:
    return make_receiver(Reply(200, b"ok"))


# -- messages in words -----------------------------------------------------------------------------


def test_one_message_per_event_says_who_what_and_each_change_in_markdown(receiver: Receiver) -> None:
    sink = AppriseSink("ops.json", url_of(receiver), app_url=APP)
    updated = customer_event(1)
    archived = customer_event(2, "customer.archived", changes=[
        {"field": "archived_at", "before": None, "after": "2026-01-05T08:59:00.000Z"},
        {"field": "name", "before": "Acme", "after": "Acme & Co"}])  # fmt: skip

    assert sink.deliver([updated, archived]) == [Outcome.ok()] * 2

    first, second = posted(receiver)
    assert first["title"] == "Customer updated: Acme & Co"
    assert first["type"] == "info"
    body = first["message"]
    # who: the name linked to the customer's page in the Metronome app, its id and external id
    assert f"**[Acme & Co]({APP}/customers/cus-0001)** · `cus-0001` · external id `acme-1`" in body
    assert "**Changes**\n\n- `custom_fields.tier`: `free` -> `growth`" in body  # field: before -> after
    assert body.endswith(
        f"`customer.updated` · #1 · detected 2026-01-05T09:00:00.000000Z · event `{updated['id']}`"
    )

    assert second["title"] == "Customer archived: Acme & Co"
    assert second["type"] == "warning"
    assert (
        "- `archived_at`: _none_ -> `2026-01-05T08:59:00.000Z`\n- `name`: `Acme` -> `Acme & Co`"
        in (second["message"])
    )


def test_plain_text_where_the_service_takes_no_markup(receiver: Receiver) -> None:
    sink = AppriseSink("ops.form", url_of(receiver, "form", "format=text"), app_url=APP)
    ev = customer_event(1, name="Acme *Co*")
    assert sink.deliver([ev]) == [Outcome.ok()]

    (message,) = posted(receiver)
    assert message["title"] == "Customer updated: Acme *Co*"
    body = message["message"]
    assert body.startswith(f"Acme *Co* · cus-0001 · external id acme-1\n{APP}/customers/cus-0001\n")
    assert "Changes:\n- custom_fields.tier: free -> growth" in body
    assert body.endswith(f"event {ev['id']}")
    assert "`" not in body and "**" not in body and "\\" not in body  # no markup to show as symbols


def test_html_where_the_service_takes_it_and_customer_data_injects_nothing(receiver: Receiver) -> None:
    # ?format=html: Apprise turns the Markdown we send into HTML, as it does for email.
    sink = AppriseSink("ops.json", url_of(receiver, query="format=html"), app_url=APP)
    name = "<img src=x onerror=alert(1)> *Acme* [click](https://evil.example)"
    ev = customer_event(1, name=name, changes=[{"field": "notes", "before": None, "after": "<b>`x`</b>"}])
    assert sink.deliver([ev]) == [Outcome.ok()]

    html = posted(receiver)[0]["message"]
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'evil.example"' not in html and "<em>Acme</em>" not in html  # no link, no emphasis smuggled in
    assert f'<a href="{APP}/customers/cus-0001">' in html  # the one link is ours
    assert "<li><code>notes</code>: <em>none</em> -&gt; <code>&lt;b&gt;'x'&lt;/b&gt;</code></li>" in html


def test_markdown_escapes_customer_data() -> None:
    name = "[click](https://evil.example) *Acme* <@here> `x`"
    body = build_event_message(customer_event(1, name=name), shape=Shape("markdown"), app_url=APP).body
    assert "\\[click\\](https://evil.example) \\*Acme\\* \\<@here\\> \\`x\\`" in body


@pytest.mark.parametrize(
    ("etype", "title", "severity", "says"),
    [
        ("customer.created", "New customer: Acme & Co", "info", "**Details**\n\n- `tier`: `growth`"),
        ("customer.deleted", "Customer deleted: Acme & Co", "warning", "No longer in Metronome"),
        ("customer.unarchived", "Customer unarchived: Acme & Co", "success", "- `archived_at`: `2026-01-01"),
    ],
)
def test_every_event_type_says_what_happened(
    receiver: Receiver, etype: str, title: str, severity: str, says: str
) -> None:
    changes = (
        [{"field": "archived_at", "before": "2026-01-01T00:00:00Z", "after": None}]
        if etype == "customer.unarchived"
        else []
    )
    AppriseSink("ops.json", url_of(receiver)).deliver([customer_event(1, etype, changes=changes)])
    (message,) = posted(receiver)
    assert message["title"] == title and message["type"] == severity
    assert says in message["message"]


def test_poll_failing_and_recovered_notices_are_readable(receiver: Receiver) -> None:
    failing = notice("watcher.poll_failing", {
        "poll_id": 7, "consecutive_failures": 3, "since": "2026-01-05T08:45:00.000000Z",
        "last_error": "Metronome answered HTTP 503 <html>"}, seq=1)  # fmt: skip
    back = {"poll_id": 9, "failed_polls": 3, "down_seconds": 905.2}
    recovered = notice("watcher.poll_recovered", back, seq=2)
    AppriseSink("ops.json", url_of(receiver)).deliver([failing, recovered])

    first, second = posted(receiver)
    assert (first["title"], first["type"]) == ("Metronome polling is failing", "failure")
    assert "- **consecutive failures:** 3" in first["message"]
    assert "- **last error:** Metronome answered HTTP 503 \\<html\\>" in first["message"]
    assert failing["id"] in first["message"]
    assert (second["title"], second["type"]) == ("Metronome polling recovered", "success")
    assert "- **failed polls:** 3" in second["message"] and "- **down:** 15m 5s" in second["message"]


def test_a_message_is_cut_to_what_the_service_takes_and_keeps_its_event_id() -> None:
    # PagerDuty, as Apprise knows it: plain text, and no title of its own ...
    pagerduty = AppriseSink(
        "oncall.pagerduty", "pagerduty://A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6@u+Xy7Zk9Qw3Er5Ty"
    )
    assert (pagerduty.shape.markup, pagerduty.shape.title_limit) == ("text", 0)
    # ... and 1024 characters of body (Apprise 2 knows that limit; 1.9 knew none).
    shape = Shape("text", title_limit=0, body_limit=1024)

    many = [{"field": f"custom_fields.k{i}", "before": "b" * 40, "after": "a" * 40} for i in range(40)]
    ev = customer_event(1, name="N" * 300, changes=many)
    message = build_event_message(ev, shape=shape, app_url=APP)
    assert len(message.title) + 2 + len(message.body) <= 1024  # the title goes into the body there
    assert message.title.startswith("Customer updated: NNN") and len(message.title) <= 200
    assert message.body.endswith(f"event {ev['id']}")  # replay --id still works from the message
    shown = message.body.count("\n- custom_fields.k")
    assert 0 < shown < 25 and f"- …and {40 - shown} more" in message.body

    teams = Shape("markdown", title_limit=250, body_limit=1000)  # Teams through Power Automate
    message = build_event_message(ev, shape=teams, app_url=APP)
    assert len(message.body) <= 1000 and message.body.endswith(f"event `{ev['id']}`")
    assert "- _…and " in message.body

    digest = build_digest(mixed_round(40), shape=shape, app_url=APP)  # fewer than 20 lines fit
    assert len(digest.title) + 2 + len(digest.body) <= 1024
    listed = digest.body.count("\n- Acme & Co ")
    assert 0 < listed < 20 and f"First {listed}:" in digest.body  # the heading counts what is there
    assert f"…and {40 - listed} more. List them all with metronome-watcher events" in digest.body


# -- digests ---------------------------------------------------------------------------------------


def mixed_round(n: int) -> list[dict[str, Any]]:
    types = ["customer.updated", "customer.archived", "customer.created"]
    return [customer_event(i + 1, types[i % 3]) for i in range(n)]


def test_a_big_round_becomes_one_digest_as_slack_has_it(receiver: Receiver) -> None:
    events = mixed_round(30)
    sink = AppriseSink("ops.json", url_of(receiver), app_url=APP, digest_threshold=5)

    assert sink.deliver(events) == [Outcome.ok()] * 30  # the digest carries every event of the round

    (digest,) = posted(receiver)
    assert digest["title"] == "30 customer changes: 10 created, 10 updated, 10 archived"
    assert digest["title"] == slack_digest(events, app_url=APP)[0]["text"]  # Slack's headline, word for word
    assert digest["type"] == "warning"  # the most serious of the round: archives
    body = digest["message"]
    assert "**By type**\n\n- 10 created\n- 10 updated\n- 10 archived" in body
    assert "**First 20**" in body
    assert body.count(f"\n- **[Acme & Co]({APP}/customers/cus-") == 20
    assert (
        "- **[Acme & Co](" + f"{APP}/customers/cus-0002)** archived: `custom_fields.tier`: `free` -> `growth`"
        in body
    )
    assert "_…and 10 more._ List them all with `metronome-watcher events --after-sequence 0`." in body
    assert body.endswith("Sequences #1 to #30.")


def test_a_failed_digest_is_one_retry_and_the_round_stays_pending(receiver: Receiver) -> None:
    receiver.script(Reply(500, b"oops"))
    outcomes = AppriseSink("ops.json", url_of(receiver), digest_threshold=5).deliver(mixed_round(30))
    assert [o.kind for o in outcomes] == [OutcomeKind.RETRY]  # nothing after it was attempted


# -- one URL, one delivery target --------------------------------------------------------------------


class Source:
    """An in-memory Metronome for the Poller: one page of active customers."""

    def __init__(self, n: int) -> None:
        self.customers = {f"cus-{i:03d}": {"id": f"cus-{i:03d}", "name": f"Customer {i}"} for i in range(n)}

    def pages(self, *, listing: Listing, sent: Any = None) -> Iterator[ListingPage]:
        yield ListingPage([] if listing else [dict(c) for c in self.customers.values()])

    def get_customer(self, customer_id: str) -> dict[str, Any] | None:
        return None


class World:
    """Real poll cycles routed by a config's sinks, a real store, a real Deliverer."""

    def __init__(self, path: Path, sinks: list[dict[str, Any]], clock: FakeClock, n: int = 3) -> None:
        self.config = parse_config({"sinks": sinks}, env={})
        self.clock = clock
        self.store = Store(path)
        source = Source(n)
        poller = Poller(self.store, source, routes=routes_from_config(self.config), clock=clock,
                        concurrent_listings=False)  # fmt: skip
        assert poller.run().baseline
        for c in source.customers.values():
            c["name"] += " (renamed)"
        assert poller.run().events == n
        self.ids = [e["id"] for e in self.store.query_events()]
        self.deliverer = Deliverer(self.store, build_sinks(self.config.sinks, app_url=APP),
                                   config=DeliveryConfig(), clock=clock, rng=random.Random(7))  # fmt: skip

    def status(self) -> dict[str, Any]:
        return {s.sink: s for s in self.store.delivery_status(self.clock(), sinks=self.config.targets)}

    def close(self) -> None:
        self.deliverer.close()
        self.store.close()


def event_ids(receiver: Receiver) -> list[str]:
    return [m["message"].rsplit("event ", 1)[1].strip("`") for m in posted(receiver)]


@pytest.fixture
def two_urls(
    tmp_path: Path, make_receiver: Callable[..., Receiver], clock: FakeClock
) -> Iterator[tuple[World, Receiver, Receiver]]:
    teams, mail = make_receiver(Reply(200, b"ok")), make_receiver(Reply(200, b"ok"))
    sinks = [{"type": "apprise", "name": "ops", "urls": [url_of(teams), url_of(mail, "form", "format=text")]}]
    world = World(tmp_path / "w.db", sinks, clock)
    yield world, teams, mail
    world.close()


def test_each_url_is_its_own_delivery_target_and_one_that_fails_holds_back_and_resends_to_none(
    two_urls: tuple[World, Receiver, Receiver],
) -> None:
    world, teams, mail = two_urls
    assert world.config.targets == ("ops.json", "ops.form")
    mail.stop()

    reports = world.deliverer.deliver_due()
    assert reports["ops.json"].delivered == 3  # the URL that works is not held back ...
    assert reports["ops.form"].retried == 1  # ... by the one that fails, which backs off alone
    status = world.status()
    assert (status["ops.json"].delivered, status["ops.json"].pending) == (3, 0)
    assert (status["ops.form"].delivered, status["ops.form"].pending) == (0, 3)
    assert status["ops.form"].next_attempt_at and not status["ops.json"].next_attempt_at
    assert "Form (form://): A Connection error occurred sending Form notification" in str(
        status["ops.form"].last_error
    )

    world.clock.advance(60)
    world.deliverer.deliver_due()  # still down: another retry, and nothing sent again to the other
    assert event_ids(teams) == world.ids

    mail.start()
    world.clock.advance(3600)
    reports = world.deliverer.deliver_due()
    assert (reports["ops.form"].delivered, reports["ops.json"].delivered) == (3, 0)
    assert event_ids(mail) == world.ids  # all of them, once, in order, the same ids
    assert event_ids(teams) == world.ids  # never re-sent to the URL that had them
    assert all(s.delivered == 3 and s.pending == 0 for s in world.status().values())


def test_a_refusal_is_retried_with_apprises_reason_and_then_delivered_with_the_same_id(
    two_urls: tuple[World, Receiver, Receiver],
) -> None:
    # Apprise says only that a send failed: a 400 may be a proxy's passing answer as much as a
    # receiver that will never take the message, so it is a retry, never dead on a guess.
    world, teams, _ = two_urls
    teams.script(Reply(400, b'{"error": "bad request"}'))

    report = world.deliverer.drain("ops.json")
    assert (report.retried, report.dead, report.delivered) == (1, 0, 0)
    last_error = str(world.status()["ops.json"].last_error)
    assert last_error.startswith("JSON (json://): Failed to send JSON POST notification")
    assert "error=400" in last_error  # the reason reaches `deliveries`

    world.clock.advance(60)
    assert world.deliverer.drain("ops.json").delivered == 3
    assert event_ids(teams)[1:] == world.ids  # the refused one again first, with its own id


def test_each_target_takes_the_sinks_filters(tmp_path: Path, make_receiver: Callable[..., Receiver]) -> None:
    a, b = make_receiver(Reply(200, b"ok")), make_receiver(Reply(200, b"ok"))
    churn = {"type": "apprise", "name": "churn", "urls": {"teams": url_of(a), "oncall": url_of(b)},
             "events": ["customer.archived"], "fields": ["archived_at"]}  # fmt: skip
    config = parse_config({"sinks": [churn]}, env={})
    routes = {r.sink: r for r in routes_from_config(config)}
    assert set(routes) == {"churn.teams", "churn.oncall"}  # a table names its targets
    for route in routes.values():
        assert route.accepts("customer.archived", ["archived_at"])
        assert not route.accepts("customer.updated", ["archived_at"])
        assert not route.accepts("customer.archived", ["name"])


def test_targets_are_named_after_their_scheme_numbered_when_one_repeats(receiver: Receiver) -> None:
    urls = [url_of(receiver), url_of(receiver, "form"), url_of(receiver)]
    config = parse_config({"sinks": [{"type": "apprise", "name": "ops", "urls": urls}]}, env={})
    assert config.targets == ("ops.json", "ops.form", "ops.json-2")
    assert config.targets_of("ops") == config.targets and config.targets_of("ops.form") == ("ops.form",)
    assert list(build_sinks(config.sinks)) == list(config.targets)


# -- configuration and secrets ----------------------------------------------------------------------

#: A Teams channel's workflow ("Post to a channel when a webhook request is received"), as copied.
TEAMS_WORKFLOW = (
    "https://prod-12.westus.logic.azure.com:443/workflows/0123456789abcdef0123456789abcdef/triggers/"
    "manual/paths/invoke?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig=S1gNatur3AbCdEfGh"
)


def test_a_services_own_https_url_is_named_after_the_service_and_its_tokens_are_secrets() -> None:
    config = parse_config({"sinks": [{"type": "apprise", "name": "ops", "urls": ["${TEAMS_URL}"]}]},
                          env={"TEAMS_URL": TEAMS_WORKFLOW})  # fmt: skip
    assert config.targets == ("ops.workflow",)  # Apprise reads it as Power Automate, not as https
    (sink,) = build_sinks(config.sinks).values()
    assert sink.shape == Shape("markdown", title_limit=250, body_limit=1000)
    text = redact(
        f"posting to {TEAMS_WORKFLOW} failed; sig=S1gNatur3AbCdEfGh; id 0123456789abcdef0123456789abcdef"
    )
    assert "S1gNatur3" not in text and "0123456789abcdef0123" not in text

    with pytest.raises(
        ConfigError, match=r"urls\.https: Apprise reads an https:// URL only as a service's own"
    ):
        parse_config(
            {"sinks": [{"type": "apprise", "name": "ops", "urls": ["https://h.example/S3cret"]}]}, env={}
        )


#: Each looks like a real token, so a leak would be unmistakable.
PASSWORD = "pw0rdZq8v1xY42"
PATH_TOKEN = "T0kenInThePath7x9"
HEADER_TOKEN = "HeaderT0ken5ecret88"


def secret_url(receiver: Receiver) -> str:
    host = receiver.url.removeprefix("http://").split("/")[0]
    return f"json://bot:{PASSWORD}@{host}/hooks/{PATH_TOKEN}?%2BX-Token={HEADER_TOKEN}&format=markdown"


def test_the_url_and_its_tokens_appear_in_no_repr_outcome_or_log_line(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_config({"sinks": [{"type": "apprise", "name": "ops", "urls": ["${OPS_URL}"]}]},
                          env={"OPS_URL": secret_url(receiver)})  # fmt: skip
    (sink,) = build_sinks(config.sinks).values()
    assert sink.deliver([customer_event(1)]) == [Outcome.ok()]
    (req,) = receiver.requests
    assert req.path == f"/hooks/{PATH_TOKEN}" and req.headers["x-token"] == HEADER_TOKEN  # all were used

    receiver.script(Reply(401, b"who are you"))
    (refused,) = sink.deliver([customer_event(2)])
    receiver.stop()
    (down,) = sink.deliver([customer_event(3)])
    assert refused.kind == down.kind == OutcomeKind.RETRY

    shown = " ".join([repr(sink), repr(config), str(refused.error), str(down.error), caplog.text])
    for secret in (PASSWORD, PATH_TOKEN, HEADER_TOKEN, secret_url(receiver)):
        assert secret not in shown


def test_a_url_apprise_cannot_use_is_one_line_naming_the_key_and_never_echoing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    for urls, expected in [
        ('["msteams://S3cretTeamT0ken"]', "sinks[0].urls.msteams: Apprise cannot use this msteams:// URL"),
        ('["ok://x", "S3cretT0kenNoScheme"]', "sinks[0].urls[1]: not an Apprise URL (expected scheme://"),
        ('{ "two words" = "json://h" }', "sinks[0].urls.two words: a label is 1 to 32 letters"),
        ("[]", "sinks[0].urls: needs at least one Apprise URL"),
    ]:
        path.write_text(f"[[sinks]]\ntype = 'apprise'\nname = 'ops'\nurls = {urls}\n")
        assert main(["--config", str(path), "check-config"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert expected in line and "S3cret" not in line


def test_the_worked_examples_in_the_docs_are_valid_and_name_the_targets_they_say() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "sinks.md").read_text()
    examples = re.findall(r"### Worked example: .*?```toml\n(.*?)```", docs, re.S)
    assert len(examples) == 3  # Teams, email, PagerDuty
    env = {
        "TEAMS_WORKFLOW_URL": TEAMS_WORKFLOW,
        "FINANCE_EMAIL_URL": "mailtos://watcher:app-passw0rd@smtp.example.com:587?from=w@example.com&to=f@example.com",
        "PAGERDUTY_URL": "pagerduty://R0utingKey0123456789abcdefABCDEF@u+Ap1KeyAbCdEf/metronome-watcher/customers",
    }
    config = parse_config(tomllib.loads("".join(examples)), env=env)
    assert config.targets == ("cs-teams.workflow", "finance.mail", "oncall.pagerduty")
    for target in config.targets:
        assert f"`{target}`" in docs

    example = (Path(__file__).resolve().parents[2] / "config" / "watcher.example.toml").read_text()
    commented = example[example.index('# [[sinks]]\n# type = "apprise"') :]
    sink = tomllib.loads("\n".join(line.removeprefix("# ") for line in commented.splitlines()))
    assert parse_config(sink, env=env).targets == ("ops.workflow", "ops.mailtos", "ops.pagerduty")


def test_a_target_name_that_clashes_with_another_sink_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"sinks\[1\]\.name: 'ops\.json' is already sink 'ops'"):
        parse_config({"sinks": [{"type": "apprise", "name": "ops", "urls": ["json://h/x"]},
                                {"type": "log", "name": "ops.json"}]}, env={})  # fmt: skip


# -- the command line: deliveries, replay, enable-sink, logs -----------------------------------------


@pytest.mark.slow
def test_an_operator_sees_each_url_with_its_reason_and_replays_it_and_no_secret_anywhere(
    fake: SimulatedMetronome, tmp_path: Path, make_receiver: Callable[..., Receiver]
) -> None:
    teams, mail = make_receiver(Reply(200, b"ok")), make_receiver(Reply(200, b"ok"))
    mail_port = mail.url.split(":")[2].split("/")[0]
    # 2130706433 is 127.0.0.1 written as one number: it stands for a key kept where a host goes
    # (Telegram's bot token, PagerDuty's key), which Apprise names in its own log lines.
    mail_url = f"form://2130706433:{mail_port}/hook?format=text"
    config = write_config(tmp_path, fake, extra="""
[[sinks]]
type = "apprise"
name = "ops"
urls = ["${TEAMS_URL}", "${MAIL_URL}"]

[diff]
emit_baseline_events = true
""")  # fmt: skip
    env = {"TEAMS_URL": secret_url(teams), "MAIL_URL": mail_url}
    for i in range(3):
        fake.create_customer(f"Customer {i}")
    mail.stop()

    checked = cli(config, "check-config", env=env)
    assert "ops (apprise: ops.json, ops.form)" in checked.stdout
    polled = cli(config, "poll", env=env)
    assert polled.returncode == 0, polled.stderr
    assert len(teams.requests) == 3

    rows = json.loads(cli(config, "deliveries", "--format", "json", env=env).stdout)
    by_sink = {r["sink"]: r for r in rows}
    assert (by_sink["ops.json"]["delivered"], by_sink["ops.json"]["pending"]) == (3, 0)
    assert (by_sink["ops.form"]["delivered"], by_sink["ops.form"]["pending"]) == (0, 3)
    reason = "A Connection error occurred sending Form notification to [redacted]."
    assert reason in by_sink["ops.form"]["last_error"]
    table = cli(config, "deliveries", env=env).stdout
    assert any(
        line.startswith("ops.form") and "backing off" in line and reason in line
        for line in table.splitlines()
    )
    # Apprise's own warning reached the operational log, as one of our JSON lines, redacted.
    logged = [json.loads(line) for line in polled.stderr.splitlines() if line.startswith("{")]
    assert {"logger": "apprise", "level": "warning", "event": reason}.items() <= next(
        e for e in logged if e.get("logger") == "apprise"
    ).items()

    def said(proc: subprocess.CompletedProcess[str]) -> list[str]:
        return proc.stdout.splitlines()  # the command's own lines only: its logs go to stderr

    replayed = cli(config, "replay", "--sink", "ops", env=env)  # the sink stands for all its URLs
    assert said(replayed) == [
        "re-queued 0 event(s) for ops.json; they go out on the next delivery",
        "re-queued 0 event(s) for ops.form; they go out on the next delivery",
    ]
    enabled = cli(config, "enable-sink", "ops", env=env)
    assert [line.split(":")[0] for line in said(enabled)] == ["ops.json", "ops.form"]  # each URL

    mail.start()
    assert cli(config, "poll", env=env).returncode == 0  # replay ended the back-off: it goes out now
    assert len(mail.requests) == 3 and len(teams.requests) == 3  # and nothing twice to the other
    again = cli(config, "replay", "--sink", "ops.form", "--from-sequence", "1", env=env)
    assert said(again) == ["re-queued 3 event(s) for ops.form; they go out on the next delivery"]

    outputs = [checked, polled, replayed, enabled, again]
    text = "".join(o.stdout + o.stderr for o in outputs) + table + json.dumps(rows)
    for secret in (PASSWORD, PATH_TOKEN, HEADER_TOKEN, "2130706433"):
        assert secret not in text
        for f in tmp_path.iterdir():
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f
