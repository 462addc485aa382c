"""The on-disk, crash-safe store of LoRA adapters (PEFT folders) under the server's data directory.

Layout under `root` (`--data-dir`):

    catalog.json                      {"format": 1, "adapters": {name: {"current", "versions": [...]}}}
    adapters/<name>/<version>/        adapter_config.json + adapter_model.safetensors (immutable)
    tmp/<owner>/<random>/             staging area of one live store (tmp/<owner>.lock held)
    .lock                             the writers' advisory lock (adapters/store_locks.py)

A version id is sha256(config bytes + weights bytes), so identical uploads share one folder.

Crash safety (a SIGKILL at any moment leaves the previous state intact, nothing partial listed):
- files are written into tmp/, fsynced with their folder, then the folder is renamed into
  adapters/ (one atomic step on one filesystem), so adapters/ never holds a half-written version;
- only catalog.json says what exists; it is replaced atomically (temp file in root, fsync,
  os.replace, fsync root), so it is always the old or the new catalog, never a mix;
- removals update the catalog first, then move folders into tmp/ before deleting them;
- at start what dead processes left in tmp/ and stray catalog temp files are removed, and catalog
  entries whose folder is missing or incomplete are dropped. A version folder renamed in just
  before a crash, with no catalog entry yet, stays unlisted and is reused if the same content is
  committed again (after its files are checked against its hash).

Several processes may share one store: writers exclude each other and re-read the catalog before
changing it, each stages in its own folder, and every read notices a catalog another process
wrote (adapters/store_locks.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from adapters.durable import fsync_dir, step, write_synced
from adapters.store_locks import StagingArea, clean_dead, exclusive
from adapters.errors import LoraswapError

# The two files of a PEFT adapter (adapters/peft_format.py reads them).
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_VERSION_PATTERN = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1 << 20  # 1 MiB: bounded memory whatever the adapter size
_CATALOG_TMP_PREFIX = ".catalog-"
_FORMAT = 1

log = logging.getLogger(__name__)

class StoreError(LoraswapError):
    """Base class of adapter store problems."""


class AdapterNameError(StoreError):
    """The name is not a valid adapter name."""


class UnknownAdapterError(StoreError):
    """No adapter of that name is in the catalog."""


class AdapterTooLargeError(StoreError):
    """The weights exceed the size limit given to stage_*."""


class IncompleteAdapterError(StoreError):
    """A folder to stage lacks adapter_config.json or adapter_model.safetensors."""


def check_name(name: str) -> None:
    """Refuse anything that could escape adapters/ when used in a path; called before any path is built."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise AdapterNameError(
            f"invalid adapter name {name!r}: names are 1-64 characters of letters, digits, "
            "'.', '_' or '-', and not '.' or '..'"
        )


@dataclass(frozen=True)
class StoredVersion:
    name: str
    version: str  # full sha256 hex
    path: Path  # folder holding adapter_config.json and adapter_model.safetensors
    size: int  # bytes of both files together
    created: float  # time.time() at commit
    source: str  # free text, e.g. "upload", "path:/x", "hub:org/repo@rev"


@dataclass(frozen=True)
class _Entry:
    current: str
    versions: tuple[StoredVersion, ...]  # oldest first


@dataclass(frozen=True)
class Staged:
    """A fully written, fsynced copy of an adapter in the store's tmp area, not yet visible."""

    path: Path  # the temp folder (caller validates the files there before commit)
    version: str
    size: int

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _folder_version(folder: Path) -> str:
    """sha256(config bytes + weights bytes) of a version folder, read in bounded blocks."""
    digest = hashlib.sha256((folder / CONFIG_FILE).read_bytes())
    with open(folder / WEIGHTS_FILE, "rb") as weights:
        while block := weights.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _complete(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


_Stamp = tuple[int, int, int] | None  # catalog.json's (inode, mtime_ns, size); None: no file
_ANY = object()


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._adapters = self.root / "adapters"
        self._tmp = self.root / "tmp"
        self._catalog_path = self.root / "catalog.json"
        self._lock_path = self.root / ".lock"
        # Writers: this lock across threads, the file lock across processes. Readers take only
        # _read_lock, briefly, to swap or read the in-memory catalog: a writer waiting for another
        # process, fsyncing or hashing never blocks a reader.
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._stamp: _Stamp = None  # catalog.json as last read or written
        self._catalog: dict[str, _Entry] = {}
        self.generation = 0  # bumped whenever the catalog changes (here or in another process)
        for folder in (self.root, self._adapters, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)
        with self._write_lock, exclusive(self._lock_path):
            self._clean_leftovers()
            # Created under the file lock, so no other process's cleanup sees it unlocked.
            self._area = StagingArea(self._tmp)
            catalog, dropped = self._load()
            self._swap(catalog, self._stat())
            if dropped:  # persist the repair so the warning is logged once
                self._replace_catalog(catalog)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Exclusive against this process's threads and every other process on the store; the
        catalog is re-read first, whatever its stat says (a network filesystem may cache it)."""
        with self._write_lock, exclusive(self._lock_path):
            self._swap(self._load()[0], self._stat())
            yield

    def _staging(self) -> Path:
        return self._area.path

    def _stat(self) -> _Stamp:
        try:
            st = os.stat(self._catalog_path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _swap(self, catalog: dict[str, _Entry], stamp: _Stamp, *, if_still: _Stamp | object = _ANY) -> None:
        """Make `catalog` (read at `stamp`) the in-memory one; with `if_still`, only if no other
        catalog was swapped in since the caller saw that stamp."""
        with self._read_lock:
            if if_still is not _ANY and self._stamp != if_still:
                return
            if catalog != self._catalog:
                self.generation += 1
            self._catalog, self._stamp = catalog, stamp

    def refresh(self) -> int:
        """Pick up what other processes committed (catalog.json's stat changed); returns the
        catalog's generation. Never waits for a writer."""
        seen = self._stamp
        stamp = self._stat()
        if stamp != seen:
            self._swap(self._load()[0], stamp, if_still=seen)
        return self.generation

    @classmethod
    def temporary(cls, prefix: str = "loraswap-run-") -> AdapterStore:
        """A store in a new folder under the system's temp dir ($TMPDIR), removed with the store
        or at the latest when the process exits: what a run holds without persisting it."""
        root = Path(tempfile.mkdtemp(prefix=prefix))
        store = cls(root)
        weakref.finalize(store, shutil.rmtree, root, True)
        return store

    def stage_files(self, config: bytes, weights: BinaryIO | Path, *, max_bytes: int | None = None) -> Staged:
        # No lock: long I/O into this store's own staging folder; only commit touches shared state.
        folder = self._staging() / uuid.uuid4().hex
        folder.mkdir()
        try:
            digest = hashlib.sha256(config)
            write_synced(folder / CONFIG_FILE, config, "stage:config")
            with contextlib.ExitStack() as stack:
                src = stack.enter_context(open(weights, "rb")) if isinstance(weights, os.PathLike) else weights
                written = self._copy(src, folder / WEIGHTS_FILE, digest, max_bytes)
            fsync_dir(folder)
            step("stage:synced")
        except BaseException:  # including KeyboardInterrupt: never leave a partial copy behind
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Staged(folder, digest.hexdigest(), len(config) + written)

    def stage_dir(self, folder: Path, *, max_bytes: int | None = None) -> Staged:
        folder = Path(folder)
        if not _complete(folder):
            raise IncompleteAdapterError(f"{folder} must contain {CONFIG_FILE} and {WEIGHTS_FILE}")
        return self.stage_files((folder / CONFIG_FILE).read_bytes(), folder / WEIGHTS_FILE, max_bytes=max_bytes)

    @staticmethod
    def _copy(src: BinaryIO, dest: Path, digest: hashlib._Hash, max_bytes: int | None) -> int:
        written = 0
        with open(dest, "wb") as out:
            while block := src.read(_BLOCK):
                written += len(block)
                if max_bytes is not None and written > max_bytes:
                    raise AdapterTooLargeError(f"adapter weights exceed the limit of {max_bytes / 1e6:g} MB")
                digest.update(block)
                out.write(block)
                if written == len(block):  # after the first block: a crash leaves a partial copy
                    out.flush()
                    step("stage:weights-partial")
            out.flush()
            os.fsync(out.fileno())
        step("stage:weights")
        return written

    def commit(self, name: str, staged: Staged, *, source: str) -> StoredVersion:
        check_name(name)
        if staged.path.parent != self._area.path:
            raise StoreError("only folders staged by this store can be committed")
        with self._writing():  # re-reads the catalog: another process may have committed since
            dest = self._place(name, staged)
            entry = self._catalog.get(name)
            known = {v.version: v for v in entry.versions} if entry else {}
            new = StoredVersion(name, staged.version, dest, staged.size, time.time(), source)
            stored = known.get(staged.version, new)  # recommitting keeps the original record
            versions = entry.versions if stored.version in known else (*known.values(), stored)
            self._replace_catalog({**self._catalog, name: _Entry(stored.version, tuple(versions))})
            return stored

    def _place(self, name: str, staged: Staged) -> Path:
        """Move the staged folder to adapters/<name>/<version>/, or reuse an identical one: a folder
        already there is reused only if its files hash to the version (one left unlisted by a
        crash, or damaged by hand, is replaced)."""
        parent = self._adapters / name
        dest = parent / staged.version
        if _complete(dest) and _folder_version(dest) == staged.version:
            staged.discard()  # same hash, same content: idempotent
            return dest
        if not staged.path.is_dir():
            raise StoreError("the staged copy no longer exists (already committed or discarded)")
        if dest.exists():  # incomplete or not what its name says: replace it
            log.warning("adapter store: replacing %s/%s: its files do not hash to its name", name, staged.version)
            self._remove(dest)
        if not parent.is_dir():
            parent.mkdir()
            fsync_dir(self._adapters)
        os.rename(staged.path, dest)
        step("place:renamed")
        fsync_dir(parent)
        fsync_dir(staged.path.parent)
        step("place:synced")
        return dest

    def delete(self, name: str) -> None:
        check_name(name)
        with self._writing():
            self._entry(name)
            self._replace_catalog({n: e for n, e in self._catalog.items() if n != name})
            self._remove(self._adapters / name)

    def prune(self, name: str, keep: set[str]) -> None:
        check_name(name)
        with self._writing():
            entry = self._entry(name)
            doomed = [v for v in entry.versions if v.version not in keep and v.version != entry.current]
            if not doomed:
                return
            kept = tuple(v for v in entry.versions if v not in doomed)
            self._replace_catalog({**self._catalog, name: replace(entry, versions=kept)})
            for v in doomed:
                self._remove(v.path)

    def current(self, name: str) -> StoredVersion:
        check_name(name)
        self.refresh()
        with self._read_lock:
            entry = self._entry(name)
            return next(v for v in entry.versions if v.version == entry.current)

    def versions(self, name: str) -> list[StoredVersion]:
        check_name(name)
        self.refresh()
        with self._read_lock:
            return list(self._entry(name).versions)

    def names(self) -> list[str]:
        self.refresh()
        with self._read_lock:
            return sorted(self._catalog)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._catalog[name]
        except KeyError:
            raise UnknownAdapterError(f"adapter {name!r} is not in the store") from None

    def _remove(self, path: Path) -> None:
        """Move out of adapters/ in one rename (never half-deleted there), then delete from tmp/."""
        trash = self._staging() / uuid.uuid4().hex
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        fsync_dir(path.parent)
        step("remove:moved")
        shutil.rmtree(trash, ignore_errors=True)

    def _replace_catalog(self, catalog: dict[str, _Entry]) -> None:
        # Write first, then swap in memory: a failed write leaves memory and disk agreeing.
        self._write_catalog(catalog)
        self._swap(catalog, self._stat())

    def _write_catalog(self, catalog: dict[str, _Entry]) -> None:
        fields = ("version", "size", "created", "source")
        adapters = {
            name: {"current": e.current, "versions": [{f: getattr(v, f) for f in fields} for v in e.versions]}
            for name, e in sorted(catalog.items())
        }
        tmp = self.root / f"{_CATALOG_TMP_PREFIX}{uuid.uuid4().hex}.tmp"
        try:
            write_synced(tmp, json.dumps({"format": _FORMAT, "adapters": adapters}, indent=1).encode(), "catalog:written")
            os.replace(tmp, self._catalog_path)  # atomic: readers see the old or the new file
            step("catalog:replaced")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.root)  # make the replace itself durable
        step("catalog:synced")

    def _clean_leftovers(self) -> None:
        """What dead processes left (their staging areas, a catalog temp file): under the lock,
        so no live writer's files are touched."""
        removed = clean_dead(self._tmp)
        if removed:
            log.info("adapter store: removed %d leftover staging entries", len(removed))
        for stray in self.root.glob(_CATALOG_TMP_PREFIX + "*.tmp"):
            stray.unlink(missing_ok=True)

    def _load(self) -> tuple[dict[str, _Entry], bool]:
        """The catalog on disk minus versions whose folder is missing or incomplete; and whether any were."""
        catalog: dict[str, _Entry] = {}
        dropped = False
        try:
            data = json.loads(self._catalog_path.read_bytes())
            if data["format"] != _FORMAT:
                raise ValueError(f"unknown format {data['format']!r}")
            for name, raw in data["adapters"].items():
                check_name(name)  # never build a path from an unchecked name, even one read from disk
                versions = [v for v in map(partial(self._version_from_json, name), raw["versions"]) if v]
                dropped |= len(versions) != len(raw["versions"])
                if not versions:
                    log.warning("adapter store: dropping %r: none of its versions is on disk", name)
                    continue
                current = raw["current"]
                if current not in {v.version for v in versions}:  # fall back to the newest one left
                    current, dropped = versions[-1].version, True
                catalog[name] = _Entry(current, tuple(versions))
        except FileNotFoundError:
            return {}, False
        except (ValueError, KeyError, TypeError, AttributeError, StoreError) as exc:
            # Only this class writes it, atomically: refuse to start rather than silently start empty.
            raise StoreError(f"{self._catalog_path} is malformed ({exc!r}); fix or remove it") from exc
        return catalog, dropped

    def _version_from_json(self, name: str, item: dict[str, Any]) -> StoredVersion | None:
        version = item["version"]
        if not _VERSION_PATTERN.fullmatch(version):
            raise ValueError(f"bad version id {version!r}")
        path = self._adapters / name / version
        if not _complete(path):
            log.warning("adapter store: dropping %s/%s: its folder is missing or incomplete", name, version)
            return None
        return StoredVersion(name, version, path, int(item["size"]), float(item["created"]), str(item["source"]))
