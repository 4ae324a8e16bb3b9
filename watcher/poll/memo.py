"""The page memo: the fingerprints of the listing pages that the last successful cycle saw.

A page's digest (``PageBody.digest``) stands for its bytes, and the same bytes always give the same
fingerprints, so a page seen again needs no fingerprinting: the cycle takes the page's fingerprints
from here instead. That is the common case, since most cycles of a long-running daemon find an
account that did not change.

When the last successful cycle saw every stored customer exactly once, each on a page with a
digest, and looked none up by id, the memo holds exactly the stored fingerprints as well
(``complete``). The next cycle then needs no set of stored fingerprints at all while every page it
sees is one of those pages, seen again: it settles each by its digest (:meth:`Memo.settle`), and
only builds the set, from the pages not settled yet, when some other page comes along
(:meth:`Memo.unsettled`). A cycle that finds nothing changed therefore reads no customer and holds no
per-customer structure, however large the account.

It is stored one row per listing (``store.schema.PageMemo``), written in the cycle's own transaction,
so it always matches the committed state it was computed with. The row's ``pages`` are packed here
and nowhere else (:func:`pack`, :func:`unpack`): each page as its 16-byte digest, its number of
records (4 bytes, little-endian) and the fingerprint of each record (8 bytes each, little-endian).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Sequence

from ..events import Listing
from ..store.cycle import CycleSession

__all__ = ["Memo", "fingerprints_of", "pack", "pack_fingerprints", "unpack"]

_DIGEST = 16  # bytes of an XXH3-128 digest
_HEADER = _DIGEST + 4  # digest, then the number of records as 4 bytes, little-endian


def _ints(packed: bytes) -> array[int]:
    values = array("q", packed)
    if sys.byteorder == "big":  # stored little-endian
        values.byteswap()
    return values


def pack_fingerprints(values: Sequence[int]) -> bytes:
    """One page's fingerprints, packed as :func:`unpack` leaves them."""
    packed = array("q", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def unpack(blob: bytes) -> list[tuple[bytes, bytes]]:
    """A listing's stored pages, in order: (digest, the page's fingerprints still packed)."""
    pages = []
    view = memoryview(blob)
    while view:
        end = _HEADER + 8 * int.from_bytes(view[_DIGEST:_HEADER], "little")
        pages.append((bytes(view[:_DIGEST]), bytes(view[_HEADER:end])))
        view = view[end:]
    return pages


def pack(pages: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The inverse of :func:`unpack`."""
    return b"".join(d + (len(f) // 8).to_bytes(4, "little") + f for d, f in pages)


def fingerprints_of(packed: bytes) -> list[int]:
    """The fingerprints of one page, as :func:`unpack` leaves them."""
    return _ints(packed).tolist()


class Memo:
    """The memo for one cycle: what the last successful cycle stored, and what this one sees."""

    def __init__(self) -> None:
        #: digest -> the page's fingerprints, packed.
        self._pages: dict[bytes, bytes] = {}
        #: listing -> (the digests of its pages in order, complete) as stored.
        self._stored: dict[Listing, tuple[list[bytes], bool]] = {}
        #: listing -> the digests of its stored pages not yet seen again (a complete memo only).
        self._unsettled: dict[Listing, set[bytes]] = {listing: set() for listing in Listing}
        #: listing -> (digest, packed fingerprints) of each page seen in this cycle, in order.
        self._seen: dict[Listing, list[tuple[bytes, bytes]]] = {listing: [] for listing in Listing}
        self._new = dict.fromkeys(Listing, False)
        #: Records on the pages seen, and whether every one of those pages had a digest.
        self.records = 0
        self.all_digests = True

    def load(self, rows: Iterable[tuple[Listing, bool, bytes]]) -> bool:
        """Load the stored memo; True if it holds exactly the stored fingerprints (``complete``)."""
        for listing, complete, blob in rows:
            pages = unpack(blob)
            self._pages.update(pages)
            self._stored[listing] = ([d for d, _ in pages], complete)
        complete = len(self._stored) == len(Listing) and all(c for _, c in self._stored.values())
        if complete:
            for listing, (digests, _) in self._stored.items():
                self._unsettled[listing] = set(digests)
        return complete

    def stored_records(self, listing: Listing) -> int:
        """How many fingerprints the listing's stored pages hold (the stored customers, if complete)."""
        return sum(len(self._pages[d]) // 8 for d in self._stored.get(listing, ([], False))[0])

    def settle(self, listing: Listing, digest: bytes | None) -> bool:
        """Settle a page of a complete memo that is one of its listing's stored pages, seen again
        for the first time: its records are stored customers, unchanged. False for any other."""
        unsettled = self._unsettled[listing]
        if digest is None or digest not in unsettled:
            return False
        unsettled.discard(digest)
        return True

    def unsettled(self, listing: Listing) -> set[int]:
        """The fingerprints on the listing's stored pages that were not settled (complete memo)."""
        return set(_ints(b"".join(self._pages[d] for d in self._unsettled[listing])))

    def get(self, digest: bytes | None) -> list[int] | None:
        """The fingerprints of a page with this digest, if the last successful cycle saw it."""
        packed = None if digest is None else self._pages.get(digest)
        return None if packed is None else fingerprints_of(packed)

    def note(self, listing: Listing, digest: bytes | None, fingerprints: list[int], *, lazy: bool) -> None:
        """A page of this cycle, once observed; ``lazy``: its fingerprints came from the memo."""
        self.records += len(fingerprints)
        if digest is None:
            self.all_digests = False
            return
        packed = self._pages.get(digest)
        if not lazy:
            # Fingerprinted here: what the memo should hold. It differs from what it holds only if
            # the memo was damaged; then this corrects it.
            computed = pack_fingerprints(fingerprints)
            if computed != packed:
                packed = self._pages[digest] = computed
                self._new[listing] = True
        assert packed is not None
        self._seen[listing].append((digest, packed))

    def save(self, session: CycleSession, *, complete: bool) -> None:
        """Store this cycle's pages (in its final transaction), for each listing that changed."""
        complete = complete and self.all_digests
        for listing, seen in self._seen.items():
            if self._new[listing] or self._stored.get(listing) != ([d for d, _ in seen], complete):
                session.save_page_memo(listing, complete=complete, pages=pack(seen))
