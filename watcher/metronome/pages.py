"""Listing pages as they come off the wire: bodies, shape checks, cursors and digests.

Three listings share the body ``{"data": [...], "next_page": ...}``: the customers
(:func:`parse_listing`, records with an ``id``), the plans (the same), and a plan's members
(:func:`parse_members`, one ``{customer_details, plan_details}`` membership per item).

Bodies are parsed with orjson and checked with a few ``isinstance`` passes only: 100k customers is
2,000 pages per listing, and per-record model validation would dominate a cycle. Unknown fields are
kept untouched; they are data to diff, never an error. Every problem is an
:class:`~watcher.errors.APIDataError` whose message names the request and the place in the body.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from datetime import datetime
from itertools import repeat
from typing import Any, cast

import orjson
import xxhash

from .._secrets import redact
from .._time import parse_ts
from ..errors import APIDataError

__all__ = ["ListingPage", "PageBody", "PageParser", "parse_customer", "parse_listing", "parse_members"]

#: ``parser(content, what=..., status=...) -> (records, next_page)``: how a page body is checked.
PageParser = Callable[..., tuple[list[dict[str, Any]], str | None]]


class ListingPage(list[dict[str, Any]]):
    """The records of one listing page, exactly as parsed, and a digest of the bytes behind them.

    ``digest`` is :attr:`PageBody.digest`: two pages with the same digest hold the same records, byte
    for byte, whatever their cursors. ``None`` means no digest is known (a page from some other
    source). :meth:`parse` returns the page itself, so a parsed page is a page like an unparsed one.
    """

    __slots__ = ("digest",)

    def __init__(self, records: list[dict[str, Any]], digest: bytes | None = None) -> None:
        super().__init__(records)
        self.digest = digest

    def parse(self) -> ListingPage:
        return self


#: How a listing body ends when its last member is a cursor without escapes, or null (as Metronome's
#: do). Quotes inside JSON strings are escaped, so this can only match the top-level object's last
#: member; a body that ends any other way is parsed first.
_TAIL_CURSOR = re.compile(rb',"next_page":(?:null|"([^"\\\x00-\x1f]+)")\}\s*\Z')
#: How far from the end the cursor is looked for (Metronome's cursors are well under 100 bytes).
_TAIL_BYTES = 1024
#: The XXH3 seed of a digest of the bytes before such an ending. A body that does not end that way
#: is digested whole with the default seed, so a digest of one kind never stands for bytes that a
#: digest of the other kind was taken of (see ``PageBody.digest``).
_CUT_SEED = 1
#: ``PageBody.next_page`` before the body has been parsed, when its tail did not give it.
_UNPARSED: Any = object()


class PageBody:
    """One listing page as received: its body, parsed and checked only by :meth:`parse`.

    ``next_page`` is the cursor to follow from this page (``None``: the last page). It is read from
    the end of the body when the body ends the way the API's do, so that the next request can go
    out before this page is parsed; otherwise the page is parsed on arrival. :meth:`parse` refuses a
    body whose parsed ``next_page`` is not the cursor that was read.

    ``digest`` (XXH3-128) stands for the page's records. For a body that ends the way the API's do
    it is known on arrival, and is a digest of the bytes before that final ``next_page`` member:
    pages with the same records share it whatever their cursors. Any other body is digested whole,
    once parsed. Once a body with a given digest has parsed, every body with that digest parses
    too, to the same records: the cut only ever removes the top-level object's last member, and
    another cursor of the same plain form in its place cannot make the object invalid. A caller that
    has seen a digest on a page that parsed can therefore skip parsing a page with that digest.
    """

    __slots__ = ("_content", "_page", "_parser", "_status", "_what", "digest", "next_page")

    def __init__(self, content: bytes, *, status: int, what: str, parser: PageParser | None = None) -> None:
        self._content, self._status, self._what = content, status, what
        self._parser = parser or parse_listing
        self._page: ListingPage | None = None
        self.next_page: str | None = _UNPARSED
        self.digest: bytes | None = None
        match = _TAIL_CURSOR.search(content, max(0, len(content) - _TAIL_BYTES))
        if match:
            with contextlib.suppress(UnicodeDecodeError):  # not UTF-8: let the parser say so
                self.next_page = match[1].decode() if match[1] else None
                self.digest = xxhash.xxh3_128_digest(memoryview(content)[: match.start()], seed=_CUT_SEED)
        if self.next_page is _UNPARSED:
            self.parse()

    @property
    def parsed(self) -> bool:
        """Whether :meth:`parse` has run (and succeeded)."""
        return self._page is not None

    def parse(self) -> ListingPage:
        """The page's records; raises :class:`~watcher.errors.APIDataError` for a bad body."""
        if self._page is None:
            data, next_page = self._parser(self._content, what=self._what, status=self._status)
            if self.next_page is _UNPARSED:
                self.next_page = next_page
                self.digest = xxhash.xxh3_128_digest(self._content)
            elif next_page != self.next_page:
                raise _bad(self._what, "'next_page' is not the cursor the body ends with", self._status)
            self._page = ListingPage(data, self.digest)
        return self._page


def _bad(what: str, problem: str, status: int | None) -> APIDataError:
    return APIDataError(redact(f"{what}: {problem}"), status=status)


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages an operator can match against the body."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _load_json(content: bytes, *, what: str, status: int | None) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise _bad(what, f"body is not JSON ({exc})", status) from exc


def _data(content: bytes, *, what: str, status: int) -> tuple[dict[str, Any], Any]:
    body = _load_json(content, what=what, status=status)
    if not isinstance(body, dict):
        raise _bad(what, f"body is {_json_type(body)}, not an object", status)
    if "data" not in body:
        raise _bad(what, "body has no 'data' key", status)
    return body, body["data"]


def parse_listing(content: bytes, *, what: str, status: int) -> tuple[list[dict[str, Any]], str | None]:
    """The records and the ``next_page`` cursor of a listing body, checked for the documented shape."""
    body, data = _data(content, what=what, status=status)
    if not isinstance(data, list):
        raise _bad(what, f"'data' is {_json_type(data)}, not an array", status)
    # Every record must be an object with a non-empty string id. This runs for every customer
    # every cycle, so the checks are C-level passes over the page; the loops below only run to
    # name the culprit once a check has failed.
    if not all(map(isinstance, data, repeat(dict))):
        index, record = next((i, r) for i, r in enumerate(data) if not isinstance(r, dict))
        raise _bad(what, f"data[{index}] is {_json_type(record)}, not an object", status)
    ids = list(map(dict.get, data, repeat("id")))
    if not (all(map(isinstance, ids, repeat(str))) and all(ids)):
        index = next(i for i, v in enumerate(ids) if not isinstance(v, str) or not v)
        raise _bad(what, f"data[{index}] has no non-empty string 'id'", status)
    return cast("list[dict[str, Any]]", data), _next_page(body, what=what, status=status)


def _next_page(body: dict[str, Any], *, what: str, status: int) -> str | None:
    if "next_page" not in body:
        raise _bad(what, "body has no 'next_page' key", status)
    next_page = body["next_page"]
    if next_page is not None and not isinstance(next_page, str):
        raise _bad(what, f"'next_page' is {_json_type(next_page)}, not a string or null", status)
    if next_page == "":
        # Neither "last page" (that is null) nor a usable cursor: sending it back would most likely
        # restart the listing. Refuse rather than guess.
        raise _bad(what, "'next_page' is an empty string", status)
    return next_page  # type: ignore[no-any-return]


def _values(objects: list[Any], key: str) -> list[Any]:
    """``key`` of each object (None where it is missing), in one C-level pass."""
    return list(map(dict.get, objects, repeat(key)))


def _objects(values: list[Any], *, where: str, what: str, status: int) -> None:
    if not all(map(isinstance, values, repeat(dict))):
        index, value = next((i, v) for i, v in enumerate(values) if not isinstance(v, dict))
        raise _bad(what, f"data[{index}]{where} is {_json_type(value)}, not an object", status)


def _texts(values: list[Any], *, where: str, what: str, status: int) -> None:
    if not (all(map(isinstance, values, repeat(str))) and all(values)):
        index = next(i for i, v in enumerate(values) if not isinstance(v, str) or not v)
        raise _bad(what, f"data[{index}]{where} is not a non-empty string", status)


def _timestamps(values: list[Any], *, where: str, optional: bool, what: str, status: int) -> None:
    present = [v for v in values if v is not None] if optional else values
    with contextlib.suppress(TypeError, ValueError):  # one C-level pass; the loop names the culprit
        if all(map(isinstance, present, repeat(str))):
            list(map(datetime.fromisoformat, present))
            return
    for index, value in enumerate(values):
        if value is None and optional:
            continue
        try:
            if not isinstance(value, str):
                raise ValueError
            parse_ts(value)
        except ValueError:
            raise _bad(
                what, f"data[{index}]{where} is not an RFC 3339 timestamp: {value!r}", status
            ) from None


def parse_members(
    content: bytes, *, what: str, status: int, plan_id: str
) -> tuple[list[dict[str, Any]], str | None]:
    """The memberships and the ``next_page`` cursor of a plan's members body (``GET
    /v1/planDetails/{plan_id}/customers``), checked for the shape the seed page documents.

    Each item is ``{"customer_details": <a customer record>, "plan_details": {"id", "name",
    "custom_fields", "customer_plan_id", "starting_on", "ending_before"}}``; ``ending_before`` may be
    absent or null. A membership of another plan than the one asked for is refused: filed under
    this plan it would corrupt the stored picture.
    """
    body, data = _data(content, what=what, status=status)
    if not isinstance(data, list):
        raise _bad(what, f"'data' is {_json_type(data)}, not an array", status)
    w, st = what, status
    _objects(data, where="", what=w, status=st)
    customers = _values(data, "customer_details")
    _objects(customers, where=".customer_details", what=w, status=st)
    _texts(_values(customers, "id"), where=".customer_details.id", what=w, status=st)
    plans = _values(data, "plan_details")
    _objects(plans, where=".plan_details", what=w, status=st)
    _texts(_values(plans, "customer_plan_id"), where=".plan_details.customer_plan_id", what=w, status=st)
    plan_ids = _values(plans, "id")
    if plan_ids.count(plan_id) != len(plan_ids):
        index, other = next((i, p) for i, p in enumerate(plan_ids) if p != plan_id)
        raise _bad(w, f"data[{index}].plan_details.id is {other!r}, not the plan asked for", st)
    starts = _values(plans, "starting_on")
    _timestamps(starts, where=".plan_details.starting_on", optional=False, what=w, status=st)
    ends = _values(plans, "ending_before")
    _timestamps(ends, where=".plan_details.ending_before", optional=True, what=w, status=st)
    return cast("list[dict[str, Any]]", data), _next_page(body, what=what, status=status)


def parse_customer(content: bytes, *, customer_id: str, what: str, status: int) -> dict[str, Any]:
    """The record of a get-by-id body, checked to be the customer that was asked for."""
    _, data = _data(content, what=what, status=status)
    if not isinstance(data, dict):
        raise _bad(what, f"'data' is {_json_type(data)}, not an object", status)
    record_id = data.get("id")
    if not isinstance(record_id, str) or not record_id:
        raise _bad(what, "'data' has no non-empty string 'id'", status)
    if record_id != customer_id:
        # Attaching another customer's record to this id would corrupt the stored picture.
        raise _bad(what, f"'data.id' is {record_id!r}, not the requested {customer_id!r}", status)
    return cast("dict[str, Any]", data)
