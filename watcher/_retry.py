"""How long to wait before trying again: one definition for the API client and for sink delivery.

Both back off exponentially with full jitter (a uniform draw between 0 and the exponential bound;
see the AWS architecture blog post "Exponential Backoff And Jitter"), and both read ``Retry-After``
the same way. The client retries inside one call, through tenacity (:mod:`watcher.metronome.client`);
delivery stores the next attempt's time, so a sink's pause outlives the process
(:mod:`watcher.delivery`). What each does with a ``Retry-After`` it finds too long is its own policy.
"""

from __future__ import annotations

import email.utils
import random
import re
from dataclasses import dataclass
from datetime import UTC

__all__ = ["Backoff", "parse_retry_after"]

_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Waits that double from ``initial`` up to ``maximum`` seconds, each drawn with full jitter."""

    initial: float
    maximum: float

    def bound(self, attempt: int) -> float:
        """The most the wait after failure number ``attempt`` (1 for the first) may be."""
        # The exponent is clamped so that an absurd attempt number cannot overflow a float.
        return min(self.maximum, self.initial * 2.0 ** min(max(attempt - 1, 0), 64))

    def wait(self, attempt: int, rng: random.Random) -> float:
        """The wait after failure number ``attempt``, drawn from ``rng``."""
        return rng.uniform(0.0, self.bound(attempt))


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks for, from ``now`` (Unix time); None when absent or unreadable.

    Both RFC 9110 forms: delay-seconds, and an HTTP date (one in the past means no wait). An
    unreadable value is ignored rather than fatal: the caller's own back-off still applies.
    """
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" gives a naive datetime; HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)
