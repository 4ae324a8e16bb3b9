"""Wiring: turn a :class:`~watcher.config.Config` into the running parts.

Kept apart from the CLI so that tests, the demo and the daemon assemble the watcher the same way
and can hand in their own httpx clients and clocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from ._time import Clock, utcnow
from .config import Config
from .delivery import Deliverer
from .metronome import MetronomeClient, RetryPolicy
from .poll import Poller
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
    """The watcher for ``config``: its store, client, poller, sinks and deliverer.

    ``extra_sinks`` are added to the configured ones and take every customer event (the demo's console).
    """
    m = config.metronome
    # The client and the sinks register their secrets as they are built, before anything is logged.
    client = MetronomeClient(
        m.base_url,
        token,
        http=api_http,
        timeout=m.timeout.total_seconds(),
        retry=RetryPolicy(max_attempts=m.max_attempts, max_total_wait=m.max_retry_wait.total_seconds()),
    )
    sinks = build_sinks(config.sinks, http=sink_http, app_url=m.app_url)
    routes = list(routes_from_config(config))
    if extra_sinks:
        sinks.update(extra_sinks)
        routes.extend(Route(name) for name in extra_sinks)
    store = Store(config.store.target)
    poller = Poller(
        store,
        client,
        diff=config.diff,
        routes=routes,
        clock=clock,
        concurrent_listings=m.concurrent_listings,
        plans=config.plans,
        plan_source=client,
    )
    deliverer = Deliverer(store, sinks, config=config.delivery, clock=clock)
    return App(config, store, client, poller, deliverer, sinks)
