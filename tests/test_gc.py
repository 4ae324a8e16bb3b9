"""``watcher._gc``: the command line runs its cycles with the start-up objects frozen."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from watcher.cli import main
from watcher.simulator import SimulatedMetronome


def test_a_poll_runs_with_the_startup_objects_frozen_and_gives_the_collector_back(
    fake: SimulatedMetronome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.create_customer("Acme")
    config = tmp_path / "watcher.toml"
    config.write_text(
        f'[metronome]\nbase_url = "{fake.url}"\n[store]\npath = "{tmp_path / "watcher.db"}"\n'
        '[logging]\nlevel = "warning"\nformat = "json"\n'
    )
    monkeypatch.setenv("METRONOME_BEARER_TOKEN", fake.token)
    frozen_during: list[int] = []
    # The fake serves from a thread of this process: what it sees is what the cycle runs with.
    fake.on_page(1, lambda _: frozen_during.append(gc.get_freeze_count()), archived=False)
    assert gc.get_freeze_count() == 0

    assert main(["--config", str(config), "poll"]) == 0

    (during,) = frozen_during
    assert during > 0  # what the process started with: modules, the config, the wired app
    assert gc.get_freeze_count() == 0
