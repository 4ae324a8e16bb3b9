"""Which sink receives which event: per-sink filters by event type and by changed field.

Routing happens when an event is recorded, inside the cycle's transaction, so the outbox holds
exactly one row per (event, sink that wants it) and a filter change never rewrites history.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .config import Config
from .events import is_customer_event

__all__ = ["Route", "Router", "routes_from_config"]


@dataclass(frozen=True, slots=True)
class Route:
    sink: str
    #: Event type globs, e.g. ``("customer.archived",)`` or ``("customer.*",)``.
    events: tuple[str, ...] = ("customer.*",)
    #: When set, a ``customer.*`` event passes only if one of its changes is at, or under, one of
    #: these dotted paths: created and deleted events carry no changes and so do not pass.
    fields: tuple[str, ...] | None = None

    def accepts(self, event_type: str, changed_fields: Iterable[str] = ()) -> bool:
        if not any(fnmatch.fnmatchcase(event_type, p) for p in self.events):
            return False
        if self.fields is None or not is_customer_event(event_type):
            return True
        return any(
            changed == f or changed.startswith(f + ".") for changed in changed_fields for f in self.fields
        )


class Router:
    """``router(event_type, changed_fields)``: the names of the sinks that take such an event."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)

    def __call__(self, event_type: str, changed_fields: Sequence[str]) -> list[str]:
        return [r.sink for r in self.routes if r.accepts(event_type, changed_fields)]


def routes_from_config(config: Config) -> tuple[Route, ...]:
    """One route per delivery target: every URL of an ``apprise`` sink gets its own outbox rows."""
    return tuple(
        Route(target, tuple(s.events), None if s.fields is None else tuple(s.fields))
        for s in config.sinks
        for target in s.targets
    )
