"""``watcher._secrets``: a secret registered anywhere is cut out of everything, logs included."""

from __future__ import annotations

import io
import logging

import orjson
import structlog

from watcher._logging import configure_logging
from watcher._secrets import REDACTED, redact, register


def test_a_registered_secret_is_cut_out_wherever_it_appears_and_the_longest_first() -> None:
    register("https://hooks.example.test/services/T1/B2/shortkey-and-more")
    register("shortkey")
    assert redact("posting to https://hooks.example.test/services/T1/B2/shortkey-and-more failed") == (
        f"posting to {REDACTED} failed"
    )
    assert redact("token shortkey leaked") == f"token {REDACTED} leaked"
    register("ab")  # too short to be anything but an ordinary word
    assert redact("ab cd") == "ab cd"


def test_log_lines_of_our_own_and_of_the_standard_library_are_redacted() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    register("mtr_live_registered_SECRET_9")
    structlog.get_logger("watcher.test").info("test.event", detail="token mtr_live_registered_SECRET_9 here")
    logging.getLogger("httpx").warning("sent mtr_live_registered_SECRET_9")
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["test.event", f"sent {REDACTED}"]
    assert lines[0]["detail"] == f"token {REDACTED} here"
    assert "mtr_live_registered_SECRET_9" not in stream.getvalue()
