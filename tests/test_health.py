"""Unit tests for watcher.health: the three endpoints over real HTTP (served by ``watcher.web``),
on a real SQLite store, and the container probe."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert

from watcher._time import format_ts
from watcher.health import Health, check, main
from watcher.notices import record_notice
from watcher.routing import Route
from watcher.store import CustomerState, PollRun, Store
from watcher.web import WebServer

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "watcher.db")
    yield s
    s.close()


def add_poll(store: Store, outcome: str, *, finished: datetime, error: str | None = None) -> None:
    with store.write() as conn:
        conn.execute(
            insert(PollRun).values(
                started_at=format_ts(finished - timedelta(seconds=2)),
                finished_at=format_ts(finished),
                outcome=outcome,
                error=error,
            )
        )


def add_customer(store: Store, cid: str, status: str) -> None:
    ts = format_ts(NOW)
    with store.write() as conn:
        conn.execute(
            insert(CustomerState).values(
                id=cid, status=status, hash=1, record="{}", first_seen_at=ts, changed_at=ts, last_poll_id=1
            )
        )


class Server:
    """A started server (health only: no ``[web]``) whose liveness the test can flip."""

    def __init__(self, store: Store) -> None:
        self.problem: str | None = None
        checks = Health(
            store,
            max_age=timedelta(minutes=3),
            alive=lambda: self.problem,
            sinks=["audit"],
            clock=lambda: NOW,
        )
        self.health = WebServer(checks, port=0, host="127.0.0.1").start()

    def get(self, path: str) -> tuple[int, bytes, str]:
        try:
            with urllib.request.urlopen(self.health.url + path, timeout=5) as r:
                return r.status, r.read(), r.headers["Content-Type"]
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers["Content-Type"]

    def json(self, path: str) -> tuple[int, Any]:
        status, body, content_type = self.get(path)
        assert content_type == "application/json"
        return status, json.loads(body)


@pytest.fixture
def server(store: Store) -> Iterator[Server]:
    s = Server(store)
    yield s
    s.health.stop()


def test_port_zero_binds_an_ephemeral_port_and_exposes_it(server: Server) -> None:
    assert server.health.port > 0
    assert server.health.url == f"http://127.0.0.1:{server.health.port}"


def test_healthz_is_200_while_alive_and_503_with_the_reason_when_not(server: Server) -> None:
    assert server.json("/healthz") == (200, {"alive": True})

    server.problem = "scheduler is not running"

    assert server.json("/healthz") == (503, {"alive": False, "reason": "scheduler is not running"})


def test_readyz_is_503_before_any_successful_poll(server: Server, store: Store) -> None:
    status, body = server.json("/readyz")
    assert status == 503
    assert body["ready"] is False and body["reason"] == "no successful poll yet"

    add_poll(store, "failed", finished=NOW - timedelta(seconds=5), error="HTTP 503 from Metronome")

    status, body = server.json("/readyz")
    assert status == 503
    assert body["reason"] == "no successful poll yet"
    assert body["last_error"] == "HTTP 503 from Metronome"


def test_readyz_is_200_while_the_last_success_is_younger_than_max_age(server: Server, store: Store) -> None:
    add_poll(store, "succeeded", finished=NOW - timedelta(seconds=170))

    status, body = server.json("/readyz")

    assert status == 200
    assert body["ready"] is True
    assert body["age_seconds"] == 170 and body["max_age_seconds"] == 180
    assert "reason" not in body


def test_readyz_is_503_with_age_and_last_error_when_the_last_success_is_too_old(
    server: Server, store: Store
) -> None:
    add_poll(store, "succeeded", finished=NOW - timedelta(seconds=181))
    add_poll(store, "failed", finished=NOW - timedelta(seconds=10), error="HTTP 401: bad token")

    status, body = server.json("/readyz")

    assert status == 503
    assert body["ready"] is False
    assert "181s ago" in body["reason"] and "180s" in body["reason"]
    assert body["last_error"] == "HTTP 401: bad token"


def test_readyz_keeps_the_last_error_while_the_next_poll_is_running(server: Server, store: Store) -> None:
    add_poll(store, "succeeded", finished=NOW - timedelta(seconds=200))
    add_poll(store, "failed", finished=NOW - timedelta(seconds=20), error="HTTP 503 from Metronome")
    with store.write() as conn:  # the next cycle has recorded its run and not finished yet
        conn.execute(insert(PollRun).values(started_at=format_ts(NOW), outcome="running"))

    status, body = server.json("/readyz")

    assert status == 503
    assert "200s ago" in body["reason"]
    assert body["last_error"] == "HTTP 503 from Metronome"


def test_readyz_shows_a_failure_the_database_could_not_record(store: Store) -> None:
    add_poll(store, "succeeded", finished=NOW - timedelta(seconds=30))
    failure = {"error": "database error: disk full writing watcher.db (0 bytes free)", "at": format_ts(NOW)}
    checks = Health(store, max_age=timedelta(minutes=3), clock=lambda: NOW, unrecorded=lambda: failure)

    ok, body = checks.readiness()

    assert ok  # the last success is still fresh: one failure is not unreadiness
    assert body["last_error"] == failure["error"] and body["unrecorded_failure"] == failure


def test_readyz_is_503_with_the_database_error_in_one_line_when_it_cannot_be_read(
    server: Server, store: Store
) -> None:
    add_poll(store, "succeeded", finished=NOW - timedelta(seconds=30))
    assert store.path is not None
    store.close()  # its connections: the next read opens the file afresh
    store.path.write_bytes(b"garbage " * 4096)  # damaged in the meantime

    status, body = server.json("/readyz")

    assert status == 503
    assert body["ready"] is False
    assert body["reason"].startswith(f"database error: {store.path} is damaged or is not a SQLite database: ")


def test_metrics_is_prometheus_text_with_gauges_refreshed_from_the_store(
    server: Server, store: Store
) -> None:
    for i in range(3):
        add_customer(store, f"a{i}", "active")
    add_customer(store, "z", "archived")
    add_poll(store, "succeeded", finished=NOW - timedelta(seconds=30))
    record_notice(
        store,
        "watcher.poll_failing",
        [Route("audit", ("watcher.*",))],
        now=NOW - timedelta(seconds=60),
        detail={"poll_id": 1},
    )

    status, body, content_type = server.get("/metrics")

    assert status == 200
    assert content_type.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("watcher_customers", (("status", "active"),))] == 3
    assert samples[("watcher_customers", (("status", "archived"),))] == 1
    assert samples[("watcher_customers", (("status", "deleted"),))] == 0
    assert samples[("watcher_outbox_backlog", (("sink", "audit"),))] == 1
    assert samples[("watcher_outbox_oldest_pending_age_seconds", (("sink", "audit"),))] == 60
    assert (
        samples[("watcher_last_successful_poll_timestamp_seconds", ())]
        == (NOW - timedelta(seconds=30)).timestamp()
    )


def test_unknown_paths_are_404_and_the_web_view_is_not_served_without_web(server: Server) -> None:
    assert server.json("/nope") == (404, {"error": "no such endpoint: /nope"})
    for path in ("/", "/status", "/api/events"):
        assert server.get(path)[0] == 404


def test_head_answers_without_a_body(server: Server) -> None:
    request = urllib.request.Request(server.health.url + "/healthz", method="HEAD")
    with urllib.request.urlopen(request, timeout=5) as r:
        assert r.status == 200 and r.read() == b""


def test_stop_releases_the_port(store: Store) -> None:
    checks = Health(store, max_age=timedelta(minutes=1))
    first = WebServer(checks, port=0, host="127.0.0.1").start()
    port = first.port
    first.stop()

    again = WebServer(checks, port=port, host="127.0.0.1").start()

    assert again.port == port
    again.stop()


def test_check_exits_0_on_200_and_1_on_503_or_no_answer(server: Server, store: Store) -> None:
    healthz = server.health.url + "/healthz"
    assert check(healthz) == 0
    assert check(server.health.url + "/readyz") == 1  # 503: no successful poll yet
    port = server.health.port
    server.health.stop()
    assert check(f"http://127.0.0.1:{port}/healthz", timeout=1) == 1


def test_probe_finds_the_port_in_watcher_config(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "watcher.toml"
    # The sink's secret is not in the probe's environment: the probe must not need it.
    config.write_text(
        f'[health]\nport = {server.health.port}\nhost = "0.0.0.0"\n\n'
        '[[sinks]]\ntype = "http"\nname = "hook"\nurl = "https://example.com"\nsecret = "${UNSET_SECRET}"\n'
    )
    monkeypatch.setenv("WATCHER_CONFIG", str(config))
    assert main([]) == 0

    config.write_text("[health]\n")
    assert main([]) == 2


def test_the_probe_loads_no_web_framework() -> None:
    # The HEALTHCHECK runs every 30 s: it must stay as light as it was.
    import subprocess
    import sys

    code = (
        "import sys, watcher.health; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'starlette', 'uvicorn', 'jinja2'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
