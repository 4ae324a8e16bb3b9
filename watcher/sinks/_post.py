"""POSTing to a receiver, shared by the sinks that speak HTTP (``http`` and ``slack``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from .._retry import parse_retry_after
from .._secrets import redact

__all__ = ["MAX_RETRY_AFTER", "TRANSPORT_ERRORS", "USER_AGENT", "Reply", "describe_error", "post"]

USER_AGENT = "metronome-watcher"
#: We read at most this much of a response body: enough for an error message, never a memory hog.
_BODY_LIMIT = 4096
#: A receiver asking for a longer pause than this gets this much, so that one odd header cannot
#: silence a sink for days; ``max_age`` still applies on top.
MAX_RETRY_AFTER = 6 * 3600.0
#: What :func:`post` may raise for receiver trouble (everything else is a bug and propagates).
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError)


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

    def retry_after(self, *, now: float | None = None) -> float | None:
        """Seconds the receiver's ``Retry-After`` asks for, at most :data:`MAX_RETRY_AFTER`."""
        seconds = parse_retry_after(self.headers.get("Retry-After"), now=time.time() if now is None else now)
        return None if seconds is None else min(seconds, MAX_RETRY_AFTER)


def post(
    client: httpx.Client, url: str, *, content: bytes, headers: Mapping[str, str], timeout: float
) -> Reply:
    """POST ``content`` without following redirects and read at most a few KiB of the answer.

    Raises what :data:`TRANSPORT_ERRORS` names, for the caller to turn into an outcome.
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


def describe_error(exc: BaseException) -> str:
    """``ConnectTimeout: timed out``, with every secret cut out of the message."""
    text = " ".join(str(exc).split()) or "no detail"
    return redact(f"{type(exc).__name__}: {text}")[:300]
