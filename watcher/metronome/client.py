"""The Metronome API client: the read endpoints the watcher needs, and nothing else.

- ``GET /v1/customers`` (active, or ``only_archived=true``), followed page by page through the opaque
  ``next_page`` cursor until it is ``null``: :meth:`MetronomeClient.pages` (unparsed pages, for the
  poll cycle) or :meth:`MetronomeClient.iter_pages` (each page parsed before the next is requested).
- ``GET /v1/customers/{customer_id}``: :meth:`MetronomeClient.get_customer` (``None`` on 404).
- ``GET /v1/plans`` (:meth:`MetronomeClient.plan_pages`) and ``GET /v1/planDetails/{plan_id}/customers``
  with ``status=all`` (:meth:`MetronomeClient.member_pages`): the plans source, paged the same way.

Everything that can go wrong surfaces as one of the :mod:`watcher.errors` ``APIError`` subclasses, so the
poll cycle can refuse to diff an incomplete picture without knowing anything about httpx:

- :class:`~watcher.errors.APIStatusError`: an HTTP error status (after the retry budget, when retryable);
- :class:`~watcher.errors.APITransportError`: connect/read/write/pool failures (after the retry budget);
- :class:`~watcher.errors.APIDataError`: a body that is not JSON or not the documented shape, a repeated
  cursor, or more pages than we are willing to follow.

Transient trouble (timeouts, dropped connections, 429, 5xx) is retried through tenacity, backing off as
:class:`watcher._retry.Backoff` says and honouring ``Retry-After`` as a minimum wait. The bearer token is
sent on every request and registered as a secret, so no exception, log line or repr shows it.
"""

from __future__ import annotations

import functools
import math
import random
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NoReturn, Self

import httpx
import orjson
import structlog
import tenacity

from .._retry import Backoff, parse_retry_after
from .._secrets import redact, register
from ..errors import APIDataError, APIStatusError, APITransportError
from ..events import Listing
from ..metrics import API_PAGES, API_REQUESTS, API_RETRIES
from .pages import ListingPage, PageBody, PageParser, parse_customer, parse_members

__all__ = ["DEFAULT_TIMEOUT", "MetronomeClient", "RetryPolicy"]

log = structlog.get_logger("watcher.client")

#: 30 s to read a page (a 100-record page is small, so a slower answer means trouble), 10 s to connect.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)

_LISTING_PATH = "/v1/customers"
_PLANS_PATH = "/v1/plans"
_MEMBERS_PATH = "/v1/planDetails/{}/customers"
_MAX_PAGE_LIMIT = 100  # the API's documented maximum for ``limit``
_USER_AGENT = "metronome-watcher"
_MESSAGE_MAX_CHARS = 500  # Metronome's error messages are short; a huge one is not worth carrying around

_Endpoint = Literal["list_active", "list_archived", "get_customer", "list_plans", "list_plan_customers"]

# Transport failures that a later attempt can plausibly cure. UnsupportedProtocol and LocalProtocolError
# are left out on purpose: they mean our URL or our request is wrong, and retrying only delays the news.
_RETRYABLE_TRANSPORT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.TimeoutException,  # connect/read/write/pool timeouts
    httpx.NetworkError,  # connect/read/write errors, closed connections
    httpx.RemoteProtocolError,  # the server dropped the connection mid-response
    httpx.ProxyError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one request is retried before the poll cycle is declared failed.

    The defaults ride out a deploy or a short rate-limit storm (six tries, at most two minutes of waiting)
    while keeping one failed cycle short enough that the next scheduled one is not delayed much.
    """

    max_attempts: int = 6
    """Total tries per request, the first one included."""
    base_delay: float = 0.5
    """Upper bound of the first back-off; it doubles with every further retry."""
    max_delay: float = 30.0
    """Cap on any one wait. A ``Retry-After`` asking for more than this makes us give up instead."""
    max_total_wait: float = 120.0
    """Budget for all waits of one request; a wait that would exceed it makes us give up instead."""

    def __post_init__(self) -> None:
        # Refuse nonsense at construction, not half-way through a poll.
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, not {self.max_attempts}")
        for name in ("base_delay", "max_delay", "max_total_wait"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"RetryPolicy.{name} must be a finite number >= 0, not {value!r}")

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.base_delay, self.max_delay)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error_message(response: httpx.Response) -> str | None:
    """Metronome's ``message`` field from an error body, when the body is JSON and has one."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message.strip():
        return None
    message = message.strip()
    return message if len(message) <= _MESSAGE_MAX_CHARS else message[:_MESSAGE_MAX_CHARS] + "..."


def _on_written(sent: Callable[[], None]) -> Callable[[str, dict[str, Any]], None]:
    """An httpcore ``trace`` callback that calls ``sent`` once the request's headers are written.

    A GET is all headers, so that is when it is on the wire; httpcore reports it as
    ``http11.send_request_headers.complete`` (``http2.`` over HTTP/2).
    """

    def trace(event: str, info: dict[str, Any]) -> None:
        if event.endswith(".send_request_headers.complete"):
            sent()

    return trace


class _RetryableStatus(Exception):
    """Internal: a 429 or 5xx answer, to be retried; carries the response and its ``Retry-After``."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response
        self.retry_after = parse_retry_after(response.headers.get("Retry-After"), now=time.time())


class MetronomeClient:
    """Synchronous client for Metronome's customer read endpoints; a ``CustomerSource`` for the poll cycle.

    ``http`` lets the caller hand in a configured :class:`httpx.Client` (tests use one with
    :class:`httpx.MockTransport`); it is then never closed by us. Either way, the bearer token and the
    ``timeout`` are applied to each request, so an injected client cannot silently drop authentication.
    ``sleep`` and ``rng`` are injectable so retries are testable without waiting.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        http: httpx.Client | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = RetryPolicy(),  # frozen, so one shared default instance is safe
        page_limit: int = 100,
        max_pages: int = 100_000,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an absolute http(s) URL, not {base_url!r}")
        if not 1 <= page_limit <= _MAX_PAGE_LIMIT:
            raise ValueError(f"page_limit must be between 1 and {_MAX_PAGE_LIMIT}, not {page_limit}")
        if max_pages < 1:
            raise ValueError(f"max_pages must be >= 1, not {max_pages}")
        register(token)
        # Keep any path prefix (a proxy mounted under /metronome, say) and join ours after it.
        self._base_url = base_url.rstrip("/")
        self._headers: Mapping[str, str] = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "User-Agent": _USER_AGENT,
        }
        self._owns_http = http is None
        if http is None:
            # Our own client carries the headers and the timeout, so that httpx does not merge them
            # into every request again.
            self._http = httpx.Client(timeout=timeout, headers=self._headers)
            self._request_headers: Mapping[str, str] | None = None
            self._request_timeout: Any = httpx.USE_CLIENT_DEFAULT
        else:
            self._http = http
            self._request_headers = self._headers
            self._request_timeout = timeout
        self._retry = retry
        self._page_limit = page_limit
        self._max_pages = max_pages
        self._sleep = sleep
        # A private Random: jitter must not be perturbed by (or perturb) anyone else's use of ``random``.
        self._rng = rng if rng is not None else random.Random()

    def __repr__(self) -> str:
        # Hand-written: the token must never show up in a repr.
        return f"{type(self).__name__}(base_url={self._base_url!r})"

    # -- lifecycle ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the underlying :class:`httpx.Client`, unless it was handed in by the caller."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the endpoints --------------------------------------------------------------------------------

    def iter_pages(self, *, archived: bool) -> Iterator[ListingPage]:
        """Yield the records of every page of one listing, following ``next_page`` until ``null``.

        ``archived=False`` lists active customers, ``archived=True`` archived ones. Each page is parsed
        before the next one is requested. Raises :class:`~watcher.errors.APIError`; a caller that needs
        a complete picture must treat any exception as "no picture".
        """
        for body in self.pages(listing=Listing(archived)):
            yield body.parse()

    def pages(self, *, listing: Listing, sent: Callable[[], None] | None = None) -> Iterator[PageBody]:
        """Like :meth:`iter_pages`, but each page comes unparsed, as a :class:`PageBody`.

        The next page is requested as soon as the generator is resumed, whether or not the page
        before it has been parsed: a caller that parses pages in another thread has the next request
        in flight meanwhile. A bad body raises from :meth:`PageBody.parse`, possibly after later pages
        were fetched; the caller must parse every page it yields before it trusts the listing.

        ``sent``, if given, is called in this thread as soon as each request is on the wire, before
        its answer is awaited (when the transport says so through httpcore's ``trace`` extension, as
        httpx's own does), and again when the request has ended, however it ended; it must be
        harmless to call twice. That is the moment to hand the page before to a thread that parses
        it: handed over earlier, that thread would take the GIL while the request is still being built.
        """
        endpoint: _Endpoint = "list_archived" if listing else "list_active"
        params: dict[str, str | int] = {"limit": self._page_limit}
        if listing:
            params["only_archived"] = "true"
        return self._paged(
            _LISTING_PATH,
            params,
            endpoint=endpoint,
            name=f"{listing.label} listing",
            label=listing.label,
            sent=sent,
        )

    def plan_pages(self, *, sent: Callable[[], None] | None = None) -> Iterator[PageBody]:
        """Every page of ``GET /v1/plans`` (plans, each with an ``id``), unparsed, as :meth:`pages`."""
        params: dict[str, str | int] = {"limit": self._page_limit}
        return self._paged(
            _PLANS_PATH, params, endpoint="list_plans", name="plans listing", label="plans", sent=sent
        )

    def member_pages(self, plan_id: str, *, sent: Callable[[], None] | None = None) -> Iterator[PageBody]:
        """Every page of one plan's memberships, past, current and upcoming (``status=all``), unparsed.

        Each item is ``{customer_details, plan_details}``, checked by
        :func:`~watcher.metronome.pages.parse_members` when the page is parsed; see :meth:`pages`.
        """
        if plan_id in ("", ".", ".."):
            raise ValueError(f"not a usable plan id: {plan_id!r}")
        path = _MEMBERS_PATH.format(urllib.parse.quote(plan_id, safe=""))
        params: dict[str, str | int] = {"limit": self._page_limit, "status": "all"}
        parser = functools.partial(parse_members, plan_id=plan_id)
        return self._paged(
            path,
            params,
            endpoint="list_plan_customers",
            name=f"members of plan {plan_id}",
            label="plan_members",
            sent=sent,
            parser=parser,
        )

    def _paged(
        self,
        path: str,
        params: dict[str, str | int],
        *,
        endpoint: _Endpoint,
        name: str,
        label: str,
        sent: Callable[[], None] | None,
        parser: PageParser | None = None,
    ) -> Iterator[PageBody]:
        """The pages of one listing at ``path``, following ``next_page`` (see :meth:`pages`)."""
        url = self._base_url + path
        # Cursor -> page number that returned it. A server that hands back a cursor we have already
        # followed would otherwise keep us paging forever (and double-count customers).
        seen_cursors: dict[str, int] = {}
        page = 0
        while True:
            page += 1
            what = f"GET {path} ({name}, page {page})"
            if page > self._max_pages:
                raise APIDataError(
                    redact(f"{what}: the {name} did not end within max_pages={self._max_pages} pages")
                )
            response = self._send(url, params=params, endpoint=endpoint, what=what, sent=sent)
            if response.status_code != httpx.codes.OK:
                raise self._status_error(response, what=what)
            body = PageBody(response.content, status=response.status_code, what=what, parser=parser)
            API_PAGES.labels(label).inc()
            yield body
            next_page = body.next_page
            if next_page is None:
                return
            if next_page in seen_cursors:
                raise APIDataError(
                    redact(
                        f"{what}: next_page repeats the cursor page {seen_cursors[next_page]} returned; "
                        "refusing to loop"
                    ),
                    status=response.status_code,
                )
            seen_cursors[next_page] = page
            params["next_page"] = next_page

    def get_customer(self, customer_id: str) -> dict[str, Any] | None:
        """The customer's record (``data``), archived ones included; ``None`` when Metronome says 404."""
        # "", "." and ".." would address another resource once the URL is normalised (the listing, or
        # a parent path), so they are refused rather than sent.
        if customer_id in ("", ".", ".."):
            raise ValueError(f"not a usable customer id: {customer_id!r}")
        path = f"{_LISTING_PATH}/{urllib.parse.quote(customer_id, safe='')}"
        what = f"GET {path}"
        response = self._send(self._base_url + path, params=None, endpoint="get_customer", what=what)
        if response.status_code == httpx.codes.NOT_FOUND:
            return None
        if response.status_code != httpx.codes.OK:
            raise self._status_error(response, what=what)
        return parse_customer(
            response.content, customer_id=customer_id, what=what, status=response.status_code
        )

    # -- the retrying transport -----------------------------------------------------------------------

    def _send(
        self,
        url: str,
        *,
        params: Mapping[str, str | int] | None,
        endpoint: _Endpoint,
        what: str,
        sent: Callable[[], None] | None = None,
    ) -> httpx.Response:
        """GET ``url``, retrying transient failures; returns the final response, whatever its status.

        Retryable statuses (429, 5xx) that outlast the budget raise here; every other status is
        returned for the caller to interpret (a 404 means different things to the two endpoints).
        ``sent``: see :meth:`pages`; called for every attempt.
        """
        # Encoded here, once per page: handed ``params=``, httpx would merge them on every request.
        target = httpx.URL(f"{url}?{urllib.parse.urlencode(params)}" if params else url)
        extensions = None if sent is None else {"trace": _on_written(sent)}

        def attempt() -> httpx.Response:
            try:
                response = self._http.get(
                    target,
                    headers=self._request_headers,
                    timeout=self._request_timeout,
                    extensions=extensions,
                )
            except _RETRYABLE_TRANSPORT_ERRORS:
                API_REQUESTS.labels(endpoint, "error").inc()
                raise
            except httpx.DecodingError as exc:
                # The body arrived but its Content-Encoding could not be undone: a data problem.
                API_REQUESTS.labels(endpoint, "error").inc()
                raise APIDataError(redact(f"{what}: body could not be decoded: {_describe(exc)}")) from exc
            except httpx.HTTPError as exc:
                # Anything else httpx raises (a bad URL scheme, a local protocol error, too many
                # redirects on an injected client that follows them) will not get better by retrying.
                API_REQUESTS.labels(endpoint, "error").inc()
                raise APITransportError(redact(f"{what}: {_describe(exc)}")) from exc
            finally:
                # For a transport that does not report the write (a MockTransport), or an attempt that
                # failed before it: the request has ended, so it is the moment at the latest.
                if sent is not None:
                    sent()
            status = response.status_code
            API_REQUESTS.labels(endpoint, str(status)).inc()
            if status == httpx.codes.TOO_MANY_REQUESTS or status >= 500:
                raise _RetryableStatus(response)
            return response

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type((*_RETRYABLE_TRANSPORT_ERRORS, _RetryableStatus)),
            wait=self._wait,
            stop=lambda state: self._why_stop(state) is not None,
            sleep=self._sleep,
            before_sleep=functools.partial(self._before_sleep, endpoint),
            retry_error_callback=functools.partial(self._give_up, endpoint, what),
        )
        return retrying(attempt)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        delay = self._retry.backoff.wait(state.attempt_number, self._rng)
        retry_after = _retry_after(state)
        # Retry-After is the server's minimum; our back-off may only lengthen it.
        return delay if retry_after is None else max(delay, retry_after)

    def _why_stop(self, state: tenacity.RetryCallState) -> str | None:
        """Why the budget allows no further attempt (the end of the error's reason), or None."""
        policy, attempts = self._retry, state.attempt_number
        if attempts >= policy.max_attempts:
            return f"after {_plural(attempts, 'attempt')}"
        retry_after = _retry_after(state)
        if retry_after is not None and retry_after > policy.max_delay:
            return (
                f"after {_plural(attempts, 'attempt')} (Retry-After asks for {retry_after:g}s, "
                f"more than max_delay={policy.max_delay:g}s)"
            )
        if state.idle_for + state.upcoming_sleep > policy.max_total_wait:
            return (
                f"after {_plural(attempts, 'attempt')} (waiting {state.upcoming_sleep:.1f}s more would "
                f"exceed the max_total_wait={policy.max_total_wait:g}s retry budget)"
            )
        return None

    def _before_sleep(self, endpoint: _Endpoint, state: tenacity.RetryCallState) -> None:
        # Only the endpoint, the status or the exception's class name: never headers, URLs with
        # credentials or exception text that might echo a request.
        exc = _exception(state)
        delay = round(state.upcoming_sleep, 3)
        if isinstance(exc, _RetryableStatus):
            status = exc.response.status_code
            log.warning(
                "api.retry", endpoint=endpoint, attempt=state.attempt_number, status=status, delay=delay
            )
        else:
            error = type(exc).__name__
            log.warning(
                "api.retry", endpoint=endpoint, attempt=state.attempt_number, error=error, delay=delay
            )
        API_RETRIES.labels(endpoint).inc()

    def _give_up(self, endpoint: _Endpoint, what: str, state: tenacity.RetryCallState) -> NoReturn:
        exc = _exception(state)
        why = self._why_stop(state) or ""
        if isinstance(exc, _RetryableStatus):
            error: APIStatusError | APITransportError = self._status_error(exc.response, what=what, why=why)
            cause: BaseException | None = None
        else:
            error, cause = APITransportError(redact(f"{what}: {_describe(exc)} {why}")), exc
        log.error("api.giving_up", endpoint=endpoint, attempts=state.attempt_number, reason=error.reason)
        raise error from cause

    def _status_error(self, response: httpx.Response, *, what: str, why: str = "") -> APIStatusError:
        status = response.status_code
        message = _error_message(response)
        message = redact(message) if message is not None else None
        if status in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
            detail = f"HTTP {status}: Metronome refused the bearer token (check METRONOME_BEARER_TOKEN)"
        else:
            detail = f"HTTP {status}"
            if message is None and response.reason_phrase:
                detail += f" {response.reason_phrase}"
        if message is not None:
            detail += f": {message}"
        if why:
            detail += f" {why}"
        return APIStatusError(redact(f"{what}: {detail}"), status=status, message=message)


def _exception(state: tenacity.RetryCallState) -> BaseException:
    assert state.outcome is not None
    exc = state.outcome.exception()
    assert exc is not None
    return exc


def _retry_after(state: tenacity.RetryCallState) -> float | None:
    exc = _exception(state)
    return exc.retry_after if isinstance(exc, _RetryableStatus) else None
