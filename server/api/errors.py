"""The one place where exception types become HTTP statuses, with OpenAI's error body:
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import AdapterNotFoundError, InvalidAdapterError
from adapters.store import (
    AdapterNameError,
    AdapterTooLargeError,
    IncompleteAdapterError,
    StoreError,
    UnknownAdapterError,
)
from server.errors import (
    ConflictError,
    EngineStoppedError,
    ForbiddenError,
    InvalidRequestError,
    LoadFailedError,
    LoraswapError,
    ModelNotFoundError,
    NotReadyError,
    PathNotAllowedError,
    PayloadTooLargeError,
    QueueFullError,
    RequestTimeoutError,
    SlotsBusyError,
    UnauthorizedError,
    UpstreamError,
)

log = logging.getLogger("loraswap.api")

# Most specific first: the first matching type decides.
STATUS_BY_TYPE: tuple[tuple[type[Exception], int, str, str | None], ...] = (
    (InvalidRequestError, 400, "invalid_request_error", None),
    (InvalidAdapterError, 400, "invalid_request_error", "invalid_adapter"),
    (AdapterNameError, 400, "invalid_request_error", "invalid_adapter_name"),
    (IncompleteAdapterError, 400, "invalid_request_error", "invalid_adapter"),
    (UnauthorizedError, 401, "authentication_error", "invalid_token"),
    (ForbiddenError, 403, "permission_error", "admin_loopback_only"),
    (PathNotAllowedError, 403, "permission_error", "path_not_allowed"),
    (AdapterNotFoundError, 404, "invalid_request_error", "adapter_not_found"),
    (UnknownAdapterError, 404, "invalid_request_error", "adapter_not_found"),
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (ConflictError, 409, "invalid_request_error", "conflict"),
    (PayloadTooLargeError, 413, "invalid_request_error", "payload_too_large"),
    (AdapterTooLargeError, 413, "invalid_request_error", "payload_too_large"),
    (QueueFullError, 429, "rate_limit_exceeded", "queue_full"),
    (RequestTimeoutError, 408, "timeout", "request_timeout"),
    (NotReadyError, 503, "service_unavailable", "model_loading"),
    (LoadFailedError, 503, "service_unavailable", "model_load_failed"),
    (EngineStoppedError, 503, "service_unavailable", "shutting_down"),
    (SlotsBusyError, 503, "service_unavailable", "slots_busy"),
    (UpstreamError, 502, "upstream_error", "hub_error"),
    (StoreError, 500, "internal_error", "store_error"),
)


def error_body(message: str, *, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_for(exc: Exception) -> tuple[int, str, str | None]:
    for cls, status, type_, code in STATUS_BY_TYPE:
        if isinstance(exc, cls):
            return status, type_, code
    return 500, "internal_error", None


def error_response(exc: Exception) -> JSONResponse:
    status, type_, code = status_for(exc)
    if status == 500:
        log.error("request failed: %s", exc)
    param = getattr(exc, "param", None)
    if isinstance(exc, ModelNotFoundError):
        param = "model"
    retry = isinstance(exc, (NotReadyError, EngineStoppedError, QueueFullError, SlotsBusyError))
    headers: dict[str, str] | None = {"Retry-After": "1" if isinstance(exc, (QueueFullError, SlotsBusyError)) else "5"} if retry else None
    if isinstance(exc, UnauthorizedError):
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(str(exc), type_=type_, param=param, code=code), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoraswapError)
    async def _loraswap(_: Request, exc: LoraswapError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        param = None
        for err in exc.errors():
            if err.get("type") == "json_invalid":  # loc holds a character offset, not a field
                offset = next((p for p in err.get("loc", ()) if isinstance(p, int)), None)
                problems.append(f"the request body is not valid JSON (at character {offset})")
                continue
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            param = param or (loc[0] if loc else None)
            problems.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        message = "invalid request: " + "; ".join(problems)
        return JSONResponse(error_body(message, type_="invalid_request_error", param=param), status_code=400)

    @app.exception_handler(RecursionError)
    async def _too_deep(_: Request, exc: RecursionError) -> JSONResponse:
        # json.loads of a body nested thousands of levels deep (any route): the client's fault.
        return JSONResponse(error_body("the request body is nested too deeply", type_="invalid_request_error"),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), type_=type_, code=exc.status_code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", type_="internal_error"), status_code=500)
