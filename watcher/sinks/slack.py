"""The ``slack`` sink: Block Kit messages to an Incoming Webhook, readable at a glance.

What a message looks like, and why:

* **One message per event** while a delivery round is small (at most ``digest_threshold`` events):
  a header with an emoji and what happened, *who* (the customer's name linked to
  ``{app_url}/customers/{id}``, its id), each field change as ``field: before -> after``, and a
  context line with the event type, sequence and event id (what ``replay --id`` takes).
* **A digest** when a round is bigger (a bulk edit, a backlog after an outage): counts by type,
  the first few items, "and N more" with the command that lists them all. A channel gets a
  handful of messages for 500 changes, not 500 messages.
* Slack's limits are enforced where the message is built, not hoped for: at most 50 blocks per
  message (a longer one is split into several), every section text at most 3000 characters (lines
  are packed into sections, never cut mid-link), header at most 150 characters, long values
  truncated. User data is escaped for mrkdwn (``&``, ``<``, ``>``) so that a customer named
  ``<!channel>`` pings no one.
* **Pacing**: never more than about one message per second per webhook (Slack's documented limit
  for incoming webhooks), shared by every sink in the process that posts to the same webhook. The
  clock and sleep are injectable so tests never wait.

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
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import orjson

from .._logging import add_secret
from ..config import SlackSinkConfig
from . import DEFAULT_APP_URL
from ._base import Outcome
from .http import TRANSPORT_ERRORS, USER_AGENT, Reply, describe_error, parse_retry_after, post

__all__ = [
    "DEFAULT_APP_URL",
    "MAX_BLOCKS",
    "MAX_SECTION_TEXT",
    "SlackSink",
    "build_digest",
    "build_event_message",
]

#: Slack's limits for one message.
MAX_BLOCKS = 50
MAX_SECTION_TEXT = 3000
MAX_HEADER_TEXT = 150
#: Ours, for readability: a value longer than this is cut with an ellipsis ...
MAX_VALUE = 200
#: ... one event message lists at most this many field changes ...
MAX_CHANGES = 25
#: ... and a digest shows this many items before "and N more".
DIGEST_ITEMS = 20
#: Seconds between two messages to one webhook ("about one per second", Slack's own figure).
MIN_INTERVAL = 1.0

#: Slack's answers that say the *webhook* (not just this message) is unusable: once one is seen,
#: the rest of the round is marked dead without sending, instead of being refused one by one.
_WEBHOOK_GONE = frozenset({
    "no_service", "no_service_id", "no_team", "team_disabled", "invalid_token", "channel_not_found",
    "channel_is_archived", "action_prohibited", "posting_to_general_channel_denied",
})  # fmt: skip

_ARROW = "-&gt;"  # "->" in mrkdwn, where ">" must be escaped

#: type -> (emoji, what happened, the short word a digest line uses)
_KINDS: dict[str, tuple[str, str, str]] = {
    "customer.created": (":new:", "New customer", "created"),
    "customer.updated": (":pencil2:", "Customer updated", "updated"),
    "customer.archived": (":file_cabinet:", "Customer archived", "archived"),
    "customer.unarchived": (":recycle:", "Customer unarchived", "unarchived"),
    "customer.deleted": (":wastebasket:", "Customer deleted", "deleted"),
    "watcher.poll_failing": (":rotating_light:", "Metronome polling is failing", "polling failing"),
    "watcher.poll_recovered": (":white_check_mark:", "Metronome polling recovered", "polling recovered"),
}


def _kind(event_type: str) -> tuple[str, str, str]:
    return _KINDS.get(event_type, (":bell:", event_type, event_type))


# -- text helpers -------------------------------------------------------------------------------


def _esc(text: str) -> str:
    """Escape for Slack mrkdwn: only these three have meaning (links, mentions, entities)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _value(value: Any) -> str:
    """A before/after value in mrkdwn: a code span, or an italic word for none/empty."""
    if value is None:
        return "_none_"
    text = _plain(value)
    return _code(text) if text else "_empty_"


def _code(text: str) -> str:
    # A backtick would end the code span early; a quote keeps the value readable.
    return "`" + _esc(_clip(text, MAX_VALUE).replace("`", "'")) + "`"


def _change_line(change: Mapping[str, Any]) -> str:
    field = _code(str(change.get("field", "?")))
    return f"{field}: {_value(change.get('before'))} {_ARROW} {_value(change.get('after'))}"


def _change_plain(change: Mapping[str, Any]) -> str:
    def short(v: Any) -> str:
        return "none" if v is None else _clip(_plain(v), 60)

    return f"{change.get('field', '?')}: {short(change.get('before'))} -> {short(change.get('after'))}"


def _record(event: Mapping[str, Any]) -> Mapping[str, Any]:
    """The customer as now seen (for ``deleted``, the last record seen)."""
    for key in ("customer", "previous"):
        value = event.get(key)
        if isinstance(value, Mapping):
            return value
    return {}


def _name(event: Mapping[str, Any]) -> str:
    name = _record(event).get("name")
    return str(name) if name else str(event.get("customer_id") or "unknown customer")


def _link(event: Mapping[str, Any], app_url: str) -> str:
    """``<{app_url}/customers/{id}|name>``: the customer's page in the Metronome app."""
    cid = event.get("customer_id")
    name = _esc(_clip(_name(event), MAX_VALUE))
    if not cid:
        return name
    return f"<{app_url}/customers/{quote(str(cid), safe='')}|{name}>"


def _sections(lines: Sequence[str], title: str | None = None) -> list[dict[str, Any]]:
    """Pack whole lines into as few section blocks as fit in 3000 characters each."""
    blocks: list[dict[str, Any]] = []
    current = f"*{title}*" if title else ""
    for raw in lines:
        line = _clip(raw, MAX_SECTION_TEXT)  # never hit: values are clipped far below this
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) > MAX_SECTION_TEXT:
            blocks.append(_section(current))
            candidate = line
        current = candidate
    if current:
        blocks.append(_section(current))
    return blocks


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _header(text: str) -> dict[str, Any]:
    return {
        "type": "header",
        "text": {"type": "plain_text", "text": _clip(text, MAX_HEADER_TEXT), "emoji": True},
    }


def _context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": _clip(text, MAX_SECTION_TEXT)}]}


def _split(blocks: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """One payload per 50 blocks; continuation parts say so in their fallback text."""
    chunks = [blocks[i : i + MAX_BLOCKS] for i in range(0, len(blocks), MAX_BLOCKS)] or [[]]
    n = len(chunks)
    return [
        {
            "text": text if n == 1 else f"{text} (part {i}/{n})",
            "blocks": chunk,
            # Links point into the Metronome app, which needs a login: an unfurl would be empty.
            "unfurl_links": False,
            "unfurl_media": False,
        }
        for i, chunk in enumerate(chunks, 1)
    ]


# -- messages -----------------------------------------------------------------------------------


def build_event_message(event: Mapping[str, Any], *, app_url: str = DEFAULT_APP_URL) -> list[dict[str, Any]]:
    """The Slack payload(s) for one event (one, unless its changes need more than 50 blocks)."""
    etype = str(event.get("type", "event"))
    emoji, title, _ = _kind(etype)
    seq = event.get("sequence")
    context = _context(
        f"{_code(etype)} · #{seq} · detected {_esc(str(event.get('detected_at', '?')))} "
        f"· event {_code(str(event.get('id', '?')))}"
    )
    if not etype.startswith("customer."):
        return _notice(event, emoji, title, context)
    name = _name(event)
    record = _record(event)
    cid = str(event.get("customer_id") or "")
    who = f"*{_link(event, app_url)}*\n{_code(cid)}"
    external = record.get("external_id")
    if external and external != cid:
        who += f" · external id {_code(str(external))}"
    blocks = [_header(f"{emoji} {title}: {name}"), _section(who)]
    changes = [c for c in event.get("changes") or [] if isinstance(c, Mapping)]
    if changes:
        lines = [f"• {_change_line(c)}" for c in changes[:MAX_CHANGES]]
        if len(changes) > MAX_CHANGES:
            lines.append(f"_…and {len(changes) - MAX_CHANGES} more changes_")
        blocks += _sections(lines, "Changes")
    elif etype == "customer.created" and (facts := _facts(record)):
        blocks += _sections(facts, "Details")
    elif etype == "customer.deleted":
        blocks.append(_section("No longer in Metronome: in neither listing, and not found by id."))
    blocks.append(context)
    text = f"{title}: {name} ({cid})"
    if changes:
        text += ": " + "; ".join(_change_plain(c) for c in changes[:3])
        if len(changes) > 3:
            text += f" (+{len(changes) - 3} more)"
    return _split(blocks, _esc(_clip(text, 500)))


def _facts(record: Mapping[str, Any]) -> list[str]:
    """What a new customer looks like: custom fields, Salesforce account, billable status."""
    lines = []
    fields = record.get("custom_fields")
    if isinstance(fields, Mapping) and fields:
        lines += [f"• {_code(str(k))}: {_value(v)}" for k, v in list(fields.items())[:MAX_CHANGES]]
    config = record.get("customer_config")
    if isinstance(config, Mapping) and config.get("salesforce_account_id"):
        lines.append(f"• Salesforce account: {_value(config['salesforce_account_id'])}")
    status = record.get("current_billable_status")
    if isinstance(status, Mapping) and status.get("value"):
        lines.append(f"• Billable status: {_value(status['value'])}")
    return lines


def _notice(
    event: Mapping[str, Any], emoji: str, title: str, context: dict[str, Any]
) -> list[dict[str, Any]]:
    """``watcher.poll_failing`` / ``watcher.poll_recovered``: the watcher talking about itself.

    Every ``detail`` key is listed with a readable label, so a key added later still shows.
    """
    raw = event.get("detail")
    detail: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    lines: list[str] = []
    for key, value in list(detail.items())[:MAX_CHANGES]:
        if value is None:
            continue
        label, shown = str(key), _plain(value)
        if label.endswith("_seconds") and isinstance(value, int | float):
            label, shown = label.removesuffix("_seconds"), _duration(float(value))
        lines.append(f"*{_esc(_clip(label.replace('_', ' '), 60))}:* {_esc(_clip(shown, 500))}")
    blocks = [_header(f"{emoji} {title}"), *_sections(lines), context]
    text = title
    reason = detail.get("last_error") or detail.get("error") or detail.get("reason")
    if reason:
        text += f": {_clip(_plain(reason), 300)}"
    elif isinstance(detail.get("failed_polls"), int):
        text += f" after {detail['failed_polls']} failed polls"
    return _split(blocks, _esc(text))


def _duration(seconds: float) -> str:
    """``905`` -> ``15m 5s``: how long polling was down, as a person reads it."""
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return " ".join(f"{n}{unit}" for n, unit in ((h, "h"), (m, "m"), (sec, "s")) if n) or "0s"


def _digest_line(event: Mapping[str, Any], app_url: str) -> str:
    etype = str(event.get("type", "event"))
    emoji, title, word = _kind(etype)
    if not etype.startswith("customer."):
        return f"• {emoji} {_esc(title)}"
    line = f"• {emoji} {_link(event, app_url)} {word}"
    changes = [c for c in event.get("changes") or [] if isinstance(c, Mapping)]
    shown = (
        [c for c in changes if c.get("field") != "archived_at"] if etype != "customer.updated" else changes
    )
    if shown:
        line += f": {_change_line(shown[0])}"
        if len(shown) > 1:
            line += f" (+{len(shown) - 1} more)"
    return line


def build_digest(
    events: Sequence[Mapping[str, Any]], *, app_url: str = DEFAULT_APP_URL, items: int = DIGEST_ITEMS
) -> list[dict[str, Any]]:
    """One digest for many events: counts by type, the first ``items``, "and N more"."""
    n = len(events)
    counts = Counter(str(e.get("type", "event")) for e in events)
    order = [t for t in _KINDS if t in counts] + sorted(t for t in counts if t not in _KINDS)
    customer_only = all(t.startswith("customer.") for t in counts)
    what = "customer changes" if customer_only else "events"
    by_type = [f"{_kind(t)[0]} *{counts[t]}* {_esc(_kind(t)[2])}" for t in order]
    blocks = [_header(f":bar_chart: {n} {what}"), *_sections(by_type, "By type")]
    first = events[:items]
    blocks += _sections(
        [_digest_line(e, app_url) for e in first], f"First {len(first)}" if n > items else None
    )
    seqs = [int(s) for s in (e.get("sequence") for e in events) if isinstance(s, int)]
    if n > len(first):
        more = f"_…and {n - len(first)} more._"
        if seqs:
            more += f" List them all with `metronome-watcher events --after-sequence {min(seqs) - 1}`."
        blocks.append(_section(more))
    if seqs:
        blocks.append(_context(f"sequences #{min(seqs)} to #{max(seqs)}"))
    text = f"{n} {what}: " + ", ".join(f"{counts[t]} {_kind(t)[2]}" for t in order)
    return _split(blocks, _esc(text))


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


#: The pacer's clock and sleep when a sink is given none. Module-level so that a test driving the
#: whole CLI can swap them for fakes; sinks read them when they are built.
_monotonic: Callable[[], float] = time.monotonic
_sleep: Callable[[float], None] = time.sleep

_PACERS: dict[str, _Pacer] = {}
_PACERS_LOCK = threading.Lock()


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
        # Cut out of any error text: the path is the secret part, the host is not.
        self._secrets = tuple(s for s in (webhook_url, urlsplit(webhook_url).path) if len(s) > 1)
        add_secret(webhook_url)  # build_app registers it too; this covers sinks built directly
        self._sleep = sleep or _sleep
        self._monotonic = monotonic or _monotonic
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
                out += [Outcome("dead", error=gone)] * message.count
                continue
            outcome, webhook_gone = self._send(message.payloads)
            if outcome.kind == "retry":
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
            if outcome.kind != "delivered":
                return outcome, gone
        return Outcome.ok(), False

    def _post(self, payload: dict[str, Any]) -> tuple[Outcome, bool]:
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        with self._pacer.slot(self.min_interval, self._monotonic, self._sleep):
            try:
                reply = post(
                    self._http,
                    self._url,
                    content=orjson.dumps(payload),
                    headers=headers,
                    timeout=self.timeout,
                )
            except TRANSPORT_ERRORS as exc:
                return Outcome("retry", error=describe_error(exc, self._secrets)), False
        return self._outcome(reply)

    def _outcome(self, reply: Reply) -> tuple[Outcome, bool]:
        status, code = reply.status, reply.text(100)
        if status == 200 and code == "ok":
            return Outcome.ok(), False
        said = f"Slack answered HTTP {status}" + (f" {code}" if code else "")
        if status == 429:
            wait = parse_retry_after(reply.headers.get("Retry-After"))
            return Outcome("retry", error=said, retry_after=wait), False
        if 400 <= status < 500 and status != 408:
            # Permanent, so dead at once, as the issue asks. For a dead *webhook* (no_service,
            # channel_not_found, channel_is_archived, invalid_token, ...) we considered
            # Outcome("disable") instead, which would keep every event pending until someone runs
            # enable-sink. We chose dead: the issue says these "go dead at once and are logged as
            # such"; dead events are counted and explained by `deliveries` and come back with
            # `replay --sink NAME` (by time or sequence range) once the webhook is fixed, while a
            # disabled sink would pile up a silent backlog that bursts into the channel later.
            gone = code in _WEBHOOK_GONE or status in (403, 404, 410)
            note = " (the webhook no longer works: fix it, then replay)" if gone else ""
            return Outcome("dead", error=f"{said}{note}"), gone
        # 5xx, 408, a redirect (never followed) or a 200 that is not "ok" (a proxy's page): later.
        return Outcome("retry", error=said), False
