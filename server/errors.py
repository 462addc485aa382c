"""Typed exceptions raised by the engine and loaders.

The HTTP layer maps these types (never their messages) to status codes in `server/api/errors.py`.
"""

from __future__ import annotations

# The root lives in the lowest layer (adapters/errors.py); re-exported for the server's modules.
from adapters.errors import LoraswapError as LoraswapError


class InvalidRequestError(LoraswapError):
    """A request parameter is invalid (HTTP 400)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """The prompt plus requested tokens do not fit the context (HTTP 400)."""


class ModelNotFoundError(LoraswapError):
    """The `model` field names nothing this server serves (HTTP 404)."""


class NotReadyError(LoraswapError):
    """The model is still loading (HTTP 503, retry later)."""


class LoadFailedError(LoraswapError):
    """The model failed to load; retrying will not help (HTTP 503, no Retry-After)."""


class UnsupportedModelError(LoraswapError):
    """The checkpoint's architecture or format is not supported."""


class NoNativeSpecError(UnsupportedModelError):
    """No native architecture spec serves this model_type (the transformers-backed path may)."""


class KVCacheBudgetError(LoraswapError):
    """--kv-cache-memory cannot hold one sequence of --max-model-len."""


class ModelSourceError(LoraswapError):
    """A --model value cannot be resolved to a local folder (missing, offline, unreachable)."""


class EngineStoppedError(LoraswapError):
    """The engine is shutting down and takes no more requests (HTTP 503)."""


class GenerationFailedError(LoraswapError):
    """The engine failed while generating (HTTP 500)."""


class QueueFullError(LoraswapError):
    """Too many requests are waiting (HTTP 429 with Retry-After)."""


class RequestTimeoutError(LoraswapError):
    """A request exceeded --request-timeout; it was cancelled (HTTP 408)."""


class SlotsBusyError(LoraswapError):
    """Every LoRA slot is in use by running requests, so an adapter cannot be loaded now (HTTP 503)."""


class ConflictError(LoraswapError):
    """The operation conflicts with the server's state, e.g. pinning the last unpinned slot (HTTP 409)."""


class UnauthorizedError(LoraswapError):
    """Missing or wrong bearer token (HTTP 401)."""


class ForbiddenError(LoraswapError):
    """Admin routes without a configured token answer loopback clients only (HTTP 403)."""


class PayloadTooLargeError(LoraswapError):
    """An upload exceeds --max-upload-mb (HTTP 413)."""


class UpstreamError(LoraswapError):
    """A Hugging Face hub download failed: unreachable, offline, or no such repository (HTTP 502)."""


class PathNotAllowedError(LoraswapError):
    """A server-side adapter path outside --adapter-roots (also via '..' or a symlink) (HTTP 403)."""
