"""The command line as an operator uses it: separate processes on one database file."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from watcher.simulator import Fault, SimulatedMetronome

from .conftest import TOKEN
from .disks import SmallDisk


def write_config(
    tmp_path: Path, fake: SimulatedMetronome, extra: str = "", *, db: Path | None = None
) -> Path:
    path = tmp_path / "watcher.toml"
    path.write_text(
        f"""
[metronome]
base_url = "{fake.url}"
max_attempts = 2
max_retry_wait = "1s"

[store]
path = "{db or tmp_path / "watcher.db"}"

[logging]
format = "json"

[[sinks]]
type = "log"
name = "events"
path = "{tmp_path / "events.jsonl"}"
{extra}
"""
    )
    return path


def cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "METRONOME_BEARER_TOKEN": TOKEN, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "watcher", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
    )


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_poll_restart_and_events(fake: SimulatedMetronome, tmp_path: Path) -> None:
    config = write_config(tmp_path, fake)
    ids = [fake.create_customer(f"Customer {i}", custom_fields={"tier": "starter"})["id"] for i in range(5)]

    first = cli(config, "poll")
    assert first.returncode == 0, first.stderr
    assert "baseline recorded" in first.stdout

    fake.set_name(ids[0], "Renamed")
    fake.archive(ids[1])
    new = fake.create_customer("Newcomer")["id"]
    second = cli(config, "poll")
    assert second.returncode == 0, second.stderr
    assert "1 customer.archived, 1 customer.created, 1 customer.updated" in second.stdout

    # Every later process continues from the committed state: nothing is re-emitted.
    for _ in range(2):
        again = cli(config, "poll")
        assert again.returncode == 0 and "no changes" in again.stdout

    listed = jsonl(cli(config, "events", "--format", "jsonl").stdout)
    assert {(e["type"], e["customer_id"]) for e in listed} == {
        ("customer.updated", ids[0]),
        ("customer.archived", ids[1]),
        ("customer.created", new),
    }
    assert [e["sequence"] for e in listed] == [1, 2, 3]
    # The log sink received exactly the audit log's events, each once, the contract unchanged.
    delivered = jsonl((tmp_path / "events.jsonl").read_text())
    assert delivered == listed


def test_events_filters_and_formats(fake: SimulatedMetronome, tmp_path: Path) -> None:
    config = write_config(tmp_path, fake)
    a = fake.create_customer("Alpha")["id"]
    b = fake.create_customer("Beta")["id"]
    long_alias = "billing-department-of-a-very-long-company-name@example.com"
    c = fake.create_customer("Gamma", ingest_aliases=[long_alias, "old@gamma.example.com"])["id"]
    assert cli(config, "poll").returncode == 0
    fake.set_name(a, "Alpha Two")
    fake.archive(b)
    fake.set_ingest_aliases(c, [long_alias, "new@gamma.example.com"])
    assert cli(config, "poll").returncode == 0

    by_customer = jsonl(cli(config, "events", "--customer", a, "--format", "jsonl").stdout)
    assert [(e["customer_id"], e["type"]) for e in by_customer] == [(a, "customer.updated")]
    by_type = jsonl(cli(config, "events", "--type", "customer.archived", "--format", "jsonl").stdout)
    assert [e["customer_id"] for e in by_type] == [b]
    assert jsonl(cli(config, "events", "--since", "2999-01-01T00:00:00Z", "--format", "jsonl").stdout) == []
    assert len(jsonl(cli(config, "events", "--since", "1h", "--format", "jsonl").stdout)) == 3
    assert jsonl(cli(config, "events", "--until", "1h", "--format", "jsonl").stdout) == []

    # Events of one cycle come in no promised order; across cycles, in sequence order.
    rows = {
        r["type"]: r for r in csv.DictReader(io.StringIO(cli(config, "events", "--format", "csv").stdout))
    }
    assert set(rows) == {"customer.updated", "customer.archived"}
    rows = {
        r["customer_id"]: r
        for r in csv.DictReader(io.StringIO(cli(config, "events", "--format", "csv").stdout))
    }
    assert json.loads(rows[a]["changes"]) == [{"field": "name", "before": "Alpha", "after": "Alpha Two"}]
    assert rows[b]["type"] == "customer.archived" and rows[b]["name"] == "Beta"

    table = cli(config, "events").stdout.splitlines()
    assert table[0].split() == ["sequence", "detected_at", "type", "customer_id", "name", "changes"]
    updated = next(line for line in table if "customer.updated" in line and a in line)
    assert "name: Alpha -> Alpha Two" in updated
    # A changed list: what was added and removed, not two lists cut off at 40 characters.
    aliases = next(line for line in table if c in line)
    assert aliases.endswith("ingest_aliases: added new@gamma.example.com; removed old@gamma.example.com")

    bad = cli(config, "events", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_failed_poll_exits_1_and_commits_nothing(fake: SimulatedMetronome, tmp_path: Path) -> None:
    config = write_config(tmp_path, fake)
    fake.create_customer("Steady")
    assert cli(config, "poll").returncode == 0
    fake.create_customer("Unseen yet")
    fake.add_fault(Fault(kind="status", status=503, times=100))

    failed = cli(config, "poll")

    assert failed.returncode == 1
    assert "failed" in failed.stderr and "HTTP 503" in failed.stderr
    assert jsonl(cli(config, "events", "--format", "jsonl").stdout) == []

    fake.clear_faults()
    assert cli(config, "poll").returncode == 0
    assert [e["type"] for e in jsonl(cli(config, "events", "--format", "jsonl").stdout)] == [
        "customer.created"
    ]


def test_token_never_appears_in_output_logs_or_database(fake: SimulatedMetronome, tmp_path: Path) -> None:
    config = write_config(
        tmp_path, fake, extra="\n[diff]\nmax_vanished_count = 0\nmax_vanished_fraction = 0.5\n"
    )
    ids = [fake.create_customer(f"C{i}")["id"] for i in range(4)]
    outputs = [cli(config, "poll")]
    fake.set_name(ids[0], "Changed")
    outputs.append(cli(config, "poll"))
    for fault in (
        Fault(kind="status", status=401, message="Unauthorized"),
        Fault(kind="status", status=500, times=10),
        Fault(kind="malformed"),
        Fault(kind="drop", times=10),
    ):
        fake.add_fault(fault)
        outputs.append(cli(config, "poll"))
        fake.clear_faults()
    for cid in ids[:3]:
        fake.delete(cid)
    outputs.append(cli(config, "poll"))  # refused: mass vanish
    outputs.append(cli(config, "--config", str(config), "events", "--format", "jsonl"))
    outputs.append(cli(config, "status"))

    assert [o.returncode for o in outputs[:2]] == [0, 0]
    assert all(o.returncode == 1 for o in outputs[2:7]), [(o.returncode, o.stderr) for o in outputs]
    text = "".join(o.stdout + o.stderr for o in outputs)
    assert "api.giving_up" in text or "failed" in text  # the failures were logged ...
    assert TOKEN not in text  # ... without the token
    for f in tmp_path.iterdir():
        assert TOKEN.encode() not in f.read_bytes(), f


def test_bad_usage_exits_2(fake: SimulatedMetronome, tmp_path: Path) -> None:
    config = write_config(tmp_path, fake)
    assert cli(config, "no-such-command").returncode == 2
    assert cli(config, "events", "--format", "xml").returncode == 2


def test_events_without_a_database_is_a_clear_error(fake: SimulatedMetronome, tmp_path: Path) -> None:
    proc = cli(write_config(tmp_path, fake), "events")
    assert proc.returncode == 1
    assert "no database at" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_shows_events_within_seconds(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "watcher",
            "demo",
            "--for",
            "6",
            "--customers",
            "150",
            "--interval",
            "1",
            "--seed",
            "7",
            "--db",
            str(tmp_path / "demo.db"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "METRONOME_BEARER_TOKEN": ""},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "baseline: " in out
    event_lines = [line for line in out.splitlines() if line.lstrip().startswith("#")]
    assert len(event_lines) >= 3, out
    assert any("customer." in line for line in event_lines)
    # Its customers are on plans, and their plans change (end dates, in words) as it runs.
    assert "memberships of 4 plans recorded" in out
    assert any("customer.plan_" in line for line in event_lines)
    assert "demo stopped:" in out
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_serves_the_web_view_on_a_local_port_and_prints_its_address(tmp_path: Path) -> None:
    import re
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "watcher",
            "demo",
            "--for",
            "30",
            "--customers",
            "50",
            "--web-port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "METRONOME_BEARER_TOKEN": ""},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        match = re.search(
            r"web view: (http://127\.0\.0\.1:(\d+))/ +\(user name: anything, password: (\S+)\)",
            "".join(lines),
        )
        assert match, lines
        url, printed_port, token = match.groups()
        assert int(printed_port) == port
        assert f"Authorization: Bearer {token}" in lines[2]
        assert httpx.get(url + "/").status_code == 401
        page = httpx.get(url + "/", auth=("me", token))
        assert page.status_code == 200 and "Recent changes" in page.text
        assert httpx.get(url + "/api/events", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_a_process_killed_mid_cycle_loses_nothing_and_invents_nothing(
    fake: SimulatedMetronome, tmp_path: Path
) -> None:
    import signal
    import sqlite3
    import threading
    import time

    config = write_config(tmp_path, fake)
    for i in range(150):  # two pages of the active listing
        fake.create_customer(f"C{i:03d}")
    assert cli(config, "poll").returncode == 0
    victim = fake.customers(archived=False)[120]["id"]
    fake.archive(victim)
    reached, release = threading.Event(), threading.Event()

    def hold(_: SimulatedMetronome) -> None:  # page 2 is held until the poller has been killed
        reached.set()
        release.wait(30)

    fake.on_page(2, hold, archived=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher", "--config", str(config), "poll"],
        env={**os.environ, "METRONOME_BEARER_TOKEN": TOKEN},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert reached.wait(30), "the poll never reached page 2"
    time.sleep(0.2)  # let it stage what it has
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    release.set()

    con = sqlite3.connect(tmp_path / "watcher.db")
    assert con.execute("SELECT outcome FROM poll_runs ORDER BY id DESC LIMIT 1").fetchone() == ("running",)
    assert con.execute("SELECT count(*) FROM events").fetchone() == (0,)
    con.close()

    assert cli(config, "poll").returncode == 0
    events = jsonl(cli(config, "events", "--format", "jsonl").stdout)
    assert [(e["type"], e["customer_id"]) for e in events] == [("customer.archived", victim)]
    con = sqlite3.connect(tmp_path / "watcher.db")
    outcomes = [o for (o,) in con.execute("SELECT outcome FROM poll_runs ORDER BY id")]
    con.close()
    assert outcomes == ["succeeded", "abandoned", "succeeded"]


def test_poll_with_plans_says_what_each_source_did_and_which_one_failed(
    fake: SimulatedMetronome, tmp_path: Path
) -> None:
    config = write_config(tmp_path, fake, "\n[plans]\nwatch = true\n")
    growth = fake.create_plan("Growth")["id"]
    ids = [fake.create_customer(f"Customer {i}")["id"] for i in range(3)]
    cpids = [
        fake.add_to_plan(cid, growth, starting_on="2026-01-01T00:00:00Z")["plan_details"]["customer_plan_id"]
        for cid in ids
    ]

    first = cli(config, "poll")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == (
        "poll 1 ok: 3 active, 0 archived, 2 pages; baseline recorded; "
        "plans: 3 memberships on 1 plans, 2 pages; baseline recorded"
    )

    fake.set_plan_end(cpids[0], "2099-12-31T00:00:00Z")
    second = cli(config, "poll")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().endswith(
        "; plans: 3 memberships on 1 plans, 2 pages; 1 customer.plan_updated"
    )
    table = cli(config, "events").stdout.splitlines()
    (row,) = [line for line in table if "customer.plan_updated" in line]
    assert "plan Growth ends on 2099-12-31; plan.ending_before: null -> 2099-12-31T00:00:00.000Z" in row
    assert ids[0] in row and "Customer 0" in row

    fake.set_name(ids[1], "Renamed")
    fake.add_fault(Fault(kind="status", status=503, times=100, path="/v1/planDetails"))
    third = cli(config, "poll")
    assert third.returncode == 1
    assert third.stdout.strip() == "poll 3 customers ok: 3 active, 0 archived, 2 pages; 1 customer.updated"
    (failed,) = [line for line in third.stderr.splitlines() if line.startswith("poll 3 failed: ")]
    assert failed.startswith(f"poll 3 failed: plans: GET /v1/planDetails/{growth}/customers (members of plan")
    assert "HTTP 503" in failed
    updated = jsonl(cli(config, "events", "--type", "customer.updated", "--format", "jsonl").stdout)
    assert [e["customer_id"] for e in updated] == [ids[1]], "the customers' news was not held back"

    status = cli(config, "status").stdout.splitlines()
    assert "(failing: plans)" in status[0]
    assert status[2] == "plans watched: 1 plans, 3 memberships (0 ended)"


# -- the database failing ---------------------------------------------------------------------------


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The one line a failed command printed (its JSON log records aside), with no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "sqlalche.me" not in text and "sqlalchemy" not in text, text
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def files_of(path: Path) -> dict[str, tuple[bytes, int]]:
    """The database's file and any -wal, -shm or -journal beside it: bytes and mtime."""
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.parent.iterdir())
        if p.name.startswith(path.name)
    }


@pytest.mark.slow
@pytest.mark.parametrize("free_kib", [0, 16, 64, 256])
def test_a_full_disk_fails_poll_in_one_line_and_once_freed_every_change_arrives_once(
    fake: SimulatedMetronome, tmp_path: Path, small_disk: SmallDisk, free_kib: int
) -> None:
    db = small_disk.root / "metronome-watcher.db"
    config = write_config(tmp_path, fake, db=db)
    ids = [fake.create_customer(f"C{i:03d}", custom_fields={"notes": "n" * 200})["id"] for i in range(200)]
    assert cli(config, "poll").returncode == 0
    changed = ids[:60]
    for cid in changed:
        fake.set_name(cid, "Renamed " + "r" * 1000)
    small_disk.fill(leave=free_kib * 1024)

    line = one_line_error(cli(config, "poll"), 1)
    status = cli(config, "status")

    assert "database error: disk full writing " in line and f"{db}" in line, line
    assert line.endswith((" free)", " free) (the database could not record it)")), line
    if line.startswith("poll ") and line.endswith(" free)"):  # the failure is recorded: status shows it
        assert "database error: disk full writing" in status.stdout
    elif status.returncode:  # the store does not even open: status says so, in one line
        assert "database error: disk full writing" in one_line_error(status, 1)

    small_disk.free_up()
    assert cli(config, "poll").returncode == 0
    events = jsonl(cli(config, "events", "--format", "jsonl").stdout)
    assert sorted((e["type"], e["customer_id"]) for e in events) == sorted(
        ("customer.updated", cid) for cid in changed
    )
    delivered = jsonl((tmp_path / "events.jsonl").read_text())
    assert sorted(e["id"] for e in delivered) == sorted(e["id"] for e in events)  # each once


def test_every_command_refuses_another_programs_database_with_exit_2_and_writes_nothing(
    fake: SimulatedMetronome, tmp_path: Path
) -> None:
    db = tmp_path / "app.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    con.execute("INSERT INTO invoices (total) VALUES (12.5)")
    con.commit()
    con.close()
    before = files_of(db)
    config = write_config(tmp_path, fake, db=db)

    for args in (
        ["poll"],
        ["status"],
        ["events"],
        ["deliveries"],
        ["replay", "--sink", "events"],
        ["enable-sink", "events"],
        ["store", "migrate", "--to", "postgresql://watcher@127.0.0.1:1/watcher"],
    ):
        line = one_line_error(cli(config, *args), 2)
        assert line == (
            f"metronome-watcher: database error: {db} is not a metronome-watcher database: it has "
            "other tables (invoices) and no metronome-watcher marker; nothing was written to it "
            "(check [store] path)"
        ), args
    assert cli(config, "run").returncode == 2
    assert files_of(db) == before


def test_a_file_that_is_not_a_database_is_one_line_and_left_as_it_was(
    fake: SimulatedMetronome, tmp_path: Path
) -> None:
    db = tmp_path / "watcher.db"
    db.write_bytes(b"these are not the bytes of a database\n" * 100)
    before = files_of(db)
    config = write_config(tmp_path, fake)

    for command in ("poll", "status", "events"):
        assert one_line_error(cli(config, command), 1) == (
            f"metronome-watcher: database error: {db} is damaged or is not a SQLite database: "
            "file is not a database"
        )
    assert files_of(db) == before


def test_a_read_only_store_is_one_line(
    fake: SimulatedMetronome, tmp_path: Path, read_only_dir: Callable[[], None]
) -> None:
    db = tmp_path / "ro" / "watcher.db"
    config = write_config(tmp_path, fake, db=db)
    fake.create_customer("Someone")
    assert cli(config, "poll").returncode == 0
    read_only_dir()

    line = one_line_error(cli(config, "poll"), 1)

    assert line.startswith(f"metronome-watcher: database error: cannot write {db}: "), line
    assert line.endswith("(the file, its directory or its filesystem is read-only to this process)")


def test_an_unreachable_postgresql_store_is_one_line_without_its_password(
    fake: SimulatedMetronome, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    config = tmp_path / "watcher.toml"
    config.write_text(
        f'[metronome]\nbase_url = "{fake.url}"\n\n[store]\nurl = "postgresql://watcher:${{DB_PASSWORD}}'
        f'@127.0.0.1:{port}/watcher"\n'
    )
    password = "db-pass-SECRET-31415"

    for command in ("status", "poll"):
        proc = cli(config, command, env={"DB_PASSWORD": password})
        line = one_line_error(proc, 1)
        assert line.startswith(
            "metronome-watcher: database error: cannot connect to "
            f"postgresql://watcher:***@127.0.0.1:{port}/watcher: "
        ), line
        assert password not in proc.stdout + proc.stderr
