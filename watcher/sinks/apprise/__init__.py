"""The ``apprise`` sink: ``messages`` says what a message holds, ``sink`` sends it to one URL."""

from .messages import Message, Shape, build_digest, build_event_message
from .sink import AppriseSink

__all__ = ["AppriseSink", "Message", "Shape", "build_digest", "build_event_message"]
