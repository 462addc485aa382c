"""FastAPI application: health/readiness, OpenAI routes, and model loading off the event loop."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from server.api.admin_routes import router as admin_router
from server.api.auth import require_api_key
from server.api.playground_routes import router as playground_router
from server.api.errors import install_error_handlers
from server.api.metrics_route import HttpMetricsMiddleware
from server.api.metrics_route import router as metrics_router
from server.api.openai_routes import router as openai_router
from server.api.tokenize_routes import router as tokenize_router
from server.errors import LoraswapError
from server.metrics import ServerMetrics
from server.service import CompletionService

log = logging.getLogger("loraswap.api")

# Builds the service with the app's metrics, which it wires into the engine and the catalog.
ServiceFactory = Callable[[ServerMetrics], CompletionService]


class ServiceHolder:
    """Loads the service on a background thread so /health answers while the model loads."""

    def __init__(self, factory: Callable[[], CompletionService], on_failure: Callable[[str], None] | None = None) -> None:
        self.factory = factory
        self.on_failure = on_failure
        self.service: CompletionService | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._load, name="loraswap-loader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _load(self) -> None:
        try:
            self.service = self.factory()
        except Exception as exc:
            if not isinstance(exc, LoraswapError):  # expected failures say what to do; others need the trace
                log.exception("model failed to load")
            self.error = f"{type(exc).__name__}: {exc}"
            if self.on_failure is not None:
                self.on_failure(self.error)


def create_app(
    factory: ServiceFactory,
    *,
    on_load_failure: Callable[[str], None] | None = None,
    admin_token: str | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """`admin_token`: bearer token of the admin routes (None: loopback clients only);
    `api_key`: bearer token the inference routes require (None: open)."""
    metrics = ServerMetrics(lambda: None if holder.service is None else holder.service.stats())
    holder = ServiceHolder(lambda: factory(metrics), on_load_failure)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder.start()
        yield
        if holder.service is not None:
            holder.service.engine.stop()

    app = FastAPI(title="loraswap", lifespan=lifespan)
    app.state.holder = holder
    app.state.admin_token = admin_token
    app.state.api_key = api_key
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(HttpMetricsMiddleware, counter=metrics.http_requests)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", response_model=None)
    async def ready() -> JSONResponse:
        if holder.service is not None:
            service = holder.service
            problem = service.engine.health()  # loaded, but unable to take work: not ready
            body = {"status": "ready" if problem is None else "unhealthy", "model": service.model_name}
            if problem is not None:
                body["error"] = problem
            return JSONResponse({**body, **service.stats()}, status_code=200 if problem is None else 503)
        if holder.error is not None:
            return JSONResponse({"status": "failed", "error": holder.error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    app.include_router(openai_router, dependencies=[Depends(require_api_key)])
    app.include_router(tokenize_router, dependencies=[Depends(require_api_key)])
    app.include_router(admin_router)
    app.include_router(metrics_router)  # no API key: see server/api/metrics_route.py
    app.include_router(playground_router)  # the page is public; its API calls carry the keys typed into it
    return app
