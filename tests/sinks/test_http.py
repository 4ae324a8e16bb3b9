"""The ``http`` sink against a real local webhook consumer: contract body, Standard Webhooks
signature, status handling, redirects, timeouts, and a real SIGKILL in the middle of delivery."""

from __future__ import annotations

import base64
import email.utils
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from freezegun import freeze_time
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.receivers import Receiver, Reply
from watcher.config import parse_config
from watcher.delivery import Deliverer
from watcher.errors import ConfigError
from watcher.notices import record_notice
from watcher.routing import Route
from watcher.sinks import Outcome, build_sinks
from watcher.sinks.http import HttpSink
from watcher.store import Store

SECRET = "whsec_" + base64.b64encode(b"metronome-watcher-test-key-32by").decode()
NOW = 1_767_600_000  # the injected signing clock


def event(seq: int = 1, **extra: Any) -> dict[str, Any]:
    """A v1 contract event."""
    cid = f"cus-{seq}"
    return {
        "id": str(uuid.uuid4()),
        "type": "customer.updated",
        "sequence": seq,
        "detected_at": "2026-01-05T09:00:00.000000Z",
        "poll_id": 3,
        "customer_id": cid,
        "customer": {"id": cid, "name": "Acme & Co", "custom_fields": {"tier": "growth"}},
        "previous": {"id": cid, "name": "Acme & Co", "custom_fields": {"tier": "free"}},
        "changes": [{"field": "custom_fields.tier", "before": "free", "after": "growth"}],
        **extra,
    }


def sink_for(receiver: Receiver, **kw: Any) -> HttpSink:
    kw.setdefault("clock", lambda: float(NOW))
    return HttpSink("hooks", receiver.url, SECRET, **kw)


def verify(body: bytes, headers: dict[str, str], at: int = NOW) -> Any:
    with freeze_time(datetime.fromtimestamp(at, UTC)):
        return Webhook(SECRET).verify(body, headers)


# -- what is sent ----------------------------------------------------------------------------------


def test_posts_the_event_contract_signed_so_that_standardwebhooks_verifies_it(receiver: Receiver) -> None:
    sink = sink_for(receiver, headers={"X-Team": "billing"})
    ev = event()

    assert sink.deliver([ev]) == [Outcome.ok()]

    (req,) = receiver.requests
    assert req.method == "POST" and req.path == "/hook"
    assert req.body == orjson.dumps(ev)  # exactly the contract, byte for byte
    assert req.headers["content-type"] == "application/json"
    assert req.headers["x-team"] == "billing"
    assert req.headers["webhook-id"] == ev["id"]
    assert req.headers["webhook-timestamp"] == str(NOW)
    assert req.headers["webhook-signature"].startswith("v1,")
    assert verify(req.body, req.headers) == ev
    with pytest.raises(WebhookVerificationError):
        verify(req.body.replace(b"growth", b"enterprise"), req.headers)  # tampering is detected


def test_configured_headers_cannot_override_the_signature_headers(receiver: Receiver) -> None:
    sink = sink_for(receiver, headers={"Content-Type": "text/plain", "webhook-id": "forged", "X-Env": "prod"})
    ev = event()
    sink.deliver([ev])

    (req,) = receiver.requests
    assert req.headers["content-type"] == "application/json"
    assert req.headers["webhook-id"] == ev["id"]
    assert req.headers["x-env"] == "prod"
    assert verify(req.body, req.headers) == ev


def test_each_attempt_is_freshly_signed_with_the_same_event_id(receiver: Receiver) -> None:
    times = iter([NOW, NOW + 60])
    sink = sink_for(receiver, clock=lambda: float(next(times)))
    receiver.script(Reply(503, b"busy"))
    ev = event()

    assert sink.deliver([ev])[0].kind == "retry"
    assert sink.deliver([ev]) == [Outcome.ok()]

    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == ev["id"]
    assert (first.headers["webhook-timestamp"], second.headers["webhook-timestamp"]) == (
        str(NOW),
        str(NOW + 60),
    )
    assert verify(second.body, second.headers, at=NOW + 60) == ev


def test_unpadded_secrets_are_accepted_like_the_reference_implementation(receiver: Receiver) -> None:
    unpadded = SECRET.rstrip("=")
    assert unpadded != SECRET
    sink = HttpSink("hooks", receiver.url, unpadded, clock=lambda: float(NOW))
    ev = event()
    sink.deliver([ev])
    (req,) = receiver.requests
    assert verify(req.body, req.headers) == ev


# -- what the answer means -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, "delivered"), (202, "delivered"), (204, "delivered"),
        (301, "retry"), (302, "retry"), (307, "retry"), (308, "retry"),
        (400, "dead"), (404, "dead"), (405, "dead"), (413, "dead"), (422, "dead"),
        (401, "retry"), (403, "retry"), (408, "retry"), (409, "retry"), (425, "retry"), (429, "retry"),
        (410, "disable"),
        (500, "retry"), (502, "retry"), (503, "retry"), (504, "retry"),
    ],
)  # fmt: skip
def test_status_codes_map_to_outcomes(receiver: Receiver, status: int, kind: str) -> None:
    receiver.script(Reply(status, b'{"error": "nope"}' if status >= 300 else b""))
    (outcome,) = sink_for(receiver).deliver([event()])
    assert outcome.kind == kind
    if kind != "delivered":
        assert outcome.error and str(status) in outcome.error


def test_error_detail_quotes_the_start_of_the_receivers_body(receiver: Receiver) -> None:
    receiver.script(Reply(400, b'{"error": "unknown customer"}' + b" " + b"x" * 10_000))
    (outcome,) = sink_for(receiver).deliver([event()])
    assert outcome.error and outcome.error.startswith('HTTP 400: {"error": "unknown customer"}')
    assert len(outcome.error) < 300


@pytest.mark.parametrize("shared_client_follows", [False, True])
def test_redirects_are_a_retry_and_never_followed(
    make_receiver: Callable[..., Receiver], shared_client_follows: bool
) -> None:
    elsewhere = make_receiver()
    first = make_receiver(Reply(307, b"", {"Location": elsewhere.url}))
    client = httpx.Client(follow_redirects=shared_client_follows)
    try:
        (outcome,) = sink_for(first, http=client).deliver([event()])
    finally:
        client.close()
    assert outcome.kind == "retry" and outcome.error and "not followed" in outcome.error
    assert len(first.requests) == 1
    assert elsewhere.requests == []  # the signed event never reached the Location's host


def test_retry_after_seconds_and_http_dates_are_passed_on(receiver: Receiver) -> None:
    receiver.script(
        Reply(429, b"", {"Retry-After": "30"}),
        Reply(503, b"", {"Retry-After": email.utils.formatdate(NOW + 120, usegmt=True)}),
        Reply(503, b"", {"Retry-After": "soon"}),
    )
    sink = sink_for(receiver)
    assert sink.deliver([event()])[0].retry_after == 30
    assert sink.deliver([event()])[0].retry_after == pytest.approx(120)
    assert sink.deliver([event()])[0].retry_after is None  # junk: the engine's own back-off applies


def test_a_batch_stops_at_the_first_retry_or_disable_but_not_at_a_dead_event(receiver: Receiver) -> None:
    sink = sink_for(receiver)
    receiver.script(Reply(200), Reply(503))
    assert [o.kind for o in sink.deliver([event(1), event(2), event(3)])] == ["delivered", "retry"]
    assert len(receiver.requests) == 2

    receiver.script(Reply(410))
    assert [o.kind for o in sink.deliver([event(4), event(5)])] == ["disable"]
    assert len(receiver.requests) == 3

    receiver.script(Reply(400), Reply(200), Reply(200))
    assert [o.kind for o in sink.deliver([event(6), event(7), event(8)])] == [
        "dead",
        "delivered",
        "delivered",
    ]


def test_receiver_down_or_hanging_is_a_retry(receiver: Receiver) -> None:
    sink = sink_for(receiver, timeout=0.3)
    receiver.script(Reply(hang=5))
    (hung,) = sink.deliver([event()])
    assert hung.kind == "retry" and hung.error and "Timeout" in hung.error

    receiver.stop()
    (down,) = sink.deliver([event()])
    assert down.kind == "retry" and down.error and "ConnectError" in down.error


# -- configuration and secrets ---------------------------------------------------------------------


def test_built_from_config_with_headers_timeout_and_the_secret_from_the_environment(
    receiver: Receiver,
) -> None:
    config = parse_config(
        {"sinks": [{"type": "http", "name": "crm", "url": receiver.url, "secret": "${HOOK_SECRET}",
                    "headers": {"X-Team": "billing"}, "timeout": "3s"}]},
        env={"HOOK_SECRET": SECRET},
    )  # fmt: skip
    sinks = build_sinks(config.sinks)
    sink = sinks["crm"]
    assert isinstance(sink, HttpSink) and sink.timeout == 3
    ev = event()
    try:
        assert sink.deliver([ev]) == [Outcome.ok()]
    finally:
        sink.close()
    (req,) = receiver.requests
    assert req.headers["x-team"] == "billing"
    assert Webhook(SECRET).verify(req.body, req.headers) == ev  # real clock, real verification


def test_the_secret_appears_in_no_repr_and_a_bad_one_is_a_config_error_that_does_not_echo_it(
    receiver: Receiver,
) -> None:
    sink = sink_for(receiver)
    key_part = SECRET.removeprefix("whsec_")
    assert key_part not in repr(sink) and "127.0.0.1" in repr(sink)

    # A secret that is not base64 is refused when the config is read (so check-config catches it),
    # naming the key and never echoing the value.
    bad = "whsec_not*base64*at*all"
    with pytest.raises(ConfigError) as err:
        parse_config({"sinks": [{"type": "http", "name": "crm", "url": receiver.url, "secret": bad}]}, env={})
    assert "sinks[0].secret" in str(err.value) and "base64" in str(err.value)
    assert "not*base64" not in str(err.value)


# -- a real kill -----------------------------------------------------------------------------------

_DRAIN = """
import sys
from watcher.delivery import Deliverer
from watcher.sinks.http import HttpSink
from watcher.store import Store

store = Store(sys.argv[1])
Deliverer(store, {"hooks": HttpSink("hooks", sys.argv[2], sys.argv[3], timeout=60)}).drain("hooks")
"""


def test_sigkill_while_a_request_is_in_flight_redelivers_everything_on_restart(
    tmp_path: Path, receiver: Receiver
) -> None:
    db = tmp_path / "watcher.db"
    store = Store(db)
    routes = [Route("hooks", events=("watcher.*",))]
    ids = [
        record_notice(store, "watcher.poll_failing", routes, now=datetime.now(UTC), detail={"n": i})["id"]
        for i in range(5)
    ]
    # Two answered, the third held open: the process is killed while it waits for that answer.
    receiver.script(Reply(204), Reply(204), Reply(204, hang=30))
    proc = subprocess.Popen([sys.executable, "-c", _DRAIN, str(db), receiver.url, SECRET])
    try:
        deadline = time.monotonic() + 20
        while len(receiver.requests) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert len(receiver.requests) == 3
    finally:
        proc.kill()
        proc.wait()
    assert [s.pending for s in store.delivery_status(datetime.now(UTC), sinks=["hooks"])] == [5]

    restarted = Deliverer(store, {"hooks": HttpSink("hooks", receiver.url, SECRET)})
    try:
        assert restarted.drain("hooks").delivered == 5
    finally:
        restarted.close()
        store.close()
    seen = [r.headers["webhook-id"] for r in receiver.requests]
    assert seen[:3] == ids[:3]
    assert seen[3:] == ids  # the restart resends from the first unmarked event, in order: nothing skipped
