"""Configuration: bad files give one clear line naming the key and exit 2; documented examples stay valid."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from watcher.cli import main
from watcher.config import load_config, parse_config, parse_duration
from watcher.errors import ConfigError

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
    "store url and path": (
        "[store]\npath = 'w.db'\nurl = 'postgresql://w@db:5432/w'\n",
        "store: both path (SQLite) and url (PostgreSQL) are set",
    ),
    "store url not PostgreSQL": ("[store]\nurl = 'mysql://w@db/w'\n", "store.url: must be a PostgreSQL URL"),
    "store url with a bad port": (
        "[store]\nurl = 'postgresql://w:Pa55w0rdX@db:port/w'\n",
        "store.url: is not a valid URL",
    ),
    "store url without a database": (
        "[store]\nurl = 'postgresql://w@db:5432'\n",
        "store.url: names no database",
    ),
    "store url password with an @": (
        "[store]\nurl = 'postgresql://w:p@ss@db/w'\n",
        "store.url: has an '@' in its password: percent-encode it",
    ),
    "store url with an unset variable": (
        "[store]\nurl = 'postgresql://w:${NO_SUCH_PG_PASSWORD}@db/w'\n",
        "store.url: environment variable NO_SUCH_PG_PASSWORD is not set",
    ),
    "lease too short": ("[ha]\nlease = '0.5s'\n", "ha.lease: must be at least 1s"),
    "web without a token": (
        "[health]\nport = 8080\n[web]\nenabled = true\n",
        'web.token: required when web.enabled is true: token = "${WATCHER_WEB_TOKEN}"',
    ),
    "web token too short": (
        "[health]\nport = 8080\n[web]\nenabled = true\ntoken = 'hunter2'\n",
        "web.token: must be at least 16 characters",
    ),
    "web without the health port": (
        "[web]\nenabled = true\ntoken = '0123456789abcdef0123'\n",
        "web.enabled: the web view is served on the health port: set health.port",
    ),
    "unknown web key": ("[web]\nport = 8081\n", "web.port: unknown key"),
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


def test_the_web_view_is_off_by_default_and_its_token_never_shows() -> None:
    assert parse_config({}, env={}).web.enabled is False
    config = parse_config(
        {"health": {"port": 8080}, "web": {"enabled": True, "token": "${WATCHER_WEB_TOKEN}"}},
        env={"WATCHER_WEB_TOKEN": "tok-0123456789abcdef"},
    )
    assert config.web.enabled and config.web.page_size == 50
    assert "tok-0123456789abcdef" not in repr(config)
    with pytest.raises(ConfigError) as short:
        parse_config({"health": {"port": 1}, "web": {"enabled": True, "token": "tok-short"}}, env={})
    assert "tok-short" not in str(short.value)


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


def test_a_store_url_takes_its_password_from_the_environment_and_never_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "S3cretPg_pass_9Zq"
    monkeypatch.setenv("WATCHER_DB_PASSWORD", password)
    path = tmp_path / "pg.toml"
    path.write_text("[store]\nurl = 'postgresql://watcher:${WATCHER_DB_PASSWORD}@db.internal:5432/watcher'\n")

    config = load_config(path)
    assert config.store.target == f"postgresql://watcher:{password}@db.internal:5432/watcher"
    assert config.store.describe() == "postgresql://watcher:***@db.internal:5432/watcher"
    assert password not in repr(config)
    assert main(["--config", str(path), "check-config"]) == 0
    out, err = capsys.readouterr()
    assert "store postgresql://watcher:***@db.internal:5432/watcher" in out
    assert password not in out + err
    assert parse_config({}).store.url is None and parse_config({}).ha.lease.total_seconds() == 15


def test_a_postgres_store_without_the_driver_says_how_to_install_it(tmp_path: Path) -> None:
    path = tmp_path / "pg.toml"
    path.write_text("[store]\nurl = 'postgresql://watcher@127.0.0.1:1/watcher'\n")
    # The driver made unimportable, as in an installation without the 'postgres' extra.
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from watcher.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "--config", str(path), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert (
        "needs the psycopg driver, which is not installed: pip install 'metronome-watcher[postgres]'"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr


# -- the apprise extra -----------------------------------------------------------------------------


@pytest.fixture
def python_without_apprise(tmp_path: Path) -> Path:
    """A real interpreter whose import path holds every package this one has except Apprise.

    A venv without pip, whose one ``.pth`` file names a folder of links to this interpreter's
    packages (Apprise's left out) and the source tree: as if ``pip install metronome-watcher`` had
    run without the extra. Nothing is patched; ``import apprise`` fails there for real.
    """
    purelib = Path(sysconfig.get_paths()["purelib"])
    packages = tmp_path / "packages"
    packages.mkdir()
    for entry in purelib.iterdir():
        if not entry.name.lower().startswith("apprise"):
            (packages / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "_watcher_without_apprise.pth").write_text(f"{packages}\n{REPO}\n")
    return python


@pytest.mark.slow
def test_an_apprise_sink_without_apprise_installed_is_refused_at_start_up_saying_what_to_install(
    python_without_apprise: Path, tmp_path: Path
) -> None:
    def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python_without_apprise, "-m", "watcher", "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={
                "PATH": "/usr/bin:/bin",
                "METRONOME_BEARER_TOKEN": "mtr_test_token",
                "TEAMS_URL": "json://h/x",
            },
        )

    missing = subprocess.run([python_without_apprise, "-c", "import apprise"], capture_output=True, text=True)
    assert "No module named 'apprise'" in missing.stderr  # the premise: no Apprise there
    plain = tmp_path / "plain.toml"
    plain.write_text(f"[store]\npath = '{tmp_path / 'w.db'}'\n[[sinks]]\ntype = 'log'\nname = 'audit'\n")
    assert run(plain, "check-config").returncode == 0  # everything else works without it

    config = tmp_path / "apprise.toml"
    config.write_text(
        f"[store]\npath = '{tmp_path / 'w.db'}'\n"
        "[[sinks]]\ntype = 'log'\nname = 'audit'\n"
        "[[sinks]]\ntype = 'apprise'\nname = 'ops'\nurls = ['${TEAMS_URL}']\n"
    )
    for command in ("check-config", "run", "poll"):
        proc = run(config, command)
        assert proc.returncode == 2, (command, proc.stderr)
        assert proc.stderr == (
            f"metronome-watcher: config error: {config}: sinks[1]: the apprise sink needs the Apprise "
            "library, which is not installed: pip install 'metronome-watcher[apprise]'\n"
        )
        assert not (tmp_path / "w.db").exists()  # refused before anything started


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
