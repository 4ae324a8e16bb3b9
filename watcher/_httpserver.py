"""A small threaded HTTP server on a daemon thread: start, stop, and start again on the same port.

Shared by the health endpoints, the simulated Metronome and the tests' receivers, which all need
the same things of the standard library's ``ThreadingHTTPServer``: a port chosen by the OS that
stays the same across restarts, a stop that returns promptly and cuts keep-alive connections (so
that clients see the server go away), and threads that never hold up the process's exit.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["BackgroundServer"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], owner: Any) -> None:
        #: What the handler serves (``self.server.owner``).
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)


class BackgroundServer:
    """Serves ``handler`` (whose ``self.server.owner`` is ``owner``) on ``host:port`` once started.

    ``port=0`` binds a port the OS chooses; it is kept, so that :meth:`start` after :meth:`stop`
    listens on the same one. ``poll_interval`` bounds how long :meth:`stop` waits.
    """

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        owner: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "http",
        poll_interval: float = 0.05,
    ) -> None:
        self._handler = handler
        self._owner = owner
        self.host = host
        self._port = port
        self._name = name
        self._poll_interval = poll_interval
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._server is None:
            raise RuntimeError(f"{self._name} server is not started")
        return self._port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> BackgroundServer:
        """Bind (raises :class:`OSError` when the port is taken) and serve in a daemon thread."""
        if self._server is not None:
            raise RuntimeError(f"{self._name} server is already started")
        server = _Server((self.host, self._port), self._handler, self._owner)
        self._server, self._port = server, int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": self._poll_interval},
            name=f"{self._name}:{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release the port, and cut every open connection; idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        server.close_connections()
        if thread is not None:
            thread.join(timeout=2)
