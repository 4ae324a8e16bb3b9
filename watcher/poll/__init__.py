"""The poll cycle: read a complete picture from a source, diff it against the store, commit.

:class:`Poller` runs one cycle at a time per database (``poll.lock``); the cycle itself is in
``poll.cycle``, reading both listings through ``poll.scan``, with the page memo of ``poll.memo``.
A source is anything that follows :class:`CustomerSource` (``watcher.metronome.MetronomeClient``).
With ``[plans] watch`` on, the plans are a second source (:class:`PlanSource`, the same client),
read and committed on their own by ``poll.plans`` (:class:`PlansResult`).
"""

from .cycle import Poller, PollResult
from .plans import PlansResult
from .source import CustomerSource, Page, PlanSource

__all__ = ["CustomerSource", "Page", "PlanSource", "PlansResult", "PollResult", "Poller"]
