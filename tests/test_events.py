"""The change line, and a changed list as the items added and removed (``watcher.events``)."""

from __future__ import annotations

from typing import Any

import pytest

from watcher.events import ListChange, change_line, list_change


def change(field: str, before: Any, after: Any) -> dict[str, Any]:
    return {"field": field, "before": before, "after": after}


def test_a_plain_change_is_field_before_arrow_after() -> None:
    assert change_line(change("name", "Acme", "Acme Inc")) == "name: Acme -> Acme Inc"
    assert change_line(change("archived_at", None, "2026-01-01")) == "archived_at: null -> 2026-01-01"
    assert change_line(change("x", 1, 2), value=lambda v: f"<{v}>", arrow="=>") == "x: <1> => <2>"


def test_a_changed_list_is_the_items_added_and_removed() -> None:
    aliases = change("ingest_aliases", ["a@x.com", "b@x.com"], ["b@x.com", "c@x.com", "d@x.com"])
    assert list_change(aliases) == ListChange(added=("c@x.com", "d@x.com"), removed=("a@x.com",))
    assert change_line(aliases) == "ingest_aliases: added c@x.com, d@x.com; removed a@x.com"
    # Each item passes the channel's own writer (the CLI cuts long values one by one).
    assert change_line(aliases, value=lambda v: f"`{v}`") == (
        "ingest_aliases: added `c@x.com`, `d@x.com`; removed `a@x.com`"
    )


@pytest.mark.parametrize(
    ("before", "after", "line"),
    [
        (["a"], ["a", "b"], "ingest_aliases: added b"),
        (["a", "b"], ["a"], "ingest_aliases: removed b"),
        (None, ["a"], "ingest_aliases: added a"),
        (["a"], None, "ingest_aliases: removed a"),
        ([{"k": 1}], [{"k": 1}, {"k": 2}], 'ingest_aliases: added {"k":2}'),
    ],
)
def test_lists_that_grow_or_shrink_or_appear(before: Any, after: Any, line: str) -> None:
    assert change_line(change("ingest_aliases", before, after)) == line


def test_a_reordered_list_or_a_change_of_kind_stays_before_and_after() -> None:
    assert list_change(change("l", ["a", "b"], ["b", "a"])) is None
    assert change_line(change("l", ["a", "b"], ["b", "a"])) == 'l: ["a","b"] -> ["b","a"]'
    assert list_change(change("l", "a", ["a"])) is None
    assert change_line(change("l", "a", ["a"])) == 'l: a -> ["a"]'
