"""The benchmarks (not collected by pytest: ``addopts`` ignores this folder); what each reports and
how (:func:`machine`, :func:`emit`); and :func:`run`, with which the small tests beside them
(``tests/test_benchmark*.py``, ``tests/test_bench_web.py``) run each one's documented command end
to end so that it cannot rot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["emit", "machine", "run"]

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


def machine() -> dict[str, Any]:
    """The machine a report's figures were measured on."""
    return {
        "uname": " ".join(platform.uname()),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def emit(report: dict[str, Any], out: Path | None) -> None:
    """Print ``report`` as JSON on stdout and, with ``--out``, write the same JSON there."""
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        Path(out).write_text(text + "\n")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
