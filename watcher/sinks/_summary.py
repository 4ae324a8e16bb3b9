"""What a message to people says about events, whatever the channel renders it as.

Slack (Block Kit and mrkdwn) and Apprise (Markdown or plain text) tell the same story: the words
for each event type, what a new customer looks like, a watcher notice's details, and a digest's
plan for a big round (counts by type, the first few events, how many more and the command that
lists them). That story lives here, once; each channel keeps only its own markup and limits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..events import EventType, customer_name, is_customer_event, plain_value, plan_headline

__all__ = [
    "DIGEST_ITEMS",
    "MAX_CHANGES",
    "MAX_VALUE",
    "Digest",
    "DigestLine",
    "Fact",
    "Kind",
    "changes",
    "clip",
    "digest_changes",
    "digest_line",
    "duration",
    "facts",
    "kind",
    "notice_details",
    "notice_summary",
    "plan_digest",
    "who",
]

#: A value longer than this is cut with an ellipsis ...
MAX_VALUE = 200
#: ... one event message lists at most this many field changes (or facts, or notice details) ...
MAX_CHANGES = 25
#: ... and a digest shows this many events before "and N more".
DIGEST_ITEMS = 20


@dataclass(frozen=True, slots=True)
class Kind:
    """How people are told about one event type: a title, and the word a digest line uses."""

    title: str
    word: str


#: In the order a digest counts them.
_KINDS: dict[str, Kind] = {
    EventType.CUSTOMER_CREATED: Kind("New customer", "created"),
    EventType.CUSTOMER_UPDATED: Kind("Customer updated", "updated"),
    EventType.CUSTOMER_ARCHIVED: Kind("Customer archived", "archived"),
    EventType.CUSTOMER_UNARCHIVED: Kind("Customer unarchived", "unarchived"),
    EventType.CUSTOMER_DELETED: Kind("Customer deleted", "deleted"),
    EventType.CUSTOMER_PLAN_ADDED: Kind("Customer added to a plan", "added to a plan"),
    EventType.CUSTOMER_PLAN_UPDATED: Kind("Customer's plan changed", "plan changed"),
    EventType.CUSTOMER_PLAN_ENDED: Kind("Customer's plan ended", "plan ended"),
    EventType.CUSTOMER_PLAN_REMOVED: Kind("Customer removed from a plan", "removed from a plan"),
    EventType.POLL_FAILING: Kind("Metronome polling is failing", "polling failing"),
    EventType.POLL_RECOVERED: Kind("Metronome polling recovered", "polling recovered"),
}


def kind(event_type: str) -> Kind:
    """The words for ``event_type``; an unknown type is named as it is."""
    return _KINDS.get(event_type, Kind(event_type, event_type))


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def who(event: Mapping[str, Any]) -> str:
    """The customer's name, else its id: whom the event is about."""
    return customer_name(event) or str(event.get("customer_id") or "unknown customer")


def changes(event: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The event's field changes (anything malformed in the list is left out)."""
    return [c for c in event.get("changes") or [] if isinstance(c, Mapping)]


def digest_changes(event: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The changes a digest line shows: an archive's own ``archived_at`` goes without saying."""
    found = changes(event)
    if event.get("type") == EventType.CUSTOMER_UPDATED:
        return found
    return [c for c in found if c.get("field") != "archived_at"]


@dataclass(frozen=True, slots=True)
class DigestLine:
    """What one event's line in a digest says; each channel renders it in its own markup.

    A notice is its ``title`` alone (``customer`` False). A customer event names the customer, then
    either its ``headline`` (a plan event in words) or its ``word`` and its first ``change``, with
    how many ``more`` changes it has.
    """

    customer: bool
    title: str
    word: str
    headline: str = ""
    change: Mapping[str, Any] | None = None
    more: int = 0


def digest_line(event: Mapping[str, Any]) -> DigestLine:
    etype = str(event.get("type", "event"))
    words = kind(etype)
    if not is_customer_event(etype):
        return DigestLine(False, words.title, words.word)
    headline = plan_headline(event)
    if headline:
        return DigestLine(True, words.title, words.word, headline=headline)
    shown = digest_changes(event)
    return DigestLine(
        True, words.title, words.word, change=shown[0] if shown else None, more=max(len(shown) - 1, 0)
    )


@dataclass(frozen=True, slots=True)
class Fact:
    """One thing worth saying about a new customer. ``field``: the label is a key of its record."""

    label: str
    value: Any
    field: bool = False


def facts(record: Mapping[str, Any]) -> list[Fact]:
    """What a new customer looks like: custom fields, Salesforce account, billable status."""
    out: list[Fact] = []
    fields = record.get("custom_fields")
    if isinstance(fields, Mapping) and fields:
        out += [Fact(str(k), v, field=True) for k, v in list(fields.items())[:MAX_CHANGES]]
    config = record.get("customer_config")
    if isinstance(config, Mapping) and config.get("salesforce_account_id"):
        out.append(Fact("Salesforce account", config["salesforce_account_id"]))
    status = record.get("current_billable_status")
    if isinstance(status, Mapping) and status.get("value"):
        out.append(Fact("Billable status", status["value"]))
    return out


def notice_details(detail: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A ``watcher.*`` notice's ``detail`` as (label, value) lines for people.

    Every key is listed with a readable label, so a key added later still shows; ``*_seconds``
    reads as a duration.
    """
    lines: list[tuple[str, str]] = []
    for key, value in list(detail.items())[:MAX_CHANGES]:
        if value is None:
            continue
        label, shown = str(key), plain_value(value)
        if label.endswith("_seconds") and isinstance(value, int | float):
            label, shown = label.removesuffix("_seconds"), duration(float(value))
        lines.append((label.replace("_", " "), shown))
    return lines


def notice_summary(title: str, detail: Mapping[str, Any]) -> str:
    """One line for a notice: its title, and the error or how many polls failed."""
    reason = detail.get("last_error") or detail.get("error") or detail.get("reason")
    if reason:
        return f"{title}: {clip(plain_value(reason), 300)}"
    if isinstance(detail.get("failed_polls"), int):
        return f"{title} after {detail['failed_polls']} failed polls"
    return title


def duration(seconds: float) -> str:
    """``905`` -> ``15m 5s``: how long polling was down, as a person reads it."""
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return " ".join(f"{n}{unit}" for n, unit in ((h, "h"), (m, "m"), (sec, "s")) if n) or "0s"


@dataclass(frozen=True, slots=True)
class Digest:
    """The plan of one digest: what a channel says when a round is too big for a message each."""

    total: int
    #: ``(event type, how many)`` in the order types are listed (known types first).
    counts: tuple[tuple[str, int], ...]
    #: "customer changes", or "events" when notices are among them.
    what: str
    #: The events shown one line each; ``more`` are left out.
    first: Sequence[Mapping[str, Any]]
    more: int
    #: The lowest and highest sequence of the round, when the events have them.
    sequences: tuple[int, int] | None

    @property
    def headline(self) -> str:
        """``100 customer changes: 20 created, 80 updated``."""
        return f"{self.total} {self.what}: " + ", ".join(f"{n} {kind(t).word}" for t, n in self.counts)

    @property
    def list_command(self) -> str | None:
        """The command that lists every event of the round, when its sequences are known."""
        if self.sequences is None:
            return None
        return f"metronome-watcher events --after-sequence {self.sequences[0] - 1}"


def plan_digest(events: Sequence[Mapping[str, Any]], *, items: int = DIGEST_ITEMS) -> Digest:
    """Counts by type, the first ``items`` events, and how many more."""
    counts = Counter(str(e.get("type", "event")) for e in events)
    order = [t for t in _KINDS if t in counts] + sorted(t for t in counts if t not in _KINDS)
    customer_only = all(is_customer_event(t) for t in counts)
    seqs = [s for s in (e.get("sequence") for e in events) if isinstance(s, int)]
    first = events[:items]
    return Digest(
        total=len(events),
        counts=tuple((t, counts[t]) for t in order),
        what="customer changes" if customer_only else "events",
        first=first,
        more=len(events) - len(first),
        sequences=(min(seqs), max(seqs)) if seqs else None,
    )
