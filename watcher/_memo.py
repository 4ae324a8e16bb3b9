"""The page memo: the fingerprints of the listing pages that the last successful cycle saw.

A page's digest (``client.ListingPage.digest``) stands for its bytes, and the same bytes always give
the same fingerprints, so a page seen again needs no fingerprinting: the cycle takes the page's
fingerprints from here instead (``poll._Page``). That is the common case, since most cycles of a
long-running daemon find an account that did not change.

When the last successful cycle saw every stored customer exactly once, each on a page with a
digest, and looked none up by id, the memo holds exactly the stored fingerprints as well
(``complete``). The next cycle then needs no set of stored fingerprints at all while every page it
sees is one of those pages, seen again: it settles each by its digest (:meth:`Memo.settle`), and
only builds the set, from the pages not settled yet, when some other page comes along
(:meth:`Memo.unsettled`). A cycle that finds nothing changed therefore reads no customer and
holds no per-customer structure, however large the account.

It is stored in ``store.PageMemo``, written in the cycle's own transaction, so it always matches the
committed state it was computed with.
"""

from __future__ import annotations

import sqlite3
import sys
from array import array

__all__ = ["Memo"]

_DIGEST = 16  # bytes of an XXH3-128 digest
_HEADER = _DIGEST + 4  # digest, then the number of records as 4 bytes, little-endian


def _ints(packed: bytes) -> array[int]:
    values = array("q", packed)
    if sys.byteorder == "big":  # stored little-endian
        values.byteswap()
    return values


def _packed(values: list[int]) -> bytes:
    packed = array("q", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


class Memo:
    """The memo for one cycle: what the last successful cycle stored, and what this one sees."""

    def __init__(self) -> None:
        #: digest -> the page's fingerprints, packed.
        self._pages: dict[bytes, bytes] = {}
        #: archived -> (the digests of its pages in order, complete) as stored.
        self._stored: dict[bool, tuple[list[bytes], bool]] = {}
        #: archived -> the digests of its stored pages not yet seen again (a complete memo only).
        self._unsettled: dict[bool, set[bytes]] = {False: set(), True: set()}
        #: archived -> (digest, packed fingerprints) of each page seen in this cycle, in order.
        self._seen: dict[bool, list[tuple[bytes, bytes]]] = {False: [], True: []}
        self._new = {False: False, True: False}
        #: Records on the pages seen, and whether every one of those pages had a digest.
        self.records = 0
        self.all_digests = True

    def load(self, db: sqlite3.Connection) -> bool:
        """Load the memo; True if it holds exactly the stored fingerprints (``complete``)."""
        for archived, complete, blob in db.execute("SELECT archived, complete, pages FROM page_memo"):
            digests: list[bytes] = []
            view = memoryview(blob)
            while view:
                end = _HEADER + 8 * int.from_bytes(view[_DIGEST:_HEADER], "little")
                digest = bytes(view[:_DIGEST])
                self._pages[digest] = bytes(view[_HEADER:end])
                digests.append(digest)
                view = view[end:]
            self._stored[bool(archived)] = (digests, bool(complete))
        complete = len(self._stored) == 2 and all(c for _, c in self._stored.values())
        if complete:
            for archived, (digests, _) in self._stored.items():
                self._unsettled[archived] = set(digests)
        return complete

    def stored_records(self, archived: bool) -> int:
        """How many fingerprints the listing's stored pages hold (the stored customers, if complete)."""
        return sum(len(self._pages[d]) // 8 for d in self._stored.get(archived, ([], False))[0])

    def settle(self, archived: bool, digest: bytes | None) -> bool:
        """Settle a page of a complete memo that is one of its listing's stored pages, seen again
        for the first time: its records are stored customers, unchanged. False for any other."""
        unsettled = self._unsettled[archived]
        if digest is None or digest not in unsettled:
            return False
        unsettled.discard(digest)
        return True

    def unsettled(self, archived: bool) -> set[int]:
        """The fingerprints on the listing's stored pages that were not settled (complete memo)."""
        return set(_ints(b"".join(self._pages[d] for d in self._unsettled[archived])))

    def get(self, digest: bytes | None) -> list[int] | None:
        """The fingerprints of a page with this digest, if the last successful cycle saw it."""
        packed = None if digest is None else self._pages.get(digest)
        return None if packed is None else _ints(packed).tolist()

    def note(self, archived: bool, digest: bytes | None, fingerprints: list[int], *, lazy: bool) -> None:
        """A page of this cycle, once observed; ``lazy``: its fingerprints came from the memo."""
        self.records += len(fingerprints)
        if digest is None:
            self.all_digests = False
            return
        packed = self._pages.get(digest)
        if not lazy:
            # Fingerprinted here: what the memo should hold. It differs from what it holds only
            # if the memo was damaged; then this corrects it.
            computed = _packed(fingerprints)
            if computed != packed:
                packed = self._pages[digest] = computed
                self._new[archived] = True
        assert packed is not None
        self._seen[archived].append((digest, packed))

    def save(self, db: sqlite3.Connection, *, complete: bool) -> None:
        """Store this cycle's pages (in its final transaction), for each listing that changed."""
        complete = complete and self.all_digests
        for archived, seen in self._seen.items():
            if self._new[archived] or self._stored.get(archived) != ([d for d, _ in seen], complete):
                blob = b"".join(d + (len(f) // 8).to_bytes(4, "little") + f for d, f in seen)
                db.execute(
                    "INSERT OR REPLACE INTO page_memo (archived, complete, pages) VALUES (?, ?, ?)",
                    (archived, complete, blob),
                )
