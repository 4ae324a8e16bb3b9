"""The ASGI app: health, the web view and the change feed, on one port.

Routes:

* ``/healthz``, ``/readyz``, ``/metrics``: always served, never behind the token (they show no
  customer data), with the bodies they have always had (:class:`watcher.health.Health`).
* With ``[web] enabled``: ``/`` (recent changes, filtered and paged by sequence),
  ``/customers/{id}`` (the record as last seen and its whole history), ``/status`` (polling health
  with a chart, and every sink's backlog), ``/api/events`` (the change feed), ``/static/style.css``.

Security, for everything but the three health paths: the token (Basic password or Bearer, compared
in constant time) or 401 with an empty body; then only GET and HEAD (405 otherwise), so nothing
here changes state. Every response carries a Content-Security-Policy that allows no script at all
and no framing, ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer`` and
``Cache-Control: no-store``. Pages are Jinja2 templates with autoescaping, so customer data is
always text, and every page passes :func:`watcher._secrets.redact` on its way out.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import orjson
import structlog
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from .._secrets import redact, register
from .._time import format_ts, parse_ts
from ..config import WebConfig, parse_when
from ..errors import StoreError
from ..events import CustomerStatus, EventType
from ..health import METRICS_CONTENT_TYPE, Health
from ..notices import failure_streak
from ._auth import Credential
from .views import event_view, poll_chart, poll_seconds, pretty_json, record_facts, short_time

__all__ = ["FEED_MAX_LIMIT", "OPEN_PATHS", "SECURITY_HEADERS", "create_app"]

log = structlog.get_logger("watcher.web")

#: Served without the token: they show no customer data, and probes carry no credentials.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
#: On every response. No script may run (there is none), nothing may frame the pages, and styles
#: and images come only from this origin (the chart is inline SVG, styled by the stylesheet).
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    (
        "content-security-policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
)
#: The feed's page size: the default, and the most one request may ask for.
FEED_DEFAULT_LIMIT = 100
FEED_MAX_LIMIT = 1000
#: Events per page of a customer's history.
HISTORY_PAGE = 500
#: Polls drawn in the ``/status`` chart, and listed under it.
CHART_POLLS = 60
LISTED_POLLS = 20

_REALM = 'realm="metronome-watcher"'

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _BadRequest(ValueError):
    """A query parameter the page or the feed cannot use; the message says which and why."""


# -- the gate: headers, the token, the methods ----------------------------------------------------


class _Gate:
    """Adds the security headers to every response, and keeps out what is not let in."""

    def __init__(self, app: ASGIApp, credential: Credential | None) -> None:
        self.app = app
        self.credential = credential

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.decode().lower() != "cache-control"
                ]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS]
                message["headers"] = headers
            await send(message)

        path: str = scope["path"]
        if path not in OPEN_PATHS and self.credential is not None:
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            if not self.credential.allows(header):
                scheme = "Bearer" if path.startswith("/api/") else "Basic"
                challenge = f"{scheme} {_REALM}" + (', charset="UTF-8"' if scheme == "Basic" else "")
                await Response(b"", 401, headers={"www-authenticate": challenge})(
                    scope, receive, send_with_headers
                )
                return
        if scope["method"] not in ("GET", "HEAD"):
            await Response(b"", 405, headers={"allow": "GET, HEAD"})(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


# -- health ---------------------------------------------------------------------------------------


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def _health_routes(health: Health) -> list[Route]:
    def guarded(check: Callable[[], Response], path: str) -> Callable[[Request], Response]:
        def endpoint(_request: Request) -> Response:
            try:
                return check()
            except StoreError as exc:
                log.error("health.store_error", path=path, error=exc.reason)
                return _json({"error": exc.reason}, 503)
            except Exception as exc:
                log.exception("health.error", path=path, error=repr(exc))
                return _json({"error": "internal error"}, 500)

        return endpoint

    def healthz() -> Response:
        ok, body = health.liveness()
        return _json(body, 200 if ok else 503)

    def readyz() -> Response:
        ok, body = health.readiness()
        return _json(body, 200 if ok else 503)

    def metrics() -> Response:
        return Response(health.metrics(), 200, media_type=METRICS_CONTENT_TYPE)

    return [
        Route("/healthz", guarded(healthz, "/healthz")),
        Route("/readyz", guarded(readyz, "/readyz")),
        Route("/metrics", guarded(metrics, "/metrics")),
    ]


# -- query parameters -----------------------------------------------------------------------------


def _expand_types(values: Sequence[str]) -> list[str]:
    """Event types named by ``type`` values (exact, or globs like ``customer.*``); "" means all."""
    out: list[str] = []
    for value in values:
        value = value.strip()
        if not value:
            continue
        matched = [t.value for t in EventType if fnmatch.fnmatchcase(t, value)]
        if not matched:
            raise _BadRequest(f"type: unknown event type {value!r} (known: {', '.join(EventType)})")
        out += [t for t in matched if t not in out]
    return out


def _int(
    params: Mapping[str, str], key: str, *, default: int | None, lo: int, hi: int | None = None
) -> int | None:
    raw = params.get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest(f"{key}: {raw!r} is not a whole number") from None
    if value < lo or (hi is not None and value > hi):
        raise _BadRequest(
            f"{key}: must be between {lo} and {hi}" if hi is not None else f"{key}: must be at least {lo}"
        )
    return value


@dataclass(frozen=True)
class _Filters:
    """The list's filters as the form sent them (to fill the form again and build links)."""

    types: tuple[str, ...]
    customer: str
    since: str
    until: str

    @property
    def type(self) -> str:
        """What the form's one type menu shows (several types come only from a URL)."""
        return self.types[0] if len(self.types) == 1 else ""

    @property
    def any(self) -> bool:
        return bool(self.types or self.customer or self.since or self.until)

    def query(self, **cursor: int) -> str:
        params: list[tuple[str, str]] = [("type", t) for t in self.types]
        params += [
            (k, v)
            for k, v in (("customer", self.customer), ("since", self.since), ("until", self.until))
            if v
        ]
        params += [(k, str(v)) for k, v in cursor.items()]
        return "?" + urlencode(params)


# -- the app --------------------------------------------------------------------------------------


def create_app(health: Health, web: WebConfig | None = None) -> ASGIApp:
    """The ASGI app for ``health``'s store: health always, the web view when ``web.enabled``."""
    routes = _health_routes(health)
    credential = None
    if web is not None and web.enabled:
        if web.token is None:  # the config refuses this; a config built in code may not
            raise ValueError("web.token is required when web.enabled is true")
        token = web.token.get_secret_value()
        register(token)
        credential = Credential(token)
        routes += _Pages(health, web).routes()

    def not_found(request: Request, _exc: Exception) -> Response:
        if credential is None or request.url.path in OPEN_PATHS:
            return _json({"error": f"no such endpoint: {request.url.path}"}, 404)
        if request.url.path.startswith("/api/"):
            return _json({"error": "not found"}, 404)
        return _Pages.render_error(404, "No such page.")

    def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == 404:
            return not_found(request, exc)
        return Response(b"", status)

    app = Starlette(routes=routes, exception_handlers={404: not_found, HTTPException: http_error})
    return _Gate(app, credential)


def _safe(endpoint: Callable[[Request], Response], *, api: bool = False) -> Callable[[Request], Response]:
    """``endpoint``, answering 500 (and logging why) instead of raising: the page says nothing of
    the cause, which may hold customer data, and the server stays quiet about it."""

    def guarded(request: Request) -> Response:
        try:
            return endpoint(request)
        except StoreError as exc:  # says nothing of customers: the page may show it
            log.error("web.store_error", path=request.url.path, error=exc.reason)
            if api:
                return _json({"error": exc.reason}, 503)
            return _Pages.render_error(503, f"The database cannot be read: {exc.reason}")
        except Exception as exc:
            log.exception("web.error", path=request.url.path, error=repr(exc))
            if api:
                return _json({"error": "internal error"}, 500)
            return _Pages.render_error(500, "Something went wrong; the watcher's log says what.")

    return guarded


_ENV = Environment(
    loader=PackageLoader("watcher.web", "templates"),
    autoescape=select_autoescape(["html", "svg"], default_for_string=True, default=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["quote"] = lambda value: quote(str(value), safe="")


class _Pages:
    def __init__(self, health: Health, web: WebConfig) -> None:
        self.health = health
        self.store = health.store
        self.page_size = web.page_size
        self.css = resources.files("watcher.web").joinpath("static/style.css").read_bytes()

    def routes(self) -> list[Route]:
        return [
            Route("/", _safe(self.index)),
            Route("/customers/{customer_id}", _safe(self.customer)),
            Route("/status", _safe(self.status)),
            Route("/api/events", _safe(self.feed, api=True)),
            Route("/static/style.css", self.stylesheet),
        ]

    @staticmethod
    def render(template: str, code: int = 200, /, **context: Any) -> HTMLResponse:
        html = _ENV.get_template(template).render(**context)
        return HTMLResponse(redact(html), code)

    @staticmethod
    def render_error(code: int, message: str) -> HTMLResponse:
        return _Pages.render("error.html", code, code=code, message=message, nav=None)

    def stylesheet(self, _request: Request) -> Response:
        return Response(self.css, media_type="text/css")

    # -- / ----------------------------------------------------------------------------------------

    def index(self, request: Request) -> Response:
        q = request.query_params
        filters = _Filters(
            types=tuple(t.strip() for t in q.getlist("type") if t.strip()),
            customer=q.get("customer", "").strip(),
            since=q.get("since", "").strip(),
            until=q.get("until", "").strip(),
        )
        context: dict[str, Any] = {
            "nav": "changes",
            "filters": filters,
            "types": [t.value for t in EventType],
        }
        try:
            now = self.health.clock()
            page = self.store.event_page(
                types=_expand_types(filters.types),
                customer_text=filters.customer or None,
                since=_moment(filters.since, now, "since"),
                until=_moment(filters.until, now, "until"),
                before=_int(q, "before", default=None, lo=0),
                after=_int(q, "after", default=None, lo=0),
                limit=self.page_size,
            )
        except _BadRequest as exc:
            return self.render(
                "index.html", 400, error=str(exc), rows=[], older_url=None, newer_url=None, **context
            )
        rows = [event_view(e) for e in page.events]
        older_url = filters.query(before=rows[-1].sequence) if rows and page.older else None
        newer_url = filters.query(after=rows[0].sequence) if rows and page.newer else None
        if not rows and page.newer:  # past the end of the log: back to the newest page
            newer_url = filters.query()
        return self.render(
            "index.html", rows=rows, older_url=older_url, newer_url=newer_url, error=None, **context
        )

    # -- /customers/{id} ----------------------------------------------------------------------------

    def customer(self, request: Request) -> Response:
        cid: str = request.path_params["customer_id"]
        try:
            before = _int(request.query_params, "before", default=None, lo=0)
        except _BadRequest as exc:
            return self.render_error(400, str(exc))
        state = self.store.get_customer(cid)
        page = self.store.event_page(customer_ids=[cid], before=before, limit=HISTORY_PAGE)
        if state is None and not page.events and before is None:
            return self.render_error(404, f"No customer with id {cid} has been seen.")
        record: Mapping[str, Any] = orjson.loads(state.record) if state is not None else {}
        if not record and page.events:  # known only from the audit log
            first = page.events[0]
            record = first.get("customer") or first.get("previous") or {}
        rows = [event_view(e) for e in page.events]
        return self.render(
            "customer.html",
            nav=None,
            customer_id=cid,
            name=str(record.get("name") or ""),
            state=state,
            status=state.status if state is not None else None,
            first_seen=short_time(state.first_seen_at) if state is not None else None,
            changed=short_time(state.changed_at) if state is not None else None,
            facts=record_facts(record),
            record_json=pretty_json(record),
            rows=rows,
            older_url=f"?before={rows[-1].sequence}" if rows and page.older else None,
            newer_url="?" if before is not None else None,
        )

    # -- /status ----------------------------------------------------------------------------------

    def status(self, _request: Request) -> Response:
        now = self.health.clock()
        polls = self.store.last_polls(CHART_POLLS)
        last_ok = self.store.last_successful_poll()
        streak = failure_streak(self.store)
        ready, readiness = self.health.readiness()
        counts = self.store.customer_counts()
        sinks = self.store.delivery_status(now, sinks=self.health.sinks)
        last_ok_age = None
        if last_ok is not None:
            last_ok_age = _ago((now - parse_ts(last_ok.finished_at or last_ok.started_at)).total_seconds())
        return self.render(
            "status.html",
            nav="status",
            now=short_time(format_ts(now)),
            ready=ready,
            readiness=readiness,
            last_ok=last_ok,
            last_ok_at=short_time(last_ok.finished_at or last_ok.started_at) if last_ok else None,
            last_ok_age=last_ok_age,
            streak=streak,
            polls=[(p, poll_seconds(p), short_time(p.started_at)) for p in polls[:LISTED_POLLS]],
            chart=poll_chart(polls),
            counts=[(s.value, counts.get(s.value, 0)) for s in CustomerStatus],
            sinks=[
                (s, _ago(s.oldest_pending_age) if s.oldest_pending_age is not None else None) for s in sinks
            ],
        )

    # -- /api/events --------------------------------------------------------------------------------

    def feed(self, request: Request) -> Response:
        """``{"data": [v1 events in sequence order], "next_after_sequence": K}``.

        ``K`` is the last sequence in ``data`` (``after_sequence`` itself when there is none): a
        consumer that asks again with it gets every event once, in order.
        """
        q = request.query_params
        try:
            after = _int(q, "after_sequence", default=0, lo=0) or 0
            limit = (
                _int(q, "limit", default=FEED_DEFAULT_LIMIT, lo=1, hi=FEED_MAX_LIMIT) or FEED_DEFAULT_LIMIT
            )
            types = _expand_types(q.getlist("type"))
        except _BadRequest as exc:
            return _json({"error": str(exc)}, 400)
        customer_id = q.get("customer_id")
        page = self.store.event_page(
            types=types,
            customer_ids=[customer_id] if customer_id else None,
            after=after,
            limit=limit,
            parse=False,
        )
        # The page is newest first; the feed is in order. The stored payloads go out as they are:
        # they are what `events --format jsonl` prints (see EventPage.payloads), and reading and
        # writing each one again would cost most of the feed's time. No secret is ever in an
        # event; should one be, it is cut out here as from every page.
        data = ",".join(reversed(page.payloads))
        next_after = page.sequences[0] if page.sequences else after
        body = redact(f'{{"data":[{data}],"next_after_sequence":{next_after}}}').encode()
        return Response(body, 200, media_type="application/json")


def _moment(value: str, now: datetime, key: str) -> str | None:
    if not value:
        return None
    try:
        return format_ts(parse_when(value, now=now))
    except ValueError as exc:
        raise _BadRequest(f"{key}: {exc}") from None


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"
