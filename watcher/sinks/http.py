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
* The signing secret lives only as the decoded key; no repr, log line or ``Outcome.error`` holds it.

:func:`post` and :func:`parse_retry_after` are shared with the Slack sink.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from .._logging import add_secret
from ..config import HttpSinkConfig
from ..errors import ConfigError
from ._base import Outcome

__all__ = [
    "MAX_RETRY_AFTER",
    "TRANSPORT_ERRORS",
    "USER_AGENT",
    "HttpSink",
    "Reply",
    "decode_secret",
    "describe_error",
    "parse_retry_after",
    "post",
    "sign",
]

USER_AGENT = "metronome-watcher"
#: We read at most this much of a response body: enough for an error message, never a memory hog.
_BODY_LIMIT = 4096
#: A receiver asking for a longer pause than this gets this much, so that one odd header cannot
#: silence a sink for days; ``max_age`` still applies on top.
MAX_RETRY_AFTER = 6 * 3600.0
_RETRY_4XX = frozenset({401, 403, 408, 409, 423, 425, 429})
_SECRET_PREFIX = "whsec_"


@dataclass(frozen=True, slots=True)
class Reply:
    """A receiver's answer, with the body cut to a few KiB."""

    status: int
    headers: httpx.Headers
    body: bytes

    def text(self, limit: int = 200) -> str:
        """The start of the body as one line, for an error message."""
        text = " ".join(self.body.decode("utf-8", "replace").split())
        return text if len(text) <= limit else text[: limit - 3] + "..."


def post(
    client: httpx.Client, url: str, *, content: bytes, headers: Mapping[str, str], timeout: float
) -> Reply:
    """POST ``content`` without following redirects and read at most a few KiB of the answer.

    Raises httpx errors (``httpx.HTTPError``, ``httpx.InvalidURL``) for the caller to map.
    """
    with client.stream(
        "POST", url, content=content, headers=headers, timeout=timeout, follow_redirects=False
    ) as resp:
        body = bytearray()
        for chunk in resp.iter_bytes():
            body += chunk
            if len(body) >= _BODY_LIMIT:
                break  # leaves the rest unread: the connection is closed rather than reused
        return Reply(resp.status_code, resp.headers, bytes(body[:_BODY_LIMIT]))


#: What :func:`post` may raise for receiver trouble (everything else is a bug and propagates).
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError)


def describe_error(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """``ConnectTimeout: timed out``, with every secret string cut out of the message."""
    text = " ".join(str(exc).split()) or "no detail"
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return f"{type(exc).__name__}: {text}"[:300]


def parse_retry_after(value: str | None, *, now: Callable[[], float] = time.time) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None when absent or junk."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - now()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret. Raises ValueError (without echoing the secret)."""
    if not secret.startswith(_SECRET_PREFIX):
        raise ValueError("must be a Standard Webhooks secret starting with 'whsec_'")
    encoded = secret[len(_SECRET_PREFIX) :].strip()
    try:
        # Padding is optional, as in the reference implementations (standardwebhooks pads too).
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the part after 'whsec_' is not valid base64") from None
    if not key:
        raise ValueError("the part after 'whsec_' is empty")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


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
        self._key = decode_secret(secret)
        add_secret(secret)  # build_app registers it too; this covers sinks built directly
        self._headers = dict(headers or {})
        self._clock = clock
        self._own = http is None
        self._http = http if http is not None else httpx.Client(follow_redirects=False)

    @classmethod
    def from_config(cls, cfg: HttpSinkConfig, *, http: httpx.Client | None = None) -> HttpSink:
        try:
            return cls(
                cfg.name,
                cfg.url,
                cfg.secret.get_secret_value(),
                headers=cfg.headers,
                timeout=cfg.timeout.total_seconds(),
                http=http,
            )
        except ValueError as exc:  # the message never contains the secret (see decode_secret)
            raise ConfigError(f"sinks.{cfg.name}.secret: {exc}") from None

    def __repr__(self) -> str:
        # The host only: a query string or path may carry a receiver's own token.
        return f"HttpSink(name={self.name!r}, host={urlsplit(self.url).netloc!r})"

    def deliver(self, events: Sequence[Mapping[str, Any]]) -> Sequence[Outcome]:
        out: list[Outcome] = []
        for event in events:
            outcome = self._send(event)
            out.append(outcome)
            if outcome.kind in ("retry", "disable"):
                break  # keep order; unattempted events stay pending untouched
        return out

    def close(self) -> None:
        if self._own:
            self._http.close()

    # -- internals ----------------------------------------------------------------------------

    def _send(self, event: Mapping[str, Any]) -> Outcome:
        body = orjson.dumps(event)
        msg_id = str(event["id"])
        timestamp = int(self._clock())
        headers = httpx.Headers(self._headers)
        # Ours win over configured extra headers: a stray "Content-Type" must not break verification.
        headers["Content-Type"] = "application/json"
        headers["webhook-id"] = msg_id
        headers["webhook-timestamp"] = str(timestamp)
        headers["webhook-signature"] = sign(self._key, msg_id, timestamp, body)
        headers.setdefault("User-Agent", USER_AGENT)
        try:
            reply = post(self._http, self.url, content=body, headers=headers, timeout=self.timeout)
        except TRANSPORT_ERRORS as exc:
            return Outcome("retry", error=describe_error(exc))
        return self._outcome(reply)

    def _outcome(self, reply: Reply) -> Outcome:
        status = reply.status
        if 200 <= status < 300:
            return Outcome.ok()
        detail = reply.text()
        error = f"HTTP {status}" + (f": {detail}" if detail else "")
        if 300 <= status < 400:
            return Outcome("retry", error=f"HTTP {status} redirect (not followed)")
        if status == 410:
            return Outcome("disable", error=f"{error} (receiver says the endpoint is gone)")
        if status in _RETRY_4XX or status >= 500 or status < 200:
            return Outcome(
                "retry",
                error=error,
                retry_after=parse_retry_after(reply.headers.get("Retry-After"), now=self._clock),
            )
        return Outcome("dead", error=error)
