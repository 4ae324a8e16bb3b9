"""The Metronome API client: the two read endpoints the watcher needs, and nothing else.

- ``GET /v1/customers`` (active, or ``only_archived=true``), followed page by page through the opaque
  ``next_page`` cursor until it is ``null``: :meth:`MetronomeClient.iter_pages`, or
  :meth:`MetronomeClient.iter_page_bodies` for pages that are parsed wherever the caller likes.
- ``GET /v1/customers/{customer_id}``: :meth:`MetronomeClient.get_customer` (``None`` on 404).

Everything that can go wrong surfaces as one of the :mod:`watcher.errors` ``APIError`` subclasses, so the
poll cycle can refuse to diff an incomplete picture without knowing anything about httpx:

- :class:`~watcher.errors.APIStatusError`: an HTTP error status (after the retry budget, when retryable);
- :class:`~watcher.errors.APITransportError`: connect/read/write/pool failures (after the retry budget);
- :class:`~watcher.errors.APIDataError`: a body that is not JSON or not the documented shape, a repeated
  cursor, or more pages than we are willing to follow.

Transient trouble (timeouts, dropped connections, 429, 5xx) is retried with exponential backoff and full
jitter, honouring ``Retry-After`` as a minimum wait. The bearer token is sent on every request and never
appears in an exception, a log line or a repr: every message built here is passed through a redactor.

Bodies are parsed with orjson and validated with a few ``isinstance`` checks only: 100k customers is 2,000
pages per listing, and per-record model validation would dominate the poll time. Unknown fields are
returned untouched; they are data to diff, never an error. Each page comes as a :class:`ListingPage`: the
records, and a digest of the bytes they were parsed from, by which the poll cycle recognises a page it
has seen before.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import math
import random
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import repeat as _repeat
from types import TracebackType
from typing import Any, Literal, Self, cast

import httpx
import orjson
import structlog
import xxhash

from watcher.errors import APIDataError, APIStatusError, APITransportError
from watcher.metrics import API_PAGES, API_REQUESTS, API_RETRIES

__all__ = ["DEFAULT_TIMEOUT", "ListingPage", "MetronomeClient", "PageBody", "RetryPolicy"]

log = structlog.get_logger(__name__)

#: 30 s to read a page (a 100-record page is small, so a slower answer means trouble), 10 s to connect.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)

_LISTING_PATH = "/v1/customers"
_MAX_PAGE_LIMIT = 100  # the API's documented maximum for ``limit``
_USER_AGENT = "metronome-watcher"
_MESSAGE_MAX_CHARS = 500  # Metronome's error messages are short; a huge one is not worth carrying around

_Endpoint = Literal["list_active", "list_archived", "get_customer"]

# Transport failures that a later attempt can plausibly cure. UnsupportedProtocol and LocalProtocolError
# are left out on purpose: they mean our URL or our request is wrong, and retrying only delays the news.
_RETRYABLE_TRANSPORT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.TimeoutException,  # connect/read/write/pool timeouts
    httpx.NetworkError,  # connect/read/write errors, closed connections
    httpx.RemoteProtocolError,  # the server dropped the connection mid-response
    httpx.ProxyError,
)


class ListingPage(list[dict[str, Any]]):
    """The records of one listing page, exactly as parsed, and a digest of the bytes behind them.

    ``digest`` is :attr:`PageBody.digest`: two pages with the same digest hold the same records, byte
    for byte, whatever their cursors. ``None`` means no digest is known (a page from some other
    source).
    """

    __slots__ = ("digest",)

    def __init__(self, records: list[dict[str, Any]], digest: bytes | None = None) -> None:
        super().__init__(records)
        self.digest = digest


#: How a listing body ends when its last member is a cursor without escapes, or null (as Metronome's
#: do). A cursor read from there lets the next request go out before this page is parsed. Quotes
#: inside JSON strings are escaped, so this can only match the top-level object's last member; a
#: body that ends any other way (escapes, spaces, another member last) is parsed first.
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
    """One listing page as received: its body, parsed and validated only by :meth:`parse`.

    ``next_page`` is the cursor the client follows from this page (``None``: the last page). It is
    read from the end of the body when the body ends the way the API's do, so that the next
    request can go out before this page is parsed; otherwise the page was parsed on arrival.
    :meth:`parse` refuses a body whose parsed ``next_page`` is not the cursor followed.

    ``digest`` (XXH3-128) stands for the page's records. For a body that ends the way the API's do
    it is known on arrival, and is a digest of the bytes before that final ``next_page`` member:
    pages with the same records share it whatever their cursors. Any other body is digested whole,
    once parsed. Once a body with a given digest has parsed, every body with that digest parses
    too, to the same records: the cut only ever removes the top-level object's last member (quotes
    inside JSON strings are escaped), and putting another cursor of the same plain form in its place
    cannot make the object invalid. (The two kinds of digest are taken with different seeds, so a
    body digested whole never shares a digest with the bytes before some other body's cursor.) A
    caller that has seen a page's digest on a page that parsed can therefore skip parsing it.
    """

    __slots__ = ("_client", "_page", "_response", "_what", "digest", "next_page")

    def __init__(self, client: MetronomeClient, response: httpx.Response, what: str) -> None:
        self._client, self._response, self._what = client, response, what
        self._page: ListingPage | None = None
        content = response.content
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
            data, next_page = self._client._parse_listing(self._response, what=self._what)
            if self.next_page is _UNPARSED:
                self.next_page = next_page
                self.digest = xxhash.xxh3_128_digest(self._response.content)
            elif next_page != self.next_page:
                raise APIDataError(
                    self._client._redact(f"{self._what}: 'next_page' is not the cursor the body ends with"),
                    status=self._response.status_code,
                )
            self._page = ListingPage(data, self.digest)
        return self._page


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one request is retried before the poll cycle is declared failed.

    The defaults ride out a deploy or a short rate-limit storm (six tries, at most two minutes of waiting)
    while keeping one failed cycle short enough that the next scheduled one is not delayed much.
    """

    max_attempts: int = 6
    """Total tries per request, the first one included."""
    base_delay: float = 0.5
    """Upper bound of the first backoff; it doubles with every further retry (full jitter below it)."""
    max_delay: float = 30.0
    """Cap on any one wait. A ``Retry-After`` asking for more than this makes us give up instead."""
    max_total_wait: float = 120.0
    """Budget for all waits of one request; a wait that would exceed it makes us give up instead."""

    def __post_init__(self) -> None:
        # Refuse nonsense at construction: a zero-attempt policy or a negative delay would otherwise
        # surface as a confusing failure in the middle of a poll.
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, not {self.max_attempts}")
        for name in ("base_delay", "max_delay", "max_total_wait"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"RetryPolicy.{name} must be a finite number >= 0, not {value!r}")

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The wait before retry number ``attempt`` (1 after the first failure), with full jitter.

        Full jitter (a uniform draw between 0 and the exponential bound) spreads out many watchers that
        failed together better than a fixed or "equal" jitter does; see the AWS architecture blog post
        "Exponential Backoff And Jitter".
        """
        # Clamp the exponent so a huge attempt number cannot overflow a float before the cap applies.
        bound = min(self.max_delay, self.base_delay * 2.0 ** min(max(attempt - 1, 0), 64))
        return rng.uniform(0.0, bound)


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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks us to wait, or ``None`` when absent or unreadable.

    Both RFC 9110 forms are understood: delta seconds and an HTTP date (compared with the current time;
    a date in the past means "now"). An unreadable value is ignored rather than fatal: our own backoff
    still applies.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" yields a naive datetime; HTTP dates are always GMT
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


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


class _GiveUp(Exception):
    """Internal: the retry loop decided to stop; carries why, for the final error's reason."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class MetronomeClient:
    """Synchronous client for Metronome's customer read endpoints.

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
        # Keep any path prefix (a proxy mounted under /metronome, say) and join ours after it.
        self._base_url = base_url.rstrip("/")
        self._token = token
        self._headers: Mapping[str, str] = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "User-Agent": _USER_AGENT,
        }
        self._owns_http = http is None
        if http is None:
            # Our own client carries the headers and the timeout, so that httpx does not merge
            # them into every request again (it is per-page work on the cycle's hot path).
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
        # A private Random, not the module's global one: jitter must not be perturbed by (or perturb)
        # anyone else's use of ``random``.
        self._rng = rng if rng is not None else random.Random()

    def __repr__(self) -> str:
        # Deliberately hand-written: the token must never show up in a repr.
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
        """Yield the ``data`` list of every page of one listing, following ``next_page`` until ``null``.

        ``archived=False`` lists active customers, ``archived=True`` archived ones. Records are yielded
        exactly as parsed, as a :class:`ListingPage`. Raises :class:`~watcher.errors.APIError`; a caller
        that needs a complete picture must treat any exception as "no picture". Each page is parsed
        before the next one is requested.
        """
        for body in self.iter_page_bodies(archived=archived):
            yield body.parse()

    def iter_page_bodies(
        self, *, archived: bool, sent: Callable[[], None] | None = None
    ) -> Iterator[PageBody]:
        """Like :meth:`iter_pages`, but each page comes unparsed, as a :class:`PageBody`.

        The next page is requested as soon as the generator is resumed, whether or not the page
        before it has been parsed: a caller that parses pages in another thread has the next request
        in flight meanwhile, so the parsing hides inside the API's latency. A bad body raises from
        :meth:`PageBody.parse`, possibly after later pages were fetched; the caller must parse every
        page it yields before it trusts the listing.

        ``sent``, if given, is called in this thread as soon as each request is on the wire, before
        its answer is awaited (when the transport says so through httpcore's ``trace`` extension, as
        httpx's own does), and again when the request has ended, however it ended; it must be
        harmless to call twice. That is the moment to hand the page before to the thread that parses
        it: handed over earlier, that thread takes the GIL from this one while the request is still
        being built (httpcore releases it to check the pooled connection), and the request goes out
        only once the parsing is done.
        """
        listing = "archived" if archived else "active"
        endpoint: _Endpoint = "list_archived" if archived else "list_active"
        url = self._base_url + _LISTING_PATH
        params: dict[str, str | int] = {"limit": self._page_limit}
        if archived:
            params["only_archived"] = "true"
        # Cursor -> page number that returned it. A server that hands back a cursor we have already
        # followed would otherwise keep us paging forever (and double-count customers).
        seen_cursors: dict[str, int] = {}
        page = 0
        while True:
            page += 1
            what = f"GET {_LISTING_PATH} ({listing} listing, page {page})"
            if page > self._max_pages:
                raise APIDataError(
                    self._redact(
                        f"{what}: the {listing} listing did not end within max_pages={self._max_pages} pages"
                    )
                )
            response = self._send(url, params=params, endpoint=endpoint, what=what, sent=sent)
            if response.status_code != httpx.codes.OK:
                raise self._status_error(response, what=what, attempts=None)
            body = PageBody(self, response, what)
            API_PAGES.labels(listing).inc()
            yield body
            next_page = body.next_page
            if next_page is None:
                return
            if next_page in seen_cursors:
                raise APIDataError(
                    self._redact(
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
            raise self._status_error(response, what=what, attempts=None)
        return self._parse_customer(response, customer_id=customer_id, what=what)

    # -- retrying transport ---------------------------------------------------------------------------

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
        ``sent``: see :meth:`iter_page_bodies`; called for every attempt.
        """
        # The query string is encoded here, once per page: handed ``params=``, httpx merges them
        # into the URL on every request, about a third of its own per-request cost (measured).
        target = httpx.URL(f"{url}?{urllib.parse.urlencode(params)}" if params else url)
        extensions = None if sent is None else {"trace": _on_written(sent)}
        attempt = 0
        waited = 0.0
        while True:
            attempt += 1
            try:
                response = self._http.get(
                    target,
                    headers=self._request_headers,
                    timeout=self._request_timeout,
                    extensions=extensions,
                )
            except _RETRYABLE_TRANSPORT_ERRORS as exc:
                API_REQUESTS.labels(endpoint, "error").inc()
                detail = self._describe_exception(exc)
                try:
                    delay = self._next_delay(attempt, waited, retry_after=None)
                except _GiveUp as give_up:
                    reason = self._redact(f"{what}: {detail} {give_up.why}")
                    log.error("api.giving_up", endpoint=endpoint, attempts=attempt, reason=reason)
                    raise APITransportError(reason) from exc
                self._log_retry(endpoint, attempt, delay, error=type(exc).__name__)
            except httpx.DecodingError as exc:
                # The body arrived but its Content-Encoding could not be undone: a data problem.
                API_REQUESTS.labels(endpoint, "error").inc()
                detail = self._describe_exception(exc)
                raise APIDataError(self._redact(f"{what}: body could not be decoded: {detail}")) from exc
            except httpx.HTTPError as exc:
                # Everything else httpx can raise (a bad URL scheme, a local protocol error, too many
                # redirects on an injected client that follows them) will not get better by retrying.
                API_REQUESTS.labels(endpoint, "error").inc()
                detail = self._describe_exception(exc)
                raise APITransportError(self._redact(f"{what}: {detail}")) from exc
            else:
                status = response.status_code
                API_REQUESTS.labels(endpoint, str(status)).inc()
                if status != httpx.codes.TOO_MANY_REQUESTS and status < 500:
                    return response
                try:
                    delay = self._next_delay(
                        attempt, waited, retry_after=_parse_retry_after(response.headers.get("Retry-After"))
                    )
                except _GiveUp as give_up:
                    error = self._status_error(response, what=what, attempts=attempt, why=give_up.why)
                    log.error("api.giving_up", endpoint=endpoint, attempts=attempt, reason=error.reason)
                    raise error from None
                self._log_retry(endpoint, attempt, delay, status=status)
            finally:
                # For a transport that does not report the write (a MockTransport), or an attempt
                # that failed before it: the request has ended, so it is the moment at the latest.
                if sent is not None:
                    sent()
            API_RETRIES.labels(endpoint).inc()
            self._sleep(delay)
            waited += delay

    def _next_delay(self, attempt: int, waited: float, *, retry_after: float | None) -> float:
        """The wait before the next attempt, or :class:`_GiveUp` when the budget does not allow one."""
        policy = self._retry
        if attempt >= policy.max_attempts:
            raise _GiveUp(f"after {_plural(attempt, 'attempt')}")
        if retry_after is not None and retry_after > policy.max_delay:
            raise _GiveUp(
                f"after {_plural(attempt, 'attempt')} (Retry-After asks for {retry_after:g}s, "
                f"more than max_delay={policy.max_delay:g}s)"
            )
        delay = policy.backoff(attempt, self._rng)
        if retry_after is not None:
            # Retry-After is the server's minimum; our jittered backoff may only lengthen it.
            delay = max(delay, retry_after)
        if waited + delay > policy.max_total_wait:
            raise _GiveUp(
                f"after {_plural(attempt, 'attempt')} (waiting {delay:.1f}s more would exceed the "
                f"max_total_wait={policy.max_total_wait:g}s retry budget)"
            )
        return delay

    def _log_retry(
        self, endpoint: _Endpoint, attempt: int, delay: float, *, status: int | None = None, error: str = ""
    ) -> None:
        # Only the endpoint, the status or the exception's class name: never headers, URLs with
        # credentials or exception text that might echo a request.
        if status is not None:
            log.warning("api.retry", endpoint=endpoint, attempt=attempt, status=status, delay=round(delay, 3))
        else:
            log.warning("api.retry", endpoint=endpoint, attempt=attempt, error=error, delay=round(delay, 3))

    # -- error and body interpretation ----------------------------------------------------------------

    def _redact(self, text: str) -> str:
        """``text`` with the bearer token blanked out, in case a server or an exception echoed it."""
        if self._token and self._token in text:
            return text.replace(self._token, "[redacted]")
        return text

    def _describe_exception(self, exc: Exception) -> str:
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    def _status_error(
        self, response: httpx.Response, *, what: str, attempts: int | None, why: str = ""
    ) -> APIStatusError:
        status = response.status_code
        message = _error_message(response)
        message = self._redact(message) if message is not None else None
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
        elif attempts is not None and attempts > 1:
            detail += f" after {_plural(attempts, 'attempt')}"
        return APIStatusError(self._redact(f"{what}: {detail}"), status=status, message=message)

    def _load(self, response: httpx.Response, *, what: str) -> Any:
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise APIDataError(
                self._redact(f"{what}: body is not JSON ({exc})"), status=response.status_code
            ) from exc

    def _parse_listing(
        self, response: httpx.Response, *, what: str
    ) -> tuple[list[dict[str, Any]], str | None]:
        body = self._load(response, what=what)

        def bad(problem: str) -> APIDataError:
            return APIDataError(self._redact(f"{what}: {problem}"), status=response.status_code)

        if not isinstance(body, dict):
            raise bad(f"body is {_json_type(body)}, not an object")
        if "data" not in body:
            raise bad("body has no 'data' key")
        data = body["data"]
        if not isinstance(data, list):
            raise bad(f"'data' is {_json_type(data)}, not an array")
        # Every record must be an object with a non-empty string id. This runs for every customer
        # every cycle, so the checks are C-level passes over the page; the Python loop below only
        # runs to name the culprit once a check has failed.
        if not all(map(isinstance, data, _repeat(dict))):
            index, record = next((i, r) for i, r in enumerate(data) if not isinstance(r, dict))
            raise bad(f"data[{index}] is {_json_type(record)}, not an object")
        ids = list(map(dict.get, data, _repeat("id")))
        if not (all(map(isinstance, ids, _repeat(str))) and all(ids)):
            index = next(i for i, v in enumerate(ids) if not isinstance(v, str) or not v)
            raise bad(f"data[{index}] has no non-empty string 'id'")
        if "next_page" not in body:
            raise bad("body has no 'next_page' key")
        next_page = body["next_page"]
        if next_page is not None and not isinstance(next_page, str):
            raise bad(f"'next_page' is {_json_type(next_page)}, not a string or null")
        if next_page == "":
            # An empty cursor is neither "last page" (that is null) nor a usable cursor: sending it back
            # would most likely restart the listing. Refuse rather than guess.
            raise bad("'next_page' is an empty string")
        return cast("list[dict[str, Any]]", data), next_page

    def _parse_customer(self, response: httpx.Response, *, customer_id: str, what: str) -> dict[str, Any]:
        body = self._load(response, what=what)

        def bad(problem: str) -> APIDataError:
            return APIDataError(self._redact(f"{what}: {problem}"), status=response.status_code)

        if not isinstance(body, dict):
            raise bad(f"body is {_json_type(body)}, not an object")
        if "data" not in body:
            raise bad("body has no 'data' key")
        data = body["data"]
        if not isinstance(data, dict):
            raise bad(f"'data' is {_json_type(data)}, not an object")
        record_id = data.get("id")
        if not isinstance(record_id, str) or not record_id:
            raise bad("'data' has no non-empty string 'id'")
        if record_id != customer_id:
            # Attaching another customer's record to this id would corrupt the stored picture.
            raise bad(f"'data.id' is {record_id!r}, not the requested {customer_id!r}")
        return cast("dict[str, Any]", data)
