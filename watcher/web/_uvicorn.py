"""An ASGI app served by uvicorn on a daemon thread: start (binding first, so a taken port is an
error the caller sees), stop within a bound, and start again on the same port.

The socket is bound here rather than by uvicorn, because uvicorn reports a failed bind by exiting
the process, and because ``port=0`` must tell the caller which port the OS chose before anyone
connects. uvicorn's own signal handling stays off (it only installs it on the main thread; the
daemon owns SIGTERM), its access log is off (probes every few seconds would drown the operational
log), and its loggers go through the process's structlog set-up like every other library's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any

import uvicorn

__all__ = ["ThreadedUvicorn"]

#: How long a request in progress may run on after :meth:`ThreadedUvicorn.stop` (the daemon has 8 s
#: in all, and a page is a few milliseconds of work).
_GRACE = 2.0


class ThreadedUvicorn:
    """Serves ``app`` on ``host:port`` once started; ``port=0`` binds a port the OS chooses, kept
    across :meth:`stop` and :meth:`start`."""

    def __init__(self, app: Any, *, host: str, port: int, name: str = "web") -> None:
        self.app = app
        self.host = host
        self._port = port
        self._name = name
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{self._name} server is not started")
        return self._port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self, *, timeout: float = 10.0) -> None:
        """Bind (raises :class:`OSError` when the port is taken) and serve in a daemon thread."""
        if self._server is not None:
            raise RuntimeError(f"{self._name} server is already started")
        sock = _bind(self.host, self._port)
        self._port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            http="h11",
            ws="none",
            server_header=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=int(_GRACE),
            limit_concurrency=200,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])),
            name=f"{self._name}:{self._port}",
            daemon=True,
        )
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                with contextlib.suppress(OSError):
                    sock.close()
                raise OSError(f"{self._name} server did not start on {self.host}:{self._port}")
            time.sleep(0.005)
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Stop listening, close idle connections, let requests in progress finish (up to a couple
        of seconds), and wait for the thread; idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.should_exit = True
        if thread is not None:
            thread.join(timeout=_GRACE + 1.0)
            if thread.is_alive():  # a request that ignores its grace: cut it
                server.force_exit = True
                thread.join(timeout=1.0)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio only switches Nagle off (TCP_NODELAY) on a connection whose socket
    # says it is TCP, and a keep-alive browser otherwise waits out a delayed ACK (40 ms) per request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # As every server does, so that a restart can take the port back while old connections
        # are in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock
