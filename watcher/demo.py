"""``metronome-watcher demo``: the whole daemon against the built-in simulated Metronome.

The simulated Metronome (the same one the tests use) is seeded with a few hundred customers, each on
one of a few plans, and a churn generator creates, renames, re-tags and archives them, and sets end
dates on their plans (a few seconds ahead, so the plan's end follows a little later), while the real
daemon polls both sources on a short interval. Events are printed as they are delivered, through an
ordinary sink, and the web view is served on a local port (``web_port``; 0 lets the OS choose) behind
a token made up for the run: its address and the token are printed first.
"""

from __future__ import annotations

import random
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .app import build_app
from .config import parse_config
from .daemon import Daemon
from .events import change_line, customer_name, plan_headline
from .poll import PollResult
from .simulator import SimulatedMetronome
from .sinks import Outcome

__all__ = ["ConsoleSink", "run_demo"]


class ConsoleSink:
    """Prints one readable line per event (a sink like any other, so delivery is exercised too)."""

    max_batch = 200

    def __init__(self, name: str, out: IO[str]) -> None:
        self.name = name
        self.out = out
        self.counts: Counter[str] = Counter()

    def deliver(self, events: Sequence[Mapping[str, Any]]) -> Sequence[Outcome]:
        for e in events:
            who = f"{customer_name(e) or '?'} ({str(e.get('customer_id', ''))[:8]})"
            changes = plan_headline(e) or "; ".join(
                change_line(c, value=_fmt) for c in e.get("changes", []) if c["field"] != "archived_at"
            )
            self.out.write(
                f"  #{e['sequence']:<5} {e['type']:<20} {who}{'  ' + changes if changes else ''}\n"
            )
            self.counts[e["type"]] += 1
        self.out.flush()
        return [Outcome.ok()] * len(events)

    def close(self) -> None:
        pass


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 32 else text[:29] + "..."


def run_demo(
    *,
    seconds: float | None = None,
    customers: int = 300,
    interval: float = 2.0,
    db: Path | None = None,
    seed: int | None = None,
    stop: threading.Event | None = None,
    out: IO[str] | None = None,
    churn_every: float = 0.25,
    web_port: int = 0,
    plans: int = 4,
) -> int:
    out = out or sys.stdout
    stop = stop or threading.Event()
    rng = random.Random(seed)
    token = secrets.token_urlsafe(24)
    web_token = secrets.token_urlsafe(18)
    with tempfile.TemporaryDirectory(prefix="watcher-demo-") as tmp, SimulatedMetronome(token=token) as fake:
        fake.seed(customers, rng=rng)
        if plans:
            fake.seed_plans(plans, rng=rng)
        db_path = db or Path(tmp) / "demo.db"
        config = parse_config(
            {
                "metronome": {"base_url": fake.url, "max_retry_wait": "10s"},
                "store": {"path": str(db_path)},
                "schedule": {"interval": interval, "delivery_interval": 1},
                "health": {"port": web_port, "host": "127.0.0.1"},
                "web": {"enabled": True, "token": web_token},
                "plans": {"watch": plans > 0},
            },
            env={},
        )
        console = ConsoleSink("console", out)
        app = build_app(config, token, extra_sinks={"console": console})

        def on_poll(result: PollResult) -> None:
            if result.baseline and result.ok:
                on_plans = ""
                if result.plans is not None:
                    on_plans = f", {result.plans.memberships} memberships of {result.plans.plans} plans"
                out.write(
                    f"baseline: {result.active} active and {result.archived} archived customers{on_plans} "
                    f"recorded (no events for what already existed)\n"
                )
            elif not result.ok:
                out.write(f"poll {result.poll_id} {result.outcome}: {result.error}\n")
            out.flush()

        daemon = Daemon(app, on_poll=on_poll)
        deadline = None if seconds is None else time.monotonic() + seconds
        daemon.start()
        assert daemon.health is not None
        web = daemon.health.url
        out.write(
            f"metronome-watcher demo: simulated Metronome at {fake.url} with {customers} customers, "
            f"polling every {interval:g}s, database {db_path}\n"
            f"web view: {web}/  (user name: anything, password: {web_token})\n"
            f"  change feed: curl -H 'Authorization: Bearer {web_token}' "
            f"'{web}/api/events?after_sequence=0'\n"
            f"Customers are created, renamed, re-tagged and archived, and their plans end, as you watch. "
            f"{f'Stops after {seconds:g}s' if seconds else 'Ctrl-C to stop'}.\n"
        )
        out.flush()
        churn = threading.Thread(
            target=_churn, args=(fake, rng, stop, churn_every), daemon=True, name="churn"
        )
        churn.start()
        try:
            while not stop.wait(0.2):
                if deadline is not None and time.monotonic() >= deadline:
                    break
        finally:
            stop.set()
            churn.join(timeout=2)
            daemon.stop()
        total = sum(console.counts.values())
        summary = ", ".join(f"{n} {t}" for t, n in sorted(console.counts.items())) or "none"
        out.write(f"demo stopped: {total} events delivered ({summary})\n")
        out.flush()
    return 0


def _churn(fake: SimulatedMetronome, rng: random.Random, stop: threading.Event, every: float) -> None:
    while not stop.wait(rng.uniform(0.5, 1.5) * every):
        fake.churn(rng)
