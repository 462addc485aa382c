"""Durable file steps of the adapter store: fsynced writes, directory syncs, and the crash points
between them.

Every point between two durable steps is named in STEPS, in the order a commit reaches them and
then those of a removal. Tests kill a process at each one in turn through CRASH_POINT
(tests/adapters/test_store.py); in production it stays None.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

STEPS = (
    "stage:config-partial", "stage:config", "stage:weights-partial", "stage:weights", "stage:synced",
    "place:renamed", "place:synced",
    "catalog:written-partial", "catalog:written", "catalog:replaced", "catalog:synced",
    "remove:moved",
)
CRASH_POINT: Callable[[str], None] | None = None


def step(name: str) -> None:
    if CRASH_POINT is not None:
        CRASH_POINT(name)


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in `path` durable (a file fsync does not cover its directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes, name: str) -> None:
    """Write and fsync `data`; the crash points `name`-partial (half written) and `name`."""
    with open(path, "wb") as out:
        half = len(data) // 2
        out.write(data[:half])
        out.flush()
        step(f"{name}-partial")  # a crash here leaves a half-written file behind
        out.write(data[half:])
        out.flush()
        os.fsync(out.fileno())
    step(name)
