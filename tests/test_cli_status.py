"""``metronome-watcher status``: polling health, the last polls, the backlog per sink and the last
error, on one screen, from a database the daemon wrote."""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert

from watcher._time import format_ts, utcnow
from watcher.app import build_app
from watcher.cli import main
from watcher.config import load_config
from watcher.daemon import Daemon
from watcher.simulator import Fault, SimulatedMetronome
from watcher.store import PollRun, Store

TOKEN = "mtr_test_status_SECRETtoken_91"


@pytest.fixture
def fake() -> Iterator[SimulatedMetronome]:
    with SimulatedMetronome(token=TOKEN) as server:
        yield server


def write_config(tmp_path: Path, fake: SimulatedMetronome) -> Path:
    config = tmp_path / "watcher.toml"
    config.write_text(f"""
[metronome]
base_url = "{fake.url}"
max_attempts = 1

[store]
path = "{tmp_path / "w.db"}"

[schedule]
interval = "1m"

[health]
failing_after = 2

[[sinks]]
type = "log"
name = "audit"
path = "{tmp_path / "audit.jsonl"}"
events = ["customer.*", "watcher.*"]

# A receiver that is down: its events stay pending, the backlog status must show.
[[sinks]]
type = "http"
name = "crm"
url = "http://127.0.0.1:{closed_port()}/hook"
secret = "whsec_{base64.b64encode(b"status-test-signing-key").decode()}"
""")
    return config


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(config: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()  # drop whatever the set-up printed
    assert main(["status", "--config", str(config)]) == 0
    return capsys.readouterr().out


def test_status_shows_the_failure_streak_the_last_polls_the_backlog_and_the_last_error(
    fake: SimulatedMetronome, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_config(tmp_path, fake)
    config = load_config(config_path)
    for cid in fake.seed(8, archived_fraction=0.0)[:2]:
        fake.archive(cid)
    daemon = Daemon(build_app(config, TOKEN))
    try:
        assert (r := daemon.poll_once()) is not None and r.ok  # 1: baseline
        fake.create_customer("Newcomer")
        assert (r := daemon.poll_once()) is not None and r.ok  # 2: one event, delivered
        fake.add_fault(Fault(kind="status", status=503, message="maintenance window", times=100))
        assert (r := daemon.poll_once()) is not None and not r.ok  # 3
        assert (r := daemon.poll_once()) is not None and not r.ok  # 4: poll_failing, delivered
    finally:
        daemon.stop()

    out = status(config_path, capsys)

    lines = out.splitlines()
    assert lines[0].startswith("polling: last successful poll #2 finished ")
    assert "FAILING: 2 consecutive failed poll(s) since" in lines[0]
    assert "(watcher.poll_failing sent)" in lines[0]
    assert lines[1] == "customers tracked: 7 active, 2 archived"
    polls = lines[lines.index("last polls:") + 2 :][:4]
    assert [row.split()[0] for row in polls] == ["4", "3", "2", "1"]
    assert [row.split()[2] for row in polls] == ["failed", "failed", "succeeded", "succeeded"]
    assert "(baseline)" in polls[3]
    (audit,) = [row for row in lines if row.startswith("audit ")]
    assert audit.split()[1:6] == ["0", "2", "0", "-", "ok"]  # pending, delivered, dead, oldest, state
    (crm,) = [row for row in lines if row.startswith("crm ")]
    assert crm.split()[1:4] == ["1", "0", "0"]
    assert "backing off" in crm
    with Store(config.store.path) as store:
        (last,) = store.last_polls(1)
    assert lines[-2] == f"last poll error (#4, {last.started_at[:19]}Z, failed):"
    assert "HTTP 503: maintenance window" in lines[-1]


def test_status_says_so_when_nothing_has_polled_yet(
    fake: SimulatedMetronome, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_config(tmp_path, fake)
    Store(load_config(config_path).store.path).close()

    out = status(config_path, capsys)

    assert out.startswith("polling: no successful poll yet\ncustomers tracked: none yet\n")
    assert "(no polls yet)" in out
    assert "last poll error" not in out


def test_status_flags_a_stale_last_success(
    fake: SimulatedMetronome, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_config(tmp_path, fake)
    finished = utcnow() - timedelta(hours=2)
    with Store(load_config(config_path).store.path) as store, store.write() as conn:
        conn.execute(
            insert(PollRun).values(
                started_at=format_ts(finished), finished_at=format_ts(finished), outcome="succeeded"
            )
        )

    out = status(config_path, capsys)

    # interval 1m x ready_intervals 3 = 180 s, as /readyz counts it
    assert "finished 2.0h ago -- STALE (more than 180s: /readyz fails)" in out.splitlines()[0]
