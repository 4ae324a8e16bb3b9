"""What the poll cycle needs from its sources, customers and plans (``watcher.metronome.MetronomeClient``).

A protocol, so that tests and benchmarks can hand the cycle any source: an in-memory one, or the
real client wrapped to record or reorder what it serves. And the words the poll history uses for a
source that failed (:func:`failure_reason`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ..errors import StoreError, WatcherError
from ..events import Listing

__all__ = ["CustomerSource", "Page", "PlanSource", "failure_reason"]


def failure_reason(exc: BaseException) -> str:
    """Why a source failed, as the poll history records it: a database error in its one line
    (``database error: ...``), any other of ours as it says, and a bug as an internal error."""
    if isinstance(exc, StoreError):
        return exc.reason
    return str(exc) if isinstance(exc, WatcherError) else f"internal error: {exc!r}"


class Page(Protocol):
    """One listing page: its records, parsed on demand, and a digest that stands for them.

    ``digest`` is None when the source cannot vouch for one; two pages with the same digest must
    hold the same records, and a digest seen on a page that parsed must parse again.
    """

    @property
    def digest(self) -> bytes | None: ...

    def parse(self) -> list[dict[str, Any]]:
        """The page's records; raises ``watcher.errors.APIError`` for a page that is not usable."""
        ...


class CustomerSource(Protocol):
    def pages(self, *, listing: Listing, sent: Callable[[], None] | None = None) -> Iterator[Page]:
        """Every page of one listing, in order; raises ``watcher.errors.APIError`` when it cannot.

        ``sent``, if given, is to be called once the request for the next page is on the wire (or,
        at the latest, when that request has ended): the cycle hands the page before it to another
        thread then, so that its work hides inside the wait for the next page. A source that makes
        no requests may ignore it; its slow pages are then handed over when its listing ends.
        """
        ...

    def get_customer(self, customer_id: str) -> dict[str, Any] | None:
        """One customer by id, archived ones included; None when it does not exist."""
        ...


class PlanSource(Protocol):
    """The plans source: which plans exist, and who is on each."""

    def plan_pages(self, *, sent: Callable[[], None] | None = None) -> Iterator[Page]:
        """Every page of the plans listing (``GET /v1/plans``), in order; each plan has an ``id``."""
        ...

    def member_pages(self, plan_id: str, *, sent: Callable[[], None] | None = None) -> Iterator[Page]:
        """Every page of one plan's memberships, past, current and upcoming, in order; each item is
        ``{customer_details, plan_details}``. Raises ``watcher.errors.APIError`` when it cannot."""
        ...
