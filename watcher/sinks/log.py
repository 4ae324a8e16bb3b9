"""The ``log`` sink: one JSON line per event, the v1 contract exactly, to stdout or a file.

It writes through its own structlog logger, never the operational one, so that the event stream
stays machine-readable and apart from the daemon's own logs (which go to stderr by default).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import IO, Any, TextIO, cast

import orjson
import structlog

from ..events import OutcomeKind
from .base import Outcome

__all__ = ["LogSink"]


def _contract_only(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> Any:
    return event_dict["payload"]


def _dumps(obj: Any, **_kw: Any) -> str:
    return orjson.dumps(obj).decode()


class LogSink:
    max_batch = 500

    def __init__(self, name: str, *, path: Path | None = None, stream: IO[str] | None = None) -> None:
        self.name = name
        self.path = path
        self._own: IO[str] | None = None
        if stream is None:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._own = stream = path.open("a", encoding="utf-8")
            else:
                stream = sys.stdout
        self._stream = stream
        self._lock = threading.Lock()
        self._logger = structlog.wrap_logger(
            structlog.WriteLogger(cast(TextIO, stream)),
            processors=[_contract_only, structlog.processors.JSONRenderer(serializer=_dumps)],
            wrapper_class=structlog.BoundLogger,
            cache_logger_on_first_use=True,
        )

    def deliver(self, events: Sequence[Mapping[str, Any]]) -> Sequence[Outcome]:
        out: list[Outcome] = []
        with self._lock:
            for event in events:
                try:
                    self._logger.msg(payload=event)
                except (OSError, ValueError) as exc:  # a full disk or closed stream is a retry
                    out.append(Outcome(OutcomeKind.RETRY, error=f"cannot write: {exc}"))
                    break
                out.append(Outcome.ok())
            try:
                self._stream.flush()
            except (OSError, ValueError) as exc:
                return [Outcome(OutcomeKind.RETRY, error=f"cannot flush: {exc}")] * len(out)
        return out

    def close(self) -> None:
        if self._own is not None:
            self._own.close()
            self._own = None
