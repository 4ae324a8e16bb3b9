"""``metronome-watcher store backup FILE``: a checked, consistent copy of a SQLite store taken while a
real ``run`` daemon polls and delivers; an existing file is never overwritten without ``--force``;
a PostgreSQL store is pointed at pg_dump."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from watcher.simulator import SimulatedMetronome
from watcher.store import Store
from watcher.store.check import check_store

from ..conftest import postgres_only, sqlite_only
from ..test_daemon import DaemonProcess, base_env, config_text, fake, start_daemon, wait_until

# The daemon tests' fixtures: their simulator takes the token ``base_env`` gives a daemon.
__all__ = ["fake", "start_daemon"]


def store_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watcher", "--config", str(config), "store", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=base_env(),
        check=False,
    )


def table(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.mark.slow
def test_a_backup_taken_while_the_daemon_polls_and_delivers_is_a_sound_copy_of_one_moment(
    fake: SimulatedMetronome, tmp_path: Path, start_daemon: Callable[[str], DaemonProcess]
) -> None:
    fake.seed(300)
    db, log = tmp_path / "w.db", tmp_path / "events.jsonl"
    sink = f'[[sinks]]\ntype = "log"\nname = "events"\npath = "{log}"\n'
    text = config_text(fake, db, extra=sink)
    daemon = start_daemon(text)
    config = tmp_path / "watcher.toml"  # written by start_daemon
    wait_until(lambda: daemon.logged("poll.completed"), "the baseline", context=daemon.tail)
    rng = random.Random(16)
    copies = []
    for i in range(4):
        for _ in range(40):  # changes for the daemon to commit and deliver while the copy is made
            fake.churn(rng)
        wait_until(lambda n=i: len(daemon.logged("poll.completed")) > n + 1, "a poll with changes")
        copy = tmp_path / f"backup-{i}.db"
        done = store_cli(config, "backup", str(copy))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"backed up {db} to {copy}: ") and "integrity_check ok" in done.stdout
        copies.append(copy)
    wait_until(lambda: log.exists() and log.read_text().count("\n") > 0, "deliveries", context=daemon.tail)
    assert daemon.terminate()[0] == 0

    events = table(db, "SELECT sequence, id, payload FROM events ORDER BY sequence")
    runs = {r[0]: r for r in table(db, "SELECT * FROM poll_runs")}
    lasts = []
    for copy in copies:
        assert not Path(f"{copy}-wal").exists()  # one self-contained file
        with Store(copy) as store:
            assert [f for f in check_store(store) if not f.ok] == []
        copied = table(copy, "SELECT sequence, id, payload FROM events ORDER BY sequence")
        # The source at one commit: its audit log up to a point, and every poll run it had finished.
        assert copied == events[: len(copied)]
        for run in table(copy, "SELECT * FROM poll_runs WHERE outcome != 'running'"):
            assert runs[run[0]] == run
        lasts.append(len(copied))
    assert lasts == sorted(lasts) and lasts[-1] > lasts[0] > 0  # taken while the log grew
    delivered = table(copies[-1], "SELECT count(*) FROM outbox WHERE status = 'delivered'")[0][0]
    assert delivered > 0  # deliveries were being recorded too
    assert json.loads(log.read_text().splitlines()[0])["sequence"] == 1


@sqlite_only
def test_an_existing_file_is_refused_unless_forced(
    fake: SimulatedMetronome, tmp_path: Path, store_url: str
) -> None:
    Store(store_url).close()
    config = tmp_path / "w.toml"
    config.write_text(f'[metronome]\nbase_url = "{fake.url}"\n[store]\npath = "{store_url}"\n')
    target = tmp_path / "copy.db"
    target.write_text("precious")

    refused = store_cli(config, "backup", str(target))
    assert (refused.returncode, refused.stderr.strip()) == (
        2,
        f"metronome-watcher: {target} exists; --force replaces it",
    )
    assert target.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".copy.db")] == []

    forced = store_cli(config, "backup", str(target), "--force")
    assert forced.returncode == 0, forced.stderr
    assert table(target, "SELECT value FROM meta WHERE key = 'schema_version'")


@postgres_only
def test_a_postgresql_store_is_pointed_at_pg_dump(tmp_path: Path, store_url: str) -> None:
    config = tmp_path / "w.toml"
    config.write_text(f'[metronome]\nbase_url = "http://127.0.0.1:9"\n[store]\nurl = "{store_url}"\n')
    done = store_cli(config, "backup", str(tmp_path / "copy.db"))
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "back up PostgreSQL with pg_dump" in line
    assert not (tmp_path / "copy.db").exists()


@sqlite_only
def test_a_backup_onto_a_full_disk_fails_in_one_line_and_leaves_no_file(
    fake: SimulatedMetronome, tmp_path: Path, store_url: str, small_disk: Any
) -> None:
    Store(store_url).close()
    config = tmp_path / "w.toml"
    config.write_text(f'[metronome]\nbase_url = "{fake.url}"\n[store]\npath = "{store_url}"\n')
    target = small_disk.root / "copy.db"
    small_disk.fill(leave=16 * 1024)
    assert Path(store_url).stat().st_size > small_disk.free  # the copy cannot fit

    done = store_cli(config, "backup", str(target))

    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"metronome-watcher: database error: disk full writing the backup {target} (16.4 kB free)"
    ]
    assert [p.name for p in small_disk.root.iterdir()] == ["filler"]  # neither the copy nor its temp file
