"""Database errors in the watcher's own words, translated at the store's boundary.

Every error of ``sqlite3``, psycopg or SQLAlchemy that says something about the database rather
than about our code (the disk is full, the file is read-only, locked, damaged or not a database,
the server cannot be reached) becomes a :class:`~watcher.errors.StoreError`: one line that names
the database (its file, or its URL without the password) and says what happened, built from the
driver's own message (never SQLAlchemy's, which ends in a link), with a ``kind`` to act on. Any
other exception, a constraint or syntax error included, is a bug and stays what it is.

Where it applies: an SQLAlchemy ``handle_error`` event on each store's engine (every statement,
connect, commit and rollback, named after the store whose engine ran it); the store's context
managers (``Store.write``, ``read``, ``cycle``), which also catch what the sessions' raw
``sqlite3`` and psycopg calls raise in their bodies; and :func:`guarded`, the plans' session,
which outlives any one ``with`` block.

SQLite on a full disk fails as ``SQLITE_FULL``, or as a plain ``SQLITE_IOERR`` when not even its
shared-memory index or journal can grow: an I/O error with next to nothing free on the file's
filesystem is reported as the full disk it is.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .. import metrics
from .._secrets import redact
from ..errors import StoreError, StoreErrorKind

__all__ = ["NEARLY_FULL", "Where", "guarded", "install", "translate", "translating"]

Kind = StoreErrorKind
T = TypeVar("T")

#: Free bytes below which a filesystem counts as full (an I/O error there is the full disk).
NEARLY_FULL = 1 << 20

#: SQLite's primary result codes (the low byte of an extended code) that are about the database.
_FULL_OR_IO = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_NOLFS})
_READ_ONLY = frozenset({sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH})
_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_PROTOCOL})
_CORRUPT = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


@dataclass(frozen=True)
class Where:
    """The database an error happened in: how messages name it, and its file (SQLite)."""

    description: str
    path: Path | None = None


def translate(exc: BaseException, where: Where) -> StoreError | None:
    """``exc`` as a :class:`StoreError` about ``where``; None when it is not a database's error (a
    bug, to be raised as it is). A :class:`StoreError` is returned unchanged."""
    if isinstance(exc, StoreError):
        return exc
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    psycopg = sys.modules.get("psycopg")  # an extra: when it is not loaded, nothing raised it
    found: tuple[Kind, str] | None
    if isinstance(orig, sqlite3.Error):
        found = _sqlite(orig, where)
    elif psycopg is not None and isinstance(orig, psycopg.Error):
        found = _postgres(orig, psycopg, where)
    elif isinstance(exc, PoolTimeout):
        found = Kind.BUSY, f"every connection to {where.description} is in use, and none came free in time"
    else:
        found = None
    if found is None:
        return None
    kind, message = found
    metrics.STORE_ERRORS.labels(kind).inc()
    return StoreError(redact(message), kind=kind)


@contextmanager
def translating(where: Where) -> Iterator[None]:
    """Raise what the block raises, with database errors translated (see :func:`translate`)."""
    try:
        yield
    except Exception as exc:
        error = translate(exc, where)
        if error is None or error is exc:
            raise
        raise error from exc


def install(engine: Engine, where: Where) -> None:
    """Translate every error the engine's connections raise (SQLAlchemy's ``handle_error``)."""

    def on_error(context: ExceptionContext) -> BaseException | None:
        if context.is_pre_ping:  # the pool reconnects by itself
            return None
        return translate(context.original_exception, where)

    event.listen(engine, "handle_error", on_error)


def guarded(target: T, where: Where) -> T:
    """``target`` (a source's session) with the database errors of every method it has translated,
    and of every ``with`` block one of them opens (its transactions)."""
    return cast(T, _Guarded(target, where))


class _Guarded:
    def __init__(self, target: object, where: Where) -> None:
        self._target = target
        self._where = where

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not inspect.ismethod(attr):
            return attr
        return _guard_call(attr, self._where)


def _guard_call(method: Callable[..., Any], where: Where) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with translating(where):
            result = method(*args, **kwargs)
        if isinstance(result, AbstractContextManager):
            return _guard_block(result, where)
        return result

    return call


@contextmanager
def _guard_block(block: AbstractContextManager[Any], where: Where) -> Iterator[Any]:
    with translating(where), block as value:
        yield value


# -- the drivers' errors ----------------------------------------------------------------------------


def _sqlite(exc: sqlite3.Error, where: Where) -> tuple[Kind, str] | None:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # raised by the sqlite3 module itself (a closed connection): our bug
        return None
    primary = code & 0xFF
    name, said = where.description, str(exc)
    if primary in _FULL_OR_IO:
        free = _free_bytes(where.path)
        if primary == sqlite3.SQLITE_FULL or (free is not None and free < NEARLY_FULL):
            if free is None or free < NEARLY_FULL:
                return Kind.DISK_FULL, f"disk full writing {name} ({_free(free)})"
            # A full temporary directory, or a page limit, with room left on the file's disk.
            return Kind.DISK_FULL, (
                f"{said} writing {name} ({_free(free)} on its filesystem: the temporary directory, "
                "or the database's page limit, is full)"
            )
        return Kind.IO, f"I/O error on {name} ({_free(free)}): {said} ({exc.sqlite_errorname})"
    if primary in _READ_ONLY or (primary == sqlite3.SQLITE_CANTOPEN and _read_only(where.path)):
        return Kind.READ_ONLY, (
            f"cannot write {name}: {said} (the file, its directory or its filesystem is read-only "
            "to this process)"
        )
    if primary in _BUSY:
        return Kind.BUSY, f"{name} is locked by another connection for too long: {said}"
    if primary in _CORRUPT:
        return Kind.CORRUPT, f"{name} is damaged or is not a SQLite database: {said}"
    if primary == sqlite3.SQLITE_CANTOPEN:
        return (
            Kind.UNAVAILABLE,
            f"cannot open {name}: {said} (does its directory exist, and may we write to it?)",
        )
    if primary == sqlite3.SQLITE_NOMEM:
        return Kind.OTHER, f"out of memory using {name}: {said}"
    return None


def _postgres(exc: Exception, psycopg: Any, where: Where) -> tuple[Kind, str] | None:
    state: str | None = getattr(exc, "sqlstate", None)
    name, said = where.description, " ".join(str(exc).split())
    if state is None:
        if isinstance(exc, psycopg.OperationalError):
            return Kind.UNAVAILABLE, f"cannot connect to {name}: {said}"
        if isinstance(exc, psycopg.InterfaceError):
            return Kind.UNAVAILABLE, f"lost the connection to {name}: {said}"
        return None
    group = state[:2]
    if state == "53100":
        return Kind.DISK_FULL, f"disk full on the server of {name}: {said}"
    if group in ("08", "28", "3D") or state in ("57P01", "57P02", "57P03"):
        return Kind.UNAVAILABLE, f"cannot reach {name}: {said}"
    if group == "53":
        return Kind.UNAVAILABLE, f"the server of {name} is out of resources: {said}"
    if state == "25006":
        return Kind.READ_ONLY, f"cannot write {name}: {said} (a read-only server, or a standby)"
    if state == "42501":
        return Kind.READ_ONLY, f"cannot write {name}: {said} (the user lacks the privilege)"
    if state in ("40001", "40P01", "55P03", "57014"):
        return Kind.BUSY, f"{name} is busy: {said}"
    if group == "58":
        return Kind.IO, f"I/O error on the server of {name}: {said}"
    if state in ("XX001", "XX002"):
        return Kind.CORRUPT, f"{name} is damaged: {said}"
    if isinstance(exc, psycopg.OperationalError):
        return Kind.OTHER, f"{name}: {said}"
    return None


def _free_bytes(path: Path | None) -> int | None:
    """Free bytes on the filesystem of ``path``'s directory; None when unknown."""
    if path is None:
        return None
    try:
        return shutil.disk_usage(path.parent).free
    except OSError:
        return None


def _read_only(path: Path | None) -> bool:
    """The file exists, but it or its directory cannot be written (a WAL database needs both)."""
    if path is None or not path.exists():
        return False
    return not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))


def _free(n: int | None) -> str:
    """``2.1 MB free``, ``16.4 kB free``, ``0 bytes free``, or ``free space unknown``."""
    if n is None:
        return "free space unknown"
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} free"
    return f"{n} bytes free"
