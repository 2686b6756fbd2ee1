"""MLflow through `MlflowClient`: MLFLOW_TRACKING_URI when set, else a store of the run's own,
sqlite:///<run>/mlflow.db with artifacts in <run>/mlartifacts (MLflow's own default is a sqlite
database; its `file:` store now refuses to open unless MLFLOW_ALLOW_FILE_STORE is set). Experiment:
MLFLOW_EXPERIMENT_NAME, else qlocal. The run id is kept in tracking.json so a resume continues it.

    mlflow ui --backend-store-uri sqlite:///outputs/<run>/mlflow.db
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from qlocal.errors import UserError

_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
_BATCH = 100  # MlflowClient.log_batch takes at most 100 params per call
_PARAM_LIMIT = 6000  # characters of a param value MLflow stores


class MlflowRun:
    """Metrics per step (steps a previous session already sent are not sent again)."""

    def __init__(self, client: Any, run_id: str, skip_through: int) -> None:
        self.client, self.run_id, self.skip_through = client, run_id, skip_through

    def _metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def log(self, step: int, values: dict[str, float]) -> None:
        if step > self.skip_through:
            self._metrics(step, values)

    def summary(self, step: int, values: dict[str, float]) -> None:
        self._metrics(step, values)

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str | None) -> None:
        if status is not None:
            self.client.set_terminated(self.run_id, _STATUS[status])


def _store(run: Path, state: dict[str, Any]) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment); None = the server's choice. A run
    already tracked stays in the store it started in, whatever MLFLOW_TRACKING_URI says now."""
    uri = state["tracking_uri"] if "tracking_uri" in state else os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    return f"sqlite:///{(run / 'mlflow.db').resolve()}", (run / "mlartifacts").resolve().as_uri()


def open_run(run: Path, state: dict[str, Any], params: dict[str, Any] | None, purge_from: int | None,
             skip_through: int) -> MlflowRun:
    """Create (params given) or reopen the MLflow run recorded in `state`."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri, artifacts = _store(run, state)
    if "tracking_uri" not in state:  # None: the run folder's own store, found again wherever it moves
        state["tracking_uri"] = None if artifacts else uri
    for name in ("mlflow", "alembic"):  # store creation logs its schema migrations at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SQLAlchemy deprecation notices from MLflow's store
            client = MlflowClient(tracking_uri=uri)
            if state.get("run_id"):
                if purge_from is not None:  # training resumes (an eval report attaches without it)
                    client.update_run(state["run_id"], status="RUNNING")
                return MlflowRun(client, state["run_id"], skip_through)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "qlocal"
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else client.create_experiment(name, artifact_location=artifacts)
            created = client.create_run(exp_id, run_name=run.name, tags={"qlocal.run_dir": str(run.resolve())})
    except MlflowException as e:
        first = (e.message or str(e)).strip().splitlines()[0]
        raise UserError(f"mlflow ({uri}): {first}") from None
    state.update(run_id=created.info.run_id, experiment_id=exp_id)
    mlrun = MlflowRun(client, created.info.run_id, skip_through)
    if params:
        items = [Param(k, str(v)[:_PARAM_LIMIT]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            client.log_batch(mlrun.run_id, params=items[i:i + _BATCH])
    return mlrun
