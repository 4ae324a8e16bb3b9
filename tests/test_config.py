"""Configuration: bad files give one clear line naming the key and exit 2; documented examples stay valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from watcher.cli import main
from watcher.config import load_config, parse_config, parse_duration

REPO = Path(__file__).resolve().parent.parent

BAD = {
    "unknown top-level key": ("[metronom]\nbase_url = 'https://x'\n", "metronom: unknown key"),
    "typo in a key": ("[schedule]\nintreval = '5m'\n", "schedule.intreval: unknown key"),
    "bad duration": ("[schedule]\ninterval = 'soon'\n", "schedule.interval: invalid duration 'soon'"),
    "negative duration": ("[schedule]\ninterval = -5\n", "schedule.interval: must be a positive duration"),
    "bad crontab": ("[schedule]\ncron = 'every day'\n", "schedule.cron: invalid crontab expression"),
    "not a URL": (
        "[metronome]\nbase_url = 'api.metronome.com'\n",
        "metronome.base_url: must be an http(s) URL",
    ),
    "fraction out of range": ("[diff]\nmax_vanished_fraction = 3\n", "diff.max_vanished_fraction:"),
    "wrong type": ("[metronome]\nmax_attempts = 'many'\n", "metronome.max_attempts:"),
    "unknown sink type": ("[[sinks]]\ntype = 'email'\nname = 'x'\n", "sinks[0]: unknown sink type 'email'"),
    "sink without type": ("[[sinks]]\nname = 'x'\n", "sinks[0]: missing 'type'"),
    "sink without name": ("[[sinks]]\ntype = 'log'\n", "sinks[0].name: required key is missing"),
    "unknown sink key": (
        "[[sinks]]\ntype = 'log'\nname = 'x'\ncolour = 'red'\n",
        "sinks[0].colour: unknown key",
    ),
    "duplicate sink names": (
        "[[sinks]]\ntype = 'log'\nname = 'x'\n[[sinks]]\ntype = 'log'\nname = 'x'\n",
        "sinks[1].name: duplicate sink name 'x'",
    ),
    "unset secret variable": (
        "[[sinks]]\ntype = 'http'\nname = 'h'\nurl = 'https://h.example'\nsecret = '${NO_SUCH_VAR_42}'\n",
        "sinks[0].secret: environment variable NO_SUCH_VAR_42 is not set",
    ),
    "secret not whsec": (
        "[[sinks]]\ntype = 'http'\nname = 'h'\nurl = 'https://h.example'\nsecret = 'plain'\n",
        "sinks[0].secret: must be a Standard Webhooks secret",
    ),
    "unknown event type": (
        "[[sinks]]\ntype = 'log'\nname = 'x'\nevents = ['customer.renamed']\n",
        "sinks[0].events: 'customer.renamed' matches no event type",
    ),
    "not TOML": ("[schedule\ninterval = 5\n", "not valid TOML"),
    "typo in plans": ("[plans]\nwach = true\n", "plans.wach: unknown key"),
    "plans.watch not a boolean": ("[plans]\nwatch = 'yes please'\n", "plans.watch:"),
    "empty plan_ids": ("[plans]\nwatch = true\nplan_ids = []\n", "plans.plan_ids: is empty"),
    "blank plan id": ("[plans]\nplan_ids = ['p1', ' ']\n", "plans.plan_ids: ' ' is not a plan id"),
    "plan id twice": ("[plans]\nplan_ids = ['p1', 'p1']\n", "plans.plan_ids: names 'p1' more than once"),
    "unknown plan event": (
        "[[sinks]]\ntype = 'log'\nname = 'x'\nevents = ['customer.plan_renewed']\n",
        "sinks[0].events: 'customer.plan_renewed' matches no event type",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_one_line_naming_the_key_and_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, expected = BAD[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)

    code = main(["--config", str(path), "check-config"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert expected in err[0]
    assert err[0].startswith(f"metronome-watcher: config error: {path}: ")


def test_missing_file_and_no_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHER_CONFIG", raising=False)
    assert main(["check-config"]) == 2
    assert "pass --config PATH or set WATCHER_CONFIG" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "nope.toml"), "poll"]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_config_from_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[schedule]\ninterval = '90s'\n")
    monkeypatch.setenv("WATCHER_CONFIG", str(path))
    assert main(["check-config"]) == 0
    assert "every 90s" in capsys.readouterr().out


def test_a_bad_config_never_shows_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[store]\npath = 42\nextra = 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "watcher", "--config", str(path), "run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "store." in proc.stderr


def test_poll_without_a_token_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("METRONOME_BEARER_TOKEN", raising=False)
    path = tmp_path / "c.toml"
    path.write_text(f"[store]\npath = '{tmp_path / 'w.db'}'\n")
    assert main(["--config", str(path), "poll"]) == 2
    assert "METRONOME_BEARER_TOKEN is not set" in capsys.readouterr().err


@pytest.mark.parametrize("example", sorted((REPO / "config").glob("*.toml")), ids=lambda p: p.name)
def test_every_documented_example_config_is_valid(example: Path) -> None:
    env = {
        "SLACK_WEBHOOK_URL": "https://hooks.slack.example/services/T/B/X",
        "WEBHOOK_SIGNING_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    }
    config = load_config(example, env=env)
    assert config.metronome.base_url.startswith("https://")


def test_secrets_are_not_in_the_parsed_config_repr() -> None:
    config = parse_config(
        {"sinks": [{"type": "http", "name": "h", "url": "https://h.example", "secret": "${S}"}]},
        env={"S": "whsec_c2VjcmV0c2VjcmV0c2VjcmV0"},
    )
    assert "whsec_c2VjcmV0" not in repr(config)
    assert config.sinks[0].secret.get_secret_value() == "whsec_c2VjcmV0c2VjcmV0c2VjcmV0"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "seconds"), [(30, 30), ("30s", 30), ("5m", 300), ("1.5h", 5400), ("3d", 259200), ("250ms", 0.25)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


def test_plans_are_off_unless_asked_and_their_events_are_types_like_any_other(tmp_path: Path) -> None:
    assert parse_config({}).plans.watch is False
    config = parse_config(
        {
            "plans": {"watch": True, "plan_ids": ["p1", "p2"]},
            "sinks": [
                {"type": "log", "name": "all", "events": ["customer.plan_*"]},
                {"type": "log", "name": "churn", "events": ["customer.plan_ended", "customer.plan_updated"]},
                {"type": "log", "name": "ends", "fields": ["plan.ending_before"]},
            ],
        }
    )
    assert config.plans.watch and config.plans.plan_ids == ("p1", "p2")
    from watcher.routing import Router, routes_from_config

    route = Router(routes_from_config(config))
    assert route("customer.plan_ended", []) == ["all", "churn"]
    assert route("customer.plan_added", []) == ["all"]
    assert route("customer.plan_updated", ["plan.ending_before"]) == ["all", "churn", "ends"]
    assert route("customer.plan_updated", ["plan.plan_name"]) == ["all", "churn"]
    assert route("customer.archived", ["archived_at"]) == []


def test_check_config_says_which_plans_are_watched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "w.toml"
    path.write_text("[plans]\nwatch = true\n")
    assert main(["--config", str(path), "check-config"]) == 0
    assert "; plans: every plan GET /v1/plans lists;" in capsys.readouterr().out
