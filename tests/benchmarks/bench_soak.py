"""Soak: the daemon against the simulated Metronome at a 1 s interval with steady churn (issue 16).

Run from the repository root, with the package installed (it is not collected by ``pytest``)::

    python -m tests.benchmarks.bench_soak --cycles 2000 --out soak.json     # ~35 minutes
    python -m tests.benchmarks.bench_soak --cycles 20 --warmup 5            # a quick look

It starts three things: the simulated Metronome in a process of its own (``python -m
watcher.simulator --churn``: ``--customers`` seeded, one random change every ``--churn`` seconds,
so a few customers are created, changed or archived each second), a local HTTP receiver in this
process (``tests/receivers.py``) behind an ``http`` sink, and ``metronome-watcher run`` with
``schedule.interval = "1s"`` on a SQLite file. Every ``--sample-every`` seconds it reads the
daemon's ``/proc/PID/status`` (``VmRSS``, ``VmHWM``: the peak, ``Threads``) and counts
``/proc/PID/fd``; the daemon's ``poll.completed`` log lines count the cycles.

It prints one JSON document on stdout (progress goes to stderr; ``--out FILE`` keeps a copy):
the figures at the end of the warm-up (``--warmup`` cycles) and at the end, the growth of peak
and current RSS in percent from one to the other (target: at most 10%), whether the open file
descriptors and threads are flat (the fewest in the last tenth of the samples are no more than
the fewest in the first tenth after the warm-up: a leak raises the floor, while a cycle's own
threads and sockets come and go), every sample, and the audit log against the receiver (every
event delivered, with its id, but those the last cycles left pending when the daemon stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.benchmarks import emit, machine
from tests.receivers import Receiver, Reply
from watcher._time import utcnow
from watcher.store import Store

TOKEN = "soak-token-0123456789"
SECRET = "whsec_c29hay1zZWNyZXQtMDEyMzQ1Njc4OQ"
#: Growth of peak RSS from the end of the warm-up to the end that the soak accepts.
RSS_GROWTH_TARGET_PCT = 10.0


def config_text(url: str, db: Path, hook: str) -> str:
    return f"""
[metronome]
base_url = "{url}"
max_attempts = 2
max_retry_wait = "1s"

[store]
path = "{db}"

[schedule]
interval = "1s"
delivery_interval = "1s"

[logging]
level = "info"
format = "json"

[[sinks]]
type = "http"
name = "hooks"
url = "{hook}"
secret = "${{SOAK_HOOK_SECRET}}"
"""


def proc_figures(pid: int) -> dict[str, int]:
    """The daemon's RSS and peak RSS (KiB), threads and open file descriptors, as the kernel counts them."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            fields[key] = int(value.split()[0])
    return {
        "rss_kib": fields["VmRSS"],
        "hwm_kib": fields["VmHWM"],
        "threads": fields["Threads"],
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


class LogReader:
    """The daemon's JSON log lines (stderr): cycles completed, failed polls, and the last lines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.completed = 0
        self.failed = 0
        self.tail: list[str] = []
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self.tail = [*self.tail[-19:], line.rstrip()]
            try:
                event = json.loads(line).get("event")
            except ValueError:
                continue
            if event == "poll.completed":
                self.completed += 1
            elif event in ("poll.failed", "poll.crashed"):
                self.failed += 1

    def join(self) -> None:
        self._thread.join(timeout=10)


def start_simulator(customers: int, churn: float, seed: int) -> tuple[subprocess.Popen[str], str]:
    argv = [sys.executable, "-m", "watcher.simulator", "--customers", str(customers)]
    argv += ["--churn", str(churn), "--seed", str(seed), "--token", TOKEN]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise RuntimeError("the simulator did not print its URL")
    return proc, url


def flat(values: list[int]) -> bool:
    """The floor does not rise: the fewest in the last tenth of the samples are no more than the
    fewest in the first tenth (a leak raises the floor; a cycle's own threads and sockets come and go)."""
    k = max(1, len(values) // 10)
    return min(values[-k:]) <= min(values[:k])


def growth_pct(start: int, end: int) -> float:
    return round(100.0 * (end - start) / start, 2)


def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    receiver = Receiver(Reply(204, b"")).start()
    simulator, url = start_simulator(args.customers, args.churn, args.seed)
    db = workdir / "watcher.db"
    config = workdir / "watcher.toml"
    config.write_text(config_text(url, db, receiver.url))
    env = {k: v for k, v in os.environ.items() if k != "WATCHER_CONFIG"}
    env.update(METRONOME_BEARER_TOKEN=TOKEN, SOAK_HOOK_SECRET=SECRET, PYTHONUNBUFFERED="1")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "watcher", "run", "--config", str(config)],
        env=env,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = LogReader(daemon)
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        next_report = 0.0
        while log.completed < args.cycles:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited ({daemon.returncode}):\n" + "\n".join(log.tail))
            elapsed = time.monotonic() - t0
            samples.append({"t": round(elapsed, 1), "cycles": log.completed, **proc_figures(daemon.pid)})
            if elapsed >= next_report:
                print(f"{elapsed:7.0f}s {samples[-1]}", file=sys.stderr, flush=True)
                next_report = elapsed + 60
            time.sleep(args.sample_every)
        samples.append(
            {"t": round(time.monotonic() - t0, 1), "cycles": log.completed, **proc_figures(daemon.pid)}
        )
        daemon.send_signal(signal.SIGTERM)
        exit_code = daemon.wait(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.join()
        simulator.kill()
        simulator.wait()
    # A last look after the daemon stopped: what reached the receiver against the audit log.
    with Store(db) as store:
        events = store.query_events()
        last_polls = store.last_polls(1)
        (deliveries,) = store.delivery_status(utcnow(), sinks=["hooks"])
    receiver.stop()
    delivered = {r.json()["id"] for r in receiver.requests if r.ok}
    audit = {e["id"] for e in events}

    after = [s for s in samples if s["cycles"] >= args.warmup] or samples[-1:]
    start, end = after[0], after[-1]
    hwm_growth = growth_pct(start["hwm_kib"], end["hwm_kib"])
    return {
        "cycles": log.completed,
        "failed_polls": log.failed,
        "seconds": round(time.monotonic() - t0, 1),
        "daemon_exit_code": exit_code,
        "warmup_cycles": args.warmup,
        "start": start,
        "end": end,
        "peak_rss_growth_pct": hwm_growth,
        "rss_growth_pct": growth_pct(start["rss_kib"], end["rss_kib"]),
        f"peak_rss_growth_le_{RSS_GROWTH_TARGET_PCT:g}pct": hwm_growth <= RSS_GROWTH_TARGET_PCT,
        "fds": {
            "min": min(s["fds"] for s in after),
            "max": max(s["fds"] for s in after),
            "flat": flat([s["fds"] for s in after]),
        },
        "threads": {
            "min": min(s["threads"] for s in after),
            "max": max(s["threads"] for s in after),
            "flat": flat([s["threads"] for s in after]),
        },
        "events": len(events),
        "events_delivered": len(delivered & audit),
        # The last cycle's events may still wait for the next delivery round when the daemon stops.
        "events_pending_at_stop": deliveries.pending,
        "events_dead": deliveries.dead,
        "every_event_delivered_or_pending": len(audit - delivered) == deliveries.pending
        and deliveries.dead == 0,
        "last_poll_customers": (last_polls[0].active, last_polls[0].archived) if last_polls else None,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.bench_soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cycles", type=int, default=2000, help="polls to complete (default 2000)")
    parser.add_argument("--warmup", type=int, default=100, help="cycles before the start figures (100)")
    parser.add_argument("--customers", type=int, default=3000, help="customers seeded (default 3000)")
    parser.add_argument(
        "--churn", type=float, default=0.25, help="seconds between two changes on the simulator (0.25)"
    )
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples (5)")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--workdir", type=Path, default=None, help="where the database goes (default: tmp)")
    args = parser.parse_args(argv)
    if args.warmup >= args.cycles:
        parser.error("--warmup must be smaller than --cycles")

    workdir = Path(tempfile.mkdtemp(prefix="watcher-soak-", dir=args.workdir))
    try:
        results = {
            "machine": machine(),
            "customers": args.customers,
            "churn_seconds": args.churn,
            "interval": "1s",
            "sample_every": args.sample_every,
            **soak(args, workdir),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    emit(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
