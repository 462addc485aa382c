"""The adapters a server knows: names, their current immutable version, and a CPU cache of weights.

Three tiers: the on-disk store (every version, `adapters/store.py`), a CPU cache of validated
weights (LRU, `max_cpu` entries) and the device slots (the engine's SlotTable). Slots and the
cache are keyed by version (`name@<first 16 hex of the sha256>`), never by bare name, so replacing
an adapter is just a new key: requests accepted before the swap keep the old version's weights,
and the old slot empties once its last row ends.

Nothing becomes visible before it is completely validated: `add` checks a staged copy against the
slot spec (every problem at once), then commits it to the store, then publishes it.

Two stores: the persistent one (`--data-dir`: what the admin API uploads, served again after a
restart) and, for the adapters named at start (`--lora-modules`), one that lives as long as this
process. A start serves what that start was told to serve: start-up adapters do not come back at
the next start unless the operator asks for it (`--persist-lora-modules`). A start-up adapter
shadows a stored one of the same name for that run; an upload under its name makes it
persistent; a delete removes the name from both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters.errors import AdapterNotFoundError, InvalidAdapterError
from adapters.peft_format import parse_config_file, read_adapter_dir
from adapters.registry import check_name
from adapters.store import CONFIG_FILE, AdapterStore, Staged, StoredVersion
from adapters.validation import AdapterWeights, SlotSpec, validate

log = logging.getLogger("loraswap.catalog")


def version_key(name: str, version: str) -> str:
    """Slot/cache key of one version ('@' cannot occur in a name)."""
    return f"{name}@{version[:16]}"


def key_name(key: str) -> str:
    """The adapter name of a version key (metrics and logs label by name, not by version)."""
    return key.partition("@")[0]


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: str  # sha256 of config + weights
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size: int  # bytes on disk
    source: str
    created: float
    persistent: bool = True  # False: a start-up adapter, kept for this run only
    dora: bool = False  # a DoRA adapter (use_dora)
    modules_to_save: tuple[str, ...] = ()  # modules it saved whole (served from a module slot)
    trainable_tokens: int = 0  # embedding rows it retrained (PEFT's trainable tokens; a module slot too)

    @property
    def key(self) -> str:
        return version_key(self.name, self.version)

    def features(self) -> dict[str, object]:
        """What the adapter uses and what a request may do with it (GET /v1/models, the admin API)."""
        # A DoRA adapter's norm is taken at weight 1 over its own weights: no scale, no mix; saved
        # modules replace the base's, which a mix cannot sum.
        whole = bool(self.modules_to_save or self.trainable_tokens)
        return {"dora": self.dora, "modules_to_save": list(self.modules_to_save), "trainable_tokens": self.trainable_tokens,
                "scalable": not self.dora, "mixable": not self.dora and not whole}


@dataclass
class Usage:
    requests: int = 0
    last_used: float | None = None


@dataclass(frozen=True)
class AdapterRef:
    """What a request carries: the version's slot key and its weights."""

    name: str
    key: str
    weights: AdapterWeights = field(repr=False)


def _describe(stored: StoredVersion, weights: AdapterWeights | None, *, persistent: bool) -> AdapterVersion:
    if weights is not None:
        rank, alpha, targets = weights.rank, weights.config.lora_alpha, tuple(weights.target_suffixes)
        config = weights.config
    else:  # the config alone (cheap): rank, alpha, targets as declared
        problems: list[str] = []
        config = parse_config_file(stored.path / CONFIG_FILE, problems)
        if config is None:
            raise InvalidAdapterError(stored.name, problems)
        targets_raw = config.target_modules
        rank, alpha = config.r, config.lora_alpha
        targets = (targets_raw,) if isinstance(targets_raw, str) else tuple(sorted(targets_raw))
    return AdapterVersion(
        name=stored.name, version=stored.version, rank=rank, alpha=alpha, target_modules=targets,
        size=stored.size, source=stored.source, created=stored.created, persistent=persistent, dora=config.use_dora,
        modules_to_save=config.modules_to_save,
        trainable_tokens=sum(len(ids) for ids in config.trainable_token_indices.values()),
    )


class AdapterCatalog:
    def __init__(
        self, store: AdapterStore, spec: SlotSpec, *, base_name: str, max_cpu: int,
        run_store: AdapterStore | None = None, on_disk_load: Callable[[float], None] | None = None,
        on_retired: Callable[[str], None] | None = None,
    ) -> None:
        """`on_disk_load(seconds)` hears how long each disk read took (metrics); `on_retired(key)`
        is told of versions another process replaced or deleted (the server unloads them)."""
        self.store = store  # persistent: --data-dir
        self.run_store = run_store  # this process's start-up adapters, or None
        self.spec = spec
        self.base_name = base_name
        self.max_cpu = max(1, max_cpu)
        self._lock = threading.Lock()  # the in-memory maps
        # Store change + publish as one step: concurrent adds/deletes of a name cannot interleave.
        self._mutate = threading.Lock()
        self._current: dict[str, AdapterVersion] = {}
        self._stores: dict[str, AdapterStore] = {}  # name -> the store holding its versions
        self._usage: dict[str, Usage] = {}
        self._cache: OrderedDict[str, AdapterWeights] = OrderedDict()  # key -> weights, LRU order
        self.cache_hits = 0  # CPU-cache lookups by resolve() (for /metrics)
        self.cache_misses = 0
        self.on_disk_load = on_disk_load
        self.on_retired = on_retired
        self._generation = -1  # the store generation _current reflects
        self._sync()

    def _sync(self) -> None:
        """Follow the persistent store when it changed, here or in another process sharing it: a
        name added there is served, one deleted there is not, a replaced one serves its new
        version to new requests and its old version is retired (`on_retired`: the engine
        empties its slot once its rows end). Start-up adapters of this run keep shadowing
        stored names. Blocking (a config read per changed name): call off the event loop."""
        if self.store.refresh() == self._generation:
            return
        retired: list[str] = []
        with self._mutate:  # no add or delete of this process interleaves
            generation = self.store.refresh()
            stored = set(self.store.names())
            with self._lock:
                for name in [n for n, s in self._stores.items() if s is self.store and n not in stored]:
                    retired.append(self._current[name].key)  # deleted by another process
                    del self._current[name], self._stores[name]
                    self._usage.pop(name, None)
            for name in stored:
                if self._stores.get(name, self.store) is not self.store:
                    continue  # shadowed by a start-up adapter for this run
                known = self._current.get(name)
                try:
                    current = self.store.current(name)
                    if known is not None and known.version == current.version:
                        continue
                    info = _describe(current, None, persistent=True)  # reads its config: changed names only
                except Exception as exc:  # one unreadable entry must not stop the server
                    log.warning("skipping stored adapter %s: %s", name, exc)
                    continue
                with self._lock:
                    if known is not None:
                        retired.append(known.key)  # replaced by another process
                    self._current[name], self._stores[name] = info, self.store
                    self._usage.setdefault(name, Usage())
            self._generation = generation
        if self.on_retired is not None:
            for key in retired:
                self.on_retired(key)

    # ---- publishing ----------------------------------------------------------------------
    def store_for(self, *, persist: bool) -> AdapterStore:
        """Where a new version goes: the persistent store, or this run's (stage into it first)."""
        if persist:
            return self.store
        if self.run_store is None:
            raise RuntimeError("this catalog has no store for start-up adapters")
        return self.run_store

    def add(
        self, name: str, staged: Staged, *, source: str, persist: bool = True
    ) -> tuple[AdapterVersion, AdapterVersion | None]:
        """Validate the staged copy completely, commit it to the persistent store (or, with
        persist=False, to this run's) and make it `name`'s current version. Returns (new,
        previous or None). The staged copy is discarded on any failure."""
        try:
            check_name(name)
            if name == self.base_name:
                raise InvalidAdapterError(name, ["an adapter cannot take the base model's name"])
            weights = validate(read_adapter_dir(staged.path, name), self.spec, name)
        except BaseException:
            staged.discard()
            raise
        target = self.store_for(persist=persist)
        with self._mutate:
            stored = target.commit(name, staged, source=source)
            info = _describe(stored, weights, persistent=persist)
            moved_from = self._stores.get(name)
            with self._lock:
                previous = self._current.get(name)
                self._current[name] = info
                self._stores[name] = target
                self._usage.setdefault(name, Usage())
                self._remember(info.key, weights)
            if moved_from is not None and moved_from is not target and moved_from is self.run_store:
                moved_from.delete(name)  # uploaded under a start-up adapter's name: now persistent
        log.info("adapter %s version %s (rank %d, %s) from %s", name, info.version[:16], info.rank,
                 ",".join(info.target_modules), source)
        return info, previous if previous is not None and previous.version != info.version else None

    def delete(self, name: str) -> list[str]:
        """Forget `name` and delete its files; returns the keys of its versions (to unload)."""
        with self._mutate:
            with self._lock:
                if name not in self._current:
                    raise AdapterNotFoundError(f"adapter {name!r} does not exist")
                # A start-up adapter may shadow a stored one of the same name: both go.
                holding = [s for s in (self.run_store, self.store) if s is not None and name in s.names()]
                keys = [version_key(name, v.version) for s in holding for v in s.versions(name)]
                del self._current[name]
                del self._stores[name]
                self._usage.pop(name, None)
                for key in keys:
                    self._cache.pop(key, None)
            for store in holding:
                store.delete(name)
        return keys

    # ---- reading -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Follow the store now (every read also does): another process just changed it."""
        self._sync()

    def __contains__(self, name: object) -> bool:
        self._sync()
        return name in self._current

    def get(self, name: str) -> AdapterVersion:
        self._sync()
        try:
            return self._current[name]
        except KeyError:
            raise AdapterNotFoundError(f"adapter {name!r} does not exist") from None

    def all(self) -> list[AdapterVersion]:
        self._sync()
        with self._lock:
            return sorted(self._current.values(), key=lambda info: info.name)

    def versions(self, name: str) -> list[StoredVersion]:
        self.get(name)
        return self._store_of(name).versions(name)

    def _store_of(self, name: str) -> AdapterStore:
        store = self._stores.get(name)
        if store is None:  # deleted meanwhile
            raise AdapterNotFoundError(f"adapter {name!r} does not exist")
        return store

    def usage(self, name: str) -> Usage:
        return self._usage.get(name, Usage())

    def in_cpu_cache(self, key: str) -> bool:
        return key in self._cache

    def resolve(self, name: str, *, count: bool = True) -> AdapterRef:
        """The current version of `name` with its weights, read from disk if cold (blocking: call
        off the event loop). `count` records a request against it."""
        info = self.get(name)
        with self._lock:
            weights = self._cache.get(info.key)
            if weights is not None:
                self._cache.move_to_end(info.key)
                self.cache_hits += 1
            else:
                self.cache_misses += 1
        if weights is None:
            stored = next(v for v in self._store_of(name).versions(name) if v.version == info.version)
            start = time.monotonic()
            weights = validate(read_adapter_dir(stored.path, name), self.spec, name)
            elapsed = time.monotonic() - start
            log.info("adapter %s loaded from disk in %.0f ms", info.key, elapsed * 1000)
            if self.on_disk_load is not None:
                self.on_disk_load(elapsed)
            with self._lock:
                self._remember(info.key, weights)
        if count:
            with self._lock:
                usage = self._usage.get(name)  # None: deleted meanwhile
                if usage is not None:
                    usage.requests += 1
                    usage.last_used = time.time()
        return AdapterRef(name=name, key=info.key, weights=weights)

    def _remember(self, key: str, weights: AdapterWeights) -> None:
        self._cache[key] = weights
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_cpu:
            self._cache.popitem(last=False)
