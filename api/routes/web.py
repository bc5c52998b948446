"""The search page: `api/web/index.html` at `/`, its assets under `/web/`, no auth on either.

The page holds no data; every API call it makes carries the user's key, so serving its files
openly gives nothing away. The CSP allows only this origin's scripts and styles, plus blob:
images (thumbnails fetched with the key header, see api/web/api.js).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
ASSETS_PATH = "/web"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "img-src 'self' blob:",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate, so a new release of the page shows up at once; the ETag keeps it cheap.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=FileResponse)
async def search_page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


class _WebAssets(StaticFiles):
    """StaticFiles that sends the page's headers too (nosniff matters for module scripts)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


def install_web(app: FastAPI) -> None:
    """Serve the page; call after the API routers so no API route can be shadowed."""
    app.include_router(router)
    app.mount(ASSETS_PATH, _WebAssets(directory=WEB_DIR), name="web")
