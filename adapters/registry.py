"""Adapter names: what clients put in the `model` field. A name matches `[A-Za-z0-9._-]{1,64}`
(not '.' or '..') and is never used as a path; the rule is the store's (adapters/store.py)."""

from __future__ import annotations

from adapters.errors import InvalidAdapterError
from adapters.store import AdapterNameError
from adapters.store import check_name as check_store_name


def check_name(name: str) -> None:
    """The store's rule, raised as an InvalidAdapterError (HTTP 400)."""
    try:
        check_store_name(name)
    except AdapterNameError as exc:
        raise InvalidAdapterError(name, [str(exc)]) from None
