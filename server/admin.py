"""Adapter administration behind the admin API: sources, publishing, hotswap, slots. No HTTP here
(the routes in server/api/admin_routes.py translate requests), and no tensor code (the catalog
validates, the engine writes slots on its own thread).

A replaced adapter is a new version with a new slot key: requests already accepted finish on the
version they started with, new ones get the new version, and the old version's slot is emptied as
soon as its last row ends. Deleting works the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from adapters.catalog import AdapterCatalog, AdapterVersion
from adapters.store import CONFIG_FILE, WEIGHTS_FILE, Staged
from server.engine_client import EngineClient
from server.errors import InvalidRequestError, ModelSourceError, PathNotAllowedError, UpstreamError
from server.model_source import hub_model_dir

ENGINE_CALL_TIMEOUT_S = 60.0
MAX_PATH_CHARS = 4096
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def allowed_path(path: str, roots: Sequence[Path]) -> Path:
    """The real folder `path` names, if it and both adapter files in it lie inside one of `roots`
    after resolving '..' and symlinks; PathNotAllowedError otherwise."""
    if not roots:
        raise PathNotAllowedError("server paths are disabled: start the server with --adapter-roots")
    if len(path) > MAX_PATH_CHARS or "\0" in path:
        raise InvalidRequestError(f"path must be at most {MAX_PATH_CHARS} characters, without NUL", param="path")
    given = Path(path)
    if not given.is_absolute():
        raise InvalidRequestError("path must be absolute", param="path")
    real_roots = [root.resolve() for root in roots]
    try:
        folder = given.resolve()
        candidates = [folder, (folder / CONFIG_FILE).resolve(), (folder / WEIGHTS_FILE).resolve()]
    except (OSError, RuntimeError, ValueError) as exc:  # a name too long, a symlink loop, ...
        raise InvalidRequestError(f"path cannot be resolved: {exc.__class__.__name__}", param="path") from None
    if not all(any(p.is_relative_to(root) for root in real_roots) for p in candidates):
        raise PathNotAllowedError(f"{path} is outside the allowed adapter roots")
    if not folder.is_dir():
        raise InvalidRequestError(f"{path} is not a folder", param="path")
    return folder


def describe(info: AdapterVersion) -> dict[str, Any]:
    return {
        "name": info.name, "version": info.version, "rank": info.rank, "alpha": info.alpha,
        "target_modules": list(info.target_modules), "size": info.size, "source": info.source,
        "created": info.created, "persistent": info.persistent, "features": info.features(),
    }


class AdminService:
    def __init__(
        self,
        catalog: AdapterCatalog,
        engine: EngineClient,
        *,
        adapter_roots: Sequence[Path],
        max_upload_bytes: int,
        model_info: dict[str, Any] | None = None,
    ) -> None:
        self.model_info = model_info or {}
        self.catalog = catalog
        self.engine = engine
        self.adapter_roots = list(adapter_roots)
        self.max_upload_bytes = max_upload_bytes

    # ---- sources (blocking: the routes call these on a worker thread) --------------------
    def put_upload(self, name: str, config: bytes, weights: BinaryIO) -> dict[str, Any]:
        staged = self.catalog.store.stage_files(config, weights, max_bytes=self.max_upload_bytes)
        return self._publish(name, staged, "upload")

    def put_path(self, name: str, path: str) -> dict[str, Any]:
        folder = allowed_path(path, self.adapter_roots)
        staged = self.catalog.store.stage_dir(folder, max_bytes=self.max_upload_bytes)
        return self._publish(name, staged, f"path:{folder}")

    def put_hub(self, name: str, hub_id: str, revision: str | None) -> dict[str, Any]:
        if not HUB_ID.fullmatch(hub_id):
            raise InvalidRequestError(f"hub_id must look like 'org/name', got {hub_id!r}", param="hub_id")
        try:
            folder = hub_model_dir(hub_id, revision, patterns=[CONFIG_FILE, WEIGHTS_FILE], what="adapter")
        except ModelSourceError as exc:
            raise UpstreamError(str(exc)) from exc
        staged = self.catalog.store.stage_dir(folder, max_bytes=self.max_upload_bytes)
        return self._publish(name, staged, f"hub:{hub_id}@{revision or 'main'}")

    def _publish(self, name: str, staged: Staged, source: str) -> dict[str, Any]:
        info, previous = self.catalog.add(name, staged, source=source)
        self._wait(self.engine.activate_adapter(info.key))  # it may be an old version come back
        if previous is not None:  # hotswap: the old version drains, then leaves its slot
            self._wait(self.engine.unload_adapter(previous.key))
        return {**describe(info), "replaced": previous.version if previous is not None else None}

    # ---- lifecycle -----------------------------------------------------------------------
    def delete(self, name: str) -> dict[str, Any]:
        for key in self.catalog.delete(name):
            self._wait(self.engine.unload_adapter(key))
        return {"name": name, "deleted": True}

    def load(self, name: str, *, pin: bool) -> dict[str, Any]:
        ref = self.catalog.resolve(name, count=False)
        self._wait(self.engine.load_adapter(ref.key, ref.weights, pin=pin))
        return self.status(name)

    def unload(self, name: str) -> dict[str, Any]:
        self._wait(self.engine.unload_adapter(self.catalog.get(name).key, retire=False))
        return self.status(name)

    # ---- reading -------------------------------------------------------------------------
    def status(self, name: str, slots: dict[str, tuple[int, bool]] | None = None) -> dict[str, Any]:
        """An adapter's versions, where it is (slot, CPU cache or disk) and how it is used.
        `slots`: the engine's slot states, when the caller already asked for them."""
        info = self.catalog.get(name)
        if slots is None:
            slots = self._wait(self.engine.adapter_slots())  # asked on the engine thread
        slot, pinned = slots.get(info.key, (None, False))
        tier = "slot" if slot is not None else "cpu" if self.catalog.in_cpu_cache(info.key) else "disk"
        usage = self.catalog.usage(name)
        return {
            **describe(info),
            "versions": [{"version": v.version, "size": v.size, "created": v.created, "source": v.source}
                         for v in self.catalog.versions(name)],
            "tier": tier, "slot": slot, "pinned": pinned,
            "requests": usage.requests, "last_used": usage.last_used,
        }

    def list(self) -> list[dict[str, Any]]:
        slots = self._wait(self.engine.adapter_slots())  # one question for every adapter
        return [self.status(info.name, slots) for info in self.catalog.all()]

    @staticmethod
    def _wait(future: Any) -> Any:
        return future.result(timeout=ENGINE_CALL_TIMEOUT_S)
