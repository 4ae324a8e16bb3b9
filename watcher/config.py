"""Configuration: one TOML file, parsed once into frozen, validated models.

Unknown keys are refused and every error names the key's path in one line, because an
operator who typoed ``intreval`` must not get a daemon that silently polls on the default.
Secrets never live in the file: the bearer token comes from ``METRONOME_BEARER_TOKEN`` and sink
secrets from ``${VAR}`` references, which are expanded here and held as :class:`SecretStr` so
that no repr, log line or error shows them.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from . import _apprise
from ._secrets import register
from ._time import parse_ts, utcnow
from .errors import ConfigError
from .events import EventType
from .schedule import cron_trigger, poll_period

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_APP_URL",
    "SINK_TYPES",
    "TOKEN_ENV",
    "WEB_TOKEN_ENV",
    "AppriseSinkConfig",
    "Config",
    "DeliveryConfig",
    "DiffConfig",
    "HaConfig",
    "HealthConfig",
    "HttpSinkConfig",
    "LogSinkConfig",
    "LoggingConfig",
    "MetronomeConfig",
    "PlansConfig",
    "ScheduleConfig",
    "SinkConfig",
    "SlackSinkConfig",
    "StoreConfig",
    "WebConfig",
    "expand_env",
    "is_postgres_url",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_postgres_url",
    "parse_when",
    "resolve_token",
]

TOKEN_ENV = "METRONOME_BEARER_TOKEN"
#: The variable the example config names for ``[web] token``.
WEB_TOKEN_ENV = "WATCHER_WEB_TOKEN"
CONFIG_ENV = "WATCHER_CONFIG"
#: Where links to a customer point (``{app_url}/customers/{id}``) unless ``[metronome] app_url`` says.
DEFAULT_APP_URL = "https://app.metronome.com"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> timedelta:
    """``30``, ``"30s"``, ``"5m"``, ``"1.5h"``, ``"3d"`` -> timedelta; plain numbers are seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 5m, 1h)")
    return timedelta(seconds=seconds)


def parse_when(value: str, *, now: datetime) -> datetime:
    """A moment as people write one: RFC 3339 (``2026-11-22T03:04:05Z``, a date alone, or a time
    without an offset, read as UTC), or an age before ``now`` such as ``24h`` or ``7d``."""
    try:
        return parse_ts(value)
    except ValueError:
        pass
    try:
        return now - parse_duration(value)
    except ValueError:
        raise ValueError(f"{value!r} is neither an RFC 3339 time nor an age such as 24h") from None


def _positive_duration(value: object) -> timedelta:
    d = parse_duration(value)
    if d <= timedelta(0):
        raise ValueError("must be a positive duration")
    return d


Duration = Annotated[timedelta, BeforeValidator(_positive_duration)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetronomeConfig(_Model):
    base_url: str = "https://api.metronome.com"
    #: Where links in Slack messages point: ``{app_url}/customers/{id}``.
    app_url: str = DEFAULT_APP_URL
    timeout: Duration = timedelta(seconds=30)
    max_attempts: int = Field(default=6, ge=1, le=20)
    max_retry_wait: Duration = timedelta(minutes=2)
    #: Fetch the active and archived listings at the same time: behind the API's latency a cycle then
    #: takes about as long as the larger listing alone.
    concurrent_listings: bool = True

    @field_validator("base_url", "app_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v.rstrip("/")


_POSTGRES_SCHEME = re.compile(r"^postgres(?:ql)?(?:\+psycopg)?://", re.IGNORECASE)


def is_postgres_url(value: object) -> bool:
    """True for a ``postgresql://`` (or ``postgres://``) URL: a PostgreSQL store, not a file."""
    return isinstance(value, str) and bool(_POSTGRES_SCHEME.match(value))


def parse_postgres_url(value: str) -> URL:
    """A store URL, checked; the ValueError says what is wrong and never repeats the URL (it may
    hold a password)."""
    example = "postgresql://user@host:5432/database"
    if not is_postgres_url(value):
        raise ValueError(f"must be a PostgreSQL URL such as {example}")
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        raise ValueError(f"is not a valid URL (expected e.g. {example}; check the port)") from None
    if url.host and "@" in url.host:
        raise ValueError("has an '@' in its password: percent-encode it (%40), or use PGPASSWORD")
    if not url.database:
        raise ValueError(f"names no database (expected e.g. {example})")
    return url


def _store_url(value: SecretStr) -> SecretStr:
    url = parse_postgres_url(value.get_secret_value())
    register(url.password if isinstance(url.password, str) else None)
    return value


class StoreConfig(_Model):
    """Where the database is: ``path`` (SQLite, the default) or ``url`` (PostgreSQL), never both."""

    path: Path = Path("metronome-watcher.db")
    #: ``postgresql://user@host:5432/db``: the password as ``${VAR}`` in it, or from ``PGPASSWORD``.
    url: Annotated[SecretStr, AfterValidator(_store_url)] | None = None
    #: Housekeeping (``store prune``, hourly in the daemon): delivered outbox rows older than this go.
    keep_deliveries: Duration = timedelta(days=30)
    #: Poll runs (and each source's row of them) older than this go; the ones notices need stay.
    keep_polls: Duration = timedelta(days=90)
    #: Audit events older than this go, once no outbox row holds them; None: kept forever.
    keep_events: Duration | None = None

    @model_validator(mode="after")
    def _one_engine(self) -> StoreConfig:
        if self.url is not None and "path" in self.model_fields_set:
            raise ValueError(
                "both path (SQLite) and url (PostgreSQL) are set; keep the one you mean "
                "(to move a SQLite store to PostgreSQL: metronome-watcher store migrate --to URL)"
            )
        if self.keep_events is not None and self.keep_events < self.keep_deliveries:
            # An event goes only once its outbox rows have: a shorter window would not be kept.
            raise ValueError(
                "keep_events is shorter than keep_deliveries; an event is pruned only after its "
                "deliveries, so keep_events must be at least keep_deliveries"
            )
        return self

    @property
    def target(self) -> str | Path:
        """What ``Store`` opens: the URL, or the file."""
        return self.url.get_secret_value() if self.url is not None else self.path

    @property
    def postgres(self) -> bool:
        return self.url is not None

    def describe(self) -> str:
        """The store as messages show it (a URL without its password)."""
        if self.url is None:
            return str(self.path)
        return parse_postgres_url(self.url.get_secret_value()).render_as_string(hide_password=True)


class HaConfig(_Model):
    """Replicas on one PostgreSQL store (off with SQLite): one leader polls and delivers."""

    #: The leader's lease: renewed every third of it; a standby takes over within about 1 1/3 of it
    #: after the leader died.
    lease: Duration = timedelta(seconds=15)

    @field_validator("lease")
    @classmethod
    def _lease(cls, v: timedelta) -> timedelta:
        if v < timedelta(seconds=1):
            raise ValueError("must be at least 1s (the lease is renewed every third of it)")
        return v


class ScheduleConfig(_Model):
    interval: Duration = timedelta(minutes=5)
    #: A five-field crontab expression; when set it replaces ``interval``.
    cron: str | None = None
    #: Random delay added to each scheduled poll so that many watchers don't hit the API in step.
    jitter: Annotated[timedelta, BeforeValidator(parse_duration)] = timedelta(seconds=0)
    delivery_interval: Duration = timedelta(seconds=10)
    #: Every poll is bounded: one that runs longer is abandoned and counts as failed.
    poll_timeout: Duration = timedelta(minutes=30)

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None:
            return v
        # The daemon's own parser, so that what validates is exactly what runs (standard crontab
        # weekdays, where APScheduler's from_crontab differs).
        try:
            cron_trigger(v)
        except ValueError as exc:
            raise ValueError(f"invalid crontab expression {v!r}: {exc}") from None
        return v


class DiffConfig(_Model):
    #: Dotted paths (or prefixes) whose changes alone never make an event.
    ignore_fields: tuple[str, ...] = ("updated_at",)
    #: Emit ``customer.created`` for every customer on the very first poll.
    emit_baseline_events: bool = False
    #: Refuse a cycle when more than this share of known customers vanishes at once ...
    max_vanished_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    #: ... and more than this many: a handful of deletions in a small account is plausible.
    max_vanished_count: int = Field(default=10, ge=0)


class PlansConfig(_Model):
    """The plans source: who is on which plan (``GET /v1/planDetails/{plan_id}/customers``)."""

    #: Read every watched plan's members each cycle, and report memberships added, changed, ended
    #: and removed (``customer.plan_*``).
    watch: bool = False
    #: The plans to watch; unset: every plan ``GET /v1/plans`` lists, read each cycle.
    plan_ids: tuple[str, ...] | None = None

    @field_validator("plan_ids")
    @classmethod
    def _plan_ids(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("is empty; leave it out to watch every plan GET /v1/plans lists")
        for plan_id in v:
            if not plan_id.strip() or plan_id in (".", "..") or plan_id != plan_id.strip():
                raise ValueError(f"{plan_id!r} is not a plan id")
        duplicates = sorted({p for p in v if v.count(p) > 1})
        if duplicates:
            raise ValueError(f"names {duplicates[0]!r} more than once")
        return v


class DeliveryConfig(_Model):
    #: Give up on an event (mark it dead) after this long.
    max_age: Duration = timedelta(hours=72)
    #: Longest gap between two attempts.
    max_backoff: Duration = timedelta(minutes=30)
    first_backoff: Duration = timedelta(seconds=2)
    batch_size: int = Field(default=100, ge=1, le=10_000)


class HealthConfig(_Model):
    port: int | None = Field(default=None, ge=0, le=65535)
    host: str = "0.0.0.0"
    #: ``/readyz`` fails when the last successful poll is older than this many intervals.
    ready_intervals: float = Field(default=3.0, gt=0)
    #: Consecutive failed polls before ``watcher.poll_failing`` is sent.
    failing_after: int = Field(default=3, ge=1)


#: The shortest ``[web] token`` accepted: it is the only thing between the network and the audit log.
WEB_TOKEN_MIN_LENGTH = 16


class WebConfig(_Model):
    """The web view (``/``, ``/customers/{id}``, ``/status``) and the change feed (``/api/events``),
    served on the health port and behind ``token``; off unless ``enabled``."""

    enabled: bool = False
    #: Browsers send it as the password of HTTP Basic auth, the feed as ``Authorization: Bearer``.
    token: SecretStr | None = Field(default=None, validate_default=True)
    #: Events per page of the list and of a customer's history.
    page_size: int = Field(default=50, ge=10, le=500)

    @field_validator("token")
    @classmethod
    def _token(cls, v: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if v is None:
            if info.data.get("enabled"):
                raise ValueError(f'required when web.enabled is true: token = "${{{WEB_TOKEN_ENV}}}"')
            return v
        if len(v.get_secret_value().strip()) < WEB_TOKEN_MIN_LENGTH:
            # Never echo the token, not even a short one.
            raise ValueError(
                f"must be at least {WEB_TOKEN_MIN_LENGTH} characters "
                "(e.g. the output of `openssl rand -hex 32`)"
            )
        return v


class LoggingConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class _SinkBase(_Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    #: Event types this sink receives; ``customer.*`` style globs allowed.
    events: tuple[str, ...] = ("customer.*",)
    #: When set, only customer events whose ``changes`` touch one of these dotted paths (or a field
    #: under them). ``created`` and ``deleted`` carry no field changes and so do not pass; ``watcher.*``
    #: notices are not affected.
    fields: tuple[str, ...] | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        """The delivery targets this sink is: each has its own outbox rows, back-off and state, and is
        what ``deliveries``, ``replay --sink`` and ``enable-sink`` name. One, named like the sink,
        except for ``apprise``: one per URL."""
        return (self.name,)

    @field_validator("events")
    @classmethod
    def _known_events(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in v:
            if not any(fnmatch.fnmatchcase(t, pattern) for t in EventType):
                raise ValueError(f"{pattern!r} matches no event type (known: {', '.join(EventType)})")
        return v


class LogSinkConfig(_SinkBase):
    type: Literal["log"]
    #: A file to append JSON lines to; stdout when unset.
    path: Path | None = None


class SlackSinkConfig(_SinkBase):
    type: Literal["slack"]
    webhook_url: SecretStr
    #: Above this many events in one delivery round, send a digest instead of one message each.
    digest_threshold: int = Field(default=5, ge=1)
    timeout: Duration = timedelta(seconds=10)

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: SecretStr) -> SecretStr:
        if not re.match(r"^https?://", v.get_secret_value()):
            raise ValueError("must be an http(s) URL")
        return v


class HttpSinkConfig(_SinkBase):
    type: Literal["http"]
    url: str
    secret: SecretStr
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: Duration = timedelta(seconds=10)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://", v):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v

    @field_validator("secret")
    @classmethod
    def _secret(cls, v: SecretStr) -> SecretStr:
        value = v.get_secret_value()
        if not value.startswith("whsec_"):
            raise ValueError("must be a Standard Webhooks secret starting with 'whsec_'")
        body = value.removeprefix("whsec_")
        try:  # unpadded secrets are accepted, as the standardwebhooks library accepts them
            ok = bool(body) and bool(base64.b64decode(body + "=" * (-len(body) % 4), validate=True))
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            raise ValueError("the part after 'whsec_' must be base64")  # never echo the secret
        return v


def _apprise_url(v: SecretStr) -> SecretStr:
    """Apprise must be able to read the URL; the error names its scheme, never the URL."""
    url = v.get_secret_value()
    if _apprise.scheme_of(url) is None:
        raise ValueError("not an Apprise URL (expected scheme://..., e.g. msteams://, mailto://)")
    _apprise.open_service(url)  # registers its secrets first; ValueError says what is wrong
    return v


AppriseUrl = Annotated[SecretStr, AfterValidator(_apprise_url)]
_LABEL = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class AppriseSinkConfig(_SinkBase):
    """Every channel Apprise speaks to (Teams, email, PagerDuty, ...), one URL each.

    Each URL is a delivery target of its own, ``{name}.{label}``, with its own outbox rows,
    back-off and state: one URL that fails holds back and re-sends to no other. ``urls`` is a list
    (each label is the URL's scheme, ``-2``, ``-3`` ... for a scheme used again) or a table of
    ``label = URL`` when the operator wants the names to stay put whatever the URLs become. A
    service's own ``https://`` URL that Apprise reads (a Teams workflow's) is labelled with the
    service's scheme (``workflow``), not ``https``.
    """

    type: Literal["apprise"]
    urls: dict[str, AppriseUrl]
    #: Above this many events in one delivery round, send a digest instead of one message each.
    digest_threshold: int = Field(default=5, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _needs_apprise(cls, data: Any) -> Any:
        if not _apprise.installed():
            raise ValueError(_apprise.MISSING)
        return data

    @field_validator("urls", mode="before")
    @classmethod
    def _labelled(cls, v: Any) -> Any:
        if not isinstance(v, Mapping | list | tuple):
            raise ValueError("must be a list of Apprise URLs, or a table of label = URL")
        if not v:
            raise ValueError("needs at least one Apprise URL")
        if isinstance(v, Mapping):
            for label in v:
                if not _LABEL.match(str(label)):
                    raise ValueError(f".{label}: a label is 1 to 32 letters, digits, '-' or '_'")
            return v
        labelled: dict[str, Any] = {}
        for i, url in enumerate(v):
            scheme = _apprise.service_scheme(url) if isinstance(url, str) else None
            if scheme is None:
                raise ValueError(f"[{i}]: not an Apprise URL (expected scheme://..., e.g. msteams://)")
            base = re.sub(r"[^a-z0-9_-]", "-", scheme)
            label, n = base, 1
            while label in labelled:
                n += 1
                label = f"{base}-{n}"
            labelled[label] = url
        return labelled

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(f"{self.name}.{label}" for label in self.urls)


SinkConfig = Annotated[
    LogSinkConfig | SlackSinkConfig | HttpSinkConfig | AppriseSinkConfig, Field(discriminator="type")
]
#: Every sink ``type`` a config may name, in the order the messages list them.
SINK_TYPES: tuple[str, ...] = tuple(
    get_args(m.model_fields["type"].annotation)[0] for m in get_args(get_args(SinkConfig)[0])
)


class Config(_Model):
    metronome: MetronomeConfig = MetronomeConfig()
    store: StoreConfig = StoreConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    diff: DiffConfig = DiffConfig()
    plans: PlansConfig = PlansConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    health: HealthConfig = HealthConfig()
    web: WebConfig = WebConfig()
    ha: HaConfig = HaConfig()
    logging: LoggingConfig = LoggingConfig()
    sinks: tuple[SinkConfig, ...] = ()

    def ready_max_age(self, *, now: datetime | None = None) -> timedelta:
        """How old the last successful poll may be while the watcher still counts as ready."""
        period = poll_period(
            interval=self.schedule.interval,
            cron=self.schedule.cron,
            jitter=self.schedule.jitter,
            now=now or utcnow(),
        )
        return period * self.health.ready_intervals

    @property
    def targets(self) -> tuple[str, ...]:
        """Every delivery target, in the config's order (see ``_SinkBase.targets``)."""
        return tuple(t for sink in self.sinks for t in sink.targets)

    def targets_of(self, name: str) -> tuple[str, ...]:
        """The targets ``name`` stands for: itself when it is one, else every target of the sink of
        that name (an ``apprise`` sink's URLs), else none."""
        if name in self.targets:
            return (name,)
        return next((s.targets for s in self.sinks if s.name == name), ())

    @model_validator(mode="after")
    def _web_on_the_health_port(self) -> Config:
        if self.web.enabled and self.health.port is None:
            raise ValueError("web.enabled: the web view is served on the health port: set health.port")
        return self

    @model_validator(mode="after")
    def _unique_sink_names(self) -> Config:
        seen: set[str] = set()
        for i, sink in enumerate(self.sinks):
            if sink.name in seen:
                raise ValueError(f"sinks[{i}].name: duplicate sink name {sink.name!r}")
            seen.add(sink.name)
        taken: dict[str, str] = {}
        for i, sink in enumerate(self.sinks):
            for name in {sink.name, *sink.targets}:
                if taken.setdefault(name, sink.name) != sink.name:
                    key = "name" if name == sink.name else "urls"
                    raise ValueError(
                        f"sinks[{i}].{key}: {name!r} is already sink {taken[name]!r} or one of its "
                        "delivery targets"
                    )
        return self


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, path: str, env: Mapping[str, str]) -> Any:
    """Replace ``${VAR}`` in every string; a reference to an unset variable is an error."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                raise ConfigError(f"{path}: environment variable {name} is not set")
            return env[name]

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{path}.{k}" if path else k, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    return value


def expand_env(value: str, key: str, env: Mapping[str, str] | None = None) -> str:
    """``${VAR}`` references in one value (a command-line URL, say) expanded as the config's are."""
    return str(_expand(value, key, os.environ if env is None else env))


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in SINK_TYPES and out.endswith("]"):
            continue  # pydantic puts the union tag in the path; operators never wrote it
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag", "?")
        return f"unknown sink type {tag!r} (expected one of: {', '.join(SINK_TYPES)})"
    if kind == "union_tag_not_found":
        return f"missing 'type' (one of: {', '.join(SINK_TYPES)})"
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def parse_config(data: Mapping[str, Any], *, env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed TOML document. Raises :class:`ConfigError` with one line."""
    expanded = _expand(dict(data), "", os.environ if env is None else env)
    try:
        return Config.model_validate(expanded)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = _loc(tuple(err["loc"]))
        desc = _describe(err)
        if not loc:  # model-level checks put the key's path in their own message
            raise ConfigError(desc) from None
        if desc.startswith(("[", ".")):  # a check that names the item under its key: urls[2]
            raise ConfigError(f"{loc}{desc}") from None
        raise ConfigError(f"{loc}: {desc}") from None


def load_config(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> Config:
    """Read ``path`` (else ``$WATCHER_CONFIG``) and validate it.

    Relative ``store.path`` and log sink paths are kept relative to the working directory,
    as an operator typing them on a command line would expect.
    """
    environ = os.environ if env is None else env
    if path is None:
        path = environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"no config file: pass --config PATH or set {CONFIG_ENV}")
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    try:
        return parse_config(data, env=environ)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def resolve_token(env: Mapping[str, str] | None = None) -> str:
    token = (os.environ if env is None else env).get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(f"{TOKEN_ENV} is not set: the Metronome bearer token comes from the environment")
    return token
