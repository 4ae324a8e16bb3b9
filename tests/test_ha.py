"""Two real ``run`` replicas on one PostgreSQL store; the leader is SIGKILLed mid-poll, then mid-delivery.

The replicas are subprocesses (``python -m watcher run``) with the default ``[ha] lease`` (15 s),
polling the simulated Metronome in this process and delivering to a real local receiver, each with
the web view on (``[web]``). What a take-over may do: nothing lost, nothing reported twice,
``sequence`` still strictly increasing, and only the event whose delivery was in flight sent again,
with the same id. It must happen within 30 s of the leader's death. A standby serves the web view
and the change feed from the shared store, as the leader does.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import postgres_only
from tests.receivers import Receiver, Reply
from tests.test_daemon import DaemonProcess, base_env, wait_until
from watcher.simulator import SimulatedMetronome
from watcher.store import Store

pytestmark = [pytest.mark.slow, postgres_only]

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WEB_TOKEN = "web-token-HA-0123456789abcdef"
#: The promise: a standby takes over within 30 s of the leader's SIGKILL, with the default lease.
TAKE_OVER = 30.0


def replica_config(fake: SimulatedMetronome, url_with_var: str, hooks: Receiver) -> str:
    return f"""
[metronome]
base_url = "{fake.url}"
max_attempts = 2
max_retry_wait = "1s"

[store]
url = "{url_with_var}"

[schedule]
interval = "2s"
delivery_interval = "1s"

[health]
port = 0
host = "127.0.0.1"

[web]
enabled = true
token = "${{WATCHER_WEB_TOKEN}}"

[logging]
level = "info"
format = "json"

[[sinks]]
type = "http"
name = "hooks"
url = "{hooks.url}"
secret = "${{HOOK_SECRET}}"
timeout = "5s"
"""


class Cluster:
    """Replicas started from one config; each one's log is kept for the checks."""

    def __init__(self, tmp_path: Path, config: str, env: dict[str, str]) -> None:
        self.path = tmp_path / "watcher.toml"
        self.path.write_text(config)
        self.env = env
        self.tmp_path = tmp_path
        self.replicas: list[DaemonProcess] = []

    def start(self) -> DaemonProcess:
        argv = [sys.executable, "-m", "watcher", "run", "--config", str(self.path)]
        d = DaemonProcess(argv, env=self.env, cwd=self.tmp_path)
        self.replicas.append(d)
        return d

    def role(self, d: DaemonProcess) -> str | None:
        if d.proc.poll() is not None:
            return None
        code, body = d.get("/readyz")
        if code is None:
            return None
        return str(json.loads(body).get("role")) if body else None

    def leader(self) -> DaemonProcess | None:
        alive = [d for d in self.replicas if d.proc.poll() is None]
        leaders = [d for d in alive if self.role(d) == "leader"]
        assert len(leaders) <= 1, "two leaders at once"
        return leaders[0] if leaders else None

    def tails(self) -> str:
        return "\n".join(d.tail() for d in self.replicas)

    def close(self) -> None:
        for d in self.replicas:
            d.kill()


@pytest.fixture
def cluster(
    fake: SimulatedMetronome, tmp_path: Path, store_url: str, make_receiver: Callable[..., Receiver]
) -> Iterator[tuple[Cluster, Receiver, str]]:
    hooks = make_receiver(Reply(204, b""))
    # The password as an operator passes it: ${VAR} in the URL, the value in the environment.
    password = store_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    url_with_var = store_url.replace(f":{password}@", ":${WATCHER_DB_PASSWORD}@")
    env = base_env(WATCHER_DB_PASSWORD=password, HOOK_SECRET=SECRET, WATCHER_WEB_TOKEN=WEB_TOKEN)
    env["METRONOME_BEARER_TOKEN"] = fake.token
    c = Cluster(tmp_path, replica_config(fake, url_with_var, hooks), env)
    yield c, hooks, password
    c.close()


def web_get(d: DaemonProcess, path: str, *, bearer: bool = True) -> tuple[int, bytes]:
    """GET a path of the web view or the feed, with the token (as the feed, or as a browser sends it)."""
    auth = (
        f"Bearer {WEB_TOKEN}" if bearer else "Basic " + base64.b64encode(f"ops:{WEB_TOKEN}".encode()).decode()
    )
    request = urllib.request.Request(f"http://127.0.0.1:{d.port}{path}", headers={"Authorization": auth})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def events_of(store_url: str) -> list[dict[str, Any]]:
    with Store(store_url) as store:
        return store.query_events()


def poll_outcomes(store_url: str) -> list[str]:
    with Store(store_url) as store:
        return [p.outcome for p in reversed(store.last_polls(1000))]


def test_a_standby_takes_over_from_a_leader_killed_mid_poll_and_again_mid_delivery(
    fake: SimulatedMetronome, cluster: tuple[Cluster, Receiver, str], store_url: str
) -> None:
    c, hooks, password = cluster
    fake.seed(250, archived_fraction=0.0)  # three pages of active customers
    first = c.start()
    wait_until(lambda: c.leader() is first, "the first replica to lead", context=c.tails)
    wait_until(lambda: "succeeded" in poll_outcomes(store_url), "the baseline", context=c.tails)
    second = c.start()
    wait_until(lambda: c.role(second) == "standby", "the second replica to stand by", context=c.tails)
    standby = second.wait_status("/readyz", 200)
    assert standby["ready"] is True and standby["leader"] == first.logged("ha.lease_acquired")[0]["holder"]

    # -- 1. the leader dies in the middle of a poll --------------------------------------------
    renamed = fake.customers(archived=False)[4]["id"]
    killed_at: list[float] = []

    def kill_leader(_: SimulatedMetronome) -> None:
        # The leader waits for page 3 while its poll is recorded as running: then it dies.
        wait_until(lambda: "running" in poll_outcomes(store_url), "the poll to be recorded", timeout=10)
        os.kill(first.proc.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    fake.on_page(3, kill_leader, archived=False)
    fake.set_name(renamed, "Renamed While The Leader Died")
    wait_until(lambda: killed_at, "the leader to be killed mid-poll", context=c.tails)
    acquired = wait_until(
        lambda: second.logged("ha.lease_acquired"), "a take-over", timeout=45, context=c.tails
    )
    took = time.monotonic() - killed_at[0]
    assert took <= TAKE_OVER, f"the standby took {took:.1f}s to take over"
    assert acquired[0]["epoch"] == 2
    wait_until(
        lambda: [r for r in hooks.requests if r.ok and r.json()["customer_id"] == renamed],
        "the rename to be delivered by the new leader",
        context=c.tails,
    )
    outcomes = poll_outcomes(store_url)
    assert outcomes.count("abandoned") == 1 and "running" not in outcomes[:-1]  # the killed poll

    # -- 2. the new leader dies in the middle of a delivery round ------------------------------
    third = c.start()
    wait_until(lambda: c.role(third) == "standby", "the restarted replica to stand by", context=c.tails)
    # A standby serves health, the web view and the feed (read-only) from the shared store.
    assert third.get("/healthz")[0] == 200
    assert third.wait_status("/readyz", 200)["role"] == "standby"
    code, body = web_get(third, "/api/events")
    assert code == 200 and json.loads(body)["data"] == events_of(store_url)
    assert [e["customer_id"] for e in json.loads(body)["data"]] == [renamed]
    code, page = web_get(third, "/", bearer=False)
    assert code == 200 and b"Renamed While The Leader Died" in page
    assert web_get(third, "/status", bearer=False)[0] == 200
    assert web_get(third, f"/customers/{renamed}", bearer=False)[0] == 200
    archived = fake.customers(archived=False)[7]["id"]
    in_flight: list[str] = []

    def kill_while_sending(request: Any) -> Reply | None:
        body = request.json()
        if body["customer_id"] == archived and not in_flight:
            in_flight.append(body["id"])
            os.kill(second.proc.pid, signal.SIGKILL)
            killed_at.append(time.monotonic())
        return None

    hooks.on_request = kill_while_sending
    fake.archive(archived)
    wait_until(lambda: in_flight, "the leader to be killed mid-delivery", context=c.tails)
    wait_until(lambda: third.logged("ha.lease_acquired"), "a second take-over", timeout=45, context=c.tails)
    took = time.monotonic() - killed_at[-1]
    assert took <= TAKE_OVER, f"the standby took {took:.1f}s to take over"
    wait_until(
        lambda: [r for r in hooks.requests if r.ok and r.json()["id"] == in_flight[0]],
        "the event in flight to be delivered again",
        context=c.tails,
    )
    hooks.on_request = None

    # -- what the audit log and the receiver say ------------------------------------------------
    events = events_of(store_url)
    assert [(e["type"], e["customer_id"]) for e in events] == [
        ("customer.updated", renamed),
        ("customer.archived", archived),
    ]  # each change once: nothing lost, nothing reported twice
    sequences = [e["sequence"] for e in events]
    assert sequences == sorted(set(sequences))
    sent = [r.json()["id"] for r in hooks.requests]
    accepted = [r.json()["id"] for r in hooks.requests if r.ok]
    assert set(accepted) == {e["id"] for e in events}
    again = {i for i in sent if sent.count(i) > 1}
    assert again <= set(in_flight), "only the event in flight may be sent twice"
    assert sent.count(in_flight[0]) == 2

    # Leadership in the logs: every take-over said so, and the password was never shown.
    assert third.logged("ha.lease_acquired")[0]["epoch"] == 3
    for d in c.replicas:
        for line in d.lines:
            assert password not in str(line)
    metrics = third.metrics()
    assert metrics[("watcher_leader", ())] == 1 and metrics[("watcher_lease_acquired_total", ())] == 1
    assert third.terminate()[0] == 0
    assert third.logged("ha.lease_released")
