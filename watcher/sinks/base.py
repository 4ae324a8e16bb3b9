"""The one small protocol every sink follows, and what a sink says about each event it attempted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..events import OutcomeKind

__all__ = ["Outcome", "Sink"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one event at one sink.

    ``delivered``: done. ``retry``: try again later (after ``retry_after`` seconds at least, when
    the receiver said so). ``dead``: this event can never be delivered (e.g. a 400): give up on it
    and go on with the next. ``disable``: the receiver asked us to stop (e.g. HTTP 410): the sink is
    switched off until an operator re-enables it, and the event stays pending.
    """

    kind: OutcomeKind
    error: str | None = None
    retry_after: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", OutcomeKind(self.kind))  # "retry" is as good as the enum

    @classmethod
    def ok(cls) -> Outcome:
        return cls(OutcomeKind.DELIVERED)


@runtime_checkable
class Sink(Protocol):
    name: str
    #: Most events one ``deliver`` call accepts (a Slack digest takes many, a webhook one).
    max_batch: int

    def deliver(self, events: Sequence[Mapping[str, Any]]) -> Sequence[Outcome]:
        """Attempt ``events`` in order. Return one outcome per attempted event, in order; a sink
        may stop early (after a ``retry``), and unattempted events stay pending untouched.
        Must not raise for receiver trouble: that is an outcome."""
        ...

    def close(self) -> None: ...
