"""The ``slack`` sink: ``messages`` says what a message holds, ``sink`` posts and paces them."""

from .messages import MAX_BLOCKS, MAX_SECTION_TEXT, build_digest, build_event_message
from .sink import MIN_INTERVAL, SlackSink, set_pacing_clock

__all__ = [
    "MAX_BLOCKS",
    "MAX_SECTION_TEXT",
    "MIN_INTERVAL",
    "SlackSink",
    "build_digest",
    "build_event_message",
    "set_pacing_clock",
]
