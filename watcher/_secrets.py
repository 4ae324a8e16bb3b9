"""Secrets that must never be written anywhere: the one place that knows them and cuts them out.

Every secret the process holds (the bearer token, webhook URLs, signing secrets) is registered here
when it is read, and every text that leaves the process through a log line, an error, an outcome or
the database passes :func:`redact` first. One registry, so a secret registered by one part is cut
out of what any other part writes.
"""

from __future__ import annotations

import threading

__all__ = ["REDACTED", "redact", "register"]

REDACTED = "[redacted]"
#: Shorter values would be cut out of ordinary words; no real secret is that short.
_MIN_LENGTH = 4

_secrets: frozenset[str] = frozenset()
_lock = threading.Lock()


def register(value: str | None) -> None:
    """Remember ``value`` as a secret, from now on cut out of everything :func:`redact` sees."""
    global _secrets
    if value and len(value) >= _MIN_LENGTH:
        with _lock:
            _secrets = _secrets | {value}


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``[redacted]``."""
    # The longest first, so a URL is cut whole rather than around a shorter secret inside it.
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text
