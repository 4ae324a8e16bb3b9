"""What the simulated Metronome's parts share: its two request errors, timestamps, cursors, ids."""

from __future__ import annotations

import base64
import random
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = [
    "MAX_LIMIT",
    "BadRequest",
    "NotFound",
    "decode_cursor",
    "dumps",
    "encode_cursor",
    "parse_limit",
    "timestamp",
    "uuid4",
]

MAX_LIMIT = 100


class NotFound(KeyError):
    """No such customer (or plan); a 404 over HTTP, whose message is ``what`` was not found."""

    def __init__(self, key: str, what: str = "Customer") -> None:
        super().__init__(key)
        self.what = what


class BadRequest(ValueError):
    """The request (or the operation) is invalid; a 400 over HTTP."""


def dumps(value: object) -> bytes:
    """``orjson.dumps`` trimmed to size, for JSON that is kept rather than sent once.

    orjson returns bytes with ~4 KiB of spare capacity; a million of them would cost ~4 GB.
    """
    return bytes(memoryview(orjson.dumps(value)))


def timestamp(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds, as Metronome writes them: ``2024-01-01T00:00:00.000Z``.

    A naive ``moment`` is taken to be UTC already.
    """
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="milliseconds") + "Z"


def parse_limit(params: dict[str, list[str]], default: int) -> int:
    if "limit" not in params:
        return default
    raw = params["limit"][-1]
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_LIMIT):
        raise BadRequest(f"limit must be an integer between 1 and {MAX_LIMIT}")
    return int(raw)


def encode_cursor(state: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(state)).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, expected: dict[str, Any]) -> tuple[int, int]:
    """(last sequence served, page number) of a cursor issued for the listing ``expected`` names;
    anything else is refused."""
    try:
        state = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except ValueError:  # binascii.Error and orjson.JSONDecodeError are both ValueErrors
        raise BadRequest("invalid next_page") from None
    if not isinstance(state, dict) or any(
        state.get(k) != v or type(state.get(k)) is not type(v) for k, v in expected.items()
    ):
        raise BadRequest("invalid next_page")
    after, page = state.get("after"), state.get("page")
    if type(after) is not int or type(page) is not int or after < 0 or page < 2:
        raise BadRequest("invalid next_page")
    return after, page


def uuid4(rng: random.Random) -> str:
    """A version-4 UUID drawn from ``rng``, so seeded data is reproducible (and cheaper than uuid.UUID)."""
    bits = rng.getrandbits(128) & ~(0xF000 << 64) & ~(0xC000 << 48) | (0x4000 << 64) | (0x8000 << 48)
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
