"""Which adapters the server knows. Plain Python: names and descriptions, no tensors (which slot
holds an adapter is the SlotTable's business; the weights live in the CPU store).

An adapter name is what clients put in the `model` field; it matches `[A-Za-z0-9._-]{1,64}` and is
never used as a path.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.errors import AdapterNotFoundError, InvalidAdapterError
from adapters.store import AdapterNameError
from adapters.store import check_name as check_store_name


def check_name(name: str) -> None:
    """The store's rule (names are safe as path components), as an InvalidAdapterError (400)."""
    try:
        check_store_name(name)
    except AdapterNameError as exc:
        raise InvalidAdapterError(name, [str(exc)]) from None


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    nbytes: int
    source: str


class AdapterRegistry:
    def __init__(self, *, base_name: str) -> None:
        self.base_name = base_name
        self._by_name: dict[str, AdapterInfo] = {}

    def add(self, info: AdapterInfo) -> None:
        check_name(info.name)
        if info.name == self.base_name:
            raise InvalidAdapterError(info.name, ["an adapter cannot take the base model's name"])
        if info.name in self._by_name:
            raise InvalidAdapterError(info.name, ["an adapter with this name is already loaded"])
        self._by_name[info.name] = info

    def get(self, name: str) -> AdapterInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def all(self) -> list[AdapterInfo]:
        return sorted(self._by_name.values(), key=lambda info: info.name)
