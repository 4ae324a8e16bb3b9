"""Sinks: where events go. One small protocol, one explicit registry keyed on ``type``.

A sink turns a batch of v1 event dicts into one :class:`Outcome` per event it attempted, in
order. It never touches the database: :mod:`watcher.delivery` owns retries, back-off, dead
letters and ordering, so every sink obeys the same delivery rules (and one contract test proves
it for all of them). A new sink is one module here, one config model in :mod:`watcher.config`,
and one line in :data:`REGISTRY`.

A configured sink may be several delivery targets, each a sink of its own with its own outbox rows
and back-off: an ``apprise`` sink is one per URL (``AppriseSinkConfig.targets``), so that one URL
that fails holds back no other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from ..config import (
    DEFAULT_APP_URL,
    AppriseSinkConfig,
    HttpSinkConfig,
    LogSinkConfig,
    SinkConfig,
    SlackSinkConfig,
)
from .apprise import AppriseSink
from .base import Outcome, Sink
from .http import HttpSink
from .log import LogSink
from .slack import SlackSink

__all__ = [
    "REGISTRY",
    "AppriseSink",
    "HttpSink",
    "LogSink",
    "Outcome",
    "Sink",
    "SlackSink",
    "build_sink",
    "build_sinks",
]

#: ``(config, shared httpx client or None, Metronome app URL)`` -> the sinks of its delivery targets.
SinkFactory = Callable[[Any, "httpx.Client | None", str], Sequence[Sink]]


def _log(cfg: LogSinkConfig, http: httpx.Client | None, app_url: str) -> Sequence[Sink]:
    return [LogSink(cfg.name, path=cfg.path)]


def _slack(cfg: SlackSinkConfig, http: httpx.Client | None, app_url: str) -> Sequence[Sink]:
    return [SlackSink.from_config(cfg, http=http, app_url=app_url)]


def _http(cfg: HttpSinkConfig, http: httpx.Client | None, app_url: str) -> Sequence[Sink]:
    return [HttpSink.from_config(cfg, http=http)]


def _apprise(cfg: AppriseSinkConfig, http: httpx.Client | None, app_url: str) -> Sequence[Sink]:
    return AppriseSink.from_config(cfg, app_url=app_url)  # Apprise makes its own requests


#: ``type`` in the config -> how to build its sinks. Explicit on purpose: no import side effects.
REGISTRY: Mapping[str, SinkFactory] = {"log": _log, "slack": _slack, "http": _http, "apprise": _apprise}


def build_sink(
    cfg: SinkConfig, *, http: httpx.Client | None = None, app_url: str = DEFAULT_APP_URL
) -> dict[str, Sink]:
    """The sinks of one configured sink, by delivery target: one, or one per URL for ``apprise``.
    ``app_url`` is ``[metronome] app_url``: messages to people link into it."""
    sinks = {sink.name: sink for sink in REGISTRY[cfg.type](cfg, http, app_url)}
    assert tuple(sinks) == cfg.targets, "a sink factory must build exactly the config's targets"
    return sinks


def build_sinks(
    cfgs: tuple[SinkConfig, ...], *, http: httpx.Client | None = None, app_url: str = DEFAULT_APP_URL
) -> dict[str, Sink]:
    """Every delivery target's sink, by name."""
    return {name: sink for cfg in cfgs for name, sink in build_sink(cfg, http=http, app_url=app_url).items()}
