"""create_app(root, token): the studio's FastAPI app (see qlocal/studio/__init__.py for how pages plug in)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlocal.studio.jobs import JobRunner

HERE = Path(__file__).resolve().parent


@dataclass
class Studio:
    """What every route shares, at `request.app.state.studio`."""

    root: Path
    token: str | None
    jobs: JobRunner
    templates: Any  # starlette Jinja2Templates over qlocal/studio/templates/

    @property
    def runs_dir(self) -> Path:
        return self.root / "outputs"

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"


def plotly_js() -> Path | None:
    """plotly.min.js inside the installed plotly package (charts are served from there, not copied)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "package_data" / "plotly.min.js"
    return path if path.is_file() else None


def error_page(request: Any, status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    """The studio's HTML error page; a missing run (404 under /runs/) lists the runs outputs/ holds,
    as the CLI names them for a mistyped outputs/<run>."""
    from http import HTTPStatus

    studio = request.app.state.studio
    runs = None
    if status == 404 and request.url.path.startswith("/runs/"):
        from qlocal import rundir

        runs = rundir.run_names(studio.runs_dir)
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "error"
    return studio.templates.TemplateResponse(
        request, "error.html", {"nav": "runs", "status": status, "reason": reason, "message": message, "runs": runs},
        status_code=status, headers=headers)


def create_app(root: Path, token: str | None) -> Any:
    """The studio over `root`'s working folders; with a token, every request must carry it."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
    from fastapi.staticfiles import StaticFiles
    from fastapi.templating import Jinja2Templates
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from qlocal.studio import chat, exports, newrun, pages
    from qlocal.studio.security import Guard, PathRefused

    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app = FastAPI(title="qlocal studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = Studio(root.resolve(), token, JobRunner(root), templates)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # The pages get the studio's own error page; /api/ (read by the pages' scripts) keeps JSON.
        if request.url.path.startswith(("/api/", "/static/")):
            return await http_exception_handler(request, exc)
        return error_page(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(PathRefused)
    async def _refused(request: Request, exc: PathRefused) -> PlainTextResponse:
        return PlainTextResponse(f"403: {exc}\n", status_code=403)

    @app.get("/static/plotly.min.js", include_in_schema=False)
    async def _plotly() -> FileResponse:
        path = plotly_js()
        if path is None:
            raise HTTPException(404, "plotly is not installed: pip install 'qlocal[studio]'")
        return FileResponse(path, media_type="text/javascript")

    @app.get("/favicon.ico", include_in_schema=False)
    async def _favicon() -> Response:
        return Response(status_code=204)  # none; saves the browser a 404 per page

    @app.get("/", include_in_schema=False)
    async def _home() -> RedirectResponse:
        return RedirectResponse("/runs", status_code=303)

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    for page in (pages, newrun, exports, chat):
        app.include_router(page.router)
    app.add_middleware(Guard, token=token)
    return app
