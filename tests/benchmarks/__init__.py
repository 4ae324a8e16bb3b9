"""The benchmarks (not collected by pytest: ``addopts`` ignores this folder), and :func:`run`, with
which the small tests beside them (``tests/test_benchmark*.py``, ``tests/test_bench_web.py``) run
each one's documented command end to end so that it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["run"]

#: The repository's root: the benchmarks run as ``python -m tests.benchmarks.NAME`` from there.
ROOT = Path(__file__).resolve().parents[2]


def run(name: str, options: dict[str, Any], *, timeout: float = 300) -> dict[str, Any]:
    """Run ``python -m tests.benchmarks.NAME`` with ``options`` (``--out`` among them); return the
    JSON it printed, after checking that it succeeded and wrote the same JSON to ``--out``."""
    argv = [str(x) for option in options.items() for x in option]
    proc = subprocess.run(
        [sys.executable, "-m", f"tests.benchmarks.{name}", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed: dict[str, Any] = json.loads(proc.stdout)
    assert json.loads(Path(options["--out"]).read_text()) == printed
    return printed
