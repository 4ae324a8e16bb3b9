"""Leadership of replicated ``run`` processes on one PostgreSQL database: a lease in a table.

Any number of replicas may run on one database; the one that holds the lease (``Lease``, the row
named ``leader``) polls and delivers, the others stand by and try to take it. The row carries the
holder, an *epoch* that grows by one at every acquisition, and an expiry on the database's clock
(so that replicas' clocks never matter). The holder renews it every third of its length; a holder
that cannot renew in time is no longer the leader, and any replica may take an expired lease.

Why a row and not an advisory lock: a session's advisory lock dies silently when the session's
server connection is swapped behind a transaction-mode pooler (PgBouncer), and it carries no
epoch, so a paused leader would not know that it was replaced. The lease needs nothing of the
session: every statement is a transaction of its own.

**The fence.** Every commit of a leader (a cycle's, a delivery mark's, a notice's) runs
:func:`check` in its own transaction, just before it commits: the lease row is read ``FOR SHARE``
and must still name this holder, at the epoch the transaction began with, unexpired. Taking the
lease over is an ``UPDATE`` of that row, so it waits for such a commit to end; either the commit
lands before the take-over (and the new leader sees it), or the check fails and nothing of the
old leader's transaction lands (:class:`~watcher.errors.NotLeader`). A leader that was paused or
cut off therefore commits nothing once another replica has the lease, however late it wakes.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import structlog
from sqlalchemy import Connection, Engine, text

from .. import metrics
from ..errors import NotLeader, PollRefused, StoreError

__all__ = [
    "LEADER",
    "Fence",
    "Fenced",
    "LeaseKeeper",
    "LeaseState",
    "acquire",
    "check",
    "current",
    "default_holder",
    "release",
    "renew",
]

log = structlog.get_logger("watcher.ha")

#: The one lease a store has: who polls and delivers.
LEADER = "leader"

_ACQUIRE = text(
    "INSERT INTO leases AS l (name, holder, epoch, acquired_at, renewed_at, expires_at) "
    "VALUES (:name, :holder, 1, clock_timestamp(), clock_timestamp(), "
    "        clock_timestamp() + make_interval(secs => :ttl)) "
    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, epoch = l.epoch + 1, "
    "    acquired_at = excluded.acquired_at, renewed_at = excluded.renewed_at, "
    "    expires_at = excluded.expires_at "
    "WHERE l.expires_at <= clock_timestamp() "
    "RETURNING epoch"
)
_RENEW = text(
    "UPDATE leases SET renewed_at = clock_timestamp(), "
    "    expires_at = clock_timestamp() + make_interval(secs => :ttl) "
    "WHERE name = :name AND holder = :holder AND epoch = :epoch AND expires_at > clock_timestamp() "
    "RETURNING epoch"
)
_RELEASE = text(
    "UPDATE leases SET expires_at = clock_timestamp() "
    "WHERE name = :name AND holder = :holder AND epoch = :epoch AND expires_at > clock_timestamp()"
)
_CURRENT = text(
    "SELECT holder, epoch, expires_at, expires_at > clock_timestamp() FROM leases WHERE name = :name"
)
_CHECK = _CURRENT.text + " FOR SHARE"


@dataclass(frozen=True)
class Fence:
    """What a store's writes must prove at commit: ``holder`` holds the lease at ``epoch``.

    ``epoch=None`` is a replica that does not hold it: its writes are refused before they begin.
    """

    holder: str
    epoch: int | None


class Fenced(Protocol):
    """What a keeper needs of a store (``watcher.store.Store``): its engine and its fence."""

    engine: Engine
    fence: Fence | None


@dataclass(frozen=True)
class LeaseState:
    holder: str
    epoch: int
    expires_at: datetime
    #: Not expired, by the database's clock.
    valid: bool


def default_holder() -> str:
    """This process's name in the lease: host, pid and a random tag (a pid is reused)."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


# -- the statements (each in the caller's transaction) ---------------------------------------------


def acquire(conn: Connection, holder: str, ttl: float, *, name: str = LEADER) -> int | None:
    """Take the lease if it is free or expired; the new epoch, or None when someone holds it."""
    epoch = conn.execute(_ACQUIRE, {"name": name, "holder": holder, "ttl": ttl}).scalar()
    return None if epoch is None else int(epoch)


def renew(conn: Connection, holder: str, epoch: int, ttl: float, *, name: str = LEADER) -> bool:
    """Extend the lease by ``ttl`` from now; False when it is no longer ours (expired, or taken)."""
    params = {"name": name, "holder": holder, "epoch": epoch, "ttl": ttl}
    return conn.execute(_RENEW, params).first() is not None


def release(conn: Connection, holder: str, epoch: int, *, name: str = LEADER) -> bool:
    """Let the lease expire now, so that a standby takes it without waiting (a clean shutdown)."""
    params = {"name": name, "holder": holder, "epoch": epoch}
    return bool(conn.execute(_RELEASE, params).rowcount)


def current(conn: Connection, *, name: str = LEADER) -> LeaseState | None:
    row = conn.execute(_CURRENT, {"name": name}).first()
    return None if row is None else LeaseState(str(row[0]), int(row[1]), row[2], bool(row[3]))


def check(conn: Connection, fence: Fence, *, name: str = LEADER) -> None:
    """The fence (see the module): raise :class:`NotLeader` unless ``fence`` still holds the lease.

    The row stays locked ``FOR SHARE`` until the caller's transaction ends, so that nobody takes
    the lease over between this check and the commit.
    """
    if fence.epoch is None:
        raise NotLeader("this replica does not hold the leader lease")
    row = conn.execute(text(_CHECK), {"name": name}).first()
    if row is None or row[0] != fence.holder or int(row[1]) != fence.epoch or not row[3]:
        now = "nobody" if row is None else f"{row[0]} at epoch {row[1]}{'' if row[3] else ' (expired)'}"
        raise NotLeader(
            f"the leader lease of epoch {fence.epoch} is lost (it is now {now}): nothing committed"
        )


# -- the keeper: campaigning and renewing on a thread ------------------------------------------------


class LeaseKeeper:
    """Holds (or campaigns for) the leader lease of ``store``, and fences the store's writes.

    :meth:`start` runs a daemon thread that, every ``ttl / 3``, renews the lease while this process
    holds it and tries to take it while it does not. :meth:`hold` takes it once for the length of a
    ``with`` block (the ``poll`` command) or refuses. While it holds the lease, ``store.fence`` names
    this holder and the epoch; otherwise ``store.fence`` refuses every write.
    """

    def __init__(
        self,
        store: Fenced,
        *,
        ttl: float,
        holder: str | None = None,
        on_acquired: Callable[[int], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.holder = holder or default_holder()
        self.on_acquired = on_acquired
        self.on_lost = on_lost
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._epoch: int | None = None
        #: monotonic time by which the lease must be renewed, as far as this process can tell.
        self._deadline = 0.0
        #: The holder last seen in the table (for ``/readyz`` on a standby), and its epoch.
        self.seen: LeaseState | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: What ``store.fence`` goes back to when this keeper stops (``hold``), or None.
        self._fence_after: Fence | None = Fence(self.holder, None)

    # -- state ------------------------------------------------------------------------------------

    @property
    def period(self) -> float:
        """How often the lease is renewed, or tried for: a third of its length."""
        return self.ttl / 3

    @property
    def epoch(self) -> int | None:
        return self._epoch

    @property
    def is_leader(self) -> bool:
        with self._lock:
            return self._epoch is not None and self._monotonic() < self._deadline

    @property
    def thread_alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    # -- one step of each kind --------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """One attempt to take the lease; True when this process holds it now."""
        started = self._monotonic()
        with self.store.engine.connect() as conn, conn.begin():
            epoch = acquire(conn, self.holder, self.ttl)
            seen = current(conn)
        self.seen = seen
        if epoch is None:
            return False
        with self._lock:
            previous, self._epoch = self._epoch, epoch
            self._deadline = started + self.ttl
            self.store.fence = Fence(self.holder, epoch)
        metrics.LEADER.set(1)
        metrics.LEASE_ACQUIRED.inc()
        log.info(
            "ha.lease_acquired", holder=self.holder, epoch=epoch, ttl_s=self.ttl, previous_epoch=previous
        )
        if self.on_acquired is not None:
            self.on_acquired(epoch)
        return True

    def renew_once(self) -> bool:
        """Renew the lease held; on failure to prove it still ours in time, step down. True if held."""
        epoch = self._epoch
        if epoch is None:
            return False
        started = self._monotonic()
        try:
            with self.store.engine.connect() as conn, conn.begin():
                ok = renew(conn, self.holder, epoch, self.ttl)
                if not ok:
                    self.seen = current(conn)
        except StoreError as exc:  # the store's engine translates every database error
            metrics.LEASE_RENEW_FAILURES.inc()
            error = str(exc)
            left = self._deadline - self._monotonic()
            log.warning(
                "ha.lease_renew_failed", holder=self.holder, epoch=epoch, error=error, left_s=round(left, 1)
            )
            if left <= self.period / 2:  # it will be gone before the next try: give up now
                self._step_down(f"could not renew the lease in time: {error}")
                return False
            return True
        if not ok:
            metrics.LEASE_RENEW_FAILURES.inc()
            seen = self.seen
            now = "nobody" if seen is None else f"{seen.holder} at epoch {seen.epoch}"
            self._step_down(f"the lease expired or was taken over (it is now {now})")
            return False
        with self._lock:
            if self._epoch == epoch:
                self._deadline = started + self.ttl
        return True

    def release(self) -> None:
        """Give the lease up now (a clean shutdown), so that a standby need not wait for it to expire."""
        epoch = self._epoch
        if epoch is None:
            return
        self._set_not_leader()
        try:
            with self.store.engine.connect() as conn, conn.begin():
                release(conn, self.holder, epoch)
        except StoreError as exc:  # it expires by itself
            log.warning("ha.lease_release_failed", holder=self.holder, epoch=epoch, error=str(exc))
            return
        log.info("ha.lease_released", holder=self.holder, epoch=epoch)

    @contextmanager
    def hold(self) -> Iterator[int]:
        """Hold the lease for a ``with`` block (renewed on a thread meanwhile), or raise
        :class:`~watcher.errors.PollRefused` when another process holds it."""
        self._fence_after = self.store.fence
        if not self.try_acquire():
            seen = self.seen
            who = "" if seen is None else f" (held by {seen.holder} until {seen.expires_at:%H:%M:%S} UTC)"
            raise PollRefused(
                f"another poll is already running against this database: the leader lease is taken{who}"
            )
        assert self._epoch is not None
        self._start_thread()
        try:
            yield self._epoch
        finally:
            self.stop()

    # -- the thread -------------------------------------------------------------------------------

    def start(self) -> None:
        """Campaign and renew on a daemon thread until :meth:`stop` (the first try is at once)."""
        self.store.fence = self._fence_after = Fence(self.holder, None)
        metrics.LEADER.set(0)
        log.info("ha.standby", holder=self.holder, ttl_s=self.ttl)
        self._start_thread()

    def stop(self) -> None:
        """Stop the thread and release the lease if it is held."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.period + 5)
        self.release()
        self.store.fence = self._fence_after

    def _start_thread(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lease")
        self._thread.start()

    def _run(self) -> None:
        wait = 0.0 if self._epoch is None else self.period
        while not self._stop.wait(wait):
            wait = self.period
            try:
                if self._epoch is not None:
                    self.renew_once()
                else:
                    self.try_acquire()
            except StoreError as exc:
                log.warning("ha.lease_unreachable", holder=self.holder, error=str(exc))
            except Exception as exc:  # a bug in a callback must not end the campaign
                log.exception("ha.lease_error", holder=self.holder, error=repr(exc))

    def _set_not_leader(self) -> int | None:
        with self._lock:
            epoch, self._epoch = self._epoch, None
            self.store.fence = Fence(self.holder, None)  # refuse writes until it is ours again
        metrics.LEADER.set(0)
        return epoch

    def _step_down(self, reason: str) -> None:
        epoch = self._set_not_leader()
        metrics.LEASE_LOST.inc()
        log.error("ha.lease_lost", holder=self.holder, epoch=epoch, reason=reason)
        if self.on_lost is not None:
            self.on_lost(reason)
