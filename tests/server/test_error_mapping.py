"""Exception types map to HTTP statuses in one place (server/api/errors.py)."""

from __future__ import annotations

import json

import pytest

from adapters.errors import AdapterNotFoundError, InvalidAdapterError
from server.api.errors import error_response
from server.errors import (
    ContextLengthError,
    EngineStoppedError,
    GenerationFailedError,
    InvalidRequestError,
    LoadFailedError,
    ModelNotFoundError,
    NotReadyError,
    QueueFullError,
)


@pytest.mark.parametrize(
    ("exc", "status", "code", "retry_after"),
    [
        (InvalidRequestError("bad", param="top_p"), 400, None, None),
        (ContextLengthError("long"), 400, None, None),
        (InvalidAdapterError("x", ["use_dora"]), 400, "invalid_adapter", None),
        (ModelNotFoundError("nope"), 404, "model_not_found", None),
        (AdapterNotFoundError("nope"), 404, "adapter_not_found", None),
        (QueueFullError("full"), 429, "queue_full", "1"),
        (NotReadyError("loading"), 503, "model_loading", "5"),
        (LoadFailedError("broken"), 503, "model_load_failed", None),
        (EngineStoppedError("bye"), 503, "shutting_down", "5"),
        (GenerationFailedError("oops"), 500, None, None),
    ],
)
def test_status_body_and_retry_after(exc: Exception, status: int, code: str | None, retry_after: str | None) -> None:
    response = error_response(exc)  # type: ignore[arg-type]
    body = json.loads(response.body)
    assert response.status_code == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert response.headers.get("retry-after") == retry_after
