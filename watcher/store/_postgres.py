"""PostgreSQL underneath the store: the engine for a ``[store] url``, through psycopg 3.

The driver is an extra (``pip install 'metronome-watcher[postgres]'``, the container image has it):
a SQLite installation does not pay for it, and a store URL without it fails at start-up with the
command that installs it.

Writers queue as SQLite's do: every writing transaction first takes a transaction-scoped advisory
lock of its schema (released by its commit or rollback, so a pooler that swaps server connections
between transactions cannot strand it). That keeps ``sequence`` numbers consecutive and strictly
increasing across writers exactly as ``BEGIN IMMEDIATE`` does on SQLite. It is not how leadership is
decided: that is the lease (:mod:`watcher.store.lease`).
"""

from __future__ import annotations

import importlib.util
import os

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import create_engine

from .._secrets import redact, register
from ..config import parse_postgres_url
from ..errors import StoreError, StoreErrorKind
from ._cycle_postgres import PostgresCycleSession
from ._errors import Where, install
from ._plans_postgres import PostgresPlanSession
from .lease import Fence

__all__ = ["PostgresEngine", "describe_url"]

#: Every writer of one schema queues on this lock (see the module docstring).
_WRITE_LOCK = text("SELECT pg_advisory_xact_lock(hashtext('metronome-watcher.write.' || current_schema()))")
_INSTALL = "pip install 'metronome-watcher[postgres]'"


def describe_url(url: URL) -> str:
    """The URL as logs and messages show it: the password (if any) replaced by ``***``."""
    return url.set(drivername="postgresql").render_as_string(hide_password=True)


def _have_psycopg() -> bool:
    try:
        return importlib.util.find_spec("psycopg") is not None
    except (ImportError, ValueError):  # a module entry of None, or a broken install
        return False


class PostgresEngine:
    """The engine of one PostgreSQL database (or schema, through ``options=-csearch_path=...``)."""

    dialect = "postgresql"
    path = None

    def __init__(self, url: str) -> None:
        try:
            parsed = parse_postgres_url(url)
        except ValueError as exc:
            raise StoreError(f"store.url: {exc}") from None
        # Registered before anything could print them: the password, and libpq's PGPASSWORD.
        register(parsed.password if isinstance(parsed.password, str) else None)
        register(os.environ.get("PGPASSWORD"))
        self.url = parsed
        self.description = describe_url(parsed)
        self.where = Where(self.description)
        if not _have_psycopg():
            raise StoreError(
                f"the PostgreSQL store needs the psycopg driver, which is not installed: {_INSTALL}",
                kind=StoreErrorKind.UNAVAILABLE,
            )
        try:
            self.engine: Engine = create_engine(
                parsed.set(drivername="postgresql+psycopg"),
                pool_pre_ping=True,
                pool_size=5,
                max_overflow=20,
                connect_args={
                    "connect_timeout": 10,
                    "application_name": "metronome-watcher",
                    # A replica cut off from the database learns it within a minute, not hours.
                    "keepalives": 1,
                    "keepalives_idle": 15,
                    "keepalives_interval": 5,
                    "keepalives_count": 3,
                },
            )
        except (ImportError, SQLAlchemyError) as exc:
            raise StoreError(
                redact(f"cannot open database {self.description}: {exc}"), kind=StoreErrorKind.UNAVAILABLE
            ) from None
        install(self.engine, self.where)

    def begin_write(self, conn: Connection) -> None:
        conn.execute(_WRITE_LOCK)

    def session(self, fence: Fence | None) -> PostgresCycleSession:
        return PostgresCycleSession(self.engine, write_lock=_WRITE_LOCK, fence=fence)

    def plan_session(self, fence: Fence | None) -> PostgresPlanSession:
        return PostgresPlanSession(self.engine, write_lock=_WRITE_LOCK, fence=fence)

    def request_checkpoint(self) -> None:
        """PostgreSQL checkpoints by itself."""

    def wait_for_checkpoint(self, timeout: float | None) -> bool:
        return True

    def close(self) -> None:
        self.engine.dispose()
