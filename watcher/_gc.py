"""Keep the objects a process starts with out of the cyclic garbage collector's way.

A poll cycle allocates and drops hundreds of thousands of containers (parsed records, fingerprint
lists, staged rows), so the collector runs often, and now and then a full collection walks every
object it tracks. Most of those are the process's own furniture: the imported modules, the config
and the wired app, which live as long as the process. What freezing them saves is measured in
``docs/performance.md``.

:func:`frozen_heap` freezes them (``gc.freeze``: the permanent generation, which no collection
walks) while the watcher runs, and unfreezes them afterwards, so that a caller that runs the
command line in-process, as the tests do, gets its collector back as it was. Objects created
while it runs are collected as usual. It does not nest: the inner exit would unfreeze all.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["frozen_heap"]


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Exclude every object tracked now from the collector's passes until the block ends."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
