"""GET /metrics (Prometheus text format) and the middleware counting HTTP requests.

/metrics needs no API key (scrapers rarely carry one, and it reveals no content) and answers
while the model loads, with whatever is available then.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import ServerMetrics

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    server_metrics: ServerMetrics = request.app.state.metrics
    body, content_type = server_metrics.render()
    return Response(content=body, media_type=content_type)


class HttpMetricsMiddleware:
    """Counts every HTTP request by route template (bounded, unlike raw paths; "unmatched" for
    404s outside any route) and response status code. Plain ASGI: streaming is untouched."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts: an exception escaped every handler

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            # The router stores the matched route in the shared scope dict.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.counter.labels(route, str(status)).inc()
