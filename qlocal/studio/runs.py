"""Run folders as the studio shows them: status, summary, metrics, progress, evals, exports.

Status of a run (what the Runs table shows):
  running   a live studio job (train) works on it
  finished  adapter/ is saved and the last checkpoint is the final step (train writes adapter/ last)
  stopped   its last studio job exited 130 (Stop = SIGINT), or it has checkpoints and no adapter:
            `qlocal train --resume` continues it
  failed    its last job ended otherwise, or it has neither checkpoints nor adapter
A run trained from a terminal (no studio job) is running while its train.pid names a live trainer
(qlocal.pidfile: any POSIX system), or qlocal.studio.procs finds its `qlocal train` process (Linux:
/proc; it also sees a training whose run folder does not exist yet).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlocal import pidfile, rundir
from qlocal.studio.jobs import Job, JobRunner
from qlocal.studio.procs import cli_trainings

# Series the run page charts: metrics.jsonl key -> title.
CHART_KEYS = {"loss": "loss", "val_loss": "validation loss", "lr": "learning rate",
              "grad_norm": "gradient norm", "tokens_per_s": "tokens / s"}


@dataclass
class RunInfo:
    """One row of the Runs table."""

    name: str
    path: Path
    base_model: str = ""
    method: str = ""
    backend: str = ""
    status: str = "failed"
    steps: int = 0
    total_steps: int | None = None
    last_loss: float | None = None
    last_val_loss: float | None = None
    tokens_per_s: float | None = None
    started: float = 0.0
    job: Job | None = None
    returncode: int | None = None
    resumable: bool = False  # not running or finished, and a checkpoint to continue from
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base_model": self.base_model, "method": self.method, "backend": self.backend,
                "status": self.status, "steps": self.steps, "total_steps": self.total_steps,
                "last_loss": self.last_loss, "last_val_loss": self.last_val_loss, "tokens_per_s": self.tokens_per_s,
                "started": self.started, "job": self.job.id if self.job else None, "returncode": self.returncode,
                "resumable": self.resumable}


def read_config(run: Path) -> dict[str, Any]:
    """config.yaml as saved by train (settings + `resolved:`), {} when unreadable."""
    try:
        doc = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return doc if isinstance(doc, dict) else {}


def read_metrics(path: Path, start: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Records of metrics.jsonl from line `start` on, and the count of complete lines read.

    A line still being written (no newline yet) is left for the next read."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return [], 0
    lines = text.split("\n")[:-1]  # the last piece has no newline: complete lines only
    rows = []
    for ln in lines[start:]:
        if ln.strip():
            try:
                rows.append(json.loads(ln))
            except ValueError:
                continue
    return rows, len(lines)


def file_identity(path: Path) -> tuple[int, int] | None:
    """(inode, size): a new inode or a smaller size means the file was rewritten (a resume trims it)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size


def _last_checkpoint(run: Path) -> int | None:
    folder = run / "checkpoints"
    steps = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith("step-") and (p / "state.json").is_file():
                try:
                    steps.append(int(p.name[5:]))
                except ValueError:
                    continue
    return max(steps) if steps else None


def run_status(run: Path, total: int | None, jobs: list[Job], cli_pid: int | None = None) -> tuple[str, Job | None]:
    """(status, the job it comes from): the rule in this module's docstring."""
    trains = [j for j in jobs if j.kind == "train"]
    latest = trains[0] if trains else None
    if latest is not None and latest.alive():
        return "running", latest
    if cli_pid is not None:  # trained from a terminal (qlocal.studio.procs)
        return "running", None
    last_ckpt = _last_checkpoint(run)
    if (run / "adapter" / "adapter_config.json").is_file() and (last_ckpt is None or total is None or last_ckpt >= total):
        return "finished", latest
    if latest is not None:
        st = latest.status()
        return ("stopped" if st in ("stopped", "finished") else "failed"), latest
    return ("stopped" if last_ckpt is not None else "failed"), None


def run_info(run: Path, runner: JobRunner, root: Path, cli: dict[Path, int] | None = None) -> RunInfo:
    """Summary of one run folder (`cli`: qlocal.studio.procs.cli_trainings(), looked up when not given)."""
    doc = read_config(run)
    resolved = doc.get("resolved") or {}
    total = resolved.get("total_steps")
    rel = os.path.relpath(run, root)
    jobs = runner.for_run(rel)
    cli = cli_trainings() if cli is None else cli
    cli_pid = cli.get(run.resolve())
    status, job = run_status(run, total, jobs, pidfile.live_pid(run) if cli_pid is None else cli_pid)
    rows, _ = read_metrics(run / "metrics.jsonl")
    info = RunInfo(name=run.name, path=run, config=doc, status=status, job=job, total_steps=total,
                   base_model=str((doc.get("model") or {}).get("name", "")),
                   method=str((doc.get("train") or {}).get("method", "sft")),
                   backend=str(resolved.get("backend") or (doc.get("train") or {}).get("backend", "")),
                   returncode=job.returncode() if job else None)
    info.resumable = status in ("stopped", "failed") and _last_checkpoint(run) is not None
    info.started = min([j.started for j in jobs] or [_mtime(run)])
    for r in rows:
        info.steps = max(info.steps, int(r.get("step", 0)))
        if "loss" in r:
            info.last_loss = r["loss"]
        if "val_loss" in r:
            info.last_val_loss = r["val_loss"]
        if "tokens_per_s" in r:
            info.tokens_per_s = r["tokens_per_s"]
    return info


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def list_runs(runs_dir: Path, runner: JobRunner, root: Path) -> list[RunInfo]:
    """Every run folder (one with config.yaml) under outputs/, newest first, plus runs of studio
    jobs that have no config.yaml (yet, while starting; or ever, when the job failed first: its log
    on the run page says why)."""
    found: dict[str, RunInfo] = {}
    cli = cli_trainings()
    for name in rundir.run_names(runs_dir):
        found[name] = run_info(runs_dir / name, runner, root, cli)
    for job in runner.list():  # newest first: the latest job of a run decides
        if job.kind == "train" and job.run:
            p = root / job.run
            if p.parent == runs_dir and p.name not in found:
                found[p.name] = RunInfo(name=p.name, path=p, status=job.status(), job=job, started=job.started,
                                        base_model=_set_value(job.args, "model.name"), backend="",
                                        method=_set_value(job.args, "train.method") or "sft",
                                        returncode=job.returncode())
    return sorted(found.values(), key=lambda r: r.started, reverse=True)


def _set_value(args: list[str], key: str) -> str:
    for a in args:
        if a.startswith(key + "="):
            return a.split("=", 1)[1]
    return ""


def progress(run: Path, rows: list[dict[str, Any]], total: int | None) -> dict[str, Any]:
    """Steps done of total and an ETA from the measured step times (tokens / tokens_per_s)."""
    step = max((int(r.get("step", 0)) for r in rows), default=0)
    secs = [r["tokens"] / r["tokens_per_s"] for r in rows if r.get("tokens") and r.get("tokens_per_s")]
    per_step = sum(secs) / len(secs) if secs else None
    eta = None if per_step is None or total is None else max(0, total - step) * per_step
    return {"step": step, "total": total, "fraction": (step / total) if total else 0.0,
            "eta_s": None if eta is None else round(eta, 1)}


def eval_reports(run: Path) -> list[tuple[str, dict[str, Any]]]:
    """The run's `qlocal eval` reports (eval-<data>.json): (file name, report)."""
    out = []
    for p in sorted(run.glob("eval-*.json")):
        try:
            out.append((p.name, json.loads(p.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            continue
    return out


def exports_of(run: Path, export_dir: Path) -> list[dict[str, Any]]:
    """Export folders made from this run: their files, verify.json verdict and Modelfile."""
    out = []
    if not export_dir.is_dir():
        return out
    for folder in sorted(export_dir.iterdir()):
        summary = _json(folder / "export.json")
        if summary is None:
            continue
        src = Path(str(summary.get("run", "")))
        same = folder.name == run.name or (src.name == run.name and (not src.is_absolute() or src.resolve() == run.resolve()))
        if not same:
            continue
        verify = _json(folder / "verify.json")
        modelfile = folder / "Modelfile"
        out.append({
            "name": folder.name, "path": folder,
            "files": sorted(p.name for p in folder.glob("*.gguf")),
            "verify": verify, "passed": None if verify is None else bool(verify.get("passed")),
            "checks": [] if verify is None else verify.get("files", []),
            "modelfile": modelfile.read_text(encoding="utf-8") if modelfile.is_file() else None,
        })
    return out


def _json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
