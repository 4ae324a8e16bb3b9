"""The simulated Metronome's plans: every plan, and who is on which (the plans source's two endpoints).

- ``GET /v1/plans``: ``{id, name, description, custom_fields}`` per plan, paged like the customers.
- ``GET /v1/planDetails/{plan_id}/customers``: one ``{customer_details, plan_details}`` per membership
  (seed page 004), ``status`` = ``all`` | ``active`` (the default) | ``ended`` | ``upcoming`` or a
  comma list of them (``ended,upcoming`` together is refused, as Metronome refuses it). A membership
  is upcoming before its ``starting_on``, ended from its ``ending_before`` on, active in between.

Pagination is by keyset, as for the customers: every plan and membership gets an insertion sequence
number, and a cursor says "after sequence *n*" of one plan (and status), so a scan stays exact while
memberships come and go. Each membership's JSON is cached until it (or its plan's name) changes.
:class:`PlanBook` holds no lock of its own: the simulator calls it under its lock.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from ._common import BadRequest, NotFound, decode_cursor, dumps, encode_cursor, parse_limit, timestamp, uuid4

__all__ = ["STATUSES", "MembersQuery", "PlanBook", "PlansQuery", "normalize_time"]

#: The ``status`` values of a plan's members listing.
STATUSES = ("active", "ended", "upcoming")

_PLAN_NAMES = (
    "Starter", "Growth", "Scale", "Enterprise", "Usage Pro", "Team", "Business", "Self-Serve", "Platform",
    "Premium",
)  # fmt: skip
_PLAN_VARIANTS = ("", " Annual", " Monthly", " 2025", " EU", " Legacy")


def normalize_time(value: str | datetime) -> str:
    """A timestamp in the API's own form (``2026-12-31T00:00:00.000Z``); BadRequest if it is none."""
    if isinstance(value, datetime):
        return timestamp(value)
    try:
        text = value.strip()
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except (AttributeError, ValueError):
        raise BadRequest(f"{value!r} is not an RFC 3339 timestamp") from None
    if moment.tzinfo is None:
        raise BadRequest(f"{value!r} has no time zone")
    return timestamp(moment)


class _Plan:
    __slots__ = ("blob", "members", "record", "seq")

    def __init__(self, seq: int, record: dict[str, Any]) -> None:
        self.seq = seq
        self.record = record
        self.blob: bytes | None = None
        #: The sequences of the plan's memberships, sorted (they only grow, so appends keep the order).
        self.members: list[int] = []

    def json(self) -> bytes:
        if self.blob is None:
            self.blob = dumps(self.record)
        return self.blob


class _Membership:
    __slots__ = ("blob", "cpid", "customer_id", "ending_before", "plan_id", "seq", "starting_on")

    def __init__(
        self, seq: int, cpid: str, plan_id: str, customer_id: str, starting_on: str, ending_before: str | None
    ) -> None:
        self.seq = seq
        self.cpid = cpid
        self.plan_id = plan_id
        self.customer_id = customer_id
        self.starting_on = starting_on
        self.ending_before = ending_before
        self.blob: bytes | None = None

    def details(self, plan: _Plan) -> bytes:
        """``plan_details`` as the API lists it (``ending_before`` left out while no end is set)."""
        if self.blob is None:
            details: dict[str, Any] = {
                "id": self.plan_id,
                "name": plan.record["name"],
                "custom_fields": plan.record["custom_fields"],
                "customer_plan_id": self.cpid,
                "starting_on": self.starting_on,
            }
            if self.ending_before is not None:
                details["ending_before"] = self.ending_before
            self.blob = dumps(details)
        return self.blob

    def status(self, now: str) -> str:
        if self.starting_on > now:
            return "upcoming"
        if self.ending_before is not None and self.ending_before <= now:
            return "ended"
        return "active"


@dataclass(frozen=True)
class PlansQuery:
    """The parsed query of ``GET /v1/plans``."""

    limit: int
    after: int
    page: int

    @classmethod
    def parse(cls, params: dict[str, list[str]], default_limit: int) -> PlansQuery:
        limit = parse_limit(params, default_limit)
        after, page = 0, 1
        if "next_page" in params:
            after, page = decode_cursor(params["next_page"][-1], {"plans": True})
        return cls(limit, after, page)

    def cursor(self, last: int) -> str:
        return encode_cursor({"plans": True, "after": last, "page": self.page + 1})


@dataclass(frozen=True)
class MembersQuery:
    """The parsed query of ``GET /v1/planDetails/{plan_id}/customers``; ``statuses`` None means all."""

    plan_id: str
    limit: int
    after: int
    page: int
    statuses: frozenset[str] | None

    @classmethod
    def parse(cls, plan_id: str, params: dict[str, list[str]], default_limit: int) -> MembersQuery:
        limit = parse_limit(params, default_limit)
        raw = params.get("status", ["active"])[-1]
        wanted = set(raw.split(","))
        if not wanted or not wanted <= {"all", *STATUSES}:
            raise BadRequest("status must be all, active, ended, upcoming, or a comma list of them")
        if {"ended", "upcoming"} <= wanted and "all" not in wanted:
            raise BadRequest("the ended,upcoming combination is not yet supported")
        statuses = None if "all" in wanted else frozenset(wanted)
        after, page = 0, 1
        if "next_page" in params:
            after, page = decode_cursor(params["next_page"][-1], cls._state(plan_id, statuses))
        return cls(plan_id, limit, after, page, statuses)

    @staticmethod
    def _state(plan_id: str, statuses: frozenset[str] | None) -> dict[str, Any]:
        return {"plan": plan_id, "status": ",".join(sorted(statuses)) if statuses else "all"}

    def cursor(self, last: int) -> str:
        return encode_cursor(
            {**self._state(self.plan_id, self.statuses), "after": last, "page": self.page + 1}
        )


class PlanBook:
    """Every plan and membership of the simulated account.

    ``customer_json(customer_id)`` is the customer's record as the listings serve it: a membership is
    listed with its customer as the customer is now.
    """

    def __init__(self, customer_json: Callable[[str], bytes]) -> None:
        self._customer_json = customer_json
        self._plans: dict[str, _Plan] = {}
        self._plan_seqs: list[int] = []
        self._plan_by_seq: dict[int, _Plan] = {}
        self._members: dict[str, _Membership] = {}  # customer_plan_id -> membership
        self._member_by_seq: dict[int, _Membership] = {}
        self._by_customer: dict[str, set[str]] = {}  # customer id -> its customer_plan_ids
        self._last_seq = 0

    def __bool__(self) -> bool:
        return bool(self._plans)

    # -- plans --------------------------------------------------------------------------------------

    def create_plan(
        self,
        name: str,
        *,
        description: str = "",
        custom_fields: dict[str, str] | None = None,
        plan_id: str,
    ) -> dict[str, Any]:
        pid = plan_id
        if pid in self._plans:
            raise BadRequest(f"a plan with id {pid} already exists")
        record = {
            "id": pid,
            "name": name,
            "description": description,
            "custom_fields": dict(custom_fields or {}),
        }
        self._last_seq += 1
        plan = _Plan(self._last_seq, record)
        self._plans[pid] = plan
        self._plan_by_seq[plan.seq] = plan
        self._plan_seqs.append(plan.seq)
        return orjson.loads(plan.json())  # type: ignore[no-any-return]

    def rename_plan(self, plan_id: str, name: str) -> None:
        plan = self._plan(plan_id)
        plan.record["name"] = name
        plan.blob = None
        for seq in plan.members:
            self._member_by_seq[seq].blob = None

    def delete_plan(self, plan_id: str) -> None:
        """The plan is gone: from ``GET /v1/plans``, and its members listing is a 404."""
        plan = self._plan(plan_id)
        for seq in list(plan.members):
            self._drop(self._member_by_seq[seq])
        del self._plans[plan_id], self._plan_by_seq[plan.seq]
        del self._plan_seqs[bisect.bisect_left(self._plan_seqs, plan.seq)]

    def plans(self) -> list[dict[str, Any]]:
        return [orjson.loads(self._plan_by_seq[seq].json()) for seq in self._plan_seqs]

    def plan_ids(self) -> list[str]:
        return [self._plan_by_seq[seq].record["id"] for seq in self._plan_seqs]

    # -- memberships --------------------------------------------------------------------------------

    def add(
        self,
        customer_id: str,
        plan_id: str,
        *,
        starting_on: str,
        ending_before: str | None = None,
        customer_plan_id: str,
    ) -> _Membership:
        plan = self._plan(plan_id)
        cpid = customer_plan_id
        if cpid in self._members:
            raise BadRequest(f"a customer plan with id {cpid} already exists")
        if ending_before is not None and ending_before <= starting_on:
            raise BadRequest("ending_before must be after starting_on")
        self._last_seq += 1
        member = _Membership(self._last_seq, cpid, plan_id, customer_id, starting_on, ending_before)
        self._members[cpid] = member
        self._member_by_seq[member.seq] = member
        self._by_customer.setdefault(customer_id, set()).add(cpid)
        plan.members.append(member.seq)
        return member

    def set_end(self, customer_plan_id: str, ending_before: str | None) -> None:
        member = self._member(customer_plan_id)
        if ending_before is not None and ending_before <= member.starting_on:
            raise BadRequest("ending_before must be after starting_on")
        member.ending_before = ending_before
        member.blob = None

    def set_start(self, customer_plan_id: str, starting_on: str) -> None:
        member = self._member(customer_plan_id)
        if member.ending_before is not None and member.ending_before <= starting_on:
            raise BadRequest("starting_on must be before ending_before")
        member.starting_on = starting_on
        member.blob = None

    def remove(self, customer_plan_id: str) -> None:
        self._drop(self._member(customer_plan_id))

    def drop_customer(self, customer_id: str) -> None:
        """A deleted customer is on no plan any more."""
        for cpid in list(self._by_customer.get(customer_id, ())):
            self._drop(self._members[cpid])

    def customer_plan_ids(self, customer_id: str) -> list[str]:
        return sorted(self._by_customer.get(customer_id, ()), key=lambda c: self._members[c].seq)

    def membership(self, customer_plan_id: str) -> dict[str, Any]:
        return orjson.loads(self._item(self._member(customer_plan_id)))  # type: ignore[no-any-return]

    def members(self, plan_id: str, statuses: Iterable[str] | None, now: str) -> list[dict[str, Any]]:
        wanted = None if statuses is None else frozenset(statuses)
        items = []
        for seq in self._plan(plan_id).members:
            member = self._member_by_seq[seq]
            if wanted is None or member.status(now) in wanted:
                items.append(orjson.loads(self._item(member)))
        return items

    def seed(self, customer_ids: list[str], plans: int, *, now: datetime, rng: random.Random) -> list[str]:
        """``plans`` new plans, with each of ``customer_ids`` on one of them, started within the last
        two years and with no end set; returns the plans' ids."""
        names = [f"{base}{variant}" for variant in _PLAN_VARIANTS for base in _PLAN_NAMES]
        ids = []
        for i in range(plans):
            name = names[i] if i < len(names) else f"Plan {i + 1}"
            tier = "self-serve" if i % 3 else "sales-led"
            ids.append(self.create_plan(name, plan_id=uuid4(rng), custom_fields={"motion": tier})["id"])
        start = now - timedelta(days=730)
        for cid in customer_ids:
            starts = timestamp(start + timedelta(seconds=int(rng.random() * 730 * 86400)))
            self.add(cid, ids[int(rng.random() * plans)], starting_on=starts, customer_plan_id=uuid4(rng))
        return ids

    # -- pages --------------------------------------------------------------------------------------

    def plans_page(self, query: PlansQuery) -> tuple[list[bytes], str | None]:
        found = self._after(self._plan_seqs, query.after, query.limit, lambda _: True)
        page = found[: query.limit]
        blobs = [self._plan_by_seq[seq].json() for seq in page]
        return blobs, query.cursor(page[-1]) if len(found) > query.limit else None

    def members_page(self, query: MembersQuery, now: str) -> tuple[list[bytes], str | None]:
        plan = self._plan(query.plan_id)
        statuses = query.statuses

        def wanted(seq: int) -> bool:
            return statuses is None or self._member_by_seq[seq].status(now) in statuses

        found = self._after(plan.members, query.after, query.limit, wanted)
        page = found[: query.limit]
        blobs = [self._item(self._member_by_seq[seq]) for seq in page]
        return blobs, query.cursor(page[-1]) if len(found) > query.limit else None

    # -- internals ----------------------------------------------------------------------------------

    @staticmethod
    def _after(seqs: list[int], after: int, limit: int, wanted: Callable[[int], bool]) -> list[int]:
        """Up to ``limit + 1`` wanted sequences after ``after`` (one look-ahead says if a page follows)."""
        found: list[int] = []
        for index in range(bisect.bisect_right(seqs, after), len(seqs)):
            if wanted(seqs[index]):
                found.append(seqs[index])
                if len(found) > limit:
                    break
        return found

    def _item(self, member: _Membership) -> bytes:
        plan = self._plans[member.plan_id]
        customer = self._customer_json(member.customer_id)
        return b'{"customer_details":' + customer + b',"plan_details":' + member.details(plan) + b"}"

    def _plan(self, plan_id: str) -> _Plan:
        plan = self._plans.get(plan_id)
        if plan is None:
            raise NotFound(plan_id, "Plan")
        return plan

    def _member(self, customer_plan_id: str) -> _Membership:
        member = self._members.get(customer_plan_id)
        if member is None:
            raise NotFound(customer_plan_id, "Customer plan")
        return member

    def _drop(self, member: _Membership) -> None:
        plan = self._plans[member.plan_id]
        del plan.members[bisect.bisect_left(plan.members, member.seq)]
        del self._members[member.cpid], self._member_by_seq[member.seq]
        cpids = self._by_customer[member.customer_id]
        cpids.discard(member.cpid)
        if not cpids:
            del self._by_customer[member.customer_id]
