"""``watcher._retry``: the one back-off and the one reading of ``Retry-After``."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from watcher._retry import Backoff, parse_retry_after

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC).timestamp()


class MaxRng(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_doubles_up_to_its_cap_with_full_jitter() -> None:
    backoff = Backoff(initial=0.5, maximum=3.0)
    assert [backoff.wait(n, MaxRng()) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    rng = random.Random(7)
    draws = [backoff.wait(3, rng) for _ in range(200)]
    assert all(0.0 <= d <= 2.0 for d in draws)
    assert min(draws) < 0.5 < 1.5 < max(draws)  # spread over the whole range, not a fixed wait
    assert backoff.wait(10_000, MaxRng()) == 3.0  # no overflow on absurd attempt numbers


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("7", 7.0),
        (" 2.5 ", 2.5),
        ("Fri, 01 Mar 2024 12:00:12 GMT", 12.0),
        ("Fri, 01 Mar 2024 11:00:00 GMT", 0.0),  # in the past: no wait
        ("soon-ish", None),
        ("-5", None),
        ("1e9", None),
    ],
)
def test_retry_after_is_delay_seconds_or_an_http_date(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == seconds
