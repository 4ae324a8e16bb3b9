"""The fingerprint of a customer record: the one definition.

A record's *canonical* form is compact JSON with sorted keys (key order never matters, rule 4); its
fingerprint is XXH3-64 of that, without the lowest bit, so that it fits SQLite's signed INTEGER as
it is. It only has to tell "same record" from "changed record" (a collision would hide one change
with odds of 2**-63), not resist forgery: the records come from the operator's own account.

The poll cycle fingerprints every customer every cycle, so the page-at-a-time forms are the
definition, written as ``map`` over builtins so that no bytecode runs per record; the one-record
forms are those applied to one record. Change either and every stored fingerprint, and every page
memo, is stale: a migration must recompute them (see ``watcher.store.schema``).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import repeat
from operator import rshift
from typing import Any

import orjson
import xxhash

__all__ = ["canonical", "canonical_all", "fingerprints", "record_hash"]

_dumps, _SORT, _xxh3 = orjson.dumps, orjson.OPT_SORT_KEYS, xxhash.xxh3_64_intdigest


def canonical_all(records: Iterable[Any]) -> list[bytes]:
    """The canonical JSON of each record."""
    return list(map(_dumps, records, repeat(None), repeat(_SORT)))


def fingerprints(canonicals: Iterable[bytes]) -> list[int]:
    """The 63-bit fingerprint of each canonical JSON."""
    return list(map(rshift, map(_xxh3, canonicals), repeat(1)))


def canonical(record: Any) -> bytes:
    return canonical_all((record,))[0]


def record_hash(data: bytes) -> int:
    """The fingerprint of one canonical JSON."""
    return fingerprints((data,))[0]
