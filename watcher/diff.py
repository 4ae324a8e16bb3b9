"""Field-level differences between two customer records.

Paths are dotted (``custom_fields.tier``); objects are walked, everything else (lists
included) is compared as a whole value; a key that is missing on one side compares as
``null``. Ignored paths (rule 4: noise is not change) match exactly or as a prefix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Change", "diff_records"]


@dataclass(frozen=True, slots=True)
class Change:
    field: str
    before: Any
    after: Any

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "before": self.before, "after": self.after}


def diff_records(
    before: Mapping[str, Any], after: Mapping[str, Any], ignore: Iterable[str] = ("updated_at",)
) -> list[Change]:
    """Every leaf that differs, sorted by path, leaving out ignored paths."""
    ignore = tuple(ignore)
    out: list[Change] = []
    _walk(before, after, "", frozenset(ignore), tuple(p + "." for p in ignore), out)
    out.sort(key=lambda c: c.field)
    return out


def _walk(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    prefix: str,
    ignored: frozenset[str],
    ignored_under: tuple[str, ...],
    out: list[Change],
) -> None:
    for key in before.keys() | after.keys():
        b = before.get(key)
        a = after.get(key)
        if b == a:
            continue  # most fields of a changed record are unchanged: settle them first
        path = f"{prefix}{key}"
        if path in ignored or path.startswith(ignored_under):  # the path, or one under it
            continue
        # Walk into objects, treating a missing/null side as empty, so that a billable status
        # appearing reads as ``current_billable_status.value: null -> "billable"``.
        walk = isinstance(b, Mapping) and isinstance(a, Mapping | None)
        if walk or (b is None and isinstance(a, Mapping)):
            _walk(b or {}, a or {}, path + ".", ignored, ignored_under, out)
        else:
            out.append(Change(path, b, a))
