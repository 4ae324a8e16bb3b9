"""Sinks: where events go. One small protocol, one explicit registry keyed on ``type``.

A sink turns a batch of v1 event dicts into one :class:`Outcome` per event it attempted, in
order. It never touches the database: :mod:`watcher.delivery` owns retries, back-off, dead
letters and ordering, so every sink obeys the same delivery rules (and one contract test proves
it for all of them). A new sink is one module here, one config model in :mod:`watcher.config`,
and one line in :data:`REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import httpx

from ..config import DEFAULT_APP_URL, HttpSinkConfig, LogSinkConfig, SinkConfig, SlackSinkConfig
from .base import Outcome, Sink
from .http import HttpSink
from .log import LogSink
from .slack import SlackSink

__all__ = ["REGISTRY", "HttpSink", "LogSink", "Outcome", "Sink", "SlackSink", "build_sink", "build_sinks"]

#: ``(config, shared httpx client or None, Metronome app URL)`` -> a sink.
SinkFactory = Callable[[Any, "httpx.Client | None", str], Sink]


def _log(cfg: LogSinkConfig, http: httpx.Client | None, app_url: str) -> Sink:
    return LogSink(cfg.name, path=cfg.path)


def _slack(cfg: SlackSinkConfig, http: httpx.Client | None, app_url: str) -> Sink:
    return SlackSink.from_config(cfg, http=http, app_url=app_url)


def _http(cfg: HttpSinkConfig, http: httpx.Client | None, app_url: str) -> Sink:
    return HttpSink.from_config(cfg, http=http)


#: ``type`` in the config -> how to build the sink. Explicit on purpose: no import side effects.
REGISTRY: Mapping[str, SinkFactory] = {"log": _log, "slack": _slack, "http": _http}


def build_sink(cfg: SinkConfig, *, http: httpx.Client | None = None, app_url: str = DEFAULT_APP_URL) -> Sink:
    """Build one sink. ``app_url`` is ``[metronome] app_url``: Slack messages link into it."""
    return REGISTRY[cfg.type](cfg, http, app_url)


def build_sinks(
    cfgs: tuple[SinkConfig, ...], *, http: httpx.Client | None = None, app_url: str = DEFAULT_APP_URL
) -> dict[str, Sink]:
    return {cfg.name: build_sink(cfg, http=http, app_url=app_url) for cfg in cfgs}
