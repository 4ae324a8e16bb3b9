"""The watcher's one HTTP server: health and metrics always, the web view and the change feed
when ``[web]`` is on (see :mod:`watcher.web.app`), as an ASGI app (Starlette, Jinja2 templates, no
JavaScript) under uvicorn on a daemon thread (:class:`WebServer`)."""

from .app import OPEN_PATHS, SECURITY_HEADERS, create_app
from .server import WebServer

__all__ = ["OPEN_PATHS", "SECURITY_HEADERS", "WebServer", "create_app"]
