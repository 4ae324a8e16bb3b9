"""The ``http`` sink: every event POSTed as the v1 contract JSON, signed per Standard Webhooks.

Why it is shaped this way:

* **One request per event, body = the contract.** The body is ``orjson.dumps(event)``, byte for byte
  the audit log's payload, so receivers verify the signature over exactly what they parse and
  dedupe on ``webhook-id`` (the event id, the same on every attempt). The timestamp and the
  signature are made fresh for each attempt, because receivers refuse stale timestamps.
* **Redirects are never followed.** A signed event re-sent to wherever a ``Location`` header points
  would reach a host the operator never configured; a 3xx is a retryable failure instead.
* **Status -> outcome**, chosen for what an operator of a webhook consumer expects:

  ======================================  ===========================================================
  2xx                                     delivered
  3xx                                     retry (not followed, see above)
  401, 403                                retry: a receiver's auth is misconfigured by a person and
                                          fixed by a person; nothing is lost meanwhile (``max_age``
                                          still gives up eventually)
  408, 409, 423, 425, 429                 retry, honouring ``Retry-After``
  410                                     disable the sink until ``enable-sink`` (the receiver says
                                          the endpoint is gone for good; the event stays pending)
  any other 4xx (400, 404, 413, 422, ..)  dead: this request will never be accepted as it is
  5xx, timeouts, refused/dropped conns    retry
  ======================================  ===========================================================

* **The batch stops at the first retry or disable**, returning outcomes only for the events it
  attempted, so order is kept and a sick receiver is not hammered.
* The signing secret is registered as a secret: no repr, log line or ``Outcome.error`` shows it.

Signing is the ``standardwebhooks`` package's, the reference implementation receivers verify with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from standardwebhooks import Webhook

from .._secrets import register
from ..config import HttpSinkConfig
from ..events import OutcomeKind
from ._post import TRANSPORT_ERRORS, USER_AGENT, Reply, describe_error, post
from .base import Outcome

__all__ = ["HttpSink"]

_RETRY_4XX = frozenset({401, 403, 408, 409, 423, 425, 429})


class HttpSink:
    """POSTs each event to ``url``, signed with a Standard Webhooks ``whsec_...`` secret."""

    #: Events per ``deliver`` call; each is its own request, so this only bounds one database read.
    max_batch = 50

    def __init__(
        self,
        name: str,
        url: str,
        secret: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.url = url
        self.timeout = timeout
        register(secret)
        self._webhook = Webhook(secret)
        self._headers = dict(headers or {})
        self._clock = clock
        self._own = http is None
        self._http = http if http is not None else httpx.Client(follow_redirects=False)

    @classmethod
    def from_config(cls, cfg: HttpSinkConfig, *, http: httpx.Client | None = None) -> HttpSink:
        return cls(
            cfg.name,
            cfg.url,
            cfg.secret.get_secret_value(),
            headers=cfg.headers,
            timeout=cfg.timeout.total_seconds(),
            http=http,
        )

    def __repr__(self) -> str:
        # The host only: a query string or path may carry a receiver's own token.
        return f"HttpSink(name={self.name!r}, host={urlsplit(self.url).netloc!r})"

    def deliver(self, events: Sequence[Mapping[str, Any]]) -> Sequence[Outcome]:
        out: list[Outcome] = []
        for event in events:
            outcome = self._send(event)
            out.append(outcome)
            if outcome.kind in (OutcomeKind.RETRY, OutcomeKind.DISABLE):
                break  # keep order; unattempted events stay pending untouched
        return out

    def close(self) -> None:
        if self._own:
            self._http.close()

    # -- internals ----------------------------------------------------------------------------

    def _send(self, event: Mapping[str, Any]) -> Outcome:
        body = orjson.dumps(event)
        msg_id = str(event["id"])
        now = self._clock()
        timestamp = int(now)
        signature = self._webhook.sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body.decode())
        headers = httpx.Headers(self._headers)
        # Ours win over configured extra headers: a stray "Content-Type" must not break verification.
        headers["Content-Type"] = "application/json"
        headers["webhook-id"] = msg_id
        headers["webhook-timestamp"] = str(timestamp)
        headers["webhook-signature"] = signature
        headers.setdefault("User-Agent", USER_AGENT)
        try:
            reply = post(self._http, self.url, content=body, headers=headers, timeout=self.timeout)
        except TRANSPORT_ERRORS as exc:
            return Outcome(OutcomeKind.RETRY, error=describe_error(exc))
        return self._outcome(reply, now)

    def _outcome(self, reply: Reply, now: float) -> Outcome:
        status = reply.status
        if 200 <= status < 300:
            return Outcome.ok()
        detail = reply.text()
        error = f"HTTP {status}" + (f": {detail}" if detail else "")
        if 300 <= status < 400:
            return Outcome(OutcomeKind.RETRY, error=f"HTTP {status} redirect (not followed)")
        if status == 410:
            return Outcome(OutcomeKind.DISABLE, error=f"{error} (receiver says the endpoint is gone)")
        if status in _RETRY_4XX or status >= 500 or status < 200:
            return Outcome(OutcomeKind.RETRY, error=error, retry_after=reply.retry_after(now=now))
        return Outcome(OutcomeKind.DEAD, error=error)
