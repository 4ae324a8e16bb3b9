"""The ``slack`` sink: posts events to an Incoming Webhook, as ``messages`` builds them.

* One message per event while a delivery round is small (at most ``digest_threshold`` events), a
  digest when it is bigger: a channel gets a handful of messages for 500 changes, not 500.
* **Pacing**: never more than about one message per second per webhook (Slack's documented limit
  for incoming webhooks), shared by every sink in the process that posts to the same webhook. A sink
  can be handed its own clock; :func:`set_pacing_clock` sets the one every other sink uses, for
  tests and simulations that must not wait.

Outcomes: HTTP 200 with the body ``ok`` is success; 429 is a retry after ``Retry-After``; 5xx,
408, redirects (never followed) and transport errors are retries; any other 4xx is permanent
(``invalid_payload``, ``channel_not_found``, ``no_service``, ``channel_is_archived``,
``action_prohibited``, ``invalid_token``, ...) and the events of that message go dead at once.

The webhook URL is the secret: it appears in no repr, log line or ``Outcome.error``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from ..._secrets import register
from ...config import DEFAULT_APP_URL, SlackSinkConfig
from ...events import OutcomeKind
from .._post import TRANSPORT_ERRORS, USER_AGENT, Reply, describe_error, post
from ..base import Outcome
from .messages import DIGEST_ITEMS, build_digest, build_event_message

__all__ = ["MIN_INTERVAL", "SlackSink", "set_pacing_clock"]

#: Seconds between two messages to one webhook ("about one per second", Slack's own figure).
MIN_INTERVAL = 1.0
#: A Slack path this long is secret enough to be cut out of messages on its own (``/services/...``).
_SECRET_PATH = 16

#: Slack's answers that say the *webhook* (not just this message) is unusable: once one is seen,
#: the rest of the round is marked dead without sending, instead of being refused one by one.
_WEBHOOK_GONE = frozenset({
    "no_service", "no_service_id", "no_team", "team_disabled", "invalid_token", "channel_not_found",
    "channel_is_archived", "action_prohibited", "posting_to_general_channel_denied",
})  # fmt: skip


# -- pacing -------------------------------------------------------------------------------------


class _Pacer:
    """Spaces the messages to one webhook at least ``interval`` apart (from the end of one send to
    the start of the next), for every sink in the process that posts to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: float | None = None

    @contextmanager
    def slot(
        self, interval: float, monotonic: Callable[[], float], sleep: Callable[[float], None]
    ) -> Iterator[None]:
        # Held through the send, so two sinks sharing a webhook queue up instead of bursting.
        with self._lock:
            if self._last is not None:
                # Capped at one interval, so a clock that jumps (or another sink's fake) never stalls us.
                delay = min(interval, self._last + interval - monotonic())
                if delay > 0:
                    sleep(delay)
            try:
                yield
            finally:
                self._last = monotonic()


@dataclass(frozen=True, slots=True)
class _Clock:
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


_clock = _Clock()
_PACERS: dict[str, _Pacer] = {}
_PACERS_LOCK = threading.Lock()


def set_pacing_clock(
    monotonic: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
) -> None:
    """The clock that paces sinks built without one of their own (called without arguments: the
    real one). For tests and simulations that drive the whole watcher and must not wait.

    The times the pacers remember are readings of the old clock, so they are forgotten.
    """
    global _clock
    with _PACERS_LOCK:
        _clock = _Clock(monotonic, sleep)
        _PACERS.clear()


def _pacer(url: str) -> _Pacer:
    key = hashlib.sha256(url.encode()).hexdigest()  # not the secret itself, even in memory
    with _PACERS_LOCK:
        return _PACERS.setdefault(key, _Pacer())


# -- the sink -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Message:
    payloads: list[dict[str, Any]]  # one Slack message, or several parts of one
    count: int  # how many consecutive events of the round it covers


class SlackSink:
    """Posts events to a Slack Incoming Webhook."""

    #: Events per ``deliver`` call: a round above ``digest_threshold`` becomes one digest.
    max_batch = 100

    def __init__(
        self,
        name: str,
        webhook_url: str,
        *,
        app_url: str = DEFAULT_APP_URL,
        digest_threshold: int = 5,
        timeout: float = 10.0,
        http: httpx.Client | None = None,
        sleep: Callable[[float], None] | None = None,
        monotonic: Callable[[], float] | None = None,
        min_interval: float = MIN_INTERVAL,
        digest_items: int = DIGEST_ITEMS,
    ) -> None:
        self.name = name
        self.app_url = app_url.rstrip("/")
        self.digest_threshold = digest_threshold
        self.digest_items = digest_items
        self.timeout = timeout
        self.min_interval = min_interval
        self._url = webhook_url
        register(webhook_url)
        path = urlsplit(webhook_url).path
        if len(path) >= _SECRET_PATH:  # the path is the secret part of a Slack webhook, the host is not
            register(path)
        self._clock = (
            None
            if sleep is None and monotonic is None
            else _Clock(monotonic or time.monotonic, sleep or time.sleep)
        )
        self._pacer = _pacer(webhook_url)
        self._own = http is None
        self._http = http if http is not None else httpx.Client(follow_redirects=False)

    @classmethod
    def from_config(
        cls, cfg: SlackSinkConfig, *, http: httpx.Client | None = None, app_url: str = DEFAULT_APP_URL
    ) -> SlackSink:
        return cls(
            cfg.name,
            cfg.webhook_url.get_secret_value(),
            app_url=app_url,
            digest_threshold=cfg.digest_threshold,
            timeout=cfg.timeout.total_seconds(),
            http=http,
        )

    def __repr__(self) -> str:
        return f"SlackSink(name={self.name!r})"

    def deliver(self, events: Sequence[Mapping[str, Any]]) -> Sequence[Outcome]:
        out: list[Outcome] = []
        gone: str | None = None
        for message in self._plan(events):
            if gone is not None:
                # The webhook itself is gone: the rest of the round would be refused the same way.
                out += [Outcome(OutcomeKind.DEAD, error=gone)] * message.count
                continue
            outcome, webhook_gone = self._send(message.payloads)
            if outcome.kind == OutcomeKind.RETRY:
                out.append(outcome)  # stop here: order holds, later events stay pending
                break
            out += [outcome] * message.count
            if webhook_gone:
                gone = outcome.error
        return out

    def close(self) -> None:
        if self._own:
            self._http.close()

    # -- internals ----------------------------------------------------------------------------

    def _plan(self, events: Sequence[Mapping[str, Any]]) -> list[_Message]:
        if len(events) <= self.digest_threshold:
            return [_Message(build_event_message(e, app_url=self.app_url), 1) for e in events]
        return [_Message(build_digest(events, app_url=self.app_url, items=self.digest_items), len(events))]

    def _send(self, payloads: Sequence[dict[str, Any]]) -> tuple[Outcome, bool]:
        """Post every part; the message is delivered when all parts are (a failed part resends all)."""
        for payload in payloads:
            outcome, gone = self._post(payload)
            if outcome.kind != OutcomeKind.DELIVERED:
                return outcome, gone
        return Outcome.ok(), False

    def _post(self, payload: dict[str, Any]) -> tuple[Outcome, bool]:
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        clock = self._clock or _clock
        with self._pacer.slot(self.min_interval, clock.monotonic, clock.sleep):
            try:
                reply = post(
                    self._http,
                    self._url,
                    content=orjson.dumps(payload),
                    headers=headers,
                    timeout=self.timeout,
                )
            except TRANSPORT_ERRORS as exc:
                return Outcome(OutcomeKind.RETRY, error=describe_error(exc)), False
        return self._outcome(reply)

    def _outcome(self, reply: Reply) -> tuple[Outcome, bool]:
        status, code = reply.status, reply.text(100)
        if status == 200 and code == "ok":
            return Outcome.ok(), False
        said = f"Slack answered HTTP {status}" + (f" {code}" if code else "")
        if status == 429:
            return Outcome(OutcomeKind.RETRY, error=said, retry_after=reply.retry_after()), False
        if 400 <= status < 500 and status != 408:
            # Permanent, so dead at once, even for a dead *webhook*: dead events are counted and
            # explained by `deliveries` and come back with `replay` once it is fixed, where a
            # disabled sink would pile up a silent backlog that bursts into the channel later.
            gone = code in _WEBHOOK_GONE or status in (403, 404, 410)
            note = " (the webhook no longer works: fix it, then replay)" if gone else ""
            return Outcome(OutcomeKind.DEAD, error=f"{said}{note}"), gone
        # 5xx, 408, a redirect (never followed) or a 200 that is not "ok" (a proxy's page): later.
        return Outcome(OutcomeKind.RETRY, error=said), False
