"""What an Apprise message says: a title and a body in words, for one event or a digest of many.

* **One message per event** while a delivery round is small: the title says what happened to whom
  ("Customer archived: Acme Inc"); the body says who (the name linked to
  ``{app_url}/customers/{id}``, the id, the external id), each change as ``field: before ->
  after``, and a last line with the event type, sequence and event id (what ``replay --id``
  takes).
* **A digest** when a round is bigger, as Slack has it (``sinks._summary``): counts by type, the
  first few events one line each, "and N more" with the command that lists them all.
* **Markdown where the service takes it.** A :class:`Shape` says what the service takes:
  ``markdown`` (sent as Markdown), ``html`` (sent as Markdown, which Apprise turns into HTML: an
  email), or ``text`` (plain words, no markup to show as stray asterisks: PagerDuty, SMS).
  Customer data is escaped for the markup, so a name cannot inject a link, a mention or HTML;
  values are code spans, with backticks turned into quotes.
* **Within the service's limits**: a title longer than the service takes is cut; a body too long
  loses its last changes (or digest lines) whole, with a line saying how many, never the line
  with the event id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from ...config import DEFAULT_APP_URL
from ...events import EventType, change_line, customer_record, is_customer_event, plain_value, plan_headline
from .._summary import (
    DIGEST_ITEMS,
    MAX_CHANGES,
    MAX_VALUE,
    changes,
    clip,
    digest_line,
    facts,
    kind,
    notice_details,
    plan_digest,
    who,
)

__all__ = ["Markup", "Message", "Shape", "build_digest", "build_event_message"]

Markup = Literal["markdown", "html", "text"]

#: Apprise's notification types, which services show as a colour, an icon or a severity.
_SEVERITY: dict[str, str] = {
    EventType.CUSTOMER_CREATED: "info",
    EventType.CUSTOMER_UPDATED: "info",
    EventType.CUSTOMER_ARCHIVED: "warning",
    EventType.CUSTOMER_UNARCHIVED: "success",
    EventType.CUSTOMER_DELETED: "warning",
    EventType.CUSTOMER_PLAN_ADDED: "info",
    EventType.CUSTOMER_PLAN_UPDATED: "warning",  # an end date that appears is the early churn notice
    EventType.CUSTOMER_PLAN_ENDED: "warning",
    EventType.CUSTOMER_PLAN_REMOVED: "warning",
    EventType.POLL_FAILING: "failure",
    EventType.POLL_RECOVERED: "success",
}
_WORST = ("failure", "warning", "info", "success")


@dataclass(frozen=True, slots=True)
class Shape:
    """What one service takes. ``title_limit`` 0: the service has no title of its own (Apprise puts
    it at the top of the body, in the body's markup). ``body_limit`` 0: no limit known."""

    markup: Markup = "markdown"
    title_limit: int = 250
    body_limit: int = 0


@dataclass(frozen=True, slots=True)
class Message:
    title: str
    body: str
    #: ``info``, ``success``, ``warning`` or ``failure``, as Apprise's ``notify_type``.
    notify_type: str
    #: Whether ``body`` (and a blended title) is Markdown.
    markdown: bool


# -- writing in one markup ------------------------------------------------------------------------


class _Writer:
    """Words in one markup: emphasis, code spans, links, and escaping of customer data."""

    def __init__(self, markup: Markup) -> None:
        self.markup = markup
        self.plain = markup == "text"

    def esc(self, text: str) -> str:
        """Customer data as literal text. Markdown that stays Markdown takes a backslash before any
        punctuation (CommonMark); Markdown that becomes HTML (Python-Markdown) cannot escape ``<``
        that way, so it becomes an entity there."""
        if self.plain:
            return text
        out = []
        for ch in text:
            if ch in "\\`*_[]>~|":
                out.append("\\" + ch)
            elif ch == "<":
                out.append("&lt;" if self.markup == "html" else "\\<")
            elif ch == "&" and self.markup == "html":
                out.append("&amp;")
            else:
                out.append(ch)
        return "".join(out)

    def code(self, text: str) -> str:
        text = clip(text, MAX_VALUE)
        return text if self.plain else "`" + text.replace("`", "'") + "`"

    def value(self, value: Any) -> str:
        if value is None:
            return "none" if self.plain else "_none_"
        text = plain_value(value)
        if not text:
            return "(empty)" if self.plain else "_empty_"
        return self.code(text)

    def bold(self, text: str) -> str:
        return text if self.plain else f"**{text}**"

    def more(self, n: int) -> str:
        """The line that stands for ``n`` list items left out."""
        return f"- …and {n} more" if self.plain else f"- _…and {n} more_"

    def heading(self, text: str) -> str:
        return f"{text}:" if self.plain else f"**{text}**"

    def change(self, c: Mapping[str, Any]) -> str:
        return change_line(c, value=self.value, field=self.code)

    def customer(self, event: Mapping[str, Any], app_url: str) -> str:
        """The customer's name, linked to its page in the Metronome app where the markup links."""
        name = self.esc(clip(who(event), MAX_VALUE))
        cid = event.get("customer_id")
        if self.plain or not cid:
            return name
        return f"[{name}]({_customer_url(app_url, str(cid))})"


def _customer_url(app_url: str, cid: str) -> str:
    return f"{app_url}/customers/{quote(cid, safe='')}"


def _footer(w: _Writer, event: Mapping[str, Any]) -> str:
    etype = str(event.get("type", "event"))
    return (
        f"{w.code(etype)} · #{event.get('sequence')} · detected {w.esc(str(event.get('detected_at', '?')))}"
        f" · event {w.code(str(event.get('id', '?')))}"
    )


def _fit(
    w: _Writer,
    title: str,
    head: Sequence[str],
    items: Sequence[str],
    tail: Sequence[str],
    shape: Shape,
    *,
    heading: str | Callable[[int, int], str] | None = None,
    more: Callable[[int], str] | None = None,
    hidden: int = 0,
) -> tuple[str, str]:
    """The title cut to the service's limit, and the body, paragraphs apart: ``head``; then
    ``heading`` over as many ``items`` as fit, with a line ``more(n)`` for the ``n`` left out
    (``hidden`` of them already were); then ``tail``. A callable ``heading`` is given how many
    items are shown and how many are left out."""
    more = more or w.more
    # A title the service has no room for goes at the top of the body: it stays short there.
    title = clip(title, shape.title_limit or MAX_VALUE)
    room = 0
    if shape.body_limit:
        room = max(1, shape.body_limit - (len(title) + 2 if shape.title_limit == 0 else 0))

    def body(n: int) -> str:
        left = len(items) - n + hidden
        shown = "\n".join([*items[:n], *([more(left)] if left else [])])
        over = heading(n, left) if callable(heading) else heading
        if over and shown:  # a Markdown list must stand apart from the line above it
            shown = over + ("\n" if w.plain else "\n\n") + shown
        return "\n\n".join(p for p in [*head, shown, *tail] if p)

    n = len(items)
    while room and n and len(body(n)) > room:
        n -= 1
    text = body(n)
    if room and len(text) > room:
        text = clip(text, room)  # even without its items it does not fit: cut, as a last resort
    return title, text


# -- messages -------------------------------------------------------------------------------------


def build_event_message(
    event: Mapping[str, Any], *, shape: Shape = Shape(), app_url: str = DEFAULT_APP_URL
) -> Message:
    """The message for one event."""
    w = _Writer(shape.markup)
    etype = str(event.get("type", "event"))
    title = kind(etype).title
    severity = _SEVERITY.get(etype, "info")
    blended = shape.title_limit == 0
    if not is_customer_event(etype):
        return _notice(event, w, title, severity, shape)
    name = who(event)
    record = customer_record(event)
    cid = str(event.get("customer_id") or "")
    ids = [w.code(cid)] if cid else []
    external = record.get("external_id")
    if external and external != cid:
        ids.append(f"external id {w.code(str(external))}")
    line = " · ".join([w.bold(w.customer(event, app_url)), *ids])
    head = [line + (f"\n{_customer_url(app_url, cid)}" if w.plain and cid else "")]
    headline = plan_headline(event)
    if headline:
        head.append(w.bold(w.esc(headline[0].upper() + headline[1:])))
    found = changes(event)
    items: list[str] = []
    heading = None
    if found:
        heading = w.heading("Changes")
        items = [f"- {w.change(c)}" for c in found[:MAX_CHANGES]]
    elif etype == EventType.CUSTOMER_CREATED and (known := facts(record)):
        heading = w.heading("Details")
        items = [f"- {w.code(f.label) if f.field else f.label}: {w.value(f.value)}" for f in known]
    elif etype == EventType.CUSTOMER_DELETED:
        head.append("No longer in Metronome: in neither listing, and not found by id.")
    title_text = f"{title}: {w.esc(name) if blended else name}"
    hidden = len(found) - len(items) if found else 0
    title_text, body = _fit(
        w, title_text, head, items, [_footer(w, event)], shape, heading=heading, hidden=hidden
    )
    return Message(title_text, body, severity, not w.plain)


def _notice(event: Mapping[str, Any], w: _Writer, title: str, severity: str, shape: Shape) -> Message:
    """``watcher.poll_failing`` / ``watcher.poll_recovered``: the watcher talking about itself."""
    raw = event.get("detail")
    detail: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    items = [
        f"- {w.bold(w.esc(clip(label, 60)) + ':')} {w.esc(clip(shown, 500))}"
        for label, shown in notice_details(detail)
    ]
    title, body = _fit(w, title, [], items, [_footer(w, event)], shape)
    return Message(title, body, severity, not w.plain)


def _digest_line(w: _Writer, event: Mapping[str, Any], app_url: str) -> str:
    d = digest_line(event)
    if not d.customer:
        return f"- {w.esc(d.title)}"
    line = f"- {w.bold(w.customer(event, app_url))}"
    if d.headline:
        return f"{line}: {w.esc(d.headline)}"
    line += f" {d.word}"
    if d.change is not None:
        line += f": {w.change(d.change)}" + (f" (+{d.more} more)" if d.more else "")
    return line


def build_digest(
    events: Sequence[Mapping[str, Any]],
    *,
    shape: Shape = Shape(),
    app_url: str = DEFAULT_APP_URL,
    items: int = DIGEST_ITEMS,
) -> Message:
    """One message for many events: counts by type, the first ``items``, "and N more"."""
    w = _Writer(shape.markup)
    plan = plan_digest(events, items=items)
    by_type = "\n".join(f"- {n} {w.esc(kind(t).word)}" for t, n in plan.counts)

    def heading(shown: int, left: int) -> str:
        return w.heading(f"First {shown}" if left else "Events")

    lines = [_digest_line(w, e, app_url) for e in plan.first]
    tail = [f"Sequences #{plan.sequences[0]} to #{plan.sequences[1]}."] if plan.sequences else []

    def more(n: int) -> str:
        text = f"…and {n} more." if w.plain else f"_…and {n} more._"
        if plan.list_command:
            text += f" List them all with {w.code(plan.list_command)}."
        return text

    types = {t for t, _ in plan.counts}
    severity = next((s for s in _WORST if any(_SEVERITY.get(t, "info") == s for t in types)), "info")
    by_type = w.heading("By type") + ("\n" if w.plain else "\n\n") + by_type
    title, body = _fit(
        w, plan.headline, [by_type], lines, tail, shape, heading=heading, more=more, hidden=plan.more
    )
    return Message(title, body, severity, not w.plain)
