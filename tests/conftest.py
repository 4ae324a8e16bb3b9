"""Shared fixtures: the simulated Metronome on a local port, and a real store per test.

Every fixture that makes a ``Store`` takes its target from ``store_url`` (or ``new_store_url`` for
more than one), which is parametrised over both engines: a SQLite file in ``tmp_path``, and a
schema of its own in the PostgreSQL server that ``$WATCHER_TEST_PG_URL`` names (``.ci/run``
starts a throw-away cluster and sets it; ``eval "$(.ci/postgres.sh start)"`` does the same for a
developer). Without it the PostgreSQL half is skipped, saying why; in CI it fails instead.
A test that is about SQLite itself says so with ``@sqlite_only``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import text

from watcher._time import Clock
from watcher.config import DiffConfig, PlansConfig, is_postgres_url
from watcher.events import Listing
from watcher.metronome import MetronomeClient, RetryPolicy
from watcher.poll import Poller, PollResult
from watcher.poll.memo import fingerprints_of, unpack
from watcher.routing import Route
from watcher.simulator import SimulatedMetronome
from watcher.store import Store

# Filesystems that fail, for every test (``small_disk``, ``read_only_dir``).
from .disks import _small_disk_mount, read_only_dir, small_disk  # noqa: F401

# The receivers' fixtures, for every test (``make_receiver``, ``receiver``, ``clock``, ``fake_time``).
from .receivers import clock, fake_time, make_receiver, receiver  # noqa: F401

#: Looks like a real token so that a leak would be unmistakable in any output.
TOKEN = "mtr_test_Zq8v1SECRETtoken42xY"

#: The PostgreSQL server the tests may use: ``postgresql://user:password@host:port/database``.
PG_URL_ENV = "WATCHER_TEST_PG_URL"
ENGINES = ("sqlite", "postgresql")
#: Runs a test on SQLite only (it is about the file, the WAL, or SQLite's own SQL).
sqlite_only = pytest.mark.parametrize("engine", ["sqlite"])
#: Runs a test on PostgreSQL only (replicas, the lease, migrating into PostgreSQL).
postgres_only = pytest.mark.parametrize("engine", ["postgresql"])


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The PostgreSQL server's URL, or a skip (a failure in CI) when there is none."""
    url = os.environ.get(PG_URL_ENV)
    if not url:
        how = 'eval "$(.ci/postgres.sh start)" starts a throw-away cluster'
        if os.environ.get("CI"):
            pytest.fail(f"{PG_URL_ENV} is not set: .ci/run must start PostgreSQL ({how})")
        pytest.skip(f"no PostgreSQL for the tests: {PG_URL_ENV} is not set ({how})")
    return url


def schema_url(server: str, schema: str) -> str:
    """``server`` with every table in ``schema`` (libpq's ``options``: the search path)."""
    sep = "&" if "?" in server else "?"
    return f"{server}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def create_schema(server: str) -> tuple[str, str]:
    """A new, empty schema in the PostgreSQL ``server``: (its name, the URL of a store in it)."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return schema, schema_url(server, schema)


def drop_schemas(server: str, schemas: list[str]) -> None:
    import psycopg

    with psycopg.connect(server, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def new_store_url(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[], str]]:
    """Makes targets for new, empty stores on the test's engine: a file, or a fresh schema."""
    made: list[str] = []
    server = request.getfixturevalue("pg_server") if engine == "postgresql" else ""

    def make() -> str:
        if engine == "sqlite":
            made.append(f"watcher{len(made) or ''}.db")  # watcher.db, watcher1.db, ...
            return str(tmp_path / made[-1])
        schema, url = create_schema(server)
        made.append(schema)
        return url

    yield make
    if engine == "postgresql" and made:
        drop_schemas(server, made)


@pytest.fixture(scope="module", params=ENGINES)
def module_store_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The target of a store that a whole module's tests share (a data set built once), on each
    engine in turn: a file, or a fresh schema dropped when the module is done."""
    if request.param == "sqlite":
        yield str(tmp_path_factory.mktemp("module-store") / "watcher.db")
        return
    server = request.getfixturevalue("pg_server")
    schema, url = create_schema(server)
    yield url
    drop_schemas(server, [schema])


@pytest.fixture
def store_url(new_store_url: Callable[[], str]) -> str:
    """The target of this test's store (a path or a URL), on each engine in turn."""
    return new_store_url()


def rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a plain query, through the store's own engine (SQLite or PostgreSQL alike)."""
    with store.read() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


def page_memo(store: Store) -> tuple[dict[Listing, bool], dict[Listing, list[int]]]:
    """The page memo as stored: listing -> complete, and every fingerprint on that listing's
    pages, sorted (read through ``watcher.poll.memo``, which alone knows its layout)."""
    with store.cycle() as session:
        rows = session.page_memo()
    complete, fingerprints = {}, {}
    for listing, is_complete, blob in rows:
        complete[listing] = is_complete
        fingerprints[listing] = sorted(f for _, packed in unpack(blob) for f in fingerprints_of(packed))
    return complete, fingerprints


def stored_fingerprints(store: Store) -> dict[Listing, list[int]]:
    with store.cycle() as session:
        return {listing: sorted(hashes) for listing, hashes in session.stored_fingerprints().items()}


def check_page_memo(store: Store) -> None:
    """The page memo may only call itself complete when it holds exactly the stored fingerprints:
    a cycle then trusts it instead of the customers table."""
    complete, fingerprints = page_memo(store)
    if complete and all(complete.values()):
        assert fingerprints == stored_fingerprints(store)


@pytest.fixture
def fake() -> Iterator[SimulatedMetronome]:
    with SimulatedMetronome(token=TOKEN) as server:
        yield server


class Harness:
    """The poll cycle wired as the daemon wires it, with a recording ``sleep``."""

    def __init__(
        self,
        fake: SimulatedMetronome,
        db: str | Path,
        *,
        page_limit: int = 10,
        concurrent: bool = True,
        max_attempts: int = 3,
        plans: PlansConfig | None = None,
        poll_clock: Clock | None = None,
        **diff: Any,
    ) -> None:
        self.fake = fake
        #: The SQLite file (a Path), or the PostgreSQL URL.
        self.db = db if is_postgres_url(db) else Path(db)
        self.sleeps: list[float] = []
        self.store = Store(db)
        self.client = MetronomeClient(
            fake.url,
            TOKEN,
            page_limit=page_limit,
            sleep=self.sleeps.append,
            retry=RetryPolicy(max_attempts=max_attempts, max_delay=30.0, max_total_wait=60.0),
        )
        self.poller = Poller(
            self.store,
            self.client,
            diff=DiffConfig(**diff),
            routes=[Route("audit")],
            concurrent_listings=concurrent,
            plans=plans,
            plan_source=self.client,
            **({"clock": poll_clock} if poll_clock is not None else {}),
        )

    def poll(self) -> PollResult:
        result = self.poller.run()
        check_page_memo(self.store)
        return result

    def events(self, **kw: Any) -> list[dict[str, Any]]:
        return self.store.query_events(**kw)

    def snapshot(self) -> dict[str, Any]:
        """Everything a cycle may change, to prove a failed one changed nothing."""
        return {
            table: rows(self.store, f"SELECT * FROM {table} ORDER BY 1")
            for table in ("customers", "events", "outbox", "plans", "plan_members", "plan_page_memo")
        }

    def close(self) -> None:
        self.client.close()
        self.store.close()


@pytest.fixture
def harness(fake: SimulatedMetronome, store_url: str) -> Iterator[Harness]:
    h = Harness(fake, store_url)
    yield h
    h.close()


@pytest.fixture
def seeded(fake: SimulatedMetronome, harness: Harness) -> Harness:
    """25 active and 5 archived customers (3 pages of 10 in the active listing), baseline taken."""
    for i in range(25):
        fake.create_customer(
            f"Customer {i:02d}", ingest_aliases=[f"c{i}@example.com"], custom_fields={"tier": "starter"}
        )
    for i in range(5):
        c = fake.create_customer(f"Old Customer {i}")
        fake.archive(c["id"])
    result = harness.poll()
    assert result.ok and result.baseline
    return harness
