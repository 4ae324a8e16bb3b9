"""Web view and change feed benchmark (issue 18): pages and the feed over HTTP, with 1M events.

Run from the repository root, with the package installed (it is not collected by ``pytest``)::

    python -m tests.benchmarks.bench_web                         # 1M events, 100k customers
    python -m tests.benchmarks.bench_web --db /tmp/web.db        # keep the database for the next run
    python -m tests.benchmarks.bench_web --events 20000 --customers 2000 --repeat 3   # a quick look

The audit log is written by ``tests/benchmarks/_webdata.py`` (a million events take a minute or two;
``--db`` keeps them: an existing file there is reused). The server (``watcher.web.WebServer`` with
``[web]`` on, exactly as the daemon starts it) runs in a process of its own; this process is the
client, one keep-alive ``httpx`` connection with Basic auth, as a browser. Each page is requested
``--repeat`` times after one untimed request, and the median, fastest and slowest round trip (request
sent to the last byte of the page read) are reported. The feed is paged from ``after_sequence=0`` to
the end with ``limit=1000``, as a consumer would, and its rate is events over the whole wall time.

It prints one JSON document on stdout (progress goes to stderr; ``--out FILE`` keeps a copy), with
``targets``: each page under 100 ms (median) and the feed at 20,000 events a second or more.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.benchmarks import emit

TOKEN = "bench-web-token-0123456789"
PAGE_TARGET_MS = 100.0
FEED_TARGET_EVENTS_PER_S = 20_000.0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def serve(db: Path) -> None:
    """The server process: serve ``db`` on an ephemeral port, print it, stop when stdin closes."""
    from watcher._logging import configure_logging
    from watcher.config import WebConfig
    from watcher.health import Health
    from watcher.store import Store
    from watcher.web import WebServer

    configure_logging("warning", "console")  # to stderr: stdout carries the port
    store = Store(db)
    checks = Health(store, max_age=timedelta(days=3650), sinks=["audit", "churn"])
    server = WebServer(checks, port=0, host="127.0.0.1", web=WebConfig(enabled=True, token=TOKEN)).start()
    print(server.port, flush=True)
    sys.stdin.read()
    server.stop()
    store.close()


def _client(port: int) -> httpx.Client:
    # As a browser: keep-alive, and Nagle off (Chrome and curl switch it off too).
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}", auth=("bench", TOKEN), timeout=60, transport=transport
    )


def _time(client: httpx.Client, path: str, repeat: int) -> dict[str, Any]:
    first = client.get(path)  # untimed: the connection, the templates, SQLite's first read of the pages
    first.raise_for_status()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = client.get(path)
        r.read()
        times.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
    rows = r.text.count('<tr class="event ')
    return {
        "path": path,
        "median_ms": round(statistics.median(times), 2),
        "min_ms": round(min(times), 2),
        "max_ms": round(max(times), 2),
        "bytes": len(r.content),
        "rows": rows,
    }


def _feed(client: httpx.Client, limit: int) -> dict[str, Any]:
    after, events, requests, last = 0, 0, 0, 0
    t0 = time.perf_counter()
    while True:
        r = client.get("/api/events", params={"after_sequence": after, "limit": limit})
        r.raise_for_status()
        body = orjson.loads(r.content)  # a consumer's own parsing is its business: a fast one
        requests += 1
        data = body["data"]
        if not data:
            break
        events += len(data)
        assert data[0]["sequence"] > last, "the feed went backwards"
        last = data[-1]["sequence"]
        after = body["next_after_sequence"]
    seconds = time.perf_counter() - t0
    return {
        "limit": limit,
        "events": events,
        "requests": requests,
        "seconds": round(seconds, 3),
        "events_per_second": round(events / seconds, 1),
        "last_sequence": last,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.benchmarks._webdata import build

    tmp = tempfile.TemporaryDirectory(prefix="bench-web-")
    db = Path(args.db) if args.db else Path(tmp.name) / "web.db"
    meta_path = db.with_suffix(".meta.json")
    if db.exists() and meta_path.exists():
        _log(f"reusing {db}")
        data = json.loads(meta_path.read_text())
    else:
        _log(f"writing {args.events} events for {args.customers} customers to {db} ...")
        t0 = time.perf_counter()
        data = build(db, events=args.events, customers=args.customers)
        data["build_seconds"] = round(time.perf_counter() - t0, 1)
        meta_path.write_text(json.dumps(data))
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.bench_web", "--serve", str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with _client(port) as client:
            fragment = data["name_fragment"]
            pages = {
                "first_page": "/",
                "type_filter": "/?type=customer.archived",
                "type_filter_rare": "/?type=customer.deleted",
                "type_filter_glob": "/?type=customer.*",
                "customer_filter_id": f"/?customer={data['hot_customer']}",
                "customer_filter_id_few_events": f"/?customer={data['cold_customer']}",
                "customer_filter_name_part": f"/?customer={fragment}",
                "customer_filter_common_word": "/?customer=acme",
                "time_range_one_day": "/?since=2026-01-03&until=2026-01-04",
                "deep_page": f"/?before={data['events'] // 2}",
                "customer_page": f"/customers/{data['hot_customer']}",
                "status": "/status",
            }
            results = {}
            for name, path in pages.items():
                results[name] = _time(client, path, args.repeat)
                _log(f"{name}: {results[name]['median_ms']} ms")
            feed = _feed(client, 1000)
            _log(f"feed: {feed['events_per_second']} events/s")
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)
        tmp.cleanup()
    required = ("first_page", "type_filter", "customer_filter_id")
    return {
        "data": data,
        "repeat": args.repeat,
        "pages": results,
        "feed": feed,
        "targets": {
            **{
                f"{name}_under_{PAGE_TARGET_MS:g}ms": results[name]["median_ms"] < PAGE_TARGET_MS
                for name in required
            },
            "feed_at_least_20000_events_per_s": feed["events_per_second"] >= FEED_TARGET_EVENTS_PER_S,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--customers", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--db", help="database to write (and reuse on the next run)")
    p.add_argument("--out", help="also write the report here")
    p.add_argument("--serve", metavar="DB", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(Path(args.serve))
        return 0
    report = run(args)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
