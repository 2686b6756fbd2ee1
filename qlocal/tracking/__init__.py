"""Experiment tracking: what a run writes to metrics.jsonl also goes to the trackers `train.report_to`
names (TensorBoard, Weights & Biases, MLflow), with the resolved config as hyperparameters and
config.yaml, loss.png and `qlocal eval` reports as artifacts.

One small interface (`Tracker`), one module per library, each imported only when a run asks for it.
Only rank 0 tracks (the caller opens nothing on other ranks). The ids of a run's tracker runs live in
<run>/tracking.json, so a resumed run continues the same TensorBoard log dir, W&B run and MLflow run,
and a later `qlocal eval` of the run attaches its report to them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from qlocal import atomic
from qlocal.config import REPORT_TO, Config
from qlocal.errors import UserError

STATE = "tracking.json"
"""<run>/tracking.json: per tracker, the ids that reopen its run (W&B run id, MLflow run id, ...)."""

# tracker -> (modules it imports, the extra that installs them). MLflow's default store (sqlite in
# the run folder) also needs SQLAlchemy and Alembic, which mlflow-skinny leaves out.
_NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboardX",), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow"),
}


class Tracker(Protocol):
    """One tracker's run, opened by its module's `open`."""

    def log(self, step: int, values: dict[str, float]) -> None:
        """One metrics.jsonl line: every numeric value at optimizer step `step`."""

    def summary(self, step: int, values: dict[str, float]) -> None:
        """Final numbers of the run (eval metrics), reported at training's last step."""

    def artifact(self, path: Path) -> None:
        """A file of the run (config.yaml, loss.png, an eval report)."""

    def close(self, status: str | None) -> None:
        """finished, stopped (Ctrl-C: resumable) or failed; None leaves the run's status as it was."""


def check_available(names: list[str], run: Path | None = None) -> None:
    """Fail before training (one line, exit 2) when a named tracker's library is not installed, online
    W&B has no API key, or MLflow's tracking server does not answer (MLflow itself retries for minutes
    before it says so).
    run: a run folder already tracked (resume, eval), whose tracking.json names its MLflow store."""
    for name in names:
        if name not in _NEEDS:
            raise UserError(f"train.report_to: unknown tracker {name!r}; use {', '.join(REPORT_TO)}")
        modules, extra = _NEEDS[name]
        if name == "mlflow" and not _mlflow_uses_sql():
            modules = modules[:1]
        for module in modules:
            if importlib.util.find_spec(module) is None:
                raise UserError(f"train.report_to: {name} needs {module}, which is not installed: "
                                f"pip install 'qlocal[{extra}]' (or 'qlocal[tracking]' for all three)")
        if name == "wandb":
            _module("wandb").check_login()
        if name == "mlflow":
            recorded = read_state(run).get("mlflow", {}) if run is not None else {}
            if "tracking_uri" in recorded:  # a tracked run stays in its store (tracking.mlflow._store)
                _probe_server(recorded["tracking_uri"], f"{run / STATE}'s MLflow server")
            else:
                _probe_server(os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")


def _probe_server(uri: str | None, what: str) -> None:
    """One TCP connect to an http(s) tracking URI: a server that is down or mistyped fails in seconds."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=10).close()
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        fix = "start that server" + (", or unset MLFLOW_TRACKING_URI to log to the run folder's own sqlite store"
                                     if what == "MLFLOW_TRACKING_URI" else "")
        raise UserError(f"train.report_to: mlflow cannot reach {what} {uri} ({why}); {fix}") from None


def _mlflow_uses_sql() -> bool:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return not uri or not uri.startswith(("http:", "https:", "databricks", "file:"))


class Trackers:
    """The run's open trackers as one: what metrics.jsonl gets, each of them gets."""

    def __init__(self, items: list[Tracker] | None = None) -> None:
        self.items = items or []

    def log(self, record: dict[str, Any]) -> None:
        """Send one metrics.jsonl record (it carries its `step`) to every tracker."""
        if self.items:
            values = numeric(record)
            values.pop("step", None)
            for t in self.items:
                t.log(int(record["step"]), values)

    def artifact(self, path: Path) -> None:
        if path.is_file():
            for t in self.items:
                t.artifact(path)

    def close(self, status: str | None) -> None:
        for t in self.items:
            t.close(status)
        self.items = []

    @contextmanager
    def session(self, run: Path) -> Iterator[Trackers]:
        """Training's span: at its end config.yaml and loss.png go up and each run is closed as
        finished, stopped (Ctrl-C, exit 130: resumable) or failed."""
        status = "failed"
        try:
            yield self
            status = "finished"
        except (KeyboardInterrupt, SystemExit):
            status = "stopped"
            raise
        finally:
            for name in ("config.yaml", "loss.png"):
                self.artifact(run / name)
            self.close(status)


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers (bools and text left out) as floats."""
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def hyperparameters(cfg: Config, resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as flat `section.key` hyperparameters, the resolved facts under `resolved.`."""
    flat: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    for key, value in resolved.items():
        flat[f"resolved.{key}"] = value
    return flat


def read_state(run: Path) -> dict[str, dict[str, Any]]:
    path = run / STATE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON; delete it to start new tracker runs") from None


def _last_step(path: Path) -> int:
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return max((json.loads(ln).get("step", 0) for ln in lines if ln.strip()), default=0)


def _module(name: str) -> Any:
    if name == "tensorboard":
        from qlocal.tracking import tensorboard as mod
    elif name == "wandb":
        from qlocal.tracking import wandb as mod
    else:
        from qlocal.tracking import mlflow as mod
    return mod


def start(run: Path, cfg: Config, resolved: dict[str, Any], resume_step: int | None, logged_through: int) -> Trackers:
    """Open the trackers of `cfg.train.report_to` for training in `run` (call on rank 0 only).

    resume_step: the checkpoint a resumed run continues from (None: a fresh run). logged_through: the
    last step the trackers were sent before (metrics.jsonl's last line before resume cut it back):
    TensorBoard drops its events from resume_step + 1 on; W&B and MLflow, which cannot drop points,
    keep theirs and are sent only the steps after logged_through, so each step is there once.
    """
    names = cfg.train.report_to
    if not names:
        return Trackers()
    check_available(names)
    state = read_state(run)
    fresh = resume_step is None
    params = hyperparameters(cfg, resolved) if fresh else None
    opened: list[Tracker] = []
    try:
        for name in names:
            mine = state[name] = {} if fresh else state.get(name, {})
            opened.append(_module(name).open_run(run, mine, params, purge_from=None if fresh else resume_step + 1,
                                             skip_through=0 if fresh else logged_through))
    except BaseException:
        Trackers(opened).close("failed")
        raise
    atomic.write_text(run / STATE, json.dumps(state, indent=1))
    return Trackers(opened)


def log_eval(run: Path, report_path: Path, metrics: dict[str, Any]) -> None:
    """Attach a `qlocal eval` report of a trained run to its tracker runs: the report file as an
    artifact and its scalar metrics as eval/<data>/<metric> at the run's last step. A tracker whose
    library is gone, or that has no run recorded, is skipped with a warning: the report is written."""
    from qlocal.rundir import load_config

    names = load_config(run)[0].train.report_to
    if not names:
        return
    state = read_state(run)
    step = _last_step(run / "metrics.jsonl")
    values = {f"eval/{report_path.stem.removeprefix('eval-')}/{k}": v for k, v in numeric(metrics).items()}
    for name in names:
        try:
            check_available([name], run)
        except UserError as e:
            print(f"warning: eval report not sent to {name}: {e}", file=sys.stderr)
            continue
        if not state.get(name):
            print(f"warning: eval report not sent to {name}: {run / STATE} records no {name} run", file=sys.stderr)
            continue
        tracker = _module(name).open_run(run, state[name], None, purge_from=None, skip_through=0)
        try:
            tracker.summary(step, values)
            tracker.artifact(report_path)
        finally:
            tracker.close(None)
