"""Real filesystems that fail for the tests: a small disk that fills up, and one that is read-only.

A :class:`SmallDisk` is a tmpfs of its own, mounted once per session, on which a test puts its
database and then leaves exactly so many bytes free with a filler file (:meth:`SmallDisk.fill`),
and frees them again (:meth:`SmallDisk.free_up`): SQLite then fails as it does on a real full disk.
Mounting needs root (CI runs as root); elsewhere the tests that need it are skipped, saying why.
``tests/conftest.py`` makes the fixtures available to every test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

#: The tmpfs's size: room for a store of a few hundred customers and its WAL.
_SIZE = "8m"
_NOT_ROOT = (
    "a real full or read-only disk needs a tmpfs of its own, and only root may mount one (CI runs as root)"
)


def _mount(where: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(_NOT_ROOT)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs at {where}: {done.stderr.strip()}")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "--lazy", str(where)], capture_output=True)


class SmallDisk:
    """A directory on a small filesystem of its own, emptied after each test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler"

    @property
    def free(self) -> int:
        return shutil.disk_usage(self.root).free

    def fill(self, leave: int) -> None:
        """Leave ``leave`` bytes free (a multiple of the page size, 4 KiB), with a filler file."""
        need = self.free - leave
        assert need >= 0, f"only {self.free} bytes are free"
        with self.filler.open("ab") as f:
            chunk = b"\0" * (1 << 20)
            while need > 0:
                need -= f.write(chunk[: min(need, len(chunk))])
        assert self.free == leave, (self.free, leave)

    def free_up(self) -> None:
        self.filler.unlink(missing_ok=True)

    def clear(self) -> None:
        for entry in self.root.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


@pytest.fixture(scope="session")
def _small_disk_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    where = tmp_path_factory.mktemp("small-disk")
    _mount(where, _SIZE)
    yield where
    _umount(where)


@pytest.fixture
def small_disk(_small_disk_mount: Path) -> Iterator[SmallDisk]:
    """A small disk of its own for this test (see :class:`SmallDisk`); skipped unless root."""
    disk = SmallDisk(_small_disk_mount)
    disk.clear()
    yield disk
    disk.clear()


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Callable[[], None]]:
    """A directory (``tmp_path / "ro"``) that the returned function makes read-only: a tmpfs
    remounted read-only as root (root writes through file permissions), else by permissions."""
    where = tmp_path / "ro"
    where.mkdir()
    mounted = os.geteuid() == 0
    if mounted:
        _mount(where, "4m")

    def seal() -> None:
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        else:
            for entry in where.iterdir():
                entry.chmod(0o444)
            where.chmod(0o555)

    yield seal
    if mounted:
        _umount(where)
    else:
        where.chmod(0o755)
