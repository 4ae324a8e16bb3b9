"""The simulated Metronome: the customers and plans APIs, served over real HTTP on a local port.

The demo, the tests and the benchmarks all need a Metronome that they control: one whose customers
they can create, edit, archive and delete between two polls, whose pages they can break on purpose,
and which never needs a token from the outside world. :class:`SimulatedMetronome` is that server. It speaks
the customer endpoints of the official OpenAPI document (``shared/metronome-customers-openapi.json``)
closely enough that the real API client runs against it unchanged, and the plans endpoints as seed
page 004 and the plans issue describe them (``_plans``). It is not product code: nothing of the
watcher's imports it but the demo.

Three choices shape it:

* **Keyset pagination.** Every customer (plan, membership) gets an insertion sequence number and a
  listing cursor says "after sequence *n*", so a scan stays exact while customers are created,
  archived or deleted between two page requests, as they are on the real service. Pages are located
  with :mod:`bisect`.
* **Cached JSON.** Each record's serialized bytes are kept until the record changes, and a page is
  the concatenation of those bytes, so that pulling a million customers measures the client, not us.
* **Fault injection.** :class:`Fault` and :meth:`SimulatedMetronome.on_page` let a test make a page fail,
  hang, lie or race with a mutation, which is how the watcher's "only complete pictures are diffed"
  rule is proven.

Standard library only (plus :mod:`orjson`), so that it can run anywhere the package runs::

    python -m watcher.simulator --customers 1000 --port 8080 --token test-token
"""

from __future__ import annotations

import argparse
import bisect
import functools
import gc
import random
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Literal, get_args
from urllib.parse import parse_qs

import orjson

from .._httpserver import BackgroundServer
from ._common import BadRequest, NotFound, decode_cursor, dumps, encode_cursor, parse_limit, timestamp, uuid4
from ._plans import MembersQuery, PlanBook, PlansQuery, normalize_time

__all__ = ["Fault", "RecordedRequest", "SimulatedMetronome", "main"]

_NAME_LIMIT = 160  # the real API truncates longer names
_CUSTOM_FIELD_LIMIT = 200  # the real API refuses longer custom field values
_MAX_FILTER_IDS = 100
_BILLABLE_STATUSES = ("billable", "unbillable")
_MALFORMED_BODY = b'{"data": [ <html><body>502 Bad Gateway</body></html>'
_PHRASES = {status.value: status.phrase for status in HTTPStatus}


_FaultKind = Literal["status", "malformed", "drop", "latency", "bad_record"]


@dataclass(frozen=True)
class Fault:
    """One injected failure; it fires on the next ``times`` matching requests, then disappears.

    ``kind`` says what the client sees instead of the normal answer:

    * ``"status"``: ``status`` with body ``{"message": message}`` and, when given, ``Retry-After``
      (sent verbatim, so a test can use seconds or an HTTP date);
    * ``"malformed"``: a 200 whose body is not JSON;
    * ``"drop"``: the connection is closed without any response;
    * ``"latency"``: a pause of ``delay`` seconds, then the normal answer (the pause counts as the
      fake's own work, so it is inside :attr:`SimulatedMetronome.latency`'s wait when that is longer);
    * ``"bad_record"``: the normal answer, well-formed JSON with its cursor in place, except that
      the first record on it (or the customer, from get-by-id) has no ``id``.

    A request matches when its path starts with ``path`` (``"/v1/customers"`` matches the listing,
    get-by-id and the customer POSTs); ``page`` restricts the fault to paged listings (the customers,
    the plans, a plan's members; pick one with ``path``), 1-based (page 1 is the request without
    ``next_page``), and ``archived`` to the customer listing, archived (True) or active (False). At
    most one fault fires per request: the oldest that matches. Faults fire before authentication, as
    they would in a proxy or load balancer in front of Metronome.
    """

    kind: _FaultKind
    status: int = 500
    message: str = "injected failure"
    retry_after: str | None = None
    delay: float = 0.0
    times: int = 1
    path: str | None = None
    page: int | None = None
    archived: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in get_args(_FaultKind):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.times < 1:
            raise ValueError("a fault must fire at least once (times >= 1)")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake served it, so tests can assert on what the client actually sent.

    ``status`` is 0 when the connection was dropped by a ``"drop"`` fault.
    """

    method: str
    path: str
    params: dict[str, list[str]]
    status: int
    authorized: bool


class _Entry:
    """One customer: its place in the listings, and its record as a dict, as JSON, or both.

    Listings serve the JSON; changes edit the dict. Seeded customers are kept as JSON only and
    their dict is decoded the first time something needs it: a million dicts would cost ~1 GB
    more and slow down every full garbage collection of the process hosting the fake.
    """

    __slots__ = ("_blob", "_record", "archived", "seq")

    def __init__(
        self, seq: int, archived: bool, record: dict[str, Any] | None, blob: bytes | None = None
    ) -> None:
        self.seq = seq
        self.archived = archived
        self._record = record
        self._blob = blob

    @property
    def record(self) -> dict[str, Any]:
        if self._record is None:
            self._record = orjson.loads(self.json())
        return self._record

    def json(self) -> bytes:
        """The record's JSON, serialized once per change rather than once per request."""
        if self._blob is None:
            self._blob = dumps(self._record)
        return self._blob

    def edit(self) -> dict[str, Any]:
        """The record, about to be changed: its cached JSON is dropped."""
        record = self.record
        self._blob = None
        return record


@dataclass
class _ArmedFault:
    fault: Fault
    remaining: int


@dataclass(frozen=True)
class _PageHook:
    page: int
    archived: bool | None
    callback: Callable[[SimulatedMetronome], object]
    path: str = "/v1/customers"


@dataclass(frozen=True)
class _Paged:
    """Where a paged request is: its path, its 1-based page, and (customer listing only) its listing."""

    path: str
    page: int
    archived: bool | None = None


def _without_first_id(body: bytes) -> bytes:
    """A JSON answer with the ``id`` of its first record (a membership's ``customer_plan_id``)
    removed, members otherwise in order."""
    answer = orjson.loads(body)
    data = answer.get("data")
    record = data[0] if isinstance(data, list) and data else data
    if isinstance(record, dict):
        details = record.get("plan_details")
        (details if isinstance(details, dict) else record).pop(
            "customer_plan_id" if isinstance(details, dict) else "id", None
        )
    return orjson.dumps(answer)


@dataclass(frozen=True)
class _Reply:
    """A complete HTTP response; ``encode`` renders it for a single socket write."""

    status: int
    body: bytes
    retry_after: str | None = None

    def encode(self) -> bytes:
        head = (
            f"HTTP/1.1 {self.status} {_PHRASES.get(self.status, 'Status')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(self.body)}\r\n"
        )
        if self.retry_after is not None:
            head += f"Retry-After: {self.retry_after}\r\n"
        return (head + "\r\n").encode("latin-1") + self.body


def _page_reply(blobs: list[bytes], cursor: str | None) -> _Reply:
    """A listing page, written the way Metronome writes one (its cursor last, without spaces)."""
    next_page = b'"' + cursor.encode() + b'"' if cursor else b"null"
    return _Reply(200, b'{"data":[' + b",".join(blobs) + b'],"next_page":' + next_page + b"}")


def _error(status: int, message: str, retry_after: str | None = None) -> _Reply:
    return _Reply(status, orjson.dumps({"message": message}), retry_after)


def _ok(payload: object) -> _Reply:
    return _Reply(200, orjson.dumps(payload))


@dataclass(frozen=True)
class _ListQuery:
    """The parsed query of ``GET /v1/customers``; ``after`` is the last sequence already served."""

    limit: int
    archived: bool
    after: int
    page: int
    customer_ids: list[str] | None
    ingest_alias: str | None
    salesforce_ids: set[str] | None

    @classmethod
    def parse(cls, params: dict[str, list[str]], default_limit: int) -> _ListQuery:
        limit = parse_limit(params, default_limit)
        archived = _parse_bool(params, "only_archived")
        after, page = 0, 1
        if "next_page" in params:
            after, page = _decode_cursor(params["next_page"][-1], archived)
        customer_ids = params.get("customer_ids")
        if customer_ids is not None and len(customer_ids) > _MAX_FILTER_IDS:
            raise BadRequest(f"customer_ids accepts at most {_MAX_FILTER_IDS} ids")
        salesforce_ids = params.get("salesforce_account_ids")
        if salesforce_ids is not None and len(salesforce_ids) > _MAX_FILTER_IDS:
            raise BadRequest(f"salesforce_account_ids accepts at most {_MAX_FILTER_IDS} ids")
        alias = params.get("ingest_alias")
        return cls(
            limit=limit,
            archived=archived,
            after=after,
            page=page,
            customer_ids=customer_ids,
            ingest_alias=alias[-1] if alias else None,
            salesforce_ids=set(salesforce_ids) if salesforce_ids is not None else None,
        )

    def matches(self, entry: _Entry) -> bool:
        if self.ingest_alias is None and self.salesforce_ids is None:
            return True
        record = orjson.loads(entry.json())  # not entry.record: a filtered scan should not keep dicts
        if self.ingest_alias is not None and self.ingest_alias not in record["ingest_aliases"]:
            return False
        return (
            self.salesforce_ids is None
            or record["customer_config"]["salesforce_account_id"] in self.salesforce_ids
        )


def _fault_matches(fault: Fault, path: str, paged: _Paged | None) -> bool:
    """Whether ``fault`` applies to a request; ``paged`` is None unless it is a valid listing request."""
    if fault.path is not None and not path.startswith(fault.path):
        return False
    if fault.page is None and fault.archived is None:
        return True
    return (
        paged is not None
        and (fault.page is None or fault.page == paged.page)
        and (fault.archived is None or fault.archived == paged.archived)
    )


def _encode_cursor(archived: bool, after: int, page: int) -> str:
    return encode_cursor({"archived": archived, "after": after, "page": page})


def _decode_cursor(cursor: str, archived: bool) -> tuple[int, int]:
    """Return (last sequence served, page number) or refuse a cursor we did not issue for this listing."""
    return decode_cursor(cursor, {"archived": archived})


def _parse_bool(params: dict[str, list[str]], key: str) -> bool:
    raw = params.get(key, ["false"])[-1].lower()
    if raw not in ("true", "false"):
        raise BadRequest(f"{key} must be true or false")
    return raw == "true"


def _default_clock() -> datetime:
    return datetime.now(UTC)


# Vocabulary for realistic seeded and churned customers.
_NAME_HEADS = (
    "Acme", "Aperture", "Blue Harbor", "Brightline", "Cascade", "Cobalt", "Copperleaf", "Crescent",
    "Driftwood", "Ember", "Evergreen", "Falcon", "Granite", "Helix", "Horizon", "Ironclad", "Juniper",
    "Keystone", "Lakeshore", "Lumen", "Maple", "Meridian", "Northwind", "Oakridge", "Orbit", "Pinnacle",
    "Quantum", "Redwood", "Riverbend", "Sable", "Silverline", "Summit", "Tidewater", "Umbra", "Vantage",
    "Vertex", "Willow", "Zenith",
)  # fmt: skip
_NAME_TAILS = (
    "Analytics", "Robotics", "Logistics", "Health", "Labs", "Software", "Systems", "Media", "Energy",
    "Foods", "Capital", "Networks", "Studios", "Dynamics", "Cloud", "Security", "Bio", "Freight",
    "Learning", "Retail",
)  # fmt: skip
_NAME_SUFFIXES = ("", "", ", Inc.", " Inc.", " LLC", " Ltd", " GmbH", " Co.", " Group", " Corp.")
_TIERS = ("free", "starter", "growth", "enterprise")
_REGIONS = ("us-east", "us-west", "eu-central", "eu-west", "apac")
_PLANS = ("monthly", "annual", "usage")
_SEED_SPAN = timedelta(days=3 * 365)
#: The share of :meth:`SimulatedMetronome.churn` changes made to plans, once there are plans.
_PLAN_CHURN = 0.3  # seeded customers were created over the last three years


@functools.cache
def _companies() -> tuple[tuple[str, str], ...]:
    """Every company-like display name with a slug for its ingest aliases (built once, shared)."""
    return tuple(
        (f"{head} {tail}{suffix}", f"{head}-{tail}".lower().replace(" ", "-"))
        for head in _NAME_HEADS
        for tail in _NAME_TAILS
        for suffix in _NAME_SUFFIXES
    )


def _salesforce_id(rng: random.Random) -> str:
    """An 18-character id shaped like a Salesforce account id."""
    return f"0015500001{rng.getrandbits(32):08X}"


class SimulatedMetronome:
    """An in-memory Metronome with customers, served over HTTP once :meth:`start` is called.

    The data operations (``create_customer``, ``archive``, ...) have the same semantics as the HTTP
    endpoints and are safe to call from any thread, including while a client is paging. Each one
    raises :class:`KeyError` for an unknown customer and :class:`ValueError` for an invalid change.

    ``latency`` (seconds, 0 by default) makes every answer leave that long after its request was
    read, like an API whose round trip is that long: the fake's own work on the answer happens
    within the wait, not after it, and the wait ends on time (:func:`_hold`), so a client measured
    against ``pages x latency`` is not charged for the fake.

    ``requests`` holds the latest ``RECORDED_REQUESTS`` requests served, oldest first, so that a
    fake left running (``watcher demo``) does not grow without end; ``served`` counts them all.
    """

    #: How many requests ``requests`` keeps.
    RECORDED_REQUESTS = 10_000

    def __init__(
        self,
        *,
        token: str = "test-token",
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], datetime] | None = None,
        default_limit: int = 50,
    ) -> None:
        self.token = token
        self.latency = 0.0
        self.default_limit = default_limit
        self.requests: deque[RecordedRequest] = deque(maxlen=self.RECORDED_REQUESTS)
        self.served = 0
        self._clock = clock or _default_clock
        self._lock = threading.RLock()
        self._by_id: dict[str, _Entry] = {}
        self._by_seq: dict[int, _Entry] = {}
        self._seqs: dict[bool, list[int]] = {False: [], True: []}  # listing (archived?) -> sorted seqs
        self._last_seq = 0
        self._faults: list[_ArmedFault] = []
        self._page_hooks: list[_PageHook] = []
        self._plans = PlanBook(lambda customer_id: self._entry(customer_id).json())
        # poll_interval bounds how long stop() waits; idle cost is negligible
        self._server = BackgroundServer(
            _Handler, self, host=host, port=port, name="metronome", poll_interval=0.01
        )

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``; the port stays the same across restarts."""
        if not self._server.running:
            raise RuntimeError("SimulatedMetronome is not started")
        return self._server.url

    def start(self) -> SimulatedMetronome:
        """Bind and serve in a background daemon thread; returns ``self`` for chaining."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection, so clients see the server go away."""
        self._server.stop()

    def __enter__(self) -> SimulatedMetronome:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- data operations ---------------------------------------------------------------------------

    def create_customer(
        self,
        name: str,
        *,
        ingest_aliases: list[str] | None = None,
        external_id: str | None = None,
        custom_fields: dict[str, str] | None = None,
        salesforce_account_id: str | None = None,
        billable_status: str | None = None,
        customer_id: str | None = None,
    ) -> dict[str, Any]:
        """Create an active customer and return a copy of its record.

        ``external_id`` defaults to the first ingest alias, else the id, as on the real API.
        ``billable_status`` (``"billable"`` or ``"unbillable"``) takes effect now.
        """
        aliases = list(ingest_aliases or [])
        fields = dict(custom_fields or {})
        _check_custom_fields(fields)
        if billable_status is not None:
            _check_billable_status(billable_status)
        with self._lock:
            cid = customer_id or str(uuid.uuid4())
            if cid in self._by_id:
                raise BadRequest(f"a customer with id {cid} already exists")
            now = timestamp(self._clock())
            record: dict[str, Any] = {
                "id": cid,
                "external_id": external_id or (aliases[0] if aliases else cid),
                "ingest_aliases": aliases,
                "name": name[:_NAME_LIMIT],
                "customer_config": {"salesforce_account_id": salesforce_account_id},
                "custom_fields": fields,
                "created_at": now,
                "updated_at": now,
                "archived_at": None,
            }
            if billable_status is not None:
                record["current_billable_status"] = {"value": billable_status, "effective_at": now}
            return orjson.loads(self._insert(cid, False, record=record).json())  # type: ignore[no-any-return]

    def archive(self, customer_id: str) -> None:
        """Archive an active customer: it moves from the active listing to the archived one."""
        with self._lock:
            entry = self._entry(customer_id)
            if entry.archived:
                raise BadRequest(f"customer {customer_id} is already archived")
            self._move(entry)
            record = self._edit(customer_id)
            record["archived_at"] = record["updated_at"]

    def unarchive(self, customer_id: str) -> None:
        """Bring an archived customer back (the real API cannot; tests of ``customer.unarchived`` can)."""
        with self._lock:
            entry = self._entry(customer_id)
            if not entry.archived:
                raise BadRequest(f"customer {customer_id} is not archived")
            self._move(entry)
            self._edit(customer_id)["archived_at"] = None

    def delete(self, customer_id: str) -> None:
        """Remove a customer entirely: gone from both listings, from every plan, and a 404 by id (for
        tests)."""
        with self._lock:
            entry = self._entry(customer_id)
            seqs = self._seqs[entry.archived]
            del seqs[bisect.bisect_left(seqs, entry.seq)]
            del self._by_id[customer_id], self._by_seq[entry.seq]
            self._plans.drop_customer(customer_id)

    def set_name(self, customer_id: str, name: str) -> None:
        """Rename a customer; like the real API, names are truncated to 160 characters."""
        with self._lock:
            self._edit(customer_id)["name"] = name[:_NAME_LIMIT]

    def set_ingest_aliases(self, customer_id: str, aliases: list[str]) -> None:
        """Replace the whole set of ingest aliases (``external_id`` is left as it was)."""
        with self._lock:
            self._edit(customer_id)["ingest_aliases"] = list(aliases)

    def update_config(self, customer_id: str, *, salesforce_account_id: str | None) -> None:
        """Set (or clear, with None) ``customer_config.salesforce_account_id``."""
        with self._lock:
            self._edit(customer_id)["customer_config"]["salesforce_account_id"] = salesforce_account_id

    def set_billable_status(self, customer_id: str, value: str, effective_at: str) -> None:
        """Set ``current_billable_status`` to ``{"value": value, "effective_at": effective_at}``."""
        _check_billable_status(value)
        with self._lock:
            self._edit(customer_id)["current_billable_status"] = {
                "value": value,
                "effective_at": effective_at,
            }

    def set_custom_fields(self, customer_id: str, fields: dict[str, str]) -> None:
        """Set the given custom fields, keeping the others (the real ``setValues`` semantics)."""
        _check_custom_fields(fields)
        with self._lock:
            self._edit(customer_id)["custom_fields"].update(fields)

    def delete_custom_fields(self, customer_id: str, keys: list[str]) -> None:
        """Remove the given custom field keys; unknown keys are ignored."""
        with self._lock:
            custom_fields = self._edit(customer_id)["custom_fields"]
            for key in keys:
                custom_fields.pop(key, None)

    def touch(self, customer_id: str) -> None:
        """Bump ``updated_at`` and nothing else: the noise the watcher must not report."""
        with self._lock:
            self._edit(customer_id)

    def get(self, customer_id: str) -> dict[str, Any]:
        """A deep copy of one customer's record; :class:`KeyError` when unknown or deleted."""
        with self._lock:
            return orjson.loads(self._entry(customer_id).json())  # type: ignore[no-any-return]

    def customers(self, *, archived: bool | None = None) -> list[dict[str, Any]]:
        """Deep copies of the customers of one listing (or of both, with None), in creation order."""
        with self._lock:
            if archived is None:
                entries = list(self._by_seq.values())
            else:
                entries = [self._by_seq[seq] for seq in self._seqs[archived]]
            blobs = [entry.json() for entry in entries]
        return [orjson.loads(blob) for blob in blobs]

    def seed(self, n: int, *, archived_fraction: float = 0.1, rng: random.Random | None = None) -> list[str]:
        """Add ``n`` realistic customers created over the last three years; returns their ids.

        Records are built directly as JSON (no per-customer locking or validation, see
        :class:`_Entry`) with the garbage collector paused, so that a million are quick to seed and a
        benchmark's first scan costs the server no more than later ones. Pass a seeded ``rng`` for
        reproducible data.
        """
        rng = rng or random.Random()
        rand = rng.random
        companies = _companies()
        now = self._clock()
        now_text = timestamp(now)
        start = datetime.fromisoformat(now_text[:-1]) - _SEED_SPAN  # naive UTC, so timestamp is cheap
        step = _SEED_SPAN / max(n, 1)
        ids: list[str] = []
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a million new containers would otherwise trigger many full collections
        try:
            with self._lock:
                for i in range(n):
                    number = self._last_seq + 1
                    cid = uuid4(rng)
                    if cid in self._by_id:  # only when the same seeded rng is replayed into one fake
                        raise ValueError(f"seed would duplicate customer {cid}; pass a fresh rng")
                    name, slug = companies[int(rand() * len(companies))]
                    created = timestamp(start + step * i)
                    aliases = [f"billing@{slug}-{number}.example.com"]
                    if rand() < 0.3:
                        aliases.append(f"acct_{number:08d}")
                    fields = {
                        "tier": _TIERS[int(rand() * len(_TIERS))],
                        "region": _REGIONS[int(rand() * len(_REGIONS))],
                    }
                    if rand() < 0.5:
                        fields["plan"] = _PLANS[int(rand() * len(_PLANS))]
                    archived = rand() < archived_fraction
                    record: dict[str, Any] = {
                        "id": cid,
                        "external_id": aliases[0],
                        "ingest_aliases": aliases,
                        "name": name,
                        "customer_config": {
                            "salesforce_account_id": _salesforce_id(rng) if rand() < 0.4 else None
                        },
                        "custom_fields": fields,
                        "created_at": created,
                        "updated_at": now_text if archived else created,
                        "archived_at": now_text if archived else None,
                    }
                    if rand() < 0.2:
                        status = "billable" if rand() < 0.8 else "unbillable"
                        record["current_billable_status"] = {"value": status, "effective_at": created}
                    self._insert(cid, archived, blob=dumps(record))  # see _Entry: JSON only
                    ids.append(cid)
        finally:
            if gc_was_enabled:
                gc.enable()
                gc.collect()  # ages the new entries now, rather than during the first timed scan
        return ids

    def load(self, records: Iterable[dict[str, Any]]) -> None:
        """Serve these records exactly as given (an account saved earlier), after any already here.

        A record is archived when its ``archived_at`` is set. Raises :class:`ValueError` for an id
        that is already served.
        """
        with self._lock:
            for record in records:
                cid = record["id"]
                if cid in self._by_id:
                    raise BadRequest(f"a customer with id {cid} already exists")
                self._insert(cid, record.get("archived_at") is not None, blob=dumps(record))

    # -- plans -------------------------------------------------------------------------------------

    def create_plan(
        self,
        name: str,
        *,
        description: str = "",
        custom_fields: dict[str, str] | None = None,
        plan_id: str | None = None,
    ) -> dict[str, Any]:
        """Create a plan (listed by ``GET /v1/plans``, with no customers yet); returns its record."""
        with self._lock:
            return self._plans.create_plan(
                name,
                description=description,
                custom_fields=custom_fields,
                plan_id=plan_id or str(uuid.uuid4()),
            )

    def rename_plan(self, plan_id: str, name: str) -> None:
        """Rename a plan: every membership of it is listed with the new name."""
        with self._lock:
            self._plans.rename_plan(plan_id, name)

    def delete_plan(self, plan_id: str) -> None:
        """Remove a plan and its memberships: gone from ``GET /v1/plans``, its members a 404 (for tests)."""
        with self._lock:
            self._plans.delete_plan(plan_id)

    def plans(self) -> list[dict[str, Any]]:
        """Copies of every plan's record, in creation order."""
        with self._lock:
            return self._plans.plans()

    def add_to_plan(
        self,
        customer_id: str,
        plan_id: str,
        *,
        starting_on: str | datetime | None = None,
        ending_before: str | datetime | None = None,
        customer_plan_id: str | None = None,
    ) -> dict[str, Any]:
        """Put a customer on a plan, from ``starting_on`` (default: now) until ``ending_before`` (default:
        no end); returns the membership as the plan's members listing shows it."""
        with self._lock:
            self._entry(customer_id)
            starts = normalize_time(starting_on) if starting_on is not None else timestamp(self._clock())
            ends = normalize_time(ending_before) if ending_before is not None else None
            member = self._plans.add(
                customer_id,
                plan_id,
                starting_on=starts,
                ending_before=ends,
                customer_plan_id=customer_plan_id or str(uuid.uuid4()),
            )
            return self._plans.membership(member.cpid)

    def set_plan_end(self, customer_plan_id: str, ending_before: str | datetime | None) -> None:
        """Set a membership's end (``ending_before``, exclusive; in the past ends it at once), or clear
        it with None."""
        with self._lock:
            ends = normalize_time(ending_before) if ending_before is not None else None
            self._plans.set_end(customer_plan_id, ends)

    def set_plan_start(self, customer_plan_id: str, starting_on: str | datetime) -> None:
        with self._lock:
            self._plans.set_start(customer_plan_id, normalize_time(starting_on))

    def remove_from_plan(self, customer_plan_id: str) -> None:
        """Remove a membership outright: it is in no status of its plan's members listing any more."""
        with self._lock:
            self._plans.remove(customer_plan_id)

    def membership(self, customer_plan_id: str) -> dict[str, Any]:
        """A copy of one membership, ``{customer_details, plan_details}``; KeyError when unknown."""
        with self._lock:
            return self._plans.membership(customer_plan_id)

    def customer_plans(self, customer_id: str) -> list[dict[str, Any]]:
        """Copies of a customer's memberships, in the order they were made."""
        with self._lock:
            return [self._plans.membership(cpid) for cpid in self._plans.customer_plan_ids(customer_id)]

    def plan_members(self, plan_id: str, status: str = "all") -> list[dict[str, Any]]:
        """Copies of a plan's memberships of one status (``all``, ``active``, ``ended``, ``upcoming``),
        as its members listing shows them, at the fake's clock."""
        with self._lock:
            statuses = None if status == "all" else [status]
            return self._plans.members(plan_id, statuses, timestamp(self._clock()))

    def seed_plans(self, n: int, *, rng: random.Random | None = None) -> list[str]:
        """Add ``n`` plans and put every customer on one of them (started within the last two years, no
        end set); returns the plans' ids. Pass a seeded ``rng`` for reproducible data."""
        rng = rng or random.Random()
        with self._lock:
            return self._plans.seed(list(self._by_id), n, now=self._clock(), rng=rng)

    def churn(self, rng: random.Random) -> str:
        """Apply one random, realistic change and describe it in one line (the demo's activity feed)."""
        with self._lock:  # held throughout so the chosen customer cannot vanish mid-change
            active = self._seqs[False]
            # Plans only take part once there are plans, so that a churn without them stays as it was.
            if self._plans and active and rng.random() < _PLAN_CHURN:
                return self._plan_churn(rng)
            kind = rng.choices(
                ("create", "rename", "tier", "archive", "aliases", "billable", "salesforce", "touch"),
                weights=(20, 15, 20, 10, 10, 10, 10, 5),
            )[0]
            if kind == "create" or not active:
                name, slug = rng.choice(_companies())
                created = self.create_customer(
                    name,
                    ingest_aliases=[f"billing@{slug}-{self._last_seq + 1}.example.com"],
                    custom_fields={"tier": rng.choice(_TIERS), "region": rng.choice(_REGIONS)},
                )
                return f"created {created['id']} {name!r}"
            record = self._by_seq[rng.choice(active)].record
            cid, name = record["id"], record["name"]
            if kind == "rename":
                new_name, _ = rng.choice(_companies())
                self.set_name(cid, new_name)
                return f"renamed {cid} {name!r} -> {new_name!r}"
            if kind == "tier":
                tier = rng.choice(_TIERS)
                self.set_custom_fields(cid, {"tier": tier})
                return f"set custom_fields.tier={tier} on {cid} {name!r}"
            if kind == "archive":
                self.archive(cid)
                return f"archived {cid} {name!r}"
            if kind == "aliases":
                alias = f"acct_{rng.getrandbits(32):08x}"
                self.set_ingest_aliases(cid, [*record["ingest_aliases"], alias])
                return f"added ingest alias {alias} to {cid} {name!r}"
            if kind == "billable":
                status = rng.choice(_BILLABLE_STATUSES)
                self.set_billable_status(cid, status, timestamp(self._clock()))
                return f"set billable status {status} on {cid} {name!r}"
            if kind == "salesforce":
                sfid = _salesforce_id(rng)
                self.update_config(cid, salesforce_account_id=sfid)
                return f"set salesforce account {sfid} on {cid} {name!r}"
            self.touch(cid)
            return f"touched {cid} {name!r} (updated_at only)"

    def _plan_churn(self, rng: random.Random) -> str:
        """One change of who is on which plan: most often an end date (soon, or straight in the past),
        else a customer put on another plan, an end date lifted, or a membership removed."""
        record = self._by_seq[rng.choice(self._seqs[False])].record
        cid, name = record["id"], record["name"]
        current = [m for m in self.customer_plans(cid) if "ending_before" not in m["plan_details"]]
        kind = rng.choices(("end", "add", "unend", "remove"), weights=(50, 30, 10, 10))[0]
        if kind == "add" or not current:
            plan = rng.choice(self.plans())
            self.add_to_plan(cid, plan["id"])
            return f"put {cid} {name!r} on plan {plan['name']!r}"
        details = rng.choice(current)["plan_details"]
        cpid, plan_name = details["customer_plan_id"], details["name"]
        if kind == "end":
            # Soon, so that the end date is seen first and its passing a little later; sometimes
            # straight in the past, as when a plan is ended "as of yesterday".
            ends = self._clock() + timedelta(seconds=rng.choice((-86400, 5, 10, 20, 40)))
            if ends <= datetime.fromisoformat(details["starting_on"][:-1] + "+00:00"):
                ends = self._clock() + timedelta(seconds=5)
            self.set_plan_end(cpid, ends)
            return f"set plan {plan_name!r} of {cid} {name!r} to end {timestamp(ends)}"
        if kind == "unend":
            ended = [m for m in self.customer_plans(cid) if "ending_before" in m["plan_details"]]
            if ended:
                details = ended[0]["plan_details"]
                self.set_plan_end(details["customer_plan_id"], None)
                return f"lifted the end date of plan {details['name']!r} of {cid} {name!r}"
        self.remove_from_plan(cpid)
        return f"removed {cid} {name!r} from plan {plan_name!r}"

    # -- fault injection ---------------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        """Arm ``fault`` for its next ``fault.times`` matching requests."""
        with self._lock:
            self._faults.append(_ArmedFault(fault, fault.times))

    def clear_faults(self) -> None:
        """Disarm every fault and every pending :meth:`on_page` callback."""
        with self._lock:
            self._faults.clear()
            self._page_hooks.clear()

    def on_page(
        self,
        page: int,
        callback: Callable[[SimulatedMetronome], object],
        *,
        archived: bool | None = None,
        path: str = "/v1/customers",
    ) -> None:
        """Run ``callback(self)`` once, just before serving ``page`` (1-based) of a listing.

        ``path`` picks the listing: the customers (the default), ``/v1/plans``, or a plan's members
        (``/v1/planDetails/{plan_id}/customers``); for the customers, ``archived`` picks the active or
        archived one (None: whichever asks for that page first). This is how a test archives, creates
        or deletes a customer, or ends a plan, between two page requests.
        """
        with self._lock:
            self._page_hooks.append(_PageHook(page, archived, callback, path))

    # -- internals: the store ----------------------------------------------------------------------

    def _entry(self, customer_id: str) -> _Entry:
        entry = self._by_id.get(customer_id)
        if entry is None:
            raise NotFound(customer_id)
        return entry

    def _insert(
        self,
        customer_id: str,
        archived: bool,
        *,
        record: dict[str, Any] | None = None,
        blob: bytes | None = None,
    ) -> _Entry:
        self._last_seq += 1
        entry = _Entry(self._last_seq, archived, record, blob)
        self._by_id[customer_id] = entry
        self._by_seq[entry.seq] = entry
        self._seqs[archived].append(entry.seq)  # sequences only grow, so the list stays sorted
        return entry

    def _edit(self, customer_id: str) -> dict[str, Any]:
        """The record of a customer about to change, with ``updated_at`` already stamped."""
        record = self._entry(customer_id).edit()
        record["updated_at"] = timestamp(self._clock())
        return record

    def _move(self, entry: _Entry) -> None:
        """Move a customer to the other listing, keeping its sequence (so its place in the order)."""
        source = self._seqs[entry.archived]
        del source[bisect.bisect_left(source, entry.seq)]
        entry.archived = not entry.archived
        bisect.insort(self._seqs[entry.archived], entry.seq)

    def _page(self, query: _ListQuery) -> tuple[list[bytes], int, bool]:
        """The JSON of one page, the last sequence on it, and whether anything follows."""
        with self._lock:
            if query.customer_ids is None:
                candidates = self._seqs[query.archived]
            else:
                wanted = (self._by_id.get(cid) for cid in set(query.customer_ids))
                candidates = sorted(e.seq for e in wanted if e is not None and e.archived == query.archived)
            found: list[_Entry] = []
            for index in range(bisect.bisect_right(candidates, query.after), len(candidates)):
                entry = self._by_seq[candidates[index]]
                if query.matches(entry):
                    found.append(entry)
                    if len(found) > query.limit:  # one look-ahead says whether a next page exists
                        break
            page = found[: query.limit]
            last = page[-1].seq if page else query.after
            return [entry.json() for entry in page], last, len(found) > query.limit

    # -- internals: HTTP ---------------------------------------------------------------------------

    def _handle(
        self, method: str, target: str, authorization: str | None, body: bytes, arrived: float
    ) -> _Reply | None:
        """Answer one request read at ``arrived`` (``time.monotonic()``; None: drop the connection)."""
        path, _, query_string = target.partition("?")
        params = parse_qs(query_string, keep_blank_values=True)
        authorized = authorization == f"Bearer {self.token}"
        reply = self._reply(method, path, params, authorized, body)
        with self._lock:
            self.requests.append(
                RecordedRequest(method, path, params, reply.status if reply else 0, authorized)
            )
            self.served += 1
        if self.latency > 0:
            _hold(arrived + self.latency)
        return reply

    def _reply(
        self, method: str, path: str, params: dict[str, list[str]], authorized: bool, body: bytes
    ) -> _Reply | None:
        parts = path.strip("/").split("/")
        query: _ListQuery | PlansQuery | MembersQuery | None = None
        invalid: BadRequest | None = None
        if method == "GET":
            try:
                match parts:
                    case ["v1", "customers"]:
                        query = _ListQuery.parse(params, self.default_limit)
                    case ["v1", "plans"]:
                        query = PlansQuery.parse(params, self.default_limit)
                    case ["v1", "planDetails", plan_id, "customers"]:
                        query = MembersQuery.parse(plan_id, params, self.default_limit)
            except BadRequest as exc:
                invalid = exc
        paged = None
        if query is not None:
            paged = _Paged(path, query.page, query.archived if isinstance(query, _ListQuery) else None)
        fault = self._take_fault(path, paged)
        if fault is not None:
            if fault.kind == "drop":
                return None
            if fault.kind == "malformed":
                return _Reply(200, _MALFORMED_BODY)
            if fault.kind == "status":
                return _error(fault.status, fault.message, fault.retry_after)
            if fault.kind == "latency":
                time.sleep(fault.delay)
        if not authorized:
            return _error(401, "Unauthorized")
        try:
            if invalid is not None:
                raise invalid
            if paged is not None:
                self._run_hooks(paged)
            if isinstance(query, _ListQuery):
                reply = self._list(query)
            elif isinstance(query, PlansQuery):
                with self._lock:
                    blobs, cursor = self._plans.plans_page(query)
                reply = _page_reply(blobs, cursor)
            elif isinstance(query, MembersQuery):
                with self._lock:
                    blobs, cursor = self._plans.members_page(query, timestamp(self._clock()))
                reply = _page_reply(blobs, cursor)
            else:
                reply = self._route(method, parts, body)
        except NotFound as exc:
            return _error(404, f"{exc.what} not found")
        except BadRequest as exc:
            return _error(400, str(exc))
        if fault is not None and fault.kind == "bad_record" and reply.status == 200:
            return _Reply(200, _without_first_id(reply.body))
        return reply

    def _take_fault(self, path: str, paged: _Paged | None) -> Fault | None:
        with self._lock:
            for armed in self._faults:
                fault = armed.fault
                if not _fault_matches(fault, path, paged):
                    continue
                armed.remaining -= 1
                if armed.remaining <= 0:
                    self._faults.remove(armed)
                return fault
        return None

    def _run_hooks(self, paged: _Paged) -> None:
        with self._lock:
            hooks = [
                hook
                for hook in self._page_hooks
                if hook.page == paged.page
                and hook.path.rstrip("/") == paged.path.rstrip("/")
                and hook.archived in (None, paged.archived)
            ]
            for hook in hooks:
                self._page_hooks.remove(hook)
        for hook in hooks:  # outside the lock: a callback may do anything, including HTTP calls
            hook.callback(self)

    def _list(self, query: _ListQuery) -> _Reply:
        blobs, last, more = self._page(query)
        cursor = _encode_cursor(query.archived, last, query.page + 1) if more else None
        return _page_reply(blobs, cursor)

    def _route(self, method: str, parts: list[str], body: bytes) -> _Reply:
        if method == "GET":
            match parts:
                case ["v1", "customers", customer_id]:
                    with self._lock:
                        blob = self._entry(customer_id).json()
                    return _Reply(200, b'{"data":' + blob + b"}")
            return _error(404, "Not found")
        if method != "POST":
            return _error(405, "Method not allowed")
        payload = _json_object(body)
        match parts:
            case ["v1", "customers"]:
                created = self.create_customer(
                    _text(payload, "name"),
                    ingest_aliases=_texts(payload, "ingest_aliases"),
                    external_id=_text(payload, "external_id", required=False),
                    custom_fields=_text_map(payload, "custom_fields"),
                )
                return _ok({"data": created})
            case ["v1", "customers", "archive"]:
                customer_id = _text(payload, "id")
                self.archive(customer_id)
                return _ok({"data": {"id": customer_id}})
            case ["v1", "customers", "setBillableStatus"]:
                customer_id, value = _text(payload, "customer_id"), _text(payload, "billable_status")
                self.set_billable_status(customer_id, value, _text(payload, "effective_at"))
                return _ok({"data": {"id": customer_id, "current_billable_status": value}})
            case ["v1", "customers", customer_id, "setName"]:
                self.set_name(customer_id, _text(payload, "name"))
                record = self.get(customer_id)
                keys = ("id", "external_id", "ingest_aliases", "name", "custom_fields")
                return _ok({"data": {key: record[key] for key in keys}})
            case ["v1", "customers", customer_id, "setIngestAliases"]:
                self.set_ingest_aliases(customer_id, _texts(payload, "ingest_aliases", required=True))
                return _ok({})
            case ["v1", "customers", customer_id, "updateConfig"]:
                if "salesforce_account_id" in payload:
                    sfid = _text(payload, "salesforce_account_id", required=False)
                    self.update_config(customer_id, salesforce_account_id=sfid)
                else:
                    self._entry(customer_id)  # nothing to change, but an unknown id is still a 404
                return _ok({})
            case ["v1", "customFields", "setValues"]:
                self.set_custom_fields(
                    _customer_entity(payload), _text_map(payload, "custom_fields", required=True)
                )
                return _ok({})
            case ["v1", "customFields", "deleteValues"]:
                self.delete_custom_fields(_customer_entity(payload), _texts(payload, "keys", required=True))
                return _ok({})
        return _error(404, "Not found")


# -- request body validation -------------------------------------------------------------------------


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


def _text(payload: dict[str, Any], key: str, *, required: bool = True) -> Any:
    value = payload.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key} is required and must be a string")
    return value


def _texts(payload: dict[str, Any], key: str, *, required: bool = False) -> Any:
    value = payload.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadRequest(f"{key} must be a list of strings")
    return value


def _text_map(payload: dict[str, Any], key: str, *, required: bool = False) -> Any:
    value = payload.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise BadRequest(f"{key} must be an object of strings")
    return value


def _customer_entity(payload: dict[str, Any]) -> str:
    if payload.get("entity") != "customer":
        raise BadRequest("this fake only supports entity 'customer'")
    return _text(payload, "entity_id")  # type: ignore[no-any-return]


def _check_custom_fields(fields: dict[str, str]) -> None:
    for key, value in fields.items():
        if len(value) > _CUSTOM_FIELD_LIMIT:
            raise BadRequest(f"custom field {key} is longer than {_CUSTOM_FIELD_LIMIT} characters")


def _check_billable_status(value: str) -> None:
    if value not in _BILLABLE_STATUSES:
        raise BadRequest("billable_status must be 'billable' or 'unbillable'")


# -- the HTTP server ---------------------------------------------------------------------------------

#: How long before its deadline :func:`_hold` stops sleeping and starts yielding the CPU instead.
_HOLD_SPIN = 0.002


def _hold(deadline: float) -> None:
    """Return at ``deadline`` (``time.monotonic()``), late by far less than ``time.sleep`` alone.

    ``time.sleep`` alone wakes late on a VM whose vCPU idles during the sleep (the host has to
    reschedule it), which would be charged to the client (``docs/performance.md`` has the figures).
    So the last ``_HOLD_SPIN`` seconds are spent yielding (``sleep(0)`` lets the server's
    other threads run), which costs the fake some CPU on its own core and nobody else anything.
    """
    remaining = deadline - time.monotonic()
    if remaining > _HOLD_SPIN:
        time.sleep(remaining - _HOLD_SPIN)
    while time.monotonic() < deadline:
        time.sleep(0)


class _Handler(BaseHTTPRequestHandler):
    """HTTP plumbing only: read the request, ask the fake, write the reply in one piece."""

    protocol_version = "HTTP/1.1"  # keep-alive, so a client's connection pool is exercised
    disable_nagle_algorithm = True
    arrived = 0.0  # time.monotonic() when the request being served arrived

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def parse_request(self) -> bool:
        # The request line has just been read: the request has arrived, and ``latency`` counts
        # from here, so the stdlib's header parsing is inside the wait rather than added to it.
        self.arrived = time.monotonic()
        return super().parse_request()

    def _serve(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self.wfile.write(_error(400, "invalid Content-Length").encode())
            return
        body = self.rfile.read(length) if length else b""
        simulator: SimulatedMetronome = self.server.owner  # type: ignore[attr-defined]
        reply = simulator._handle(
            self.command, self.path, self.headers.get("Authorization"), body, self.arrived
        )
        if reply is None:
            self.close_connection = True
            return
        self.wfile.write(reply.encode())

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log lines; :attr:`SimulatedMetronome.requests` records them instead."""


def main(argv: list[str] | None = None) -> int:
    """Run a fake Metronome until Ctrl-C, printing its base URL on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m watcher.simulator",
        description="Serve a simulated Metronome customers (and plans) API with seeded customers.",
    )
    parser.add_argument("--customers", type=int, default=100, help="customers to seed (default 100)")
    parser.add_argument(
        "--plans", type=int, default=0, metavar="N", help="N plans, every customer on one of them (default 0)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--token", default="test-token", help="the bearer token to accept")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible data")
    parser.add_argument(
        "--churn", type=float, default=0.0, metavar="SECONDS", help="apply one random change every SECONDS"
    )
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    fake = SimulatedMetronome(token=args.token, host=args.host, port=args.port)
    fake.seed(args.customers, rng=rng)
    if args.plans:
        fake.seed_plans(args.plans, rng=rng)
    with fake:
        print(fake.url, flush=True)
        plans = f" on {args.plans} plans" if args.plans else ""
        print(f"simulated Metronome with {args.customers} customers{plans}; Ctrl-C stops", file=sys.stderr)
        try:
            while True:
                time.sleep(args.churn or 3600)
                if args.churn:
                    print(fake.churn(rng), file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            pass
    return 0
