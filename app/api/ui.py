"""The dashboard at /ui: a few static files (app/ui/) that talk to the API from the browser.

No build step and nothing fetched from elsewhere: the page, its script and its style ship
in the package. The routes are left out of the OpenAPI schema; they hold no data, so they
need no API key (the page asks for one and sends it with each API call).
"""

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse, RedirectResponse

UI_DIR = Path(__file__).resolve().parent.parent / "ui"

# The only files served, by name: nothing else under app/ can be asked for.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
HEADERS = {
    # Revalidated on every load (cheap: ETag), so an upgrade shows at once.
    "Cache-Control": "no-cache",
    # Only this origin's script and style; job output shown on the page can never run.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("")
async def dashboard_redirect() -> RedirectResponse:
    # Relative asset and API paths in the page resolve against /ui/; a relative Location
    # keeps working behind a proxy that mounts the service under a prefix.
    return RedirectResponse("ui/", status_code=status.HTTP_307_TEMPORARY_REDIRECT)


@router.get("/")
async def dashboard() -> FileResponse:
    return FileResponse(
        UI_DIR / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS
    )


@router.get("/static/{name}")
async def dashboard_asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such file")
    return FileResponse(UI_DIR / name, media_type=media_type, headers=HEADERS)
