"""Reading both listings: producer threads fetch pages, and every page is observed exactly once.

What happens to a page depends on how long it took to arrive:

- Quickly (under :data:`HANDOFF_WAIT`): the cycle is CPU-bound under the GIL, and waking another
  thread for every page would cost more than it saves, so the producer fingerprints and observes
  the page itself.
- Slowly, as behind a real API's latency: the producer keeps the page, unparsed, until its next
  request is on the wire (the source's ``sent``), then puts it on a queue; the cycle's own thread
  parses and observes it while that request is in flight, so the cycle's work hides inside the wait
  for the next page instead of adding to it.

Pages are observed under one lock, and in order within a listing: a producer observes a page itself
only when none of its listing's pages is still queued. Why it is shaped this way, with figures:
``docs/performance.md``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from ..events import Listing
from ..fingerprint import canonical_all, fingerprints
from .memo import Memo
from .source import CustomerSource, Page

__all__ = ["HANDOFF_WAIT", "Scan", "SeenPage"]

#: Pages fetched but not yet observed, at most (raw bodies, about a megabyte): the producers wait
#: when the queue is full.
_BACKLOG_PAGES = 24
#: A page that took at least this long to arrive (seconds) is handed to the cycle's thread: below
#: the GIL's switch interval, a woken thread can be delayed by as long as the wait it would hide in.
HANDOFF_WAIT = 0.005

_ID = itemgetter("id")


class SeenPage:
    """One page of a listing, with the id, canonical JSON and fingerprint of every record.

    A page whose fingerprints are known from the page memo is *lazy*: it keeps the page as fetched
    and computes ids and canonical JSON only if the fingerprints do not settle it
    (:meth:`fingerprint`). Its digest was on a page that parsed, so it would parse too, to the same
    records; parsing it only to throw them away is what being lazy saves.
    """

    __slots__ = ("canonical", "digest", "fetched", "hashes", "ids", "listing")

    def __init__(self, listing: Listing, fetched: Page, memo: Memo | None = None) -> None:
        self.listing = listing
        self.digest: bytes | None = fetched.digest
        self.ids: list[str] = []
        self.canonical: list[bytes] = []
        #: What was fetched, while the page is lazy; None once fingerprinted.
        self.fetched: Page | None = None
        hashes = None if memo is None else memo.get(self.digest)
        if hashes is None:
            self.fingerprint(fetched.parse())
        else:
            self.fetched = fetched
            self.hashes = hashes

    @property
    def lazy(self) -> bool:
        return self.fetched is not None

    def fingerprint(self, records: list[dict[str, Any]]) -> None:
        self.ids = list(map(_ID, records))
        self.canonical = canonical_all(records)
        self.hashes = fingerprints(self.canonical)
        self.fetched = None

    def unlazy(self) -> None:
        """Parse and fingerprint a lazy page: its records are needed after all."""
        if self.fetched is not None:
            self.fingerprint(self.fetched.parse())


class Scan:
    """Reads both listings and hands every page to ``observe`` exactly once, one page at a time.

    Producer threads fetch: two, one per listing, when ``concurrent``; otherwise one that reads the
    listings one after the other. They start at once, so the first pages are in flight while the
    cycle records its poll run and loads the stored state; nothing is observed before :meth:`run`,
    and nothing after :meth:`close`. The calling thread never waits on the network itself, so it
    sees a cancel request (shutdown, ``poll_timeout``) within a fraction of a second even while a
    request hangs.
    """

    def __init__(
        self,
        source: CustomerSource,
        concurrent: bool,
        observe: Callable[[SeenPage], None],
        check_cancel: Callable[[], None],
    ) -> None:
        self.source = source
        self.observe = observe
        #: Fingerprints of pages seen before, set before :meth:`run`.
        self.memo: Memo | None = None
        self.check_cancel = check_cancel
        #: ``(listing, page)`` for a page; ``(listing, None)`` when a producer is done.
        self.queue: queue.Queue[tuple[Listing, Page | None]] = queue.Queue(_BACKLOG_PAGES)
        #: Held while a page is observed. Guards ``queued``, and ``stop`` is set under it.
        self.lock = threading.Lock()
        #: Pages of each listing queued and not observed yet.
        self.queued = dict.fromkeys(Listing, 0)
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        groups = [(listing,) for listing in Listing] if concurrent else [tuple(Listing)]
        self.threads = [
            threading.Thread(
                target=self._produce,
                args=(group,),
                daemon=True,
                name="list-" + "-".join(listing.label for listing in group),
            )
            for group in groups
        ]
        for t in self.threads:
            t.start()

    def _produce(self, listings: tuple[Listing, ...]) -> None:
        clock = time.monotonic
        # Slow pages wait here until the next request is on the wire (the source's ``sent``).
        pending: list[tuple[Listing, Page]] = []

        def hand_over() -> None:
            for item in pending:
                self._put(item)
            pending.clear()

        try:
            for listing in listings:
                requested = clock()
                for page in self.source.pages(listing=listing, sent=hand_over):
                    quick = clock() - requested < HANDOFF_WAIT
                    # Only this thread adds to its listing's ``queued``: once read as 0, it stays 0.
                    if quick and self.ready.is_set() and not self.queued[listing]:
                        seen = SeenPage(listing, page, self.memo)
                        with self.lock:
                            if self.stop.is_set():
                                return
                            self.observe(seen)
                    else:
                        with self.lock:
                            self.queued[listing] += 1
                        pending.append((listing, page))
                    requested = clock()
                hand_over()  # the listing's last page: no request follows it
        except BaseException as exc:  # raised in the calling thread
            if self.error is None:
                self.error = exc
        finally:
            hand_over()
            self._put((listings[0], None))

    def _put(self, item: tuple[Listing, Page | None]) -> bool:
        """Queue ``item``, waiting while the queue is full; False once the scan is stopped."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
            except queue.Full:
                continue
            return True
        return False

    def run(self) -> None:
        """Observe every page of both listings (the stored state is ready)."""
        self.ready.set()
        running = len(self.threads)
        while running:
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                item = None
            self.check_cancel()
            if self.error is not None:
                raise self.error
            if item is None:
                continue
            listing, page = item
            if page is None:
                running -= 1
                continue
            seen = SeenPage(listing, page, self.memo)
            with self.lock:
                self.observe(seen)
                self.queued[listing] -= 1

    def close(self) -> None:
        """Stop the producers: nothing is observed once this returns.

        ``stop`` is set under the observing lock, so a page being observed is finished first and
        none is started after. A producer stuck in a request sees ``stop`` only when the request
        ends; it touches nothing but its own pages, so a short join is enough, and a cancelled poll
        (SIGTERM) does not stall shutdown for a read timeout.
        """
        with self.lock:
            self.stop.set()
        for t in self.threads:
            t.join(timeout=0.5)
