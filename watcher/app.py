"""Wiring: turn a :class:`~watcher.config.Config` into the running parts.

Kept apart from the CLI so that tests, the demo and the daemon assemble the watcher the same way
and can hand in their own httpx clients and clocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from ._logging import add_secret
from ._time import Clock, utcnow
from .client import MetronomeClient, RetryPolicy
from .config import Config, HttpSinkConfig, SlackSinkConfig
from .delivery import Deliverer
from .poll import Poller, PollResult
from .routing import Route, routes_from_config
from .sinks import Sink, build_sinks
from .store import Store

__all__ = ["App", "build_app"]


@dataclass
class App:
    config: Config
    store: Store
    client: MetronomeClient
    poller: Poller
    deliverer: Deliverer
    sinks: dict[str, Sink] = field(default_factory=dict)

    def poll_and_deliver(self) -> PollResult:
        result = self.poller.run()
        self.deliverer.deliver_due()
        return result

    def close(self) -> None:
        self.deliverer.close()
        self.client.close()
        self.store.close()


def build_app(
    config: Config,
    token: str,
    *,
    clock: Clock = utcnow,
    api_http: httpx.Client | None = None,
    sink_http: httpx.Client | None = None,
    extra_sinks: dict[str, Sink] | None = None,
) -> App:
    add_secret(token)
    for s in config.sinks:
        if isinstance(s, SlackSinkConfig):
            add_secret(s.webhook_url.get_secret_value())
        elif isinstance(s, HttpSinkConfig):
            add_secret(s.secret.get_secret_value())
    m = config.metronome
    store = Store(config.store.path)
    client = MetronomeClient(
        m.base_url,
        token,
        http=api_http,
        timeout=m.timeout.total_seconds(),
        retry=RetryPolicy(max_attempts=m.max_attempts, max_total_wait=m.max_retry_wait.total_seconds()),
    )
    routes = list(routes_from_config(config))
    sinks = build_sinks(config.sinks, http=sink_http, app_url=m.app_url)
    if extra_sinks:
        sinks.update(extra_sinks)
        routes.extend(Route(name) for name in extra_sinks)
    poller = Poller(
        store, client, diff=config.diff, routes=routes, clock=clock, concurrent_listings=m.concurrent_listings
    )
    deliverer = Deliverer(store, sinks, config=config.delivery, clock=clock)
    return App(config, store, client, poller, deliverer, sinks)
