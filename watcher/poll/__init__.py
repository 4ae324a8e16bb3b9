"""The poll cycle: read a complete picture from a source, diff it against the store, commit.

:class:`Poller` runs one cycle at a time per database (``poll.lock``); the cycle itself is in
``poll.cycle``, reading both listings through ``poll.scan``, with the page memo of ``poll.memo``.
A source is anything that follows :class:`CustomerSource` (``watcher.metronome.MetronomeClient``).
"""

from .cycle import Poller, PollResult
from .source import CustomerSource, Page

__all__ = ["CustomerSource", "Page", "PollResult", "Poller"]
