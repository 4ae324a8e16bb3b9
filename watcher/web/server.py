"""The one HTTP server of the daemon: health, and the web view when ``[web]`` is on, on one port."""

from __future__ import annotations

import structlog

from ..config import WebConfig
from ..health import Health
from ._uvicorn import ThreadedUvicorn
from .app import create_app

__all__ = ["WebServer"]

log = structlog.get_logger("watcher.web")


class WebServer:
    """Serves ``/healthz``, ``/readyz`` and ``/metrics`` for ``health`` and, when ``web.enabled``,
    the pages and the feed, on ``host:port`` until :meth:`stop`. ``port=0`` binds an ephemeral
    port (see :attr:`port`)."""

    def __init__(
        self, health: Health, *, port: int, host: str = "0.0.0.0", web: WebConfig | None = None
    ) -> None:
        self.health = health
        self.web_enabled = bool(web and web.enabled)
        self._server = ThreadedUvicorn(create_app(health, web), host=host, port=port, name="http")

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        return self._server.port

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> WebServer:
        """Bind (raises :class:`OSError` when the port is taken) and serve in a daemon thread."""
        self._server.start()
        log.info("health.listening", host=self.host, port=self.port, web=self.web_enabled)
        return self

    def stop(self) -> None:
        """Stop within a few seconds (requests in progress get a short grace); idempotent."""
        self._server.stop()

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
