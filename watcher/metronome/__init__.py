"""Metronome's API, as the watcher reads it: the client (requests, retries) and its pages.

:class:`MetronomeClient` is the customers source of the poll cycle (``watcher.poll.CustomerSource``),
and its plans source (``watcher.poll.PlanSource``).
"""

from .client import DEFAULT_TIMEOUT, MetronomeClient, RetryPolicy
from .pages import ListingPage, PageBody

__all__ = ["DEFAULT_TIMEOUT", "ListingPage", "MetronomeClient", "PageBody", "RetryPolicy"]
