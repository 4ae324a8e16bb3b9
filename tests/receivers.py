"""Real local HTTP receivers for the tests, and clocks that tests move by hand: the one helper.

A :class:`Receiver` is an HTTP server on 127.0.0.1 (``watcher._httpserver``, as the simulated
Metronome's) that stands in for Slack or for a webhook consumer: it answers from a script
(:class:`Reply`: status, body, headers, hang, drop), can be taken down (port closed) and brought
back on the same port, and records every request it saw (:class:`Received`) with a global arrival
number, so tests can assert on the *order* in which several receivers were reached rather than on
wall-clock thresholds. ``tests/conftest.py`` makes its fixtures available to every test.
"""

from __future__ import annotations

import dataclasses
import itertools
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any

import orjson
import pytest

from watcher._httpserver import BackgroundServer

__all__ = ["FakeClock", "FakeTime", "Received", "Receiver", "Reply"]

_arrivals = itertools.count(1)
_arrivals_lock = threading.Lock()


def _next_arrival() -> int:
    with _arrivals_lock:
        return next(_arrivals)


@dataclass(frozen=True)
class Reply:
    """One scripted answer. ``hang``: hold the request up to this many seconds (until the client
    hangs up, or the receiver stops) before answering; ``drop``: close without answering."""

    status: int = 200
    body: bytes | str = b"ok"
    headers: Mapping[str, str] = field(default_factory=dict)
    hang: float = 0.0
    drop: bool = False


@dataclass(frozen=True)
class Received:
    """A request as the receiver saw it; ``arrival`` orders requests across every receiver."""

    arrival: int
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    #: The status answered (0: dropped, or the receiver went down while holding the request).
    status: int = 0
    #: ``arrival`` number given when a hung request ended (None when it was not hung).
    ended: int | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return orjson.loads(self.body)


class Receiver:
    """A scriptable HTTP receiver on 127.0.0.1. Answers ``default`` once the script runs out."""

    def __init__(self, default: Reply | None = None, *, path: str = "/hook") -> None:
        self.default = default or Reply()
        self.path = path
        self.requests: list[Received] = []
        self.on_request: Callable[[Received], Reply | None] | None = None
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = BackgroundServer(_Handler, self, name="receiver", poll_interval=0.02)
        self._port = 0

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}{self.path}"

    @property
    def up(self) -> bool:
        return self._server.running

    def start(self) -> Receiver:
        """Listen (again) on the same port as before, so a sink's URL stays valid."""
        if not self._server.running:
            self._stopping.clear()
            self._port = self._server.start().port
        return self

    def stop(self) -> None:
        """Go down: close the port (connections are refused) and end any hung request."""
        if self._server.running:
            self._stopping.set()
            self._server.stop()

    # -- scripting ----------------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order."""
        with self._lock:
            self._script.extend(replies)

    def bodies(self) -> list[Any]:
        return [r.json() for r in self.requests]

    def _next(self, received: Received) -> Reply:
        if self.on_request is not None and (reply := self.on_request(received)) is not None:
            return reply
        with self._lock:
            return self._script.popleft() if self._script else self.default


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def receiver(self) -> Receiver:
        return self.server.owner  # type: ignore[attr-defined, no-any-return]

    def do_POST(self) -> None:
        receiver = self.receiver
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        received = Received(_next_arrival(), self.command, self.path, headers, body)
        reply = receiver._next(received)
        index = self._record(received)
        client_gone = False
        if reply.hang:
            client_gone = self._hang(reply.hang)
            self._update(index, ended=_next_arrival())
        if reply.drop or client_gone or receiver._stopping.is_set():
            self.close_connection = True
            return
        self._update(index, status=reply.status)
        payload = reply.body.encode() if isinstance(reply.body, str) else reply.body
        try:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            # One request per connection: "down" then really means refused, never a stale socket.
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            pass  # the client gave up (timeout): nothing to answer
        self.close_connection = True

    def _record(self, received: Received) -> int:
        receiver = self.receiver
        with receiver._lock:
            receiver.requests.append(received)
            return len(receiver.requests) - 1

    def _update(self, index: int, **changes: Any) -> None:
        receiver = self.receiver
        with receiver._lock:
            receiver.requests[index] = dataclasses.replace(receiver.requests[index], **changes)

    def _hang(self, seconds: float) -> bool:
        """Hold the request until the client hangs up (True), the receiver stops, or
        ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.receiver._stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.02)
            if readable:
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return True  # the client closed the connection: it timed out
                except OSError:
                    return True
        return False

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test reads ``receiver.requests``


class FakeClock:
    """A wall clock (``datetime``) for the Deliverer and the Poller that only moves when told."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FakeTime:
    """``monotonic`` and ``sleep`` for the Slack pacer: sleeping moves the clock, never waits."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


@pytest.fixture
def make_receiver() -> Iterator[Callable[..., Receiver]]:
    """``make_receiver(default=Reply(...), path=...)``: started receivers, stopped at teardown."""
    made: list[Receiver] = []

    def make(default: Reply | None = None, *, path: str = "/hook") -> Receiver:
        r = Receiver(default, path=path).start()
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


@pytest.fixture
def receiver(make_receiver: Callable[..., Receiver]) -> Receiver:
    return make_receiver()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()
