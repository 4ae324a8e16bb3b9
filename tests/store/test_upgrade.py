"""Upgrades lose nothing: a database written by an older release opens, and carries on.

``tests/fixtures/upgrade_v3`` was written by schema version 3 (see its README): a baseline, a round
of changes, a notice, and a sink (``crm``) whose receiver was down, so its events are still pending.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from standardwebhooks import Webhook

from tests.receivers import Receiver, Reply
from watcher.cli import main
from watcher.simulator import SimulatedMetronome
from watcher.store import SCHEMA_VERSION, Store

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "upgrade_v3"
TOKEN = "fixture-token"
SECRET = "whsec_dXBncmFkZS1maXh0dXJlLXNpZ25pbmcta2V5"


@pytest.fixture
def upgraded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_receiver: Callable[..., Receiver]
) -> Iterator[tuple[Path, Receiver, SimulatedMetronome]]:
    db = tmp_path / "watcher.db"
    shutil.copy(FIXTURE / "watcher.db", db)
    fake = SimulatedMetronome(token=TOKEN).start()
    fake.load(orjson.loads((FIXTURE / "customers.json").read_bytes()))
    crm = make_receiver(Reply(204, b""))
    config = tmp_path / "watcher.toml"
    config.write_text(
        f'[metronome]\nbase_url = "{fake.url}"\n[store]\npath = "{db}"\n'
        '[logging]\nlevel = "warning"\nformat = "json"\n'
        f'[[sinks]]\ntype = "log"\nname = "audit"\npath = "{tmp_path / "audit.jsonl"}"\n'
        f'[[sinks]]\ntype = "http"\nname = "crm"\nurl = "{crm.url}"\nsecret = "${{CRM_SECRET}}"\n'
        'events = ["customer.archived", "customer.deleted", "watcher.*"]\n'
    )
    monkeypatch.setenv("METRONOME_BEARER_TOKEN", TOKEN)
    monkeypatch.setenv("CRM_SECRET", SECRET)
    yield config, crm, fake
    fake.stop()


def run(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    code = main(["--config", str(config), *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_an_older_store_reads_back_polls_delivers_and_numbers_on_without_losing_anything(
    upgraded: tuple[Path, Receiver, SimulatedMetronome], capsys: pytest.CaptureFixture[str]
) -> None:
    config, crm, fake = upgraded

    # The audit log reads back exactly as the older release printed it.
    assert run(config, capsys, "events", "--format", "jsonl") == (FIXTURE / "events.jsonl").read_text()

    # The same account: a poll finds nothing new, and the deliveries left pending go out now,
    # in order, with their original ids (and nothing already delivered is sent again).
    assert run(config, capsys, "poll").endswith("no changes\n")
    pending = (FIXTURE / "pending_crm.txt").read_text().split()
    assert [r.headers["webhook-id"] for r in crm.requests] == pending
    for r in crm.requests:
        Webhook(SECRET).verify(r.body, r.headers)
    deliveries = {d["sink"]: d for d in orjson.loads(run(config, capsys, "deliveries", "--format", "json"))}
    assert (deliveries["crm"]["pending"], deliveries["crm"]["delivered"]) == (0, 3)
    assert (deliveries["audit"]["pending"], deliveries["audit"]["delivered"]) == (0, 6)

    # The next change gets the next sequence number.
    last = max(orjson.loads(line)["sequence"] for line in (FIXTURE / "events.jsonl").read_text().splitlines())
    cid = fake.customers(archived=False)[0]["id"]
    fake.set_name(cid, "After The Upgrade")
    assert "1 customer.updated" in run(config, capsys, "poll")
    (new,) = [
        orjson.loads(line)
        for line in run(
            config, capsys, "events", "--format", "jsonl", "--after-sequence", str(last)
        ).splitlines()
    ]
    assert (new["sequence"], new["type"], new["customer_id"]) == (last + 1, "customer.updated", cid)
    with Store(config.parent / "watcher.db") as store:
        assert store.schema_version() == SCHEMA_VERSION
