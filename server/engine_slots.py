"""The engine's LoRA slots: the slot table (who holds which slot) and the slot tensors the
runner writes, kept in step. Engine thread only; other threads read `SlotView`s."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from adapters.slot_table import SlotGrant, SlotTable
from server.engine_view import SlotView
from server.errors import ConflictError, SlotsBusyError
from server.runner import ModelRunner


@dataclass
class Grants:
    """The slots one request holds: a LoRA slot per adapter, and a module slot when its adapter
    saved its embedding or head (modules_to_save)."""

    lora: list[SlotGrant] = field(default_factory=list)
    module: SlotGrant | None = None


class EngineSlots:
    def __init__(self, table: SlotTable, runner: ModelRunner, on_load: Callable[[float], None] | None = None,
                 modules: SlotTable | None = None) -> None:
        """`on_load(seconds)` is told how long each slot write took (metrics). `modules`: the
        table of the module slots (None: none)."""
        self.table = table
        self.runner = runner
        self.on_load = on_load
        self.modules = modules

    def acquire(self, key: str) -> SlotGrant | None:
        return self.table.acquire(key)

    def acquire_all(self, keys: Iterable[str], module_key: str | None = None) -> Grants | None:
        """A slot for each of `keys` (one request's adapters) and a module slot for `module_key`,
        or none of them: None, and every slot taken on the way is given back, when one cannot
        be had now."""
        keys = list(keys)
        modules_free = module_key is None or (self.modules is not None and self.modules.can_acquire([module_key]))
        if not self.table.can_acquire(keys) or not modules_free:
            self.table.counters.waits += 1
            return None
        grants = Grants()
        for key in keys:
            grant = self.table.acquire(key)
            if grant is None:
                self.give_back(grants)
                return None
            grants.lora.append(grant)
        if module_key is not None:
            grants.module = None if self.modules is None else self.modules.acquire(module_key)
            if grants.module is None:
                self.give_back(grants)
                return None
        return grants

    def give_back(self, grants: Grants, written: int = 0) -> None:
        """Undo `grants`, of which the first `written` LoRA slots hold their adapter now (the
        module slot is written last, so never when this runs): slots still to be written go back
        empty, the others (resident) lose this reference."""
        for i, grant in enumerate(grants.lora):
            if grant.load and i >= written:
                self.abandon(grant.slot)
            else:
                self.release(grant.slot)
        module = grants.module
        if module is not None and self.modules is not None:
            self.release_module(module.slot)
            if module.load:
                self.modules.forget(module.slot)

    def write_module(self, slot: int, full: Any) -> None:
        self._timed(lambda: self.runner.load_module_slot(slot, full))

    def release_module(self, slot: int) -> None:
        if self.modules is not None and self.modules.release(slot):
            self.runner.clear_module_slot(slot)

    def write(self, slot: int, weights: Any) -> None:
        self._timed(lambda: self.runner.load_slot(slot, weights))

    def _timed(self, write: Callable[[], None]) -> None:
        """Run a slot write, telling `on_load` how long it took."""
        start = time.monotonic()
        write()
        if self.on_load is not None:
            self.on_load(time.monotonic() - start)

    def abandon(self, slot: int) -> None:
        """A placement whose write failed (or never happened): give it back empty, its tensors
        cleared of whatever a write stopped halfway may have left."""
        self.table.release(slot)
        self.table.forget(slot)
        self.runner.clear_slot(slot)

    def release(self, slot: int) -> None:
        """A row stopped using `slot`; an unloaded version leaves its slot with its last row."""
        if self.table.release(slot):
            self.runner.clear_slot(slot)

    def load_now(self, key: str, weights: Any, pin: bool) -> int:
        """Write an adapter version into a slot now (if not resident) and pin or unpin it."""
        placement = self.table.acquire(key)
        if placement is None:
            raise SlotsBusyError("every slot is in use by running requests; retry shortly")
        try:
            if placement.load:
                self.write(placement.slot, weights)
        except Exception:
            self.abandon(placement.slot)
            raise
        if self.table.release(placement.slot):  # a retired version: it does not stay resident
            self.runner.clear_slot(placement.slot)
            raise ConflictError(f"{key} has been replaced or deleted")
        try:
            self.table.pin(key, pin)
        except ValueError as exc:
            raise ConflictError(str(exc)) from None
        return placement.slot

    def unload_now(self, key: str, retire: bool) -> None:
        if (slot := self.table.unload(key, retire=retire)) is not None:
            self.runner.clear_slot(slot)
        if self.modules is not None and (slot := self.modules.unload(key, retire=retire)) is not None:
            self.runner.clear_module_slot(slot)

    def revive(self, key: str) -> None:
        """A version published anew: resident as usual again, in both tables."""
        for table in (self.table, self.modules):
            if table is not None:
                table.revive(key)

    def prune_retired(self, needed: Iterable[str]) -> None:
        """Forget the unloaded versions no queued request needs, in both tables (`needed` is
        read only when one has something to forget: this runs every step)."""
        tables = [t for t in (self.table, self.modules) if t is not None and t.retired()]
        if tables:
            keys = list(needed)
            for table in tables:
                table.prune_retired(keys)

    def view(self, waiting: Iterable[str]) -> SlotView:
        return SlotView.of(self.table, waiting)

    def states(self) -> dict[str, tuple[int, bool]]:
        """Adapter version key -> (slot, pinned), for every resident version."""
        return {key: (slot, self.table.is_pinned(key)) for key, slot in self.table.resident().items()}
