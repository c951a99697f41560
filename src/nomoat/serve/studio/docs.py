"""`/docs` that works offline: FastAPI's Swagger UI page, with its script and stylesheet served from the package.

FastAPI's own `/docs` page loads Swagger UI from a CDN, so it is blank without internet. `offline_docs` replaces that
route with the same page pointing at the copies vendored under `serve/web/vendor/` (see its VENDORED.md).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

VENDOR = "/vendor"


def offline_docs(app: FastAPI) -> None:
    """Serve `/docs` (and drop `/redoc`, which has no local assets) with local Swagger UI assets."""
    if app.docs_url is None or app.openapi_url is None:
        return
    docs_url, openapi_url = app.docs_url, app.openapi_url
    drop = {docs_url, app.redoc_url}
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in drop]

    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} API", swagger_js_url=f"{VENDOR}/swagger-ui-bundle.js",
            swagger_css_url=f"{VENDOR}/swagger-ui.css", swagger_favicon_url="data:,",
        )  # fmt: skip

    app.add_api_route(docs_url, docs, include_in_schema=False, response_class=HTMLResponse)
