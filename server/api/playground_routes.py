"""GET / and GET /playground: the web playground, a single page of plain JavaScript shipped with
the package (server/playground/), no CDN and no build step. The page itself is public (it holds
no data); everything it shows comes from the API with the keys the user types into the open tab.

Behind a path prefix (`--root-path`), the page learns its base URL from a <base> element written
here from the request's root path, so every API call it makes is relative to it.
"""

from __future__ import annotations

import html
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

FOLDER = Path(__file__).resolve().parents[1] / "playground"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}  # what the page loads besides itself
# No script or style from anywhere but the server, no framing by other sites.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'self'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter()


@lru_cache(maxsize=1)
def _page() -> str:
    return (FOLDER / "index.html").read_text(encoding="utf-8")


def _index(request: Request) -> HTMLResponse:
    root = str(request.scope.get("root_path") or "").rstrip("/")
    page = _page().replace("%BASE%", html.escape(root + "/", quote=True))
    return HTMLResponse(page, headers=SECURITY_HEADERS)


@router.get("/", include_in_schema=False)
async def root(request: Request) -> HTMLResponse:
    return _index(request)


@router.get("/playground", include_in_schema=False)
async def playground(request: Request) -> HTMLResponse:
    return _index(request)


@router.get("/playground/{asset}", include_in_schema=False)
async def playground_asset(asset: str) -> Response:
    media_type = ASSETS.get(asset)
    if media_type is None:
        raise HTTPException(status_code=404, detail="no such file")
    return FileResponse(FOLDER / asset, media_type=media_type, headers=SECURITY_HEADERS)
