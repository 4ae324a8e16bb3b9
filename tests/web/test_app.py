"""The web view and the change feed over real HTTP (uvicorn on a local port), on a real store filled
by real poll cycles against the simulated Metronome: a SQLite file, and a PostgreSQL schema (what
every replica of a replicated store, standbys included, serves from; ``module_store_url``)."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from watcher import _secrets
from watcher.config import WebConfig, is_postgres_url
from watcher.health import Health
from watcher.simulator import SimulatedMetronome
from watcher.store import Store, queries
from watcher.web import SECURITY_HEADERS, WebServer

from ..conftest import TOKEN, Harness

WEB_TOKEN = "web-token-Zq8v1SECRET-0123456789"
EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def account(module_store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An audit log made by four real cycles: a baseline of 30, then renames, an archive, a list
    change, a customer whose name is a script, and more updates (enough for three pages of 10)."""
    tmp = tmp_path_factory.mktemp("web")
    with SimulatedMetronome(token=TOKEN) as fake:
        harness = Harness(fake, module_store_url)
        ids = [
            fake.create_customer(
                f"Customer {i:02d}",
                ingest_aliases=[f"c{i}@example.com"],
                custom_fields={"tier": "starter"},
                external_id=f"ext-{i:02d}",
            )["id"]
            for i in range(30)
        ]
        assert harness.poll().baseline
        fake.set_name(ids[0], "Acme Rockets")
        fake.archive(ids[1])
        fake.set_ingest_aliases(ids[2], ["c2@example.com", "billing@new.example.com"])
        evil = fake.create_customer(EVIL, custom_fields={"tier": EVIL})["id"]
        assert harness.poll().ok
        for i in range(3, 23):
            fake.set_custom_fields(ids[i], {"tier": "growth"})
        assert harness.poll().ok
        fake.set_custom_fields(ids[0], {"tier": "enterprise"})
        fake.set_ingest_aliases(ids[2], ["billing@new.example.com", "third@example.com"])
        assert harness.poll().ok
        harness.close()
    yield {"db": module_store_url, "ids": ids, "evil": evil, "tmp": tmp}


@pytest.fixture(scope="module")
def store(account: dict[str, Any]) -> Iterator[Store]:
    s = Store(account["db"])
    yield s
    s.close()


@pytest.fixture(scope="module")
def server(store: Store) -> Iterator[WebServer]:
    checks = Health(store, max_age=timedelta(hours=1), sinks=["audit"])
    web = WebConfig(enabled=True, token=WEB_TOKEN, page_size=10)
    with WebServer(checks, port=0, host="127.0.0.1", web=web) as s:
        yield s


@pytest.fixture
def browser(server: WebServer) -> Iterator[httpx.Client]:
    """A client that logs in as a browser does: HTTP Basic, the token as the password."""
    with httpx.Client(base_url=server.url, auth=("anyone", WEB_TOKEN), timeout=10) as c:
        yield c


@pytest.fixture
def anonymous(server: WebServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def rows(html: str) -> list[int]:
    """The sequences of the event rows on a page, in order."""
    return [int(s) for s in re.findall(r'<tr class="event [a-z]+" id="e(\d+)">', html)]


def all_events(store: Store) -> list[dict[str, Any]]:
    return store.query_events()


# -- security ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/status", "/customers/x", "/api/events", "/static/style.css", "/nope"]
)
def test_without_the_token_every_path_but_health_is_401_and_nothing_else(
    anonymous: httpx.Client, path: str
) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": "Basic " + base64.b64encode(b"user:wrong-token-wrong").decode()},
        {"Authorization": "Basic " + base64.b64encode(WEB_TOKEN.encode()).decode()},  # no "user:"
        {"Authorization": "Basic not-base64!"},
        {"Authorization": f"Token {WEB_TOKEN}"},
        {"Authorization": f"Bearer {WEB_TOKEN[:-1]}"},
    ):
        r = anonymous.get(path, headers=headers)
        assert r.status_code == 401, (path, headers)
        assert r.content == b""
        scheme = "Bearer" if path.startswith("/api/") else "Basic"
        assert r.headers["www-authenticate"].startswith(f'{scheme} realm="metronome-watcher"')


def test_the_token_works_as_a_basic_password_and_as_a_bearer_token(server: WebServer) -> None:
    basic = httpx.get(server.url + "/", auth=("whoever", WEB_TOKEN), timeout=10)
    bearer = httpx.get(
        server.url + "/api/events", headers={"Authorization": f"Bearer {WEB_TOKEN}"}, timeout=10
    )
    assert basic.status_code == 200 and "Recent changes" in basic.text
    assert bearer.status_code == 200 and bearer.json()["data"]


def test_health_stays_open_with_its_bodies(anonymous: httpx.Client) -> None:
    r = anonymous.get("/healthz")
    assert (r.status_code, r.content, r.headers["content-type"]) == (
        200,
        b'{"alive":true}',
        "application/json",
    )
    assert anonymous.get("/readyz").status_code in (200, 503)
    metrics = anonymous.get("/metrics")
    assert metrics.status_code == 200 and b"watcher_customers" in metrics.content


def test_only_get_and_head(browser: httpx.Client, anonymous: httpx.Client) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        assert browser.request(method, "/").status_code == 405
        assert browser.request(method, "/api/events").status_code == 405
        assert anonymous.request(method, "/").status_code == 401  # the token first
        assert anonymous.request(method, "/healthz").status_code == 405
    head = browser.head("/")
    assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize("path", ["/", "/status", "/api/events", "/healthz", "/nope", "/customers/none"])
def test_every_response_carries_the_security_headers(
    browser: httpx.Client, anonymous: httpx.Client, path: str
) -> None:
    for client in (browser, anonymous):
        r = client.get(path)
        for name, value in SECURITY_HEADERS:
            assert r.headers[name] == value, (path, name)
    csp = dict(SECURITY_HEADERS)["content-security-policy"]
    assert "script-src" not in csp and "'unsafe-inline'" not in csp and "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp


def test_pages_carry_no_script_at_all(browser: httpx.Client, account: dict[str, Any]) -> None:
    for path in ("/", "/status", f"/customers/{account['ids'][0]}", "/?type=customer.*"):
        html = browser.get(path).text
        assert "<script" not in html.lower()
        assert not re.search(r"<[^>]+\son[a-z]+=", html)  # no inline event handlers either
        assert "javascript:" not in html.lower()


def test_a_customer_named_like_a_script_is_text_everywhere(
    browser: httpx.Client, account: dict[str, Any]
) -> None:
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for path in (
        "/?type=customer.created",
        f"/customers/{account['evil']}",
        "/?customer=script",
        "/?customer=" + EVIL,
    ):
        html = browser.get(path).text
        assert EVIL not in html, path
        assert escaped in html, path


def test_no_secret_is_ever_rendered(browser: httpx.Client, store: Store, account: dict[str, Any]) -> None:
    slack_url = "https://hooks.slack.com/services/T000/B000/SECRETslackPATH42"
    _secrets.register(slack_url)
    # A sink whose last error somehow carries its URL: the page still shows it redacted.
    with store.write() as conn:
        queries.set_sink_state(conn, "audit", last_error=f"POST {slack_url}: HTTP 500")
    pages = [browser.get(p).text for p in ("/", "/status", f"/customers/{account['ids'][0]}", "/api/events")]
    assert "[redacted]" in pages[1]
    for page in pages:
        assert slack_url not in page
        assert WEB_TOKEN not in page
        assert TOKEN not in page


# -- the list ------------------------------------------------------------------------------------


def test_the_list_is_newest_first_and_pages_by_sequence(browser: httpx.Client, store: Store) -> None:
    sequences = [e["sequence"] for e in all_events(store)]
    newest = sorted(sequences, reverse=True)
    first = browser.get("/").text
    assert rows(first) == newest[:10]
    older = re.search(r'href="(\?before=\d+)" rel="next"', first)
    assert older is not None
    second = browser.get("/" + older.group(1)).text
    assert rows(second) == newest[10:20]
    newer = re.search(r'href="(\?after=\d+)" rel="prev"', second)
    assert newer is not None
    assert rows(browser.get("/" + newer.group(1)).text) == newest[:10]
    seen, page = [], "/"
    while page:  # following "older" to the end shows every event once
        html = browser.get(page).text
        seen += rows(html)
        link = re.search(r'href="(\?[^"]+)" rel="next"', html)
        page = "/" + link.group(1).replace("&amp;", "&") if link else ""
    assert seen == newest


def test_each_row_says_who_what_when_and_each_change(
    browser: httpx.Client, account: dict[str, Any], store: Store
) -> None:
    (renamed,) = store.query_events(customer_id=account["ids"][0], types=["customer.updated"], limit=1)
    html = browser.get(f"/?customer={account['ids'][0]}").text
    row = html[html.index(f'id="e{renamed["sequence"]}"') :]
    row = row[: row.index("</tr>")]
    assert "updated" in row and renamed["detected_at"][:19].replace("T", " ") in row
    assert "Customer 00" in row and "Acme Rockets" in row and "&rarr;" in row


def test_a_changed_list_shows_the_items_added_and_removed(
    browser: httpx.Client, account: dict[str, Any]
) -> None:
    html = browser.get(f"/customers/{account['ids'][2]}").text
    assert '<span class="added">added <code>billing@new.example.com</code></span>' in html
    assert '<span class="added">added <code>third@example.com</code></span>' in html
    assert '<span class="removed">removed <code>c2@example.com</code></span>' in html
    assert "[&#34;c2@example.com&#34;" not in html and '["c2@example.com"' not in html


def test_the_type_filter_narrows_the_list(browser: httpx.Client, store: Store) -> None:
    archived = [e["sequence"] for e in store.query_events(types=["customer.archived"])]
    assert rows(browser.get("/?type=customer.archived").text) == archived[::-1]
    created_or_archived = browser.get(
        "/", params=[("type", "customer.archived"), ("type", "customer.created")]
    )
    assert set(rows(created_or_archived.text)) == {
        e["sequence"] for e in store.query_events(types=["customer.archived", "customer.created"])
    }
    assert len(rows(browser.get("/?type=customer.*").text)) == 10
    bad = browser.get("/?type=customer.exploded")
    assert bad.status_code == 400 and "unknown event type" in bad.text


@pytest.mark.parametrize("text", ["ACME rock", "acme", "ext-00"])
def test_the_customer_filter_takes_a_part_of_a_name_or_external_id(
    browser: httpx.Client, account: dict[str, Any], store: Store, text: str
) -> None:
    expected = [e["sequence"] for e in store.query_events(customer_id=account["ids"][0])][::-1]
    assert rows(browser.get("/", params={"customer": text}).text) == expected


def test_the_customer_filter_takes_an_id_or_part_of_one(
    browser: httpx.Client, account: dict[str, Any], store: Store
) -> None:
    cid = account["ids"][1]
    expected = [e["sequence"] for e in store.query_events(customer_id=cid)][::-1]
    assert rows(browser.get("/", params={"customer": cid}).text) == expected
    assert rows(browser.get("/", params={"customer": cid[:13].upper()}).text) == expected
    nothing = browser.get("/", params={"customer": "no such customer"}).text
    assert rows(nothing) == [] and "No changes match these filters" in nothing


def test_the_time_range_filter(browser: httpx.Client, store: Store) -> None:
    events = all_events(store)
    cut = events[-1]["detected_at"]  # the last cycle's events
    last_cycle = [e["sequence"] for e in events if e["detected_at"] >= cut][::-1]
    assert rows(browser.get("/", params={"since": cut}).text) == last_cycle
    assert rows(browser.get("/", params={"until": "2000-01-01"}).text) == []
    assert (
        rows(browser.get("/", params={"since": "1h"}).text)[:10] == [e["sequence"] for e in events][::-1][:10]
    )
    older = [e["sequence"] for e in events if e["detected_at"] < cut][::-1]
    assert rows(browser.get("/", params={"until": cut}).text) == older[:10]
    bad = browser.get("/", params={"since": "last tuesday"})
    assert bad.status_code == 400 and "since:" in bad.text and "last tuesday" in bad.text


# -- a customer, the status ------------------------------------------------------------------------


def test_a_customer_page_shows_the_record_as_last_seen_and_its_whole_history(
    browser: httpx.Client, account: dict[str, Any], store: Store
) -> None:
    cid = account["ids"][0]
    html = browser.get(f"/customers/{cid}").text
    assert "<h1>Acme Rockets" in html
    assert "enterprise" in html and "ext-00" in html and "c0@example.com" in html
    history = [e["sequence"] for e in store.query_events(customer_id=cid)][::-1]
    assert rows(html) == history and len(history) == 2
    unknown = browser.get("/customers/no-such-id")
    assert unknown.status_code == 404 and "No customer with id no-such-id" in unknown.text


def test_status_shows_polls_with_a_chart_and_every_sink(browser: httpx.Client, store: Store) -> None:
    html = browser.get("/status").text
    polls = store.last_polls(60)
    assert html.count('<rect class="bar succeeded"') == len(polls) == 4
    assert "<polyline" in html and f"up to {max(p.events for p in polls)}" in html
    assert "<td>audit</td>" in html  # the sink this server was told about
    assert "last successful poll" in html and f"#{polls[0].id} finished" in html
    assert "30 active" in html or "29 active" in html


# -- the feed ------------------------------------------------------------------------------------


def cli_jsonl(db: str, tmp: Path, *args: str) -> list[bytes]:
    config = tmp / "cli.toml"
    config.write_text(f'[store]\n{"url" if is_postgres_url(db) else "path"} = "{db}"\n')
    out = subprocess.run(
        [sys.executable, "-m", "watcher", "--config", str(config), "events", "--format", "jsonl", *args],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    return out.splitlines()


def test_the_feed_is_the_cli_jsonl_exactly_and_paging_gets_every_event_once(
    server: WebServer, account: dict[str, Any]
) -> None:
    expected = cli_jsonl(account["db"], account["tmp"])
    got: list[bytes] = []
    after = 0
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {WEB_TOKEN}"}) as feed:
        while True:
            r = feed.get("/api/events", params={"after_sequence": after, "limit": 7})
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            body = orjson.loads(r.content)
            assert set(body) == {"data", "next_after_sequence"}
            if not body["data"]:
                assert body["next_after_sequence"] == after
                break
            got += [orjson.dumps(e) for e in body["data"]]
            assert body["next_after_sequence"] == body["data"][-1]["sequence"]
            after = body["next_after_sequence"]
    assert got == expected
    # The response's own bytes hold each event exactly as the CLI printed it.
    raw = httpx.get(
        server.url + "/api/events?limit=1000", headers={"Authorization": f"Bearer {WEB_TOKEN}"}
    ).content
    assert (
        raw
        == b'{"data":['
        + b",".join(expected)
        + b'],"next_after_sequence":'
        + str(len(expected)).encode()
        + b"}"
    )


def test_the_feed_filters_by_type_and_customer(server: WebServer, account: dict[str, Any]) -> None:
    def feed(**params: Any) -> list[bytes]:
        r = httpx.get(
            server.url + "/api/events", params=params, headers={"Authorization": f"Bearer {WEB_TOKEN}"}
        )
        assert r.status_code == 200
        return [orjson.dumps(e) for e in r.json()["data"]]

    db, tmp = account["db"], account["tmp"]
    assert feed(type="customer.archived") == cli_jsonl(db, tmp, "--type", "customer.archived")
    cid = account["ids"][0]
    history = cli_jsonl(db, tmp, "--customer", cid)
    assert feed(customer_id=cid) == history and len(history) == 2
    first = orjson.loads(history[0])["sequence"]
    assert feed(customer_id=cid, after_sequence=first) == history[1:]
    assert feed(customer_id=cid, type="customer.archived") == []


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=0", "limit: must be between 1 and 1000"),
        ("limit=1001", "limit: must be between 1 and 1000"),
        ("after_sequence=-1", "after_sequence: must be at least 0"),
        ("after_sequence=abc", "after_sequence: 'abc' is not a whole number"),
        ("type=nope", "type: unknown event type 'nope'"),
    ],
)
def test_the_feed_refuses_bad_parameters_with_a_clear_400(
    server: WebServer, query: str, message: str
) -> None:
    r = httpx.get(f"{server.url}/api/events?{query}", headers={"Authorization": f"Bearer {WEB_TOKEN}"})
    assert r.status_code == 400
    assert r.json()["error"].startswith(message)


# -- the server ----------------------------------------------------------------------------------


def test_stop_is_prompt_with_a_keep_alive_connection_open(store: Store) -> None:
    checks = Health(store, max_age=timedelta(hours=1))
    server = WebServer(checks, port=0, host="127.0.0.1", web=WebConfig(enabled=True, token=WEB_TOKEN)).start()
    client = httpx.Client(base_url=server.url, auth=("u", WEB_TOKEN))
    assert client.get("/").status_code == 200  # the connection stays open (keep-alive)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 3
    with pytest.raises(httpx.TransportError):
        client.get("/", timeout=2)
    client.close()


def test_the_token_is_registered_as_a_secret(server: WebServer) -> None:
    assert _secrets.redact(f"token {WEB_TOKEN} here") == "token [redacted] here"


def test_a_database_that_cannot_be_read_is_a_503_that_says_so_in_one_line(tmp_path: Path) -> None:
    db = tmp_path / "watcher.db"
    store = Store(db)
    store.close()  # its connections: the next request opens the file afresh
    db.write_bytes(b"garbage " * 4096)  # damaged in the meantime
    checks = Health(store, max_age=timedelta(hours=1))
    line = f"database error: {db} is damaged or is not a SQLite database: file is not a database"
    with WebServer(checks, port=0, host="127.0.0.1", web=WebConfig(enabled=True, token=WEB_TOKEN)) as s:
        client = httpx.Client(base_url=s.url, auth=("u", WEB_TOKEN))
        page, feed, ready = client.get("/"), client.get("/api/events"), client.get("/readyz")
        client.close()

    assert page.status_code == 503 and line in page.text
    assert (feed.status_code, feed.json()) == (503, {"error": line})
    assert ready.status_code == 503 and ready.json()["reason"] == line
