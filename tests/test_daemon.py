"""The daemon: as a real subprocess against the fake Metronome (health, metrics, shutdown, notices),
in-process for what needs precise control (timeouts, overlap, restarts), and installed from a wheel
the way the Dockerfile installs it."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from watcher._time import utcnow
from watcher.app import App, build_app
from watcher.config import parse_config
from watcher.daemon import Daemon
from watcher.errors import ConfigError
from watcher.simulator import Fault, SimulatedMetronome

from .disks import SmallDisk

ROOT = Path(__file__).resolve().parents[1]
#: Looks like a real token so that a leak would be unmistakable.
TOKEN = "mtr_test_daemon_SECRETtoken_7Hq2"
WEB_TOKEN = "web_test_daemon_SECRET_0123456789"
#: Every wait in this file is bounded by a deadline; none is a fixed sleep.
DEADLINE = 20.0

T = TypeVar("T")
#: Scraped samples: (sample name, sorted labels) -> value.
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def wait_until(
    predicate: Callable[[], T | None],
    what: str,
    *,
    timeout: float = DEADLINE,
    context: Callable[[], str] = lambda: "",
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{context()}")
        time.sleep(0.05)


@pytest.fixture
def fake() -> Iterator[SimulatedMetronome]:
    with SimulatedMetronome(token=TOKEN) as server:
        yield server


def config_text(fake: SimulatedMetronome, db: Path, *, health_port: int = 0, extra: str = "") -> str:
    # One attempt per request and a 1 s interval: a failing API shows up within a second or two.
    return f"""
[metronome]
base_url = "{fake.url}"
max_attempts = 1
max_retry_wait = "1s"

[store]
path = "{db}"

[schedule]
interval = "1s"
delivery_interval = "1s"

[health]
port = {health_port}
host = "127.0.0.1"
ready_intervals = 2
failing_after = 2

[logging]
level = "info"
format = "json"
{extra}
"""


def db_rows(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def snapshot(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Everything a poll may commit."""
    return {t: db_rows(db, f"SELECT * FROM {t} ORDER BY 1") for t in ("customers", "events", "outbox")}


def jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class DaemonProcess:
    """``metronome-watcher run`` in a subprocess; its JSON log lines (stderr) are collected."""

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd: Path, port: int | None = None) -> None:
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._port = port

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.lines.append({"event": "<not json>", "raw": line.rstrip()})

    def tail(self) -> str:
        return "daemon log tail:\n" + "\n".join(json.dumps(x) for x in self.lines[-25:])

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [x for x in list(self.lines) if x.get("event") == event]

    @property
    def port(self) -> int:
        if self._port is None:
            line = wait_until(lambda: self.logged("health.listening"), "the health server", context=self.tail)
            self._port = int(line[0]["port"])
        return self._port

    def get(self, path: str) -> tuple[int | None, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return None, b""

    def wait_status(self, path: str, status: int) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            code, body = self.get(path)
            return json.loads(body) if code == status else None

        return wait_until(probe, f"{path} to answer {status}", context=self.tail)

    def metrics(self) -> Metrics:
        code, body = self.get("/metrics")
        assert code == 200, code
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }

    def terminate(self, timeout: float = 10.0) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        elapsed = time.monotonic() - t0
        self._reader.join(timeout=5)
        return rc, elapsed

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHER_CONFIG", "METRONOME_BEARER_TOKEN")}
    env.update(METRONOME_BEARER_TOKEN=TOKEN, PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[[str], DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(text: str) -> DaemonProcess:
        config = tmp_path / "watcher.toml"
        config.write_text(text)
        d = DaemonProcess(
            [sys.executable, "-m", "watcher", "run", "--config", str(config)], env=base_env(), cwd=tmp_path
        )
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


# -- the daemon as a subprocess -----------------------------------------------------------------


def test_healthz_and_readyz_answer_and_readyz_follows_the_api(
    fake: SimulatedMetronome, tmp_path: Path, start_daemon: Callable[[str], DaemonProcess]
) -> None:
    fake.seed(20)
    daemon = start_daemon(config_text(fake, tmp_path / "w.db"))

    assert daemon.wait_status("/healthz", 200) == {"alive": True}
    assert daemon.wait_status("/readyz", 200)["ready"] is True

    fake.add_fault(Fault(kind="status", status=503, message="Metronome is down", times=100_000))
    down = daemon.wait_status("/readyz", 503)
    assert down["ready"] is False
    assert "ago, more than the allowed 2s" in down["reason"]
    assert "HTTP 503" in down["last_error"]
    assert daemon.get("/healthz")[0] == 200  # the API being down is not a reason to restart us

    fake.clear_faults()
    assert daemon.wait_status("/readyz", 200)["ready"] is True

    assert daemon.terminate()[0] == 0


def test_metrics_parse_and_their_counters_move_with_polls_and_events(
    fake: SimulatedMetronome, tmp_path: Path, start_daemon: Callable[[str], DaemonProcess]
) -> None:
    ids = fake.seed(30, archived_fraction=0.0)
    audit = tmp_path / "audit.jsonl"
    daemon = start_daemon(
        config_text(
            fake, tmp_path / "w.db", extra=f'[[sinks]]\ntype = "log"\nname = "audit"\npath = "{audit}"\n'
        )
    )
    daemon.wait_status("/readyz", 200)
    before = daemon.metrics()
    assert sample(before, "watcher_polls_total", outcome="succeeded") >= 1
    assert sample(before, "watcher_customers", status="active") == 30

    fake.create_customer("Brand New Co")
    fake.archive(ids[0])

    def counted_and_delivered() -> Metrics | None:
        m = daemon.metrics()
        archived = sample(m, "watcher_events_total", type="customer.archived")
        delivered = sample(m, "watcher_deliveries_total", sink="audit", outcome="delivered")
        # The gauges are read from the database before the counters are rendered: a delivery that
        # commits in between shows in the counter at once and in the backlog on the next scrape.
        backlog = sample(m, "watcher_outbox_backlog", sink="audit")
        return m if archived == 1 and delivered == 2 and backlog == 0 else None

    after = wait_until(
        counted_and_delivered,
        "the created and archived events to be counted and delivered",
        context=daemon.tail,
    )

    assert sample(after, "watcher_events_total", type="customer.created") == 1
    assert sample(after, "watcher_polls_total", outcome="succeeded") > sample(
        before, "watcher_polls_total", outcome="succeeded"
    )
    assert sample(after, "watcher_poll_duration_seconds_count") > sample(
        before, "watcher_poll_duration_seconds_count"
    )
    for endpoint in ("list_active", "list_archived"):
        assert sample(after, "watcher_api_requests_total", endpoint=endpoint, status="200") > sample(
            before, "watcher_api_requests_total", endpoint=endpoint, status="200"
        )
    assert sample(after, "watcher_customers", status="active") == 30
    assert sample(after, "watcher_customers", status="archived") == 1
    assert sample(after, "watcher_outbox_backlog", sink="audit") == 0
    assert sample(after, "watcher_last_successful_poll_timestamp_seconds") > time.time() - 60
    # One poll may see both changes, in either order (the two listings are read concurrently).
    assert sorted(e["type"] for e in jsonl(audit)) == ["customer.archived", "customer.created"]
    assert daemon.terminate()[0] == 0


def test_sigterm_during_a_slow_poll_exits_in_time_with_code_0_and_commits_nothing(
    fake: SimulatedMetronome, tmp_path: Path, start_daemon: Callable[[str], DaemonProcess]
) -> None:
    ids = fake.seed(150, archived_fraction=0.0)  # two pages of 100 in the active listing
    db = tmp_path / "w.db"
    daemon = start_daemon(config_text(fake, db))
    daemon.wait_status("/readyz", 200)  # the baseline is in

    in_page_2 = threading.Event()
    release = threading.Event()

    def slow_page_2(_: SimulatedMetronome) -> None:
        in_page_2.set()
        release.wait(30)  # the request hangs: a slow API

    def change_then_slow(f: SimulatedMetronome) -> None:
        # Both in the same poll: it sees the rename on page 1, then hangs on page 2.
        f.set_name(ids[0], "Renamed During The Slow Poll")
        f.on_page(2, slow_page_2, archived=False)

    fake.on_page(1, change_then_slow, archived=False)
    try:
        wait_until(in_page_2.is_set, "a poll to hang on page 2", context=daemon.tail)
        # The cycle records its run while its first pages are already in flight: wait for the row.
        (slow_poll,) = wait_until(
            lambda: db_rows(db, "SELECT id FROM poll_runs WHERE outcome = 'running'"),
            "the slow poll's run to be recorded",
            context=daemon.tail,
        )
        committed = snapshot(db)

        rc, elapsed = daemon.terminate(timeout=15)
    finally:
        release.set()

    assert rc == 0
    assert elapsed < 10
    assert daemon.logged("daemon.stopped")
    assert db_rows(db, "SELECT outcome FROM poll_runs WHERE id = ?", slow_poll[0]) == [("abandoned",)]
    assert snapshot(db) == committed
    (record,) = db_rows(db, "SELECT record FROM customers WHERE id = ?", ids[0])
    assert "Renamed During The Slow Poll" not in record[0]


def test_the_web_view_is_served_on_the_health_port_and_sigterm_still_exits_in_time(
    fake: SimulatedMetronome, tmp_path: Path, start_daemon: Callable[[str], DaemonProcess]
) -> None:
    ids = fake.seed(20, archived_fraction=0.0)
    web = '[web]\nenabled = true\ntoken = "${WATCHER_WEB_TOKEN}"\n'
    config = tmp_path / "watcher.toml"
    config.write_text(config_text(fake, tmp_path / "w.db", extra=web))
    daemon = DaemonProcess(
        [sys.executable, "-m", "watcher", "run", "--config", str(config)],
        env=base_env(WATCHER_WEB_TOKEN=WEB_TOKEN),
        cwd=tmp_path,
    )
    try:
        daemon.wait_status("/readyz", 200)  # health stays open, on the same port
        fake.archive(ids[0])
        with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", auth=("ops", WEB_TOKEN)) as browser:
            assert browser.get("/", auth=None).status_code == 401
            page = wait_until(
                lambda: (
                    (r := browser.get("/?type=customer.archived")).status_code == 200
                    and f"/customers/{ids[0]}" in r.text
                    and r
                ),
                "the archive to show on the web view",
                context=daemon.tail,
            )
            assert "archived" in page.text
            # A browser keeps its connection open; SIGTERM must not wait for it.
            rc, elapsed = daemon.terminate(timeout=15)
        assert rc == 0 and elapsed < 10
        assert WEB_TOKEN not in json.dumps(daemon.lines)  # never logged
    finally:
        daemon.kill()


def test_failing_and_recovered_notices_are_sent_once_each(
    fake: SimulatedMetronome, tmp_path: Path, start_daemon: Callable[[str], DaemonProcess]
) -> None:
    fake.seed(10)
    db = tmp_path / "w.db"
    notices, audit = tmp_path / "notices.jsonl", tmp_path / "audit.jsonl"
    daemon = start_daemon(
        config_text(
            fake,
            db,
            extra=f"""
[[sinks]]
type = "log"
name = "notices"
path = "{notices}"
events = ["watcher.*"]

[[sinks]]
type = "log"
name = "audit"
path = "{audit}"
""",
        )
    )
    daemon.wait_status("/readyz", 200)

    fake.add_fault(Fault(kind="status", status=503, times=100_000))
    wait_until(lambda: jsonl(notices), "the failing notice", context=daemon.tail)

    def failed_polls() -> int:
        return int(db_rows(db, "SELECT COUNT(*) FROM poll_runs WHERE outcome = 'failed'")[0][0])

    wait_until(lambda: failed_polls() >= 5, "three more failed polls after the notice", context=daemon.tail)
    fake.clear_faults()
    wait_until(lambda: len(jsonl(notices)) >= 2, "the recovered notice", context=daemon.tail)
    (recovered_at,) = db_rows(db, "SELECT MAX(id) FROM poll_runs WHERE outcome = 'succeeded'")[0]
    wait_until(
        lambda: (
            db_rows(
                db, "SELECT COUNT(*) FROM poll_runs WHERE outcome = 'succeeded' AND id > ?", recovered_at
            )[0][0]
            >= 2
        ),
        "two more successful polls",
        context=daemon.tail,
    )
    assert daemon.terminate()[0] == 0

    sent = jsonl(notices)
    assert [n["type"] for n in sent] == ["watcher.poll_failing", "watcher.poll_recovered"]
    failing, recovered = sent[0]["detail"], sent[1]["detail"]
    assert failing["consecutive_failures"] == 2 and failing["failing_after"] == 2
    assert "HTTP 503" in failing["last_error"] and failing["since"]
    assert recovered["failed_polls"] == failed_polls() and recovered["since"] == failing["since"]
    # The default sink filter is customer.*: notices go only where they are asked for.
    assert not [e for e in jsonl(audit) if e["type"].startswith("watcher.")]


# -- the daemon in-process ----------------------------------------------------------------------


def make_app(fake: SimulatedMetronome, tmp_path: Path, **schedule: Any) -> App:
    config = parse_config(
        {
            "metronome": {"base_url": fake.url, "max_attempts": 1, "max_retry_wait": "1s"},
            "store": {"path": str(tmp_path / "w.db")},
            "schedule": {"interval": "1m", **schedule},
            "health": {"failing_after": 3},
            "sinks": [
                {
                    "type": "log",
                    "name": "notices",
                    "path": str(tmp_path / "notices.jsonl"),
                    "events": ["watcher.*"],
                }
            ],
        },
        env={},
    )
    return build_app(config, TOKEN)


def test_the_failure_streak_and_its_notices_survive_restarts(
    fake: SimulatedMetronome, tmp_path: Path
) -> None:
    fake.seed(5)
    notices = tmp_path / "notices.jsonl"

    def run(*outcomes: str) -> None:
        """One process lifetime: a fresh app and daemon on the same database."""
        daemon = Daemon(make_app(fake, tmp_path))
        try:
            for expected in outcomes:
                if expected == "failed":
                    fake.add_fault(Fault(kind="status", status=500, times=100))
                else:
                    fake.clear_faults()
                result = daemon.poll_once()
                assert result is not None and result.outcome == expected
        finally:
            daemon.stop()

    run("succeeded", "failed", "failed")
    assert jsonl(notices) == []  # two failures: below failing_after = 3

    run("failed")  # the third, counted across the restart
    assert [n["type"] for n in jsonl(notices)] == ["watcher.poll_failing"]
    assert jsonl(notices)[0]["detail"]["consecutive_failures"] == 3

    run("failed")  # still failing after another restart: no second notice
    run("succeeded", "succeeded")
    run("failed", "succeeded")  # a single failure is not news

    assert [n["type"] for n in jsonl(notices)] == ["watcher.poll_failing", "watcher.poll_recovered"]
    assert jsonl(notices)[1]["detail"]["failed_polls"] == 4


def test_a_poll_past_its_timeout_is_abandoned_commits_nothing_and_the_daemon_goes_on(
    fake: SimulatedMetronome, tmp_path: Path
) -> None:
    ids = fake.seed(150, archived_fraction=0.0)
    daemon = Daemon(make_app(fake, tmp_path, poll_timeout="0.5s"))
    try:
        assert (baseline := daemon.poll_once()) is not None and baseline.ok
        fake.set_name(ids[0], "Changed")
        fake.add_fault(Fault(kind="latency", delay=3, page=2, archived=False))

        t0 = time.monotonic()
        timed_out = daemon.poll_once()
        elapsed = time.monotonic() - t0

        assert timed_out is not None and timed_out.outcome == "failed"
        assert "timed out after 0.5s" in (timed_out.error or "")
        assert elapsed < 8
        db = tmp_path / "w.db"
        assert db_rows(db, "SELECT outcome FROM poll_runs WHERE id = ?", timed_out.poll_id) == [("failed",)]
        assert daemon.app.store.query_events() == []

        again = daemon.poll_once()
        assert again is not None and again.ok
        assert dict(again.events_by_type) == {"customer.updated": 1}
    finally:
        daemon.stop()


def test_polls_never_overlap(fake: SimulatedMetronome, tmp_path: Path) -> None:
    fake.seed(150, archived_fraction=0.0)
    daemon = Daemon(make_app(fake, tmp_path))
    entered, release = threading.Event(), threading.Event()

    def hold(_: SimulatedMetronome) -> None:
        entered.set()
        release.wait(20)

    fake.on_page(2, hold, archived=False)
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(daemon.poll_once()))
    try:
        first.start()
        wait_until(entered.is_set, "the first poll to be in flight")

        assert daemon.poll_once() is None  # skipped: the first is still running
    finally:
        release.set()
        first.join(20)
        daemon.stop()
    assert results[0] is not None and results[0].ok
    assert db_rows(tmp_path / "w.db", "SELECT COUNT(*) FROM poll_runs") == [(1,)]


def test_the_hourly_prune_job_deletes_what_the_windows_let_go_and_logs_one_line(
    fake: SimulatedMetronome, tmp_path: Path
) -> None:
    fake.seed(5)
    later = utcnow() + timedelta(days=100)
    daemon = Daemon(make_app(fake, tmp_path), clock=lambda: later)
    try:
        for _ in range(3):
            result = daemon.poll_once()
            assert result is not None and result.ok
        with capture_logs() as logs:
            report = daemon.prune_once()
    finally:
        daemon.stop()
    # Three successes, 100 days old: the last two stay (notices and has_baseline count on them).
    assert report is not None and (report.polls, report.poll_sources, report.deliveries) == (1, 1, 0)
    (line,) = [x for x in logs if x["event"] == "store.pruned"]
    assert (line["polls"], line["poll_sources"], line["events"], line["complete"]) == (1, 1, 0, True)
    assert db_rows(tmp_path / "w.db", "SELECT id FROM poll_runs ORDER BY id") == [(2,), (3,)]


def test_a_prune_on_a_full_disk_logs_one_line_and_deletes_nothing(
    fake: SimulatedMetronome, small_disk: Any
) -> None:
    fake.seed(5)
    later = utcnow() + timedelta(days=100)
    daemon = Daemon(make_app(fake, small_disk.root), clock=lambda: later)
    try:
        for _ in range(3):
            result = daemon.poll_once()
            assert result is not None and result.ok
        daemon.app.store.wait_for_checkpoint(5)
        db_rows(small_disk.root / "w.db", "PRAGMA wal_checkpoint(TRUNCATE)")  # no WAL left to reuse
        small_disk.fill(leave=0)
        with capture_logs() as logs:
            report = daemon.prune_once()
        small_disk.free_up()
    finally:
        daemon.stop()
    assert report is None
    (line,) = [x for x in logs if x["event"] == "store.prune_failed"]
    assert line["log_level"] == "error" and "exc_info" not in line
    assert line["error"] == f"database error: disk full writing {small_disk.root / 'w.db'} (0 bytes free)"
    assert db_rows(small_disk.root / "w.db", "SELECT count(*) FROM poll_runs") == [(3,)]


def test_the_prune_job_is_scheduled_hourly_from_a_few_minutes_after_start(
    fake: SimulatedMetronome, tmp_path: Path
) -> None:
    start = utcnow()
    daemon = Daemon(make_app(fake, tmp_path), clock=lambda: start)
    try:
        daemon.start()
        job = daemon.scheduler.get_job("prune")
        assert job.next_run_time == start + timedelta(minutes=5)
        assert job.trigger.interval == timedelta(hours=1)
    finally:
        daemon.stop()


def test_a_taken_health_port_is_a_config_error(fake: SimulatedMetronome, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = make_app(fake, tmp_path)
        config = app.config.model_copy(update={"health": app.config.health.model_copy(update={"port": port})})
        daemon = Daemon(App(config, app.store, app.client, app.poller, app.deliverer, app.sinks))

        with pytest.raises(ConfigError, match=f"health.port: cannot listen on .*:{port}"):
            daemon.run_until(threading.Event())
    assert not daemon.scheduler.running


# -- the container's way of installing and starting ---------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def adapt(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert text.count(old) == 1, f"config/docker.toml no longer contains {old!r} exactly once"
        text = text.replace(old, new)
    return text


@pytest.mark.slow
def test_the_wheel_installed_as_the_dockerfile_does_starts_and_answers_healthz(
    fake: SimulatedMetronome, tmp_path: Path
) -> None:
    # The Dockerfile builds a wheel, installs only that wheel into a venv and runs the console
    # script. Offline, the dependencies come from this interpreter's site-packages through a .pth
    # file, while the package itself must come from the wheel, not from the source tree.
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # With hatchling at hand the build needs no network; without it (a fresh `pip install -e .[test]`
    # venv) pip fetches the build backend itself, exactly as `pip wheel .` in the Dockerfile does.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("hatchling") else []
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", *isolation, "--wheel-dir", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, f"pip wheel failed:\n{built.stderr}"
    (wheel,) = wheels.glob("metronome_watcher-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # cwd matters: ``python -c`` and ``python -m`` put it first on sys.path, and the source tree
    # must not shadow the installed package.
    where = subprocess.run(
        [python, "-c", "import watcher.cli; print(watcher.cli.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert where.startswith(str(venv)), where

    port = free_port()
    config = tmp_path / "config" / "watcher.toml"
    config.parent.mkdir()
    config.write_text(
        adapt(
            (ROOT / "config" / "docker.toml").read_text(),
            {
                '"https://api.metronome.com"': f'"{fake.url}"',
                '"/data/metronome-watcher.db"': f'"{tmp_path / "data" / "metronome-watcher.db"}"',
                "port = 8080": f"port = {port}",
                'host = "0.0.0.0"': 'host = "127.0.0.1"',
            },
        )
        + '\n[web]\nenabled = true\ntoken = "${WATCHER_WEB_TOKEN}"\n'
    )
    fake.seed(5)
    env = base_env(WATCHER_CONFIG=str(config), WATCHER_WEB_TOKEN=WEB_TOKEN)  # as the image's ENV
    script = venv / "bin" / "metronome-watcher"

    checked = subprocess.run(
        [script, "check-config"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stderr
    assert "config OK" in checked.stdout

    daemon = DaemonProcess([str(script), "run"], env=env, cwd=tmp_path, port=port)  # ENTRYPOINT + CMD
    try:
        assert daemon.wait_status("/healthz", 200) == {"alive": True}
        daemon.wait_status("/readyz", 200)
        # The image's HEALTHCHECK command, run with the image's environment.
        probe = subprocess.run(
            [python, "-m", "watcher.health"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert probe.returncode == 0, probe.stderr
        # The templates and the stylesheet came with the wheel.
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/status", auth=("ops", WEB_TOKEN)).text.count("<svg") == 1
        assert httpx.get(f"{base}/static/style.css", auth=("ops", WEB_TOKEN)).status_code == 200
        assert daemon.terminate()[0] == 0
    finally:
        daemon.kill()


# -- the database failing under the daemon ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("free_kib", [0, 64])
def test_a_full_disk_fails_polls_without_a_crash_is_shown_and_once_freed_each_change_arrives_once(
    fake: SimulatedMetronome,
    tmp_path: Path,
    small_disk: SmallDisk,
    start_daemon: Callable[[str], DaemonProcess],
    free_kib: int,
) -> None:
    # When not even the failure can be recorded, the daemon keeps it in memory for /readyz.
    db = small_disk.root / "metronome-watcher.db"
    delivered = tmp_path / "events.jsonl"
    sink = f'\n[[sinks]]\ntype = "log"\nname = "events"\npath = "{delivered}"\n'
    ids = [fake.create_customer(f"C{i:03d}", custom_fields={"notes": "n" * 200})["id"] for i in range(200)]
    daemon = start_daemon(config_text(fake, db, extra=sink))
    wait_until(lambda: daemon.logged("poll.completed"), "the baseline", context=daemon.tail)
    changed = ids[:60]
    for cid in changed:
        fake.set_name(cid, "Renamed " + "r" * 1000)
    small_disk.fill(leave=free_kib * 1024)

    failed = wait_until(lambda: daemon.logged("poll.failed"), "a failed poll", context=daemon.tail)
    ready = daemon.wait_status("/readyz", 503)  # two intervals without a success: stale
    scraped = daemon.metrics()
    small_disk.free_up()

    assert failed[0]["error"].startswith(f"database error: disk full writing {db} ("), failed[0]
    assert "database error: disk full writing" in ready["last_error"], ready
    if free_kib == 0:  # nothing at all can be written: the failure lives in the daemon's memory
        assert failed[0]["recorded"] is False
        assert ready["unrecorded_failure"]["error"] == ready["last_error"], ready
    assert sample(scraped, "watcher_polls_total", outcome="failed") >= 1
    assert sample(scraped, "watcher_store_errors_total", kind="disk_full") >= 1

    def all_delivered() -> list[dict[str, Any]] | None:
        events = [e for e in jsonl(delivered) if e["type"].startswith("customer.")]
        return events if len(events) >= len(changed) else None

    events = wait_until(all_delivered, "the changes, once there is room", context=daemon.tail)
    ready = daemon.wait_status("/readyz", 200)
    rc, _ = daemon.terminate()

    assert rc == 0
    assert "unrecorded_failure" not in ready
    events = [e for e in jsonl(delivered) if e["type"].startswith("customer.")]
    assert sorted((e["type"], e["customer_id"]) for e in events) == sorted(
        ("customer.updated", cid) for cid in changed
    )
    assert len({e["id"] for e in events}) == len(events)
    assert not daemon.logged("poll.crashed")
    assert not [x for x in daemon.lines if x["event"] == "<not json>"], daemon.tail()
    assert not [x for x in daemon.lines if "exception" in x or "exc_info" in x], daemon.tail()
