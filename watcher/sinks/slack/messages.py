"""What a Slack message says: one event, or a digest of many, as Block Kit, within Slack's limits.

* **One message per event** while a delivery round is small: a header with an emoji and what
  happened, *who* (the customer's name linked to ``{app_url}/customers/{id}``, its id), for a plan
  event what it means in words (``plan Growth ends on 2026-12-31``), each field change as ``field:
  before -> after``, and a context line with the event type, sequence and event id (what ``replay
  --id`` takes).
* **A digest** when a round is bigger (a bulk edit, a backlog after an outage): counts by type, the
  first few items, "and N more" with the command that lists them all.
* Slack's limits are enforced where the message is built, not hoped for: at most 50 blocks per
  message (a longer one is split into several), every section text at most 3000 characters (lines
  are packed into sections, never cut mid-link), header at most 150 characters, long values
  truncated. User data is escaped for mrkdwn (``&``, ``<``, ``>``) so that a customer named
  ``<!channel>`` pings no one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from ...config import DEFAULT_APP_URL
from ...events import EventType, change_line, customer_name, customer_record, plain_value, plan_headline

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
#: Ours, for readability: a value longer than this is cut with an ellipsis ...
MAX_VALUE = 200
#: ... one event message lists at most this many field changes ...
MAX_CHANGES = 25
#: ... and a digest shows this many items before "and N more".
DIGEST_ITEMS = 20

_ARROW = "-&gt;"  # "->" in mrkdwn, where ">" must be escaped

#: type -> (emoji, what happened, the short word a digest line uses)
_KINDS: dict[str, tuple[str, str, str]] = {
    EventType.CUSTOMER_CREATED: (":new:", "New customer", "created"),
    EventType.CUSTOMER_UPDATED: (":pencil2:", "Customer updated", "updated"),
    EventType.CUSTOMER_ARCHIVED: (":file_cabinet:", "Customer archived", "archived"),
    EventType.CUSTOMER_UNARCHIVED: (":recycle:", "Customer unarchived", "unarchived"),
    EventType.CUSTOMER_DELETED: (":wastebasket:", "Customer deleted", "deleted"),
    EventType.CUSTOMER_PLAN_ADDED: (":inbox_tray:", "Customer added to a plan", "added to a plan"),
    EventType.CUSTOMER_PLAN_UPDATED: (":calendar:", "Customer's plan changed", "plan changed"),
    EventType.CUSTOMER_PLAN_ENDED: (":door:", "Customer's plan ended", "plan ended"),
    EventType.CUSTOMER_PLAN_REMOVED: (":outbox_tray:", "Customer removed from a plan", "removed from a plan"),
    EventType.POLL_FAILING: (":rotating_light:", "Metronome polling is failing", "polling failing"),
    EventType.POLL_RECOVERED: (":white_check_mark:", "Metronome polling recovered", "polling recovered"),
}


def _kind(event_type: str) -> tuple[str, str, str]:
    return _KINDS.get(event_type, (":bell:", event_type, event_type))


# -- text helpers -------------------------------------------------------------------------------


def _esc(text: str) -> str:
    """Escape for Slack mrkdwn: only these three have meaning (links, mentions, entities)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _value(value: Any) -> str:
    """A before/after value in mrkdwn: a code span, or an italic word for none/empty."""
    if value is None:
        return "_none_"
    text = plain_value(value)
    return _code(text) if text else "_empty_"


def _code(text: str) -> str:
    # A backtick would end the code span early; a quote keeps the value readable.
    return "`" + _esc(_clip(text, MAX_VALUE).replace("`", "'")) + "`"


def _change_line(change: Mapping[str, Any]) -> str:
    return change_line(change, value=_value, field=_code, arrow=_ARROW)


def _short(value: Any) -> str:
    return "none" if value is None else _clip(plain_value(value), 60)


def _change_text(change: Mapping[str, Any]) -> str:
    """A change in the plain-text fallback (notifications): ``field: before -> after``."""
    return change_line(change, value=_short)


def _name(event: Mapping[str, Any]) -> str:
    return customer_name(event) or str(event.get("customer_id") or "unknown customer")


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
    record = customer_record(event)
    cid = str(event.get("customer_id") or "")
    who = f"*{_link(event, app_url)}*\n{_code(cid)}"
    external = record.get("external_id")
    if external and external != cid:
        who += f" · external id {_code(str(external))}"
    blocks = [_header(f"{emoji} {title}: {name}"), _section(who)]
    headline = plan_headline(event)
    if headline:
        blocks.append(_section(f"*{_esc(_clip(headline[0].upper() + headline[1:], MAX_SECTION_TEXT - 2))}*"))
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
    if headline:
        text += f": {headline}"
    elif changes:
        text += ": " + "; ".join(_change_text(c) for c in changes[:3])
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
        label, shown = str(key), plain_value(value)
        if label.endswith("_seconds") and isinstance(value, int | float):
            label, shown = label.removesuffix("_seconds"), _duration(float(value))
        lines.append(f"*{_esc(_clip(label.replace('_', ' '), 60))}:* {_esc(_clip(shown, 500))}")
    blocks = [_header(f"{emoji} {title}"), *_sections(lines), context]
    text = title
    reason = detail.get("last_error") or detail.get("error") or detail.get("reason")
    if reason:
        text += f": {_clip(plain_value(reason), 300)}"
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
    headline = plan_headline(event)
    if headline:
        return f"• {emoji} {_link(event, app_url)}: {_esc(_clip(headline, MAX_SECTION_TEXT // 4))}"
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
