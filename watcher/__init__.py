"""metronome-watcher: change detection for Metronome customers.

Polls ``GET /v1/customers``, diffs each complete picture against the last one stored in SQLite,
records every change in an append-only audit log and delivers it to sinks. The public modules are
one per concept: :mod:`watcher.config`, :mod:`watcher.client`, :mod:`watcher.store`,
:mod:`watcher.diff`, :mod:`watcher.poll`, :mod:`watcher.routing`, :mod:`watcher.delivery`,
:mod:`watcher.sinks`, :mod:`watcher.daemon`, :mod:`watcher.health`, :mod:`watcher.cli`,
:mod:`watcher.fake_metronome` and :mod:`watcher.errors`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("metronome-watcher")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0"

__all__ = ["__version__"]
