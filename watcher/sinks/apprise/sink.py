"""The ``apprise`` sink: every channel Apprise speaks to (Microsoft Teams, email, PagerDuty, Discord,
Opsgenie, Telegram, ntfy, ...), one URL each.

* **One URL, one delivery target.** Apprise's ``notify()`` answers one true or false for all the
  URLs it holds, so a sink that sent to several at once could neither tell which failed nor retry
  that one alone. Instead each configured URL is a sink of its own (:class:`AppriseSink`, named
  ``{sink}.{label}``: see ``AppriseSinkConfig``), with its own outbox rows, back-off, dead events
  and state: a URL that fails holds back and re-sends to no other.
* One message per event while a round is small (at most ``digest_threshold`` events), a digest
  when it is bigger, as ``messages`` builds them for what the service takes (Markdown, HTML or
  plain text) and within its limits.
* **Every failure is a retry.** Apprise says only that a send failed, not whether it could ever
  succeed (its plugins log the HTTP status or the exception, and the same status means different
  things to different services), and it passes no ``Retry-After`` on. A retry loses nothing: the
  sink backs off, a failure that lasts turns dead after ``[delivery] max_age`` like every other,
  and ``replay`` brings it back. Marking an event dead on a guess would drop a churn alert because
  a mail server was briefly refusing. The reason is Apprise's own log lines for that send,
  redacted.
* The URL is the secret, whole and in its parts: it appears in no repr, log line or
  ``Outcome.error`` (``watcher._apprise.register_url``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ... import _apprise
from ...config import DEFAULT_APP_URL, AppriseSinkConfig
from ...errors import ConfigError
from ...events import OutcomeKind
from .._summary import DIGEST_ITEMS
from ..base import Outcome
from .messages import Message, Shape, build_digest, build_event_message

__all__ = ["AppriseSink"]


class AppriseSink:
    """Sends events to one Apprise URL."""

    #: Events per ``deliver`` call: a round above ``digest_threshold`` becomes one digest.
    max_batch = 100

    def __init__(
        self,
        name: str,
        url: str,
        *,
        app_url: str = DEFAULT_APP_URL,
        digest_threshold: int = 5,
        digest_items: int = DIGEST_ITEMS,
    ) -> None:
        self.name = name
        self.app_url = app_url.rstrip("/")
        self.digest_threshold = digest_threshold
        self.digest_items = digest_items
        try:
            self._service = _apprise.open_service(url)  # registers the URL's secrets first
        except ValueError as exc:
            raise ConfigError(f"sink {name}: {exc}") from None
        service = self._service
        self.scheme = service.scheme
        self.shape = Shape(service.markup, service.title_limit, service.body_limit)

    @classmethod
    def from_config(cls, cfg: AppriseSinkConfig, *, app_url: str = DEFAULT_APP_URL) -> list[AppriseSink]:
        """One sink per URL, each named after its delivery target."""
        return [
            cls(
                f"{cfg.name}.{label}",
                url.get_secret_value(),
                app_url=app_url,
                digest_threshold=cfg.digest_threshold,
            )
            for label, url in cfg.urls.items()
        ]

    def __repr__(self) -> str:
        return f"AppriseSink(name={self.name!r}, service={self._service.name!r})"

    def deliver(self, events: Sequence[Mapping[str, Any]]) -> Sequence[Outcome]:
        if len(events) > self.digest_threshold:
            digest = build_digest(events, shape=self.shape, app_url=self.app_url, items=self.digest_items)
            outcome = self._send(digest)
            # A failed digest is one retry: the round stays pending, in order, and goes again.
            return [outcome] if outcome.kind == OutcomeKind.RETRY else [outcome] * len(events)
        out: list[Outcome] = []
        for event in events:
            outcome = self._send(build_event_message(event, shape=self.shape, app_url=self.app_url))
            out.append(outcome)
            if outcome.kind == OutcomeKind.RETRY:
                break  # keep order; unattempted events stay pending untouched
        return out

    def close(self) -> None:
        pass  # nothing of ours stays open between sends

    def _send(self, message: Message) -> Outcome:
        failure = self._service.send(
            message.title, message.body, markdown=message.markdown, notify_type=message.notify_type
        )
        if failure is None:
            return Outcome.ok()
        return Outcome(OutcomeKind.RETRY, error=f"{self._service.name} ({self.scheme}://): {failure}")
