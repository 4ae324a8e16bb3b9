"""Health and metrics: what ``/healthz``, ``/readyz`` and ``/metrics`` answer, and the container probe.

* ``/healthz`` is liveness: the process answers and the scheduler is running (and no poll is stuck
  past its timeout). It never touches the database, so a slow disk cannot make an orchestrator
  kill a process that is merely busy.
* ``/readyz`` is "is the watcher doing its job": the last successful poll (every source it read
  succeeded), as recorded in the database, is younger than ``ready_intervals`` x the poll interval;
  with plans watched, ``failed_sources`` names the sources the latest poll failed on. Reading it from
  the database rather than from memory means a restarted process is ready at once when its data is
  fresh, and reports the truth even when polls run from another process (``metronome-watcher poll``).
  When the database failed and could not even record the failure (a full disk), the daemon's
  memory of it is shown as ``last_error`` (with ``unrecorded_failure``); when the database cannot
  be read, ``/readyz`` fails with the database's error in one line.
  A standby replica (a PostgreSQL store) is ready as such (``"role": "standby"``): standing by is
  its job, and a rolling update must be able to proceed.
* ``/metrics`` is Prometheus text. Gauges that are cheap to compute from the database (customers
  by status, outbox backlog, time of the last successful poll) are refreshed on each scrape, so they
  are right after a restart and never drift from what ``status`` shows.

:class:`Health` holds the checks; the one HTTP server (:mod:`watcher.web`) serves them, always
without a token (they show no customer data), next to the web view when ``[web]`` is on.

``python -m watcher.health [URL]`` is a dependency-light probe for a container ``HEALTHCHECK``
(``python:3.11-slim`` has no curl): it exits 0 when the URL answers 200. Without a URL it reads
``[health] port`` from ``$WATCHER_CONFIG`` and probes ``/healthz`` on localhost.
"""

from __future__ import annotations

import os
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import metrics
from ._time import Clock, format_ts, parse_ts, utcnow
from .errors import StoreError
from .events import CustomerStatus, PollOutcome
from .store import Store

__all__ = ["METRICS_CONTENT_TYPE", "Health", "Probe", "check", "main"]

log = structlog.get_logger("watcher.health")

#: Returns None when alive, else why not (e.g. "scheduler is not running").
Probe = Callable[[], str | None]
#: The ``Content-Type`` of ``/metrics``.
METRICS_CONTENT_TYPE: str = CONTENT_TYPE_LATEST


def _alive() -> str | None:
    return None


class Health:
    """The three checks for one store, as plain methods (so they are testable without HTTP).

    ``max_age`` is how old the last successful poll may be before ``/readyz`` fails;
    ``alive`` is the liveness probe (the daemon's); ``sinks`` names the sinks whose outbox
    gauges ``/metrics`` refreshes (and that ``/status`` shows); ``unrecorded`` returns the last
    poll's failure that the database could not record (``error``, ``at``), or None.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_age: timedelta,
        alive: Probe = _alive,
        sinks: Sequence[str] = (),
        clock: Clock = utcnow,
        ha: Callable[[], dict[str, Any] | None] | None = None,
        unrecorded: Callable[[], dict[str, str] | None] | None = None,
    ) -> None:
        self.store = store
        self.unrecorded = unrecorded
        #: Leadership among replicas (``role``: leader or standby), when the store has replicas.
        self.ha = ha
        self.max_age = max_age
        self.alive = alive
        self.sinks = tuple(sinks)
        self.clock = clock

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        try:
            problem = self.alive()
        except Exception as exc:  # a broken probe is itself a reason to be restarted
            problem = f"liveness probe failed: {exc!r}"
        if problem:
            return False, {"alive": False, "reason": problem}
        return True, {"alive": True}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        ha = self.ha() if self.ha is not None else None
        if ha is not None and ha.get("role") == "standby":
            # Ready: a standby is doing its job, and a rolling update must be able to proceed.
            return True, {"ready": True, **ha}
        ok, body = self._readiness()
        return ok, body if ha is None else {**body, **ha}

    def _readiness(self) -> tuple[bool, dict[str, Any]]:
        max_age = self.max_age.total_seconds()
        try:
            last = self.store.last_successful_poll()
            # Two: the latest may be the poll in progress, which has no outcome yet; the one before
            # it then says how the last attempt went (one poll runs at a time per database).
            latest = [p for p in self.store.last_polls(2) if p.outcome != PollOutcome.RUNNING][:1]
            failed = self.store.failed_sources(latest[0].id) if latest and latest[0].id is not None else ()
        except StoreError as exc:  # the database is part of the job: unreadable means not ready
            return False, {"ready": False, "reason": exc.reason, **self._unrecorded()}
        except Exception as exc:
            return False, {"ready": False, "reason": f"cannot read the database: {exc}"}
        last_error = next((p.error for p in latest if p.outcome != PollOutcome.SUCCEEDED and p.error), None)
        body: dict[str, Any] = {"ready": False, "max_age_seconds": max_age}
        if last_error:
            body["last_error"] = last_error
        body.update(self._unrecorded())
        if failed:
            body["failed_sources"] = list(failed)
        if last is None:
            body["reason"] = "no successful poll yet"
            return False, body
        finished = parse_ts(last.finished_at or last.started_at)
        age = (self.clock() - finished).total_seconds()
        body.update(last_successful_poll=format_ts(finished), age_seconds=round(age, 3), poll_id=last.id)
        if age > max_age:
            body["reason"] = (
                f"last successful poll (#{last.id}) finished {age:.0f}s ago, "
                f"more than the allowed {max_age:.0f}s"
            )
            return False, body
        body["ready"] = True
        return True, body

    def _unrecorded(self) -> dict[str, Any]:
        """The last poll's failure that only the daemon knows of, as ``/readyz`` adds it."""
        failure = self.unrecorded() if self.unrecorded is not None else None
        if failure is None:
            return {}
        return {"last_error": failure["error"], "unrecorded_failure": failure}

    def metrics(self) -> bytes:
        try:
            self.refresh_gauges()
        except StoreError as exc:  # stale gauges beat no metrics at all: counters are still right
            log.warning("health.gauge_refresh_failed", error=exc.reason)
        except Exception as exc:
            log.warning("health.gauge_refresh_failed", error=repr(exc))
        return bytes(generate_latest(metrics.REGISTRY))

    def refresh_gauges(self) -> None:
        counts = self.store.customer_counts()
        # Statuses with no customers are reported as 0 rather than left at a stale value.
        for status in {*CustomerStatus, *counts}:
            metrics.CUSTOMERS.labels(status).set(counts.get(status, 0))
        for s in self.store.delivery_status(self.clock(), sinks=self.sinks):
            metrics.OUTBOX_BACKLOG.labels(s.sink).set(s.pending)
            metrics.OUTBOX_OLDEST_PENDING_AGE.labels(s.sink).set(s.oldest_pending_age or 0)
        last = self.store.last_successful_poll()
        if last is not None:
            metrics.LAST_SUCCESSFUL_POLL.set(parse_ts(last.finished_at or last.started_at).timestamp())


# -- the container probe ------------------------------------------------------------------------


def check(url: str, *, timeout: float = 5.0) -> int:
    """0 when ``url`` answers 200, else 1 (with the reason on stderr)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        print(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


def _url_from_config(path: str) -> str:
    # Only tomllib, not the full config loader: the probe must not need the sinks' secrets to be
    # set in its environment, nor pay for pydantic on every health check.
    with open(path, "rb") as f:
        health = tomllib.load(f).get("health", {})
    port = health.get("port")
    if not isinstance(port, int) or port <= 0:
        raise ValueError(f"{path}: [health] port is not set to a fixed port")
    host = health.get("host", "0.0.0.0")
    host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    return f"http://{host}:{port}/healthz"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print("usage: python -m watcher.health [URL]  (default: /healthz on the port in $WATCHER_CONFIG)")
        return 0
    if args:
        url = args[0]
    else:
        config = os.environ.get("WATCHER_CONFIG")
        if not config:
            print("no URL given and WATCHER_CONFIG is not set", file=sys.stderr)
            return 2
        try:
            url = _url_from_config(config)
        except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
            print(f"cannot find the health port: {exc}", file=sys.stderr)
            return 2
    return check(url)


if __name__ == "__main__":
    sys.exit(main())
