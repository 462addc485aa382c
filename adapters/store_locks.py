"""Several processes sharing one adapter store (replicas on one data dir, a network filesystem).

- Writers exclude each other with an advisory lock on `<root>/.lock` (`exclusive`): a commit,
  a removal and the start-up repair run under it, and each re-reads catalog.json first, so no
  process writes a catalog made from a stale copy (A adds x, B adds y: both stay listed).
- Each live store stages in a folder of its own, `tmp/<owner>/`, marked live by an exclusive
  lock on `tmp/<owner>.lock` that the process holds for as long as it runs (the kernel drops it
  when the process dies, SIGKILL included). Start-up cleanup (`clean_dead`) removes only what no
  live process holds: another replica's in-flight upload is never deleted under it.

These are POSIX advisory locks (flock): every loraswap process honours them; on NFS they need a
server with lock support (NFSv4).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path

LOCK_SUFFIX = ".lock"


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold the advisory lock file `path` (created if missing) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class StagingArea:
    """`tmp/<owner>/`: where one store stages and trashes, live while its lock is held. Create it
    under the store's `exclusive` lock, so that no cleaner sees it before it is locked."""

    def __init__(self, tmp: Path) -> None:
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.path = tmp / self.owner
        lock_path = tmp / (self.owner + LOCK_SUFFIX)
        self._fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path.mkdir()
        # At exit (or when the store goes away) the area and its lock file go; after a crash the
        # next start's clean_dead removes them.
        weakref.finalize(self, _release, self.path, lock_path, self._fd)


def _release(path: Path, lock_path: Path, fd: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        lock_path.unlink()
    with contextlib.suppress(OSError):
        os.close(fd)


def _held(lock_path: Path) -> bool:
    """Whether a live process holds `lock_path` (False if it is free or gone)."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def clean_dead(tmp: Path) -> list[str]:
    """Remove from `tmp` every staging area whose owner is dead, and anything else not owned by
    a live store (leftovers of older versions); returns what was removed. Call it under the
    store's `exclusive` lock."""
    live = {entry.name.removesuffix(LOCK_SUFFIX) for entry in tmp.iterdir()
            if entry.name.endswith(LOCK_SUFFIX) and _held(entry)}
    removed = []
    for entry in tmp.iterdir():
        if entry.name.removesuffix(LOCK_SUFFIX) in live:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry.name)
    return removed
