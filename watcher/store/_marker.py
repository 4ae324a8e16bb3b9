"""Which databases are the watcher's: the marker it leaves in its own, and the refusal of any other.

A store is marked when it is created, or when a store of an earlier release (one without the
marker) is first opened: a row in ``meta`` (``application = metronome-watcher``) on both engines,
and on SQLite also the file header's ``application_id``, which :func:`check_file` reads without
opening the file as a database.

A database is used when it is marked, empty (no tables: it is created and marked), or an earlier
release's store (``meta`` with a schema version, and the tables every release has had). Anything
else, another program's tables without the marker, is refused before a byte is written to it
(:class:`~watcher.errors.StoreError` of kind ``foreign``). On SQLite that check must come before
the engine's first connection, which switches the file to WAL (:mod:`watcher.store._sqlite`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Connection, insert, inspect, select
from sqlmodel import col

from ..errors import StoreError, StoreErrorKind
from ._errors import Where, translating
from .schema import Meta

__all__ = ["APPLICATION_ID", "Facts", "Ownership", "check_file", "facts_of", "judge", "mark", "refusal"]

#: SQLite's ``application_id`` of a watcher's database: "MWat".
APPLICATION_ID = 0x4D576174
#: The marker row in ``meta``.
MARKER_KEY, MARKER_VALUE = "application", "metronome-watcher"
#: Tables every release's store has had, besides ``meta``.
_EVERY_RELEASE = frozenset({"customers", "poll_runs", "events", "outbox"})
_VERSION = "schema_version"
_SQLITE_MAGIC = b"SQLite format 3\x00"


class Ownership(StrEnum):
    OURS = "ours"
    #: A store of an earlier release, which had no marker: ours, to be marked.
    EARLIER = "earlier"
    EMPTY = "empty"
    FOREIGN = "foreign"


@dataclass(frozen=True)
class Facts:
    """What the check reads of a database."""

    tables: frozenset[str]
    #: ``meta`` holds the marker row.
    marked: bool
    #: ``meta`` holds a schema version.
    versioned: bool
    #: SQLite's header field (0: not set); always 0 on PostgreSQL.
    application_id: int = 0
    sqlite: bool = False

    @property
    def needs_marking(self) -> bool:
        return not self.marked or (self.sqlite and self.application_id != APPLICATION_ID)


def judge(facts: Facts) -> Ownership:
    if facts.application_id == APPLICATION_ID or (facts.marked and facts.application_id == 0):
        return Ownership.OURS
    if facts.application_id != 0:
        return Ownership.FOREIGN  # another program's id in the header
    if not facts.tables:
        return Ownership.EMPTY
    if facts.versioned and {Meta.__tablename__, *_EVERY_RELEASE} <= facts.tables:
        return Ownership.EARLIER
    return Ownership.FOREIGN


def refusal(description: str, facts: Facts, *, setting: str) -> StoreError:
    """The one-line refusal of a database that is not the watcher's."""
    if facts.application_id not in (0, APPLICATION_ID):
        what = f"its header names another program (application_id {facts.application_id:#010x})"
    else:
        shown = sorted(facts.tables)
        listed = ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
        what = f"it has other tables ({listed}) and no metronome-watcher marker"
    return StoreError(
        f"{description} is not a metronome-watcher database: {what}; nothing was written to it "
        f"(check [store] {setting})",
        kind=StoreErrorKind.FOREIGN,
    )


# -- reading the facts ---------------------------------------------------------------------------


def facts_of(conn: Connection) -> Facts:
    """The facts of the database behind ``conn`` (the current schema, on PostgreSQL)."""
    sqlite = conn.dialect.name == "sqlite"
    tables = frozenset(inspect(conn).get_table_names())
    application_id = int(conn.exec_driver_sql("PRAGMA application_id").scalar() or 0) if sqlite else 0
    keys: set[str] = set()
    if Meta.__tablename__ in tables and _keyed_meta(
        str(c["name"]) for c in inspect(conn).get_columns(Meta.__tablename__)
    ):
        keys = set(
            conn.execute(select(col(Meta.key)).where(col(Meta.key).in_([MARKER_KEY, _VERSION]))).scalars()
        )
    return _facts(tables, keys, application_id, sqlite=sqlite)


def mark(conn: Connection, facts: Facts) -> None:
    """Leave what of the marker is missing (in the caller's write transaction, once the tables exist)."""
    if conn.dialect.name == "sqlite" and facts.application_id != APPLICATION_ID:
        conn.exec_driver_sql(f"PRAGMA application_id = {APPLICATION_ID}")
    if not facts.marked:
        conn.execute(insert(Meta).values(key=MARKER_KEY, value=MARKER_VALUE))


def check_file(path: Path, where: Where) -> None:
    """Refuse another program's SQLite file, reading it without writing anything (not even a
    ``-wal``): read-only, and ``immutable`` when no journal says another process is writing it."""
    try:
        with path.open("rb") as f:
            header = f.read(100)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(
            f"cannot open {where.description}: {exc.strerror or exc}", kind=StoreErrorKind.UNAVAILABLE
        ) from exc
    if not header:
        return  # an empty file is an empty database
    if header.startswith(_SQLITE_MAGIC) and int.from_bytes(header[68:72], "big") == APPLICATION_ID:
        return
    journal = any(Path(f"{path}{suffix}").exists() for suffix in ("-wal", "-journal"))
    uri = f"file:{quote(str(path.absolute()))}?mode=ro" + ("" if journal else "&immutable=1")
    with translating(where):
        db = sqlite3.connect(uri, uri=True)
        try:
            facts = _read_file(db)
        finally:
            db.close()
    if judge(facts) is Ownership.FOREIGN:
        raise refusal(where.description, facts, setting="path")


def _read_file(db: sqlite3.Connection) -> Facts:
    tables = frozenset(
        name
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not name.startswith("sqlite_")
    )
    (application_id,) = db.execute("PRAGMA application_id").fetchone()
    keys: set[str] = set()
    if Meta.__tablename__ in tables and _keyed_meta(row[1] for row in db.execute("PRAGMA table_info(meta)")):
        keys = {k for (k,) in db.execute("SELECT key FROM meta WHERE key IN (?, ?)", (MARKER_KEY, _VERSION))}
    return _facts(tables, keys, int(application_id), sqlite=True)


def _keyed_meta(columns: Iterable[str]) -> bool:
    """``meta`` has our two columns (another program's ``meta`` may not)."""
    return {"key", "value"} <= set(columns)


def _facts(tables: frozenset[str], keys: set[str], application_id: int, *, sqlite: bool) -> Facts:
    return Facts(
        tables=tables,
        marked=MARKER_KEY in keys,
        versioned=_VERSION in keys,
        application_id=application_id,
        sqlite=sqlite,
    )
