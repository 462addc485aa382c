"""The one place where exception types become HTTP statuses, with OpenAI's error body:
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import AdapterNotFoundError, InvalidAdapterError
from server.errors import (
    EngineStoppedError,
    InvalidRequestError,
    LoadFailedError,
    LoraswapError,
    ModelNotFoundError,
    NotReadyError,
    QueueFullError,
    RequestTimeoutError,
)

log = logging.getLogger("loraswap.api")

# Most specific first: the first matching type decides.
STATUS_BY_TYPE: tuple[tuple[type[LoraswapError], int, str, str | None], ...] = (
    (InvalidRequestError, 400, "invalid_request_error", None),
    (InvalidAdapterError, 400, "invalid_request_error", "invalid_adapter"),
    (AdapterNotFoundError, 404, "invalid_request_error", "adapter_not_found"),
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (QueueFullError, 429, "rate_limit_exceeded", "queue_full"),
    (RequestTimeoutError, 408, "timeout", "request_timeout"),
    (NotReadyError, 503, "service_unavailable", "model_loading"),
    (LoadFailedError, 503, "service_unavailable", "model_load_failed"),
    (EngineStoppedError, 503, "service_unavailable", "shutting_down"),
)


def error_body(message: str, *, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_for(exc: LoraswapError) -> tuple[int, str, str | None]:
    for cls, status, type_, code in STATUS_BY_TYPE:
        if isinstance(exc, cls):
            return status, type_, code
    return 500, "internal_error", None


def error_response(exc: LoraswapError) -> JSONResponse:
    status, type_, code = status_for(exc)
    if status == 500:
        log.error("request failed: %s", exc)
    param = getattr(exc, "param", None)
    if isinstance(exc, ModelNotFoundError):
        param = "model"
    retry = isinstance(exc, (NotReadyError, EngineStoppedError, QueueFullError))
    headers = {"Retry-After": "1" if isinstance(exc, QueueFullError) else "5"} if retry else None
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
