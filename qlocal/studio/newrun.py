"""New run form, Stop and Resume.

The form's fields are config keys (`lora.rank`, ...). Each value goes through qlocal.config
exactly as `qlocal train --set key=value` sends it, so a bad value is shown next to its field with
the message the CLI prints for it, and the job that starts is `qlocal train --set key=value ...`
with those same validated strings: an argv list, only the keys below, nothing through a shell.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from qlocal import config as config_mod
from qlocal.errors import UserError
from qlocal.studio.jobs import JobRefused
from qlocal.studio.pages import run_path, studio_of
from qlocal.studio.security import WORKING_FOLDERS, PathRefused, confine

router = APIRouter()

# (config key, label, choices or None); the only keys the form may set.
FIELDS: list[tuple[str, str, tuple[str, ...] | None]] = [
    ("model.name", "model (alias, hub id or models/ folder)", None),
    ("data.path", "training data (data/ file or hub dataset)", None),
    ("data.val_path", "validation data", None),
    ("data.val_split", "validation split", None),
    ("data.format", "data format", config_mod.CHOICES["data.format"]),
    ("data.max_seq_len", "max sequence length", None),
    ("train.method", "method", config_mod.CHOICES["train.method"]),
    ("train.backend", "backend", config_mod.CHOICES["train.backend"]),
    ("train.quantize", "quantize", config_mod.CHOICES["train.quantize"]),
    ("lora.rank", "LoRA rank", None),
    ("lora.alpha", "LoRA alpha", None),
    ("lora.dropout", "LoRA dropout", None),
    ("lora.target_modules", "target modules", None),
    ("train.lr", "learning rate", None),
    ("train.lr_schedule", "lr schedule", config_mod.CHOICES["train.lr_schedule"]),
    ("train.warmup_steps", "warmup steps", None),
    ("train.iters", "steps (blank: from epochs)", None),
    ("train.epochs", "epochs", None),
    ("train.batch_size", "batch size", None),
    ("train.grad_accum", "gradient accumulation", None),
    ("train.eval_every", "validate every", None),
    ("train.save_every", "checkpoint every", None),
    ("train.seed", "seed", None),
    ("train.report_to", "report to (tensorboard, wandb, mlflow)", None),
]
SECTIONS = [("Model and data", "model.", "data."), ("Method", "train.method", "train.backend", "train.quantize"),
            ("LoRA", "lora."), ("Training", "train.")]
PATH_KEYS = ("data.path", "data.val_path")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def defaults() -> dict[str, str]:
    """The config defaults, as the form shows them."""
    flat = {}
    for sec, values in config_mod.Config().to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{sec}.{k}"] = "" if v is None else (",".join(v) if isinstance(v, list) else str(v))
    return {key: flat.get(key, "") for key, _, _ in FIELDS}


def _check_path(root: Path, key: str, value: str) -> str:
    """A local file must lie in the working folders (the absolute path goes to the job); a name
    that is no file there passes only in hub-id shape."""
    from qlocal.models import ALIASES

    if value.startswith("~"):  # the job would expand it to a home folder
        raise PathRefused(f"{value}: give a path inside the working folders, not under ~")
    local = Path(value) if Path(value).is_absolute() else root / value
    if ".." in Path(value).parts or Path(value).is_absolute() or local.exists() or local.is_symlink():
        return str(confine(root, value))
    in_working = Path(value).parts[0] in WORKING_FOLDERS  # `data/x.jsonl` is a missing file, not a hub id
    if (_HUB_ID.match(value) and not in_working) or (key == "model.name" and value in ALIASES):
        return value  # a hub id or an alias: resolved in the job, as the CLI does
    if key == "model.name":  # models.resolve_model's own message
        raise UserError(f"{value}: no such model folder; give a local HF folder, a hub id like "
                        f"Qwen/Qwen2.5-0.5B-Instruct, or an alias ({', '.join(ALIASES)})")
    raise PathRefused(f"{value}: no such file under {root}; give a path inside data/ or a hub dataset id (org/name)")


def validate(form: dict[str, str], root: Path) -> tuple[list[str], dict[str, str], str]:
    """(argv after `qlocal`, errors by field, run name). Errors empty = the argv may be started."""
    known = {key for key, _, _ in FIELDS}
    errors: dict[str, str] = {}
    sets: list[str] = []
    for key in form:
        if key not in known and key != "run.name":
            errors["_form"] = f"'{key}': not a field of this form"
    for key, _, _ in FIELDS:
        value = (form.get(key) or "").strip()
        if not value:
            continue
        if any(c in value for c in "\r\n\x00"):
            errors[key] = f"'{key}': one line of text, please"
            continue
        try:
            if key in PATH_KEYS or key == "model.name":
                value = _check_path(root, key, value)
            item = f"{key}={value}"
            config_mod.build(None, None, [item])
            if key in PATH_KEYS + ("model.name",) and config_mod.parse_set([item])[key] != value:
                raise UserError(f"{value}: reads as {config_mod.parse_set([item])[key]!r} in --set {key}=...; rename it")
        except (UserError, PathRefused) as e:
            errors[key] = str(e)
            continue
        sets.append(item)
    name = (form.get("run.name") or "").strip() or _default_name(form.get("model.name") or config_mod.Config().model.name)
    if not _RUN_NAME.match(name):
        errors["run.name"] = f"{name!r}: a run name is letters, digits, '.', '_' or '-' (at most 100)"
    elif (root / "outputs" / name).exists():
        from qlocal import rundir

        try:
            rundir.check_available(root / "outputs" / name, overwrite=False)
        except UserError as e:  # the CLI's message, run from root as the job would be
            errors["run.name"] = str(e).replace(str(root / "outputs" / name), f"outputs/{name}")
    if not errors:
        try:
            config_mod.build(None, None, sets)  # what only the whole set can tell (method vs options)
        except UserError as e:
            errors["_form"] = str(e)
    args = ["train", *[a for s in sets for a in ("--set", s)], "--set", "run.output_dir=outputs",
            "--set", f"run.name={name}"]
    return args, errors, name


def _default_name(model: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or "run").strip("-.") or "run"
    return f"{stem[:60]}-{time.strftime('%Y%m%d-%H%M%S')}"


def _form_page(request: Request, values: dict[str, str], errors: dict[str, str], status: int = 200) -> Any:
    studio = studio_of(request)
    data_files = sorted(str(p.relative_to(studio.root)) for p in studio.data_dir.glob("*")
                        if p.is_file() and p.suffix in (".jsonl", ".json", ".csv", ".parquet")) \
        if studio.data_dir.is_dir() else []
    return studio.templates.TemplateResponse(request, "new.html", {
        "nav": "new", "fields": FIELDS, "values": values, "errors": errors, "data_files": data_files},
        status_code=status)


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form body (what a browser's form sends) as {field: last value}."""
    from urllib.parse import parse_qsl

    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/x-www-form-urlencoded":
        raise HTTPException(415, "send the form as application/x-www-form-urlencoded")
    body = (await request.body()).decode("utf-8", "replace")
    return dict(parse_qsl(body, keep_blank_values=True))


@router.get("/new", response_class=HTMLResponse)
async def new_form(request: Request) -> Any:
    return _form_page(request, {**defaults(), "run.name": ""}, {})


@router.post("/new")
async def new_submit(request: Request) -> Any:
    """Validate; on errors the form again (400) with each message beside its field; else start
    `qlocal train` and go to the run's page."""
    studio = studio_of(request)
    form = await read_form(request)
    args, errors, name = validate(form, studio.root)
    if not errors:
        try:
            studio.jobs.start(args, run=f"outputs/{name}")
        except JobRefused as e:
            errors["_form"] = str(e)
    if errors:
        return _form_page(request, form, errors, status=400)
    return RedirectResponse(f"/runs/{name}", status_code=303)


@router.post("/runs/{name}/stop")
async def stop_run(request: Request, name: str) -> Any:
    """Stop = SIGINT, as Ctrl-C: train finishes its step, checkpoints and exits 130."""
    studio = studio_of(request)
    path = run_path(studio, name)
    job = studio.jobs.active_for(f"outputs/{path.name}")
    if job is None:
        raise HTTPException(409, f"{name}: not running")
    studio.jobs.stop(job.id)
    return RedirectResponse(f"/runs/{name}", status_code=303)


@router.post("/runs/{name}/resume")
async def resume_run(request: Request, name: str) -> Any:
    """`qlocal train --resume outputs/<name>`: continue from its last checkpoint."""
    studio = studio_of(request)
    path = run_path(studio, name)
    if not (path / "config.yaml").is_file():
        raise HTTPException(409, f"{name}: has no config.yaml yet; nothing to resume")
    try:
        studio.jobs.start(["train", "--resume", f"outputs/{path.name}"], run=f"outputs/{path.name}")
    except JobRefused as e:
        raise HTTPException(409, str(e)) from None
    return RedirectResponse(f"/runs/{name}", status_code=303)
