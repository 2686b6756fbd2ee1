"""Runs table, Run page, comparison, and the JSON / server-sent-event feeds their script reads."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse

from qlocal.studio import runs as runs_mod
from qlocal.studio.security import PathRefused, confine

router = APIRouter()
POLL_S = 0.5  # how often the event stream looks at metrics.jsonl and the job


def studio_of(request: Request) -> Any:
    return request.app.state.studio


def run_path(studio: Any, name: str) -> Path:
    """outputs/<name> for a run name from the URL: one path component inside outputs/, existing."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise PathRefused(f"{name!r}: not a run name")
    path = confine(studio.root, Path("outputs") / name, ("outputs",))
    if path.parent != studio.runs_dir.resolve():
        raise PathRefused(f"{name}: not a run folder directly inside outputs/")
    if not (path / "config.yaml").is_file() and not studio.jobs.for_run(f"outputs/{name}"):
        raise HTTPException(404, f"no run {name!r} in outputs/")
    return path


@router.get("/runs", response_class=HTMLResponse)
async def runs_page(request: Request) -> Any:
    studio = studio_of(request)
    rows = runs_mod.list_runs(studio.runs_dir, studio.jobs, studio.root)
    return studio.templates.TemplateResponse(request, "runs.html", {"nav": "runs", "runs": rows})


@router.get("/api/runs")
async def runs_json(request: Request) -> JSONResponse:
    studio = studio_of(request)
    return JSONResponse([r.to_dict() for r in runs_mod.list_runs(studio.runs_dir, studio.jobs, studio.root)])


def _summary(studio: Any, path: Path) -> dict[str, Any]:
    info = runs_mod.run_info(path, studio.jobs, studio.root)
    rows, _ = runs_mod.read_metrics(path / "metrics.jsonl")
    return {**info.to_dict(), "progress": runs_mod.progress(path, rows, info.total_steps)}


@router.get("/runs/{name}", response_class=HTMLResponse)
async def run_page(request: Request, name: str) -> Any:
    studio = studio_of(request)
    path = run_path(studio, name)
    info = runs_mod.run_info(path, studio.jobs, studio.root)
    config_text = (path / "config.yaml").read_text(encoding="utf-8") if (path / "config.yaml").is_file() else ""
    ctx = {"nav": "runs", "run": info, "config_text": config_text, "chart_keys": runs_mod.CHART_KEYS,
           "evals": runs_mod.eval_reports(path), "exports": runs_mod.exports_of(path, studio.export_dir),
           "log": info.job.log_tail(6000) if info.job else ""}
    return studio.templates.TemplateResponse(request, "run.html", ctx)


@router.get("/api/runs/{name}")
async def run_json(request: Request, name: str) -> JSONResponse:
    studio = studio_of(request)
    return JSONResponse(_summary(studio, run_path(studio, name)))


@router.get("/api/runs/{name}/metrics")
async def metrics_json(request: Request, name: str, after: int = Query(0, ge=0)) -> JSONResponse:
    """metrics.jsonl records from line `after` on; `next` is the line to ask for next time."""
    path = run_path(studio_of(request), name) / "metrics.jsonl"
    rows, count = runs_mod.read_metrics(path, after)
    if count < after:  # rewritten shorter (a resume trims lines past its checkpoint): start over
        rows, count = runs_mod.read_metrics(path, 0)
        return JSONResponse({"rows": rows, "next": count, "reset": True})
    return JSONResponse({"rows": rows, "next": count, "reset": False})


@router.get("/api/runs/{name}/events")
async def metrics_events(request: Request, name: str) -> Any:
    """Server-sent events: `metrics` (new records), `reset` (file rewritten: all records again) and
    `status` (status, progress and log tail, whenever they change). It follows the run until the
    client leaves; the page's script closes it once the run is no longer running."""
    from sse_starlette.sse import EventSourceResponse

    studio = studio_of(request)
    path = run_path(studio, name)
    return EventSourceResponse(_event_stream(request, studio, path))


async def _event_stream(request: Request, studio: Any, path: Path) -> AsyncIterator[dict[str, str]]:
    metrics = path / "metrics.jsonl"
    sent, ident, last_status = 0, None, None
    while not await request.is_disconnected():
        now = runs_mod.file_identity(metrics)
        if now != ident:
            if ident is not None and (now is None or now[0] != ident[0] or now[1] < ident[1]):
                rows, sent = runs_mod.read_metrics(metrics, 0)
                yield {"event": "reset", "data": json.dumps(rows)}
            else:
                rows, count = runs_mod.read_metrics(metrics, sent)
                sent = count
                if rows:
                    yield {"event": "metrics", "data": json.dumps(rows)}
            ident = now
        summary = _summary(studio, path)
        job = studio.jobs.get(summary["job"]) if summary["job"] else None
        summary["log"] = job.log_tail(4000) if job else ""
        if summary != last_status:
            yield {"event": "status", "data": json.dumps(summary)}
            last_status = summary
        await asyncio.sleep(POLL_S)


@router.get("/api/runs/{name}/example")
async def example_json(request: Request, name: str) -> JSONResponse:
    """One training example as the run renders it: [(text, trained)] segments (slow the first time:
    it loads the run's tokenizer)."""
    from qlocal.studio.example import run_example

    path = run_path(studio_of(request), name)
    try:
        result = await asyncio.to_thread(run_example, path, studio_of(request).root)
    except Exception as e:  # a moved data file or model: say so on the page, not as a 500
        return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=200)
    return JSONResponse(result)


@router.get("/api/compare")
async def compare_json(request: Request, run: list[str] = Query(default=[])) -> JSONResponse:
    """metrics.jsonl of several runs, for one chart per metric with a line per run."""
    studio = studio_of(request)
    out = {}
    for name in run[:12]:
        rows, _ = runs_mod.read_metrics(run_path(studio, name) / "metrics.jsonl")
        out[name] = rows
    return JSONResponse(out)


@router.get("/compare", response_class=HTMLResponse)
async def compare_page(request: Request, run: list[str] = Query(default=[])) -> Any:
    studio = studio_of(request)
    names = [run_path(studio, n).name for n in run[:12]]
    return studio.templates.TemplateResponse(request, "compare.html", {"nav": "runs", "names": names,
                                                                         "chart_keys": runs_mod.CHART_KEYS})


@router.get("/api/jobs")
async def jobs_json(request: Request) -> JSONResponse:
    return JSONResponse([j.to_dict() for j in studio_of(request).jobs.list()])


@router.get("/api/jobs/{job_id}")
async def job_json(request: Request, job_id: str) -> JSONResponse:
    job = studio_of(request).jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return JSONResponse({**job.to_dict(), "log": job.log_tail()})


@router.post("/api/jobs/{job_id}/stop")
async def job_stop(request: Request, job_id: str) -> JSONResponse:
    """SIGINT to a job (train checkpoints and exits 130)."""
    studio = studio_of(request)
    if studio.jobs.get(job_id) is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return JSONResponse(studio.jobs.stop(job_id).to_dict())
