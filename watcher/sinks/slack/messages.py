"""What a Slack message says: one event, or a digest of many, as Block Kit, within Slack's limits.

* **One message per event** while a delivery round is small: a header with an emoji and what
  happened, *who* (the customer's name linked to ``{app_url}/customers/{id}``, its id), for a plan
  event what it means in words (``plan Growth ends on 2026-12-31``), each field change as ``field:
  before -> after`` (a changed list as the items added and removed), and a context line with the
  event type, sequence and event id (what ``replay --id`` takes).
* **A digest** when a round is bigger (a bulk edit, a backlog after an outage): counts by type, the
  first few items, "and N more" with the command that lists them all.
* Slack's limits are enforced where the message is built, not hoped for: at most 50 blocks per
  message (a longer one is split into several), every section text at most 3000 characters (lines
  are packed into sections, never cut mid-link), header at most 150 characters, long values
  truncated. User data is escaped for mrkdwn (``&``, ``<``, ``>``) so that a customer named
  ``<!channel>`` pings no one.

The words (titles, digest counts, which changes a digest line shows) are ``sinks._summary``'s,
shared with the Apprise sink; this module is the Block Kit and mrkdwn around them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
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
    notice_summary,
    plan_digest,
    who,
)

__all__ = [
    "DIGEST_ITEMS",
    "MAX_BLOCKS",
    "MAX_CHANGES",
    "MAX_HEADER_TEXT",
    "MAX_SECTION_TEXT",
    "MAX_VALUE",
    "build_digest",
    "build_event_message",
]

#: Slack's limits for one message.
MAX_BLOCKS = 50
MAX_SECTION_TEXT = 3000
MAX_HEADER_TEXT = 150

_ARROW = "-&gt;"  # "->" in mrkdwn, where ">" must be escaped

#: Slack's emoji for each type (the words are ``_summary``'s, shared with every channel).
_EMOJI: dict[str, str] = {
    EventType.CUSTOMER_CREATED: ":new:",
    EventType.CUSTOMER_UPDATED: ":pencil2:",
    EventType.CUSTOMER_ARCHIVED: ":file_cabinet:",
    EventType.CUSTOMER_UNARCHIVED: ":recycle:",
    EventType.CUSTOMER_DELETED: ":wastebasket:",
    EventType.POLL_FAILING: ":rotating_light:",
    EventType.POLL_RECOVERED: ":white_check_mark:",
    EventType.CUSTOMER_PLAN_ADDED: ":inbox_tray:",
    EventType.CUSTOMER_PLAN_UPDATED: ":calendar:",
    EventType.CUSTOMER_PLAN_ENDED: ":door:",
    EventType.CUSTOMER_PLAN_REMOVED: ":outbox_tray:",
}


def _emoji(event_type: str) -> str:
    return _EMOJI.get(event_type, ":bell:")


# -- text helpers -------------------------------------------------------------------------------


def _esc(text: str) -> str:
    """Escape for Slack mrkdwn: only these three have meaning (links, mentions, entities)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _value(value: Any) -> str:
    """A before/after value in mrkdwn: a code span, or an italic word for none/empty."""
    if value is None:
        return "_none_"
    text = plain_value(value)
    return _code(text) if text else "_empty_"


def _code(text: str) -> str:
    # A backtick would end the code span early; a quote keeps the value readable.
    return "`" + _esc(clip(text, MAX_VALUE).replace("`", "'")) + "`"


def _change_line(change: Mapping[str, Any]) -> str:
    return change_line(change, value=_value, field=_code, arrow=_ARROW)


def _short(value: Any) -> str:
    return "none" if value is None else clip(plain_value(value), 60)


def _link(event: Mapping[str, Any], app_url: str) -> str:
    """``<{app_url}/customers/{id}|name>``: the customer's page in the Metronome app."""
    cid = event.get("customer_id")
    name = _esc(clip(who(event), MAX_VALUE))
    if not cid:
        return name
    return f"<{app_url}/customers/{quote(str(cid), safe='')}|{name}>"


def _sections(lines: Sequence[str], title: str | None = None) -> list[dict[str, Any]]:
    """Pack whole lines into as few section blocks as fit in 3000 characters each."""
    blocks: list[dict[str, Any]] = []
    current = f"*{title}*" if title else ""
    for raw in lines:
        line = clip(raw, MAX_SECTION_TEXT)  # never hit: values are clipped far below this
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
        "text": {"type": "plain_text", "text": clip(text, MAX_HEADER_TEXT), "emoji": True},
    }


def _context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": clip(text, MAX_SECTION_TEXT)}]}


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
    emoji, title = _emoji(etype), kind(etype).title
    seq = event.get("sequence")
    context = _context(
        f"{_code(etype)} · #{seq} · detected {_esc(str(event.get('detected_at', '?')))} "
        f"· event {_code(str(event.get('id', '?')))}"
    )
    if not is_customer_event(etype):
        return _notice(event, emoji, title, context)
    name = who(event)
    record = customer_record(event)
    cid = str(event.get("customer_id") or "")
    who_text = f"*{_link(event, app_url)}*\n{_code(cid)}"
    external = record.get("external_id")
    if external and external != cid:
        who_text += f" · external id {_code(str(external))}"
    blocks = [_header(f"{emoji} {title}: {name}"), _section(who_text)]
    headline = plan_headline(event)
    if headline:
        blocks.append(_section(f"*{_esc(clip(headline[0].upper() + headline[1:], MAX_SECTION_TEXT - 2))}*"))
    found = changes(event)
    if found:
        lines = [f"• {_change_line(c)}" for c in found[:MAX_CHANGES]]
        if len(found) > MAX_CHANGES:
            lines.append(f"_…and {len(found) - MAX_CHANGES} more changes_")
        blocks += _sections(lines, "Changes")
    elif etype == EventType.CUSTOMER_CREATED and (known := facts(record)):
        lines = [f"• {_code(f.label) if f.field else f.label}: {_value(f.value)}" for f in known]
        blocks += _sections(lines, "Details")
    elif etype == EventType.CUSTOMER_DELETED:
        blocks.append(_section("No longer in Metronome: in neither listing, and not found by id."))
    blocks.append(context)
    text = f"{title}: {name} ({cid})"
    if headline:
        text += f": {headline}"
    elif found:
        text += ": " + "; ".join(change_line(c, value=_short) for c in found[:3])
        if len(found) > 3:
            text += f" (+{len(found) - 3} more)"
    return _split(blocks, _esc(clip(text, 500)))


def _notice(
    event: Mapping[str, Any], emoji: str, title: str, context: dict[str, Any]
) -> list[dict[str, Any]]:
    """``watcher.poll_failing`` / ``watcher.poll_recovered``: the watcher talking about itself."""
    raw = event.get("detail")
    detail: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    lines = [
        f"*{_esc(clip(label, 60))}:* {_esc(clip(shown, 500))}" for label, shown in notice_details(detail)
    ]
    blocks = [_header(f"{emoji} {title}"), *_sections(lines), context]
    return _split(blocks, _esc(notice_summary(title, detail)))


def _digest_line(event: Mapping[str, Any], app_url: str) -> str:
    d = digest_line(event)
    emoji = _emoji(str(event.get("type", "event")))
    if not d.customer:
        return f"• {emoji} {_esc(d.title)}"
    line = f"• {emoji} {_link(event, app_url)}"
    if d.headline:
        return f"{line}: {_esc(clip(d.headline, MAX_SECTION_TEXT // 4))}"
    line += f" {d.word}"
    if d.change is not None:
        line += f": {_change_line(d.change)}" + (f" (+{d.more} more)" if d.more else "")
    return line


def build_digest(
    events: Sequence[Mapping[str, Any]], *, app_url: str = DEFAULT_APP_URL, items: int = DIGEST_ITEMS
) -> list[dict[str, Any]]:
    """One digest for many events: counts by type, the first ``items``, "and N more"."""
    plan = plan_digest(events, items=items)
    by_type = [f"{_emoji(t)} *{n}* {_esc(kind(t).word)}" for t, n in plan.counts]
    blocks = [_header(f":bar_chart: {plan.total} {plan.what}"), *_sections(by_type, "By type")]
    blocks += _sections(
        [_digest_line(e, app_url) for e in plan.first], f"First {len(plan.first)}" if plan.more else None
    )
    if plan.more:
        more = f"_…and {plan.more} more._"
        if plan.list_command:
            more += f" List them all with `{plan.list_command}`."
        blocks.append(_section(more))
    if plan.sequences:
        blocks.append(_context(f"sequences #{plan.sequences[0]} to #{plan.sequences[1]}"))
    return _split(blocks, _esc(plan.headline))
