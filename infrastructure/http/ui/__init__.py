"""The web UI under /ui/: server-rendered pages (Jinja2) made live with a vendored htmx."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from infrastructure.http.ui.pages import STATIC_DIR, router

__all__ = ["install_ui"]


def install_ui(app: FastAPI) -> None:
    """Serve the UI's pages under /ui/ and its scripts and stylesheet under /ui/static/."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
