"""Export page: choose quants for a finished run, start `qlocal export` as a studio job, follow its
log, and show the export's verify table (verify.json) and Modelfile when it ends.

The job is `qlocal export outputs/<run> --quant <q,...>` (plus `--system` when given), started
through the job runner with validated strings only: the run is a name inside outputs/ whose
adapter is saved, each quant is one of those `qlocal export --quant` accepts (its own parser says
which), and the export lands where the CLI puts it, export/<run>/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from qlocal import rundir
from qlocal.errors import UserError
from qlocal.studio import runs as runs_mod
from qlocal.studio.jobs import JobRefused
from qlocal.studio.pages import run_path, studio_of

router = APIRouter()
DEFAULT_QUANTS = ("q4_k_m",)  # what `qlocal export` writes when --quant is not given


def quant_choices() -> tuple[str, ...]:
    """Every quant `qlocal export --quant` accepts, in its own order."""
    from qlocal.export.quantize import ALL_QUANTS

    return tuple(ALL_QUANTS)


def export_args(studio: Any, run: str, quants: list[str], system: str = "") -> tuple[list[str], str]:
    """(argv after `qlocal`, run path relative to root) for exporting `run`; UserError says what is wrong."""
    from qlocal.export.quantize import parse_quants

    path = run_path(studio, run)  # one name inside outputs/ (PathRefused -> 403, missing -> 404)
    rel = f"outputs/{path.name}"
    rundir.check_finished(path, rel)  # the CLI's message: still training (its pid), stopped (--resume), never saved
    if not (path / "adapter" / "adapter_config.json").is_file():  # a studio job's run before its config.yaml
        if studio.jobs.active_for(rel) is not None:
            raise UserError(f"{rel}: is still starting (no config.yaml yet); its adapter/ is written when training ends")
        raise UserError(f"{rel}: its training ended before writing config.yaml (its log on the run page says why); "
                        "train it again")
    if not quants:
        raise UserError(f"choose at least one quant ({', '.join(quant_choices())})")
    parsed = parse_quants(quants)  # the CLI's own check and message for an unknown quant
    args = ["export", rel, "--quant", ",".join(parsed)]
    system = system.strip()
    if system:
        if any(c in system for c in "\r\n\x00"):
            raise UserError("system prompt: one line of text, please (the Modelfile's SYSTEM line)")
        args += ["--system", system]
    return args, rel


def _exportable(studio: Any) -> list[runs_mod.RunInfo]:
    """Runs whose adapter is saved (finished), newest first."""
    return [r for r in runs_mod.list_runs(studio.runs_dir, studio.jobs, studio.root) if r.status == "finished"]


def _page(request: Request, chosen: str, quants: list[str], system: str, error: str = "", status: int = 200) -> Any:
    studio = studio_of(request)
    runs = _exportable(studio)
    jobs = [j for j in studio.jobs.list() if j.kind == "export"][:10]
    exports: list[dict[str, Any]] = []
    for r in runs if not chosen else [r for r in runs if r.name == chosen]:
        exports += runs_mod.exports_of(r.path, studio.export_dir)
    return studio.templates.TemplateResponse(request, "export.html", {
        "nav": "export", "runs": runs, "chosen": chosen, "choices": quant_choices(), "quants": quants,
        "system": system, "error": error, "jobs": jobs, "exports": exports}, status_code=status)


@router.get("/export", response_class=HTMLResponse)
async def export_page(request: Request, run: str = "") -> Any:
    """The form (a finished run, quants, optional SYSTEM line), recent export jobs, existing exports."""
    return _page(request, run, list(DEFAULT_QUANTS), "")


@router.post("/export")
async def export_submit(request: Request) -> Any:
    """Validate and start `qlocal export`; on an error the form again (400) with the message."""
    studio = studio_of(request)
    form = await request.form()
    run = str(form.get("run") or "")
    quants = [str(q) for q in form.getlist("quant")]
    system = str(form.get("system") or "")
    try:
        args, rel = export_args(studio, run, quants, system)
        job = studio.jobs.start(args, run=rel)
    except (UserError, JobRefused) as e:
        return _page(request, run, quants, system, str(e), status=400)
    except HTTPException as e:  # no such run (404): the form again, saying so
        return _page(request, run, quants, system, str(e.detail), status=e.status_code)
    return RedirectResponse(f"/export/jobs/{job.id}", status_code=303)


def _job_context(studio: Any, job_id: str) -> dict[str, Any]:
    job = studio.jobs.get(job_id)
    if job is None or job.kind != "export":
        raise HTTPException(404, f"no export job {job_id!r}")
    run = Path(job.run or "").name
    status = job.status()
    exports = []
    if status != "running" and (studio.runs_dir / run).is_dir():
        # the folder this job wrote (export/<run>/, the CLI's default), or whatever export of the run exists
        exports = [e for e in runs_mod.exports_of(studio.runs_dir / run, studio.export_dir) if e["name"] == run]
    return {"job": job, "status": status, "run": run, "exports": exports, "log": job.log_tail(12000)}


@router.get("/export/jobs/{job_id}", response_class=HTMLResponse)
async def export_job_page(request: Request, job_id: str) -> Any:
    """One export: its live log (the page polls /api/jobs/<id>), then the verify table and Modelfile."""
    studio = studio_of(request)
    return studio.templates.TemplateResponse(request, "export_job.html",
                                             {"nav": "export", **_job_context(studio, job_id)})


@router.get("/export/jobs/{job_id}/result", response_class=HTMLResponse)
async def export_job_result(request: Request, job_id: str) -> Any:
    """The result block alone (verify table, Modelfile), which the page fetches when the job ends."""
    studio = studio_of(request)
    return studio.templates.TemplateResponse(request, "export_result.html", _job_context(studio, job_id))
