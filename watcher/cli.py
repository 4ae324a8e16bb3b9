"""The ``metronome-watcher`` command line.

Exit codes: 0 success, 1 a run that failed (API down, poll refused, the database failing), 2 bad
usage or bad config (another program's database at ``[store] path`` included). Configuration and
database errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import io
import signal
import sys
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import orjson

from ._gc import frozen_heap
from ._logging import configure_logging
from ._time import format_ts, parse_ts, utcnow
from .app import build_app
from .config import (
    Config,
    expand_env,
    load_config,
    parse_postgres_url,
    parse_when,
    resolve_token,
)
from .daemon import Daemon
from .delivery import ReplaySelection, enable_sink, replay
from .demo import run_demo
from .errors import ConfigError, PollRefused, StoreError, StoreErrorKind
from .events import PollOutcome, Source, change_line, customer_name, plain_value, plan_headline
from .notices import failure_streak
from .poll import PollResult
from .store import SinkStatus, Store
from .store.backup import backup
from .store.check import check_store
from .store.lease import LeaseKeeper
from .store.prune import prune
from .store.transfer import copy_store

__all__ = ["main"]

PROG = "metronome-watcher"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    # --config is accepted before or after the command; SUPPRESS keeps the subcommand's copy from
    # overwriting a value given before it.
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="TOML config file (default: $WATCHER_CONFIG)",
    )
    p = _Parser(prog=PROG, description="Watch Metronome customers and emit an event for every change.")
    p.add_argument(
        "--config", "-c", metavar="PATH", default=None, help="TOML config file (default: $WATCHER_CONFIG)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("run", parents=[common], help="run the daemon: poll on a schedule and deliver events")
    s = sub.add_parser("poll", parents=[common], help="one poll cycle, then deliver what is due, then exit")
    s.add_argument("--no-deliver", action="store_true", help="record events but do not deliver them now")

    s = sub.add_parser("events", parents=[common], help="query the audit log")
    s.add_argument("--customer", metavar="ID", help="only this customer")
    s.add_argument(
        "--type",
        action="append",
        default=[],
        metavar="TYPE",
        help="only this event type (repeatable), e.g. customer.archived",
    )
    s.add_argument(
        "--since", metavar="WHEN", help="detected at or after: RFC 3339 time, or an age such as 24h"
    )
    s.add_argument("--until", metavar="WHEN", help="detected before: RFC 3339 time, or an age such as 1h")
    s.add_argument("--after-sequence", type=int, metavar="N", help="only events with a sequence above N")
    s.add_argument("--limit", type=int, metavar="N", help="at most N events")
    s.add_argument("--format", choices=("table", "jsonl", "csv"), default="table")

    s = sub.add_parser(
        "demo",
        parents=[common],
        help="run the whole watcher against the built-in simulated Metronome (no token needed)",
    )
    s.add_argument(
        "--for", dest="seconds", type=float, metavar="SECONDS", help="stop by itself after SECONDS"
    )
    s.add_argument("--customers", type=int, default=300, metavar="N", help="customers in the simulation")
    s.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="poll interval")
    s.add_argument("--db", metavar="PATH", help="database file (default: a temporary one)")
    s.add_argument("--seed", type=int, help="random seed for a repeatable demo")
    s.add_argument(
        "--web-port",
        type=int,
        default=0,
        metavar="PORT",
        help="serve the web view on this local port (default: one the OS chooses; the address is printed)",
    )

    sub.add_parser("check-config", parents=[common], help="validate the config file and exit")

    s = sub.add_parser("deliveries", parents=[common], help="per sink: pending, delivered, dead, last error")
    s.add_argument("--format", choices=("table", "json"), default="table")

    s = sub.add_parser("replay", parents=[common], help="re-queue dead or chosen events for a sink")
    s.add_argument(
        "--sink", required=True, help="the sink's name, or one delivery target's (an apprise sink's URL)"
    )
    s.add_argument("--id", action="append", default=[], metavar="EVENT_ID", help="an event id (repeatable)")
    s.add_argument("--from-sequence", type=int, metavar="N")
    s.add_argument("--to-sequence", type=int, metavar="N")
    s.add_argument("--since", metavar="WHEN")
    s.add_argument("--until", metavar="WHEN")
    s.add_argument(
        "--dead", action="store_true", help="only rows that are dead (the default with no selector)"
    )

    s = sub.add_parser("enable-sink", parents=[common], help="switch a sink disabled by its receiver back on")
    s.add_argument("sink")

    sub.add_parser("status", parents=[common], help="last polls, backlog per sink and the last error")

    s = sub.add_parser("store", help="manage the database")
    store_sub = s.add_subparsers(
        dest="store_command", required=True, metavar="STORE_COMMAND", parser_class=_Parser
    )
    m = store_sub.add_parser(
        "migrate",
        parents=[common],
        help="copy the SQLite store ([store] path) into an empty PostgreSQL database, and verify it",
    )
    m.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="postgresql://user@host:5432/db (a password in ${VAR}, or from PGPASSWORD)",
    )
    m = store_sub.add_parser(
        "prune",
        parents=[common],
        help="delete delivered outbox rows, poll runs and events older than [store] keep_* says",
    )
    m.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    m = store_sub.add_parser(
        "backup", parents=[common], help="a consistent copy of the SQLite store, while the daemon runs"
    )
    m.add_argument("file", metavar="FILE", type=Path, help="where the copy goes")
    m.add_argument("--force", action="store_true", help="replace FILE if it exists")
    store_sub.add_parser(
        "check", parents=[common], help="integrity_check and the store's own invariants (exit 1 on a failure)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(_COMMANDS[args.command](args))
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"{PROG}: {exc.reason}", file=sys.stderr)
        return 2 if exc.kind is StoreErrorKind.FOREIGN else 1
    except KeyboardInterrupt:
        return 130


def _config(args: argparse.Namespace) -> Config:
    """The config, with logging set up as it says (to stderr: stdout is the command's output)."""
    config = load_config(args.config)
    configure_logging(config.logging.level, config.logging.format)
    return config


def _when(value: str | None, *, now: datetime, key: str) -> str | None:
    if value is None:
        return None
    try:
        return format_ts(parse_when(value, now=now))
    except ValueError as exc:
        raise ConfigError(f"--{key}: {exc}") from None


def _open_store(config: Config) -> Store:
    if not config.store.postgres and not Path(config.store.path).exists():
        raise StoreError(f"no database at {config.store.path} (run 'poll' or 'run' first)")
    return Store(config.store.target)


# -- commands ----------------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    names = (
        ", ".join(
            f"{s.name} ({s.type}" + (f": {', '.join(s.targets)})" if s.targets != (s.name,) else ")")
            for s in config.sinks
        )
        or "none"
    )
    sched = config.schedule
    when = f"cron {sched.cron!r}" if sched.cron else f"every {sched.interval.total_seconds():g}s"
    plans = ""
    if config.plans.watch:
        ids = config.plans.plan_ids
        plans = f"; plans: {len(ids)} plan(s)" if ids else "; plans: every plan GET /v1/plans lists"
    store = config.store.describe()
    print(f"config OK: polls {config.metronome.base_url} {when}; store {store}{plans}; sinks: {names}")
    try:
        resolve_token()
    except ConfigError as exc:
        print(f"warning: {exc}", file=sys.stderr)
    return 0


def cmd_poll(args: argparse.Namespace) -> int:
    config = _config(args)
    app = build_app(config, resolve_token())
    try:
        with frozen_heap(), ExitStack() as lease:
            leading = True
            if app.store.replicated:
                # Replicas on PostgreSQL: the poll and its deliveries under the leader lease, as a
                # leader's (when a replica holds it, the cycle is refused and recorded as such, and
                # the leader delivers).
                keeper = LeaseKeeper(app.store, ttl=config.ha.lease.total_seconds())
                try:
                    lease.enter_context(keeper.hold())
                except PollRefused:
                    leading = False
            result = app.poller.run()
            if not args.no_deliver and leading:
                app.deliverer.deliver_due()
    finally:
        app.close()
    if result.plans is not None:
        return _print_poll_of_both(result)
    if result.ok:
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(result.events_by_type.items())) or "no changes"
        label = "baseline recorded" if result.baseline else kinds
        print(
            f"poll {result.poll_id} ok: {result.active} active, {result.archived} archived, "
            f"{result.pages} pages; {label}"
        )
        return 0
    print(_poll_failure(result), file=sys.stderr)
    return 1


def _poll_failure(result: PollResult) -> str:
    """``poll 12 failed: ...``; ``poll failed: ...`` when the database could not even record the poll
    run, and saying so when it could not record the failure."""
    label = f"poll {result.poll_id}" if result.poll_id else "poll"
    unrecorded = "" if result.recorded else " (the database could not record it)"
    return f"{label} {result.outcome}: {result.error}{unrecorded}"


def _print_poll_of_both(result: PollResult) -> int:
    """A poll of customers and plans: what each source committed, then (exit 1) which one failed."""
    plans = result.plans
    assert plans is not None

    def label(baseline: bool, by_type: dict[str, int]) -> str:
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(by_type.items()) if n) or "no changes"
        return "baseline recorded" if baseline else kinds

    parts = []
    if result.customers_ok:
        customer_events = {t: n - plans.events_by_type.get(t, 0) for t, n in result.events_by_type.items()}
        parts.append(
            f"{result.active} active, {result.archived} archived, {result.pages} pages; "
            f"{label(result.baseline, customer_events)}"
        )
    if plans.ok:
        parts.append(
            f"plans: {plans.memberships} memberships on {plans.plans} plans, {plans.pages} pages; "
            f"{label(plans.baseline, dict(plans.events_by_type))}"
        )
    if result.ok:
        print(f"poll {result.poll_id} ok: {'; '.join(parts)}")
        return 0
    if parts:
        which = Source.CUSTOMERS if result.customers_ok else Source.PLANS
        print(f"poll {result.poll_id} {which} ok: {'; '.join(parts)}")
    print(_poll_failure(result), file=sys.stderr)
    return 1


def cmd_run(args: argparse.Namespace) -> int:
    config = _config(args)
    app = build_app(config, resolve_token())
    stop = threading.Event()
    _stop_on_signals(stop)
    with frozen_heap():
        Daemon(app).run_until(stop)
    return 0


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_demo(args: argparse.Namespace) -> int:
    configure_logging("warning", "console")
    stop = threading.Event()
    _stop_on_signals(stop)
    with frozen_heap():
        return run_demo(
            seconds=args.seconds,
            customers=args.customers,
            interval=args.interval,
            db=Path(args.db) if args.db else None,
            seed=args.seed,
            stop=stop,
            web_port=args.web_port,
        )


_EVENT_COLUMNS = ("sequence", "detected_at", "type", "customer_id", "name", "changes")


def _summary(event: dict[str, Any]) -> str:
    """The changes column: each change as ``field: before -> after``; a plan event says what it
    means first (``plan Growth ends on 2026-12-31``)."""
    lines = [change_line(c, value=_short) for c in event.get("changes") or []]
    headline = plan_headline(event)
    return "; ".join([headline, *lines] if headline else lines)


def _short(value: Any) -> str:
    text = plain_value(value)
    return text if len(text) <= 40 else text[:37] + "..."


def cmd_events(args: argparse.Namespace) -> int:
    config = _config(args)
    now = utcnow()
    since = _when(args.since, now=now, key="since")
    until = _when(args.until, now=now, key="until")
    with _open_store(config) as store:
        events = store.query_events(
            customer_id=args.customer,
            types=args.type,
            since=since,
            until=until,
            after_sequence=args.after_sequence,
            limit=args.limit,
        )
    out = sys.stdout
    if args.format == "jsonl":
        for e in events:
            out.write(orjson.dumps(e).decode() + "\n")
    elif args.format == "csv":
        w = csv.writer(out)
        w.writerow(["sequence", "id", "type", "detected_at", "poll_id", "customer_id", "name", "changes"])
        for e in events:
            w.writerow(
                [
                    e["sequence"],
                    e["id"],
                    e["type"],
                    e["detected_at"],
                    e["poll_id"],
                    e["customer_id"],
                    customer_name(e),
                    orjson.dumps(e["changes"]).decode(),
                ]
            )
    else:
        rows = [
            [
                str(e["sequence"]),
                e["detected_at"][:19] + "Z",
                e["type"],
                e["customer_id"] or "",
                customer_name(e),
                _summary(e),
            ]
            for e in events
        ]
        out.write(_table(_EVENT_COLUMNS, rows))
        if not rows:
            out.write("(no events)\n")
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in header]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    buf = io.StringIO()
    for r in [list(header), *rows]:
        buf.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
    return buf.getvalue()


def cmd_deliveries(args: argparse.Namespace) -> int:
    config = _config(args)
    with _open_store(config) as store:
        statuses = store.delivery_status(utcnow(), sinks=config.targets)
    if args.format == "json":
        sys.stdout.write(
            orjson.dumps([s.__dict__ for s in statuses], option=orjson.OPT_INDENT_2).decode() + "\n"
        )
        return 0
    sys.stdout.write(_deliveries_table(statuses))
    return 0


def _deliveries_table(statuses: Sequence[SinkStatus], *, error_width: int | None = None) -> str:
    rows = [
        [
            s.sink,
            str(s.pending),
            str(s.delivered),
            str(s.dead),
            "-" if s.oldest_pending_age is None else f"{s.oldest_pending_age:.0f}s",
            "disabled" if s.disabled else ("backing off" if s.next_attempt_at else "ok"),
            (s.last_error or "")[:error_width],
        ]
        for s in statuses
    ]
    return _table(("sink", "pending", "delivered", "dead", "oldest", "state", "last error"), rows)


def cmd_replay(args: argparse.Namespace) -> int:
    config = _config(args)
    # A sink with several delivery targets (an apprise sink's URLs) stands for all of them.
    targets = config.targets_of(args.sink)
    if not targets:
        raise ConfigError(f"--sink: no sink named {args.sink!r} in the config")
    now = utcnow()
    selection = ReplaySelection(
        event_ids=args.id,
        sequence_from=args.from_sequence,
        sequence_to=args.to_sequence,
        since=_when(args.since, now=now, key="since"),
        until=_when(args.until, now=now, key="until"),
        dead_only=args.dead,
    )
    with _open_store(config) as store:
        counts = {target: replay(store, target, now=now, selection=selection) for target in targets}
    for target, n in counts.items():
        print(f"re-queued {n} event(s) for {target}; they go out on the next delivery")
    return 0


def cmd_enable_sink(args: argparse.Namespace) -> int:
    config = _config(args)
    with _open_store(config) as store:
        changed = {
            target: enable_sink(store, target) for target in config.targets_of(args.sink) or [args.sink]
        }
    for target, done in changed.items():
        print(f"{target}: {'enabled' if done else 'was not disabled'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Polling health, the last polls, the backlog per sink and the last error, on one screen.

    Read-only (WAL lets it read while ``run`` writes), and it derives everything from the database,
    so it tells the same story as ``/readyz`` and the failing/recovered notices.
    """

    def ago(seconds: float) -> str:
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds >= size:
                return f"{seconds / size:.1f}{unit} ago"
        return f"{seconds:.0f}s ago"

    config = _config(args)
    now = utcnow()
    with _open_store(config) as store:
        polls = store.last_polls(10)
        last_ok = store.last_successful_poll()
        streak = failure_streak(store)
        counts = store.customer_counts()
        plans, memberships, ended = store.plan_counts()
        deliveries = store.delivery_status(now, sinks=config.targets)
    out = sys.stdout

    if last_ok is None:
        polling = "no successful poll yet"
    else:
        age = (now - parse_ts(last_ok.finished_at or last_ok.started_at)).total_seconds()
        max_age = config.ready_max_age(now=now).total_seconds()
        polling = f"last successful poll #{last_ok.id} finished {ago(age)}"
        if age > max_age:
            polling += f" -- STALE (more than {max_age:.0f}s: /readyz fails)"
    if streak.failures:
        polling += (
            f"; FAILING: {streak.failures} consecutive failed poll(s) since {(streak.since or '')[:19]}Z"
        )
        if streak.failed_sources:
            polling += f" (failing: {', '.join(streak.failed_sources)})"
        if streak.failing_notice_outstanding:
            polling += " (watcher.poll_failing sent)"
    tracked = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none yet"
    out.write(f"polling: {polling}\ncustomers tracked: {tracked}\n")
    if config.plans.watch or plans or memberships:
        out.write(f"plans watched: {plans} plans, {memberships} memberships ({ended} ended)\n")
    out.write("\nlast polls:\n")
    if not polls:
        out.write("(no polls yet)\n")
    else:
        out.write(
            _table(
                ("poll", "started", "outcome", "secs", "pages", "active", "archived", "events", "error"),
                [
                    [
                        str(p.id),
                        p.started_at[:19] + "Z",
                        p.outcome + (" (baseline)" if p.baseline else ""),
                        f"{(parse_ts(p.finished_at) - parse_ts(p.started_at)).total_seconds():.1f}"
                        if p.finished_at
                        else "-",
                        str(p.pages),
                        str(p.active),
                        str(p.archived),
                        str(p.events),
                        (p.error or "")[:60],
                    ]
                    for p in polls
                ],
            )
        )
    out.write("\nsinks:\n")
    if not deliveries:
        out.write("(no sinks configured)\n")
    else:
        out.write(_deliveries_table(deliveries, error_width=80))
    # The table truncates errors; the most recent one is worth reading in full.
    failed = next(
        (p for p in polls if p.outcome in (PollOutcome.FAILED, PollOutcome.REFUSED) and p.error), None
    )
    if failed is not None:
        when = f"#{failed.id}, {failed.started_at[:19]}Z, {failed.outcome}"
        out.write(f"\nlast poll error ({when}):\n  {failed.error}\n")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    """``store migrate|prune|backup|check``."""
    return int(_STORE_COMMANDS[args.store_command](args))


def cmd_store_migrate(args: argparse.Namespace) -> int:
    """``store migrate --to URL``: the SQLite store of the config copied into PostgreSQL."""
    config = _config(args)
    if config.store.postgres:
        raise ConfigError(
            "store.url: this config's store is PostgreSQL already; store migrate copies a SQLite "
            "store (store.path) into PostgreSQL"
        )
    try:
        target_url = str(expand_env(args.to, "--to"))
        parse_postgres_url(target_url)
    except ValueError as exc:
        raise ConfigError(f"--to: {exc}") from None
    source = _open_store(config)
    try:
        target = Store(target_url)
        try:
            report = copy_store(source, target)
        finally:
            target.close()
    finally:
        source.close()
    rows = ", ".join(f"{n} {table}" for table, n in report.rows.items())
    print(
        f"copied {source.description} into {target.description}: {rows}; last sequence "
        f"{report.last_sequence}; counts and last sequence verified.\n"
        f"Now set [store] url (and remove path) in the config, and start the watcher on it."
    )
    return 0


def cmd_store_prune(args: argparse.Namespace) -> int:
    """``store prune [--dry-run]``: what the ``[store] keep_*`` windows let go, in short batches."""
    config = _config(args)
    keep = config.store
    with _open_store(config) as store:
        report = prune(store, keep, now=utcnow(), dry_run=args.dry_run)

    def age(d: timedelta) -> str:
        seconds = d.total_seconds()
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds >= size and seconds % size == 0:
                return f"{seconds / size:g}{unit}"
        return f"{seconds:g}s"

    verb = "would delete" if report.dry_run else "deleted"
    kept = (
        "the audit log is kept (keep_events unset)"
        if keep.keep_events is None
        else (f"{report.events} event(s) older than {age(keep.keep_events)}")
    )
    print(
        f"{verb}: {report.deliveries} delivered outbox row(s) older than {age(keep.keep_deliveries)}; "
        f"{report.polls} poll run(s) older than {age(keep.keep_polls)} (and {report.poll_sources} "
        f"source row(s)); {kept}"
    )
    return 0


def cmd_store_backup(args: argparse.Namespace) -> int:
    """``store backup FILE [--force]``: a checked copy of the SQLite store, made while it runs."""
    config = _config(args)
    if config.store.postgres:
        raise ConfigError(
            "store.url: store backup copies a SQLite store; back up PostgreSQL with pg_dump "
            "(docs/operations.md)"
        )
    with _open_store(config) as store:
        try:
            report = backup(store, args.file, force=args.force)
        except FileExistsError:
            print(f"{PROG}: {args.file} exists; --force replaces it", file=sys.stderr)
            return 2
    print(
        f"backed up {store.description} to {report.path}: {report.bytes} bytes, schema version "
        f"{report.schema_version}, last sequence {report.last_sequence}; integrity_check ok "
        f"({report.seconds:.1f}s)"
    )
    return 0


def cmd_store_check(args: argparse.Namespace) -> int:
    """``store check``: each check with ok or FAILED; exit 1 when any failed."""
    config = _config(args)
    with _open_store(config) as store:
        findings = check_store(store)
    for f in findings:
        print(f"{'ok' if f.ok else 'FAILED':<7}{f.name}" + (f": {f.detail}" if f.detail else ""))
    failed = [f for f in findings if not f.ok]
    print(f"store check: {len(findings)} checks, " + (f"{len(failed)} FAILED" if failed else "all ok"))
    return 1 if failed else 0


_STORE_COMMANDS = {
    "migrate": cmd_store_migrate,
    "prune": cmd_store_prune,
    "backup": cmd_store_backup,
    "check": cmd_store_check,
}


_COMMANDS = {
    "run": cmd_run,
    "poll": cmd_poll,
    "events": cmd_events,
    "demo": cmd_demo,
    "check-config": cmd_check_config,
    "deliveries": cmd_deliveries,
    "replay": cmd_replay,
    "enable-sink": cmd_enable_sink,
    "status": cmd_status,
    "store": cmd_store,
}
