"""train.report_to: TensorBoard, MLflow and W&B get what metrics.jsonl gets, read back with each
library's own reader (TensorBoard's EventAccumulator, MlflowClient, `wandb leet inspect` on the
offline run file). Each run is stopped by Ctrl-C after step 4, its step-4 checkpoint removed (as a
kill after step 4 leaves it: metrics and trackers one step past the last checkpoint), and resumed:
every tracker must still show one run with each step once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qlocal import rundir
from qlocal.errors import UserError

pytest.importorskip("torch")

from train_helpers import DATA, metrics_rows, train_cfg  # noqa: E402

ITERS, STOP_AT = 6, 4
TIMING = {"tokens_per_s", "trained_tokens_per_s", "peak_memory_mb"}  # differ between two runs of one step


def _stopped_and_resumed(model: Path, out: Path, trackers: str) -> Path:
    """Train ITERS steps with `trackers`, Ctrl-C after step STOP_AT, drop that checkpoint, resume."""
    from qlocal.config import Config
    from qlocal.train import train

    cfg = train_cfg("torch", model, out, "run", iters=ITERS, batch_size=2, save_every=3,
                    **{"train.report_to": trackers, "data.val_split": 0.2, "train.eval_every": 3,
                       "data.max_seq_len": 128})
    real_write = rundir.Metrics.write

    def write_then_ctrl_c(self: rundir.Metrics, record: dict[str, Any]) -> None:
        real_write(self, record)
        if record["step"] == STOP_AT:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rundir.Metrics, "write", write_then_ctrl_c)
        with pytest.raises(SystemExit) as stopped:
            train(cfg, quiet=True)
    assert stopped.value.code == 130
    run = out / "run"
    assert [s for s, _ in rundir.checkpoints(run)] == [3, STOP_AT]
    shutil.rmtree(run / "checkpoints" / f"step-{STOP_AT:08d}")
    assert train(Config(), resume=run, quiet=True) == run
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == list(range(1, ITERS + 1))
    return run


@pytest.fixture(scope="module")
def tracker_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Offline trackers writing under a temp folder; nothing reaches the network or ~/."""
    root = tmp_path_factory.mktemp("tracking_env")
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_ENTITY"):
            mp.delenv(key, raising=False)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root))
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_CONFIG_DIR", str(root / "config"))
        mp.setenv("WANDB_CACHE_DIR", str(root / "cache"))
        yield root


@pytest.fixture(scope="module")
def tb_mlflow_run(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory, tracker_env: Path) -> Path:
    """One stopped-and-resumed run tracked by TensorBoard and MLflow, then `qlocal eval`ed."""
    pytest.importorskip("tensorboardX")
    pytest.importorskip("mlflow")
    run = _stopped_and_resumed(tiny_model_dir("qwen2"), tmp_path_factory.mktemp("tracked"), "tensorboard,mlflow")
    _evaluate(run)
    return run


def _evaluate(run: Path) -> None:
    """`qlocal eval`'s path on three sample records (loss only): the report goes to the run's trackers."""
    from qlocal.evaluate import EvalOptions, run_eval

    held_out = run.parent / "held_out.jsonl"
    held_out.write_text("".join(DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    run_eval(str(run), EvalOptions(data=str(held_out), generate=False), echo=lambda _: None, quiet=True)
    assert (run / "eval-held_out.json").is_file()


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in rows if key in r]


def _keys(rows: list[dict[str, Any]]) -> set[str]:
    return {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}


def _assert_matches_metrics(got: dict[str, list[tuple[int, float]]], rows: list[dict[str, Any]],
                            resent: bool, rel: float) -> None:
    """got[key] == metrics.jsonl's (step, value) per step; `resent`: STOP_AT holds the stopped
    session's value (trackers that cannot drop a point), equal up to the resume's exactness."""
    assert _keys(rows) <= got.keys()
    for key in _keys(rows):
        want = _series(rows, key)
        assert [s for s, _ in got[key]] == [s for s, _ in want], f"{key}: each step once, in order"
        for (step, g), (_, w) in zip(got[key], want):
            if resent and step == STOP_AT:
                if key not in TIMING:
                    assert g == pytest.approx(w, rel=1e-4, abs=1e-5), f"{key} at the re-run step {step}"
            else:
                assert g == pytest.approx(w, rel=rel), f"{key} at step {step}"


def test_tensorboard_holds_metrics_jsonl_once_per_step(tb_mlflow_run: Path) -> None:
    """Read with TensorBoard's own EventAccumulator: the resumed session's purge_step dropped the
    stopped session's step 4, so every step shows once with the value metrics.jsonl has."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(tb_mlflow_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    rows = metrics_rows(tb_mlflow_run)
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    _assert_matches_metrics(got, rows, resent=False, rel=1e-6)  # event files store float32
    assert got["eval/held_out/loss"] == [(ITERS, pytest.approx(_eval_loss(tb_mlflow_run), rel=1e-6))]
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lora.rank"].number_value == 8
    assert start.hparams["train.report_to"].string_value == "['tensorboard', 'mlflow']"
    assert start.hparams["resolved.total_steps"].number_value == ITERS
    assert "loss.png" in acc.Tags()["images"]


def _eval_loss(run: Path) -> float:
    return json.loads((run / "eval-held_out.json").read_text(encoding="utf-8"))["metrics"]["loss"]


def test_mlflow_holds_one_run_with_metrics_params_and_artifacts(tb_mlflow_run: Path) -> None:
    """Read with MlflowClient from the run folder's own store: one run (the resume continued it),
    finished, every metric per step, the config as params, config.yaml/loss.png/eval report."""
    from mlflow.tracking import MlflowClient

    state = json.loads((tb_mlflow_run / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tb_mlflow_run / 'mlflow.db'}")
    runs = client.search_runs([state["experiment_id"]])
    assert [r.info.run_id for r in runs] == [state["run_id"]]
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    rows = metrics_rows(tb_mlflow_run)
    got = {key: sorted((m.step, m.value) for m in client.get_metric_history(state["run_id"], key))
           for key in run.data.metrics}
    _assert_matches_metrics(got, rows, resent=True, rel=1e-12)
    assert got["eval/held_out/loss"] == [(ITERS, pytest.approx(_eval_loss(tb_mlflow_run), rel=1e-12))]
    params = run.data.params
    assert params["lora.rank"] == "8" and params["train.iters"] == str(ITERS)
    assert params["resolved.backend"] == "torch" and params["train.report_to"] == "['tensorboard', 'mlflow']"
    assert {a.path for a in client.list_artifacts(state["run_id"])} >= {"config.yaml", "loss.png", "eval-held_out.json"}


@pytest.fixture(scope="module")
def wandb_run(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory, tracker_env: Path) -> Path:
    pytest.importorskip("wandb").teardown()  # a fresh wandb singleton reads tracker_env's settings
    run = _stopped_and_resumed(tiny_model_dir("qwen2"), tmp_path_factory.mktemp("wandb_tracked"), "wandb")
    _evaluate(run)
    return run


def _inspect(run_file: Path) -> list[dict[str, Any]]:
    """The records of an offline .wandb file, as W&B's own reader (`wandb leet inspect`) prints them."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_file)], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    return [json.loads(ln) for ln in out.splitlines() if ln.strip()]


@pytest.mark.slow
def test_wandb_offline_run_resumes_the_same_id_with_metrics_jsonl(wandb_run: Path, tracker_env: Path) -> None:
    """Offline sessions of one W&B run id: stopped at step 4 (exit 130), resumed (exit 0), then the
    eval report attached. History rows are metrics.jsonl's steps, each once (the resumed session
    starts after step 4); the eval metrics are in the run summary, the report among its files."""
    run_id = json.loads((wandb_run / "tracking.json").read_text())["wandb"]["id"]
    sessions = sorted((tracker_env / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(sessions) == 3
    rows = metrics_rows(wandb_run)
    got: dict[str, list[tuple[int, float]]] = {}
    exits, configs, files, summary = [], [], set(), {}
    for session in sessions:
        for rec in _inspect(session / f"run-{run_id}.wandb"):
            if rec["type"] == "history":
                step = rec["history"]["step"]["num"]
                for k, v in rec["history"]["item"].items():
                    if not k.startswith("_"):
                        got.setdefault(k, []).append((int(step), float(v)))
            elif rec["type"] == "exit":
                exits.append(rec["exit"].get("exit_code", 0))
            elif rec["type"] == "run":
                configs.append(rec["run"].get("config", {}).get("update", {}))
                assert rec["run"]["run_id"] == run_id and rec["run"]["project"] == "qlocal"
            elif rec["type"] == "files":
                files |= {f["path"] for f in rec["files"]["files"]}
            elif rec["type"] == "summary":
                summary.update(rec["summary"].get("update", {}))
    assert exits == [130, 0, 0]
    _assert_matches_metrics(got, rows, resent=True, rel=1e-12)
    assert configs[0]["lora.rank"] == 8 and configs[0]["resolved.backend"] == "torch"
    assert {"config.yaml", "loss.png", "eval-held_out.json"} <= files
    assert summary["eval/held_out/loss"] == pytest.approx(_eval_loss(wandb_run), rel=1e-12)


def test_missing_tracker_library_is_one_line_before_training(tiny_model_dir: Any, tmp_path: Path) -> None:
    """A named tracker whose library is absent stops the run before any model loads, naming the extra."""
    from qlocal.train import train

    cfg = train_cfg("torch", tiny_model_dir("qwen2"), tmp_path, "run", iters=2, **{"train.report_to": "tensorboard"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorboardX", None)  # what `import tensorboardX` finds when it is not installed
        with pytest.raises(UserError) as err:
            train(cfg, quiet=True)
    msg = str(err.value)
    assert "\n" not in msg and "train.report_to: tensorboard needs tensorboardX" in msg
    assert "pip install 'qlocal[tensorboard]'" in msg
    assert not (tmp_path / "run").exists()


def test_mlflow_server_not_answering_is_one_line_before_training(tmp_path: Path) -> None:
    """MLFLOW_TRACKING_URI naming a server that is down: one line in seconds, before anything loads
    (MLflow's client retried for about five minutes, after the model had loaded, then printed its urllib3 error)."""
    import socket

    pytest.importorskip("mlflow")
    from conftest import run_qlocal

    with socket.socket() as s:  # a port nothing listens on once it is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    bad = run_qlocal("train", "--model", tmp_path / "not-loaded", "--data", DATA, "--report-to", "mlflow",
                     "--output-dir", tmp_path, "--name", "run", env={"MLFLOW_TRACKING_URI": uri})
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip() == (f"error: train.report_to: mlflow cannot reach MLFLOW_TRACKING_URI {uri} "
                                  "(Connection refused); start that server, or unset MLFLOW_TRACKING_URI to log "
                                  "to the run folder's own sqlite store")
    assert not (tmp_path / "run").exists()
    # A run tracked in the run folder's own store is resumed there: a server named now is not probed.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tracking.json").write_text(json.dumps({"mlflow": {"tracking_uri": None, "run_id": "x"}}))
    from qlocal.tracking import check_available

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        check_available(["mlflow"], tmp_path / "old")
        with pytest.raises(UserError, match="cannot reach MLFLOW_TRACKING_URI"):
            check_available(["mlflow"])


def test_report_to_on_the_command_line(tmp_path: Path) -> None:
    """--report-to is train.report_to: an unknown tracker is one line naming the key and the allowed values."""
    from conftest import run_qlocal

    bad = run_qlocal("train", "--report-to", "tensorboard,comet", "--output-dir", tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: command line: 'train.report_to' takes tensorboard, wandb, mlflow "
                                  "(comma-separated) or none, got 'comet'")
    from qlocal import config as config_mod

    assert config_mod.build(flags={"train.report_to": "wandb, mlflow"}).train.report_to == ["wandb", "mlflow"]
    assert config_mod.build(flags={"train.report_to": "none"}).train.report_to == []
    assert config_mod.Config().train.report_to == []


def test_wandb_without_login_is_one_line(tmp_path: Path) -> None:
    """Online W&B with no API key anywhere: wandb's own reason and the offline way out, on one line."""
    wandb = pytest.importorskip("wandb")
    from qlocal.tracking import wandb as wandb_tracker

    # wandb reads its environment once per process, into a singleton: start from a fresh one.
    wandb.teardown()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
                mp.delenv(key, raising=False)
            mp.setenv("HOME", str(tmp_path))  # no ~/.netrc
            mp.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
            mp.setenv("WANDB_SILENT", "true")
            with pytest.raises(UserError) as err:
                wandb_tracker.open_run(tmp_path / "run", {}, {"lora.rank": 8}, purge_from=None, skip_through=0)
    finally:
        wandb.teardown()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("wandb: ") and "wandb login" in msg and "WANDB_MODE=offline" in msg


def test_wandb_online_without_api_key_is_one_line_before_training(tmp_path: Path) -> None:
    """--report-to wandb, online, no credentials anywhere: the preflight says so (exit 2) before any
    model loads (the model path does not even exist) and nothing is created; each way out passes it."""
    pytest.importorskip("wandb")
    from conftest import OFFLINE_ENV

    from qlocal.tracking import check_available

    home = tmp_path / "home"
    home.mkdir()
    clean = {k: v for k, v in os.environ.items()
             if not (k.startswith("WANDB_") or k == "NETRC")}
    env = {**clean, **OFFLINE_ENV, "HOME": str(home), "WANDB_CONFIG_DIR": str(home / "config"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "qlocal", "train", "--model", str(tmp_path / "not-loaded"), "--data", str(DATA),
            "--report-to", "wandb", "--output-dir", str(tmp_path / "outputs"), "--name", "run"]
    bad = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr
    line = bad.stderr.strip()
    assert "\n" not in line and line.startswith("error: train.report_to: wandb is online (")
    assert "WANDB_API_KEY" in line and "`wandb login`" in line and "WANDB_MODE=offline" in line
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "wandb").exists()

    import wandb

    def check(**setenv: str) -> None:
        wandb.teardown()  # wandb reads its environment once per process, into a singleton
        try:
            with pytest.MonkeyPatch.context() as mp:
                for k in [k for k in os.environ if k.startswith("WANDB_") or k == "NETRC"]:
                    mp.delenv(k)
                mp.setenv("HOME", str(home))
                mp.setenv("WANDB_CONFIG_DIR", str(home / "config"))
                for k, v in setenv.items():
                    mp.setenv(k, v)
                check_available(["wandb"])
        finally:
            wandb.teardown()

    with pytest.raises(UserError, match="has no API key"):
        check()
    check(WANDB_MODE="offline")
    check(WANDB_MODE="disabled")
    check(WANDB_API_KEY="k" * 40)
    # `wandb login` writes the key to ~/.netrc under the API host's name
    from urllib.parse import urlsplit

    from wandb.sdk import wandb_setup

    wandb.teardown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_CONFIG_DIR", str(home / "config"))
        mp.delenv("WANDB_BASE_URL", raising=False)
        host = urlsplit(wandb_setup.singleton().settings.base_url).hostname
    wandb.teardown()
    netrc = home / ".netrc"
    netrc.write_text(f"machine {host}\n  login user\n  password {'p' * 40}\n")
    netrc.chmod(0o600)
    check()


def _tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_mlx_backend_logs_through_the_same_hook(tiny_model_dir: Any, tmp_path: Path) -> None:
    """The MLX backend's metrics reach TensorBoard exactly as metrics.jsonl has them (no torch writer needed)."""
    pytest.importorskip("mlx_lm")
    pytest.importorskip("tensorboardX")
    from qlocal.train import train

    cfg = train_cfg("mlx", tiny_model_dir("qwen2"), tmp_path, "mlx", iters=3, batch_size=2,
                    **{"train.report_to": "tensorboard", "data.max_seq_len": 128})
    run = train(cfg, quiet=True)
    _assert_matches_metrics(_tensorboard_scalars(run), metrics_rows(run), resent=False, rel=1e-6)


@pytest.mark.slow
def test_only_rank_zero_tracks_under_torchrun(tiny_model_dir: Any, tmp_path: Path, tracker_env: Path) -> None:
    """2 ranks (torchrun, gloo) sharing one run folder: one TensorBoard events file and one MLflow run,
    each step once; a tracker opened on rank 1 too would show two of each."""
    pytest.importorskip("tensorboardX")
    pytest.importorskip("mlflow")
    from conftest import run_group
    from mlflow.tracking import MlflowClient
    from train_helpers import subprocess_env

    args = ["-m", "qlocal", "train", "--backend", "torch", "--model", str(tiny_model_dir("qwen2")), "--data",
            str(DATA), "--iters", "3", "--batch-size", "2", "--max-seq-len", "128", "--report-to", "tensorboard,mlflow",
            "--output-dir", str(tmp_path), "--name", "ddp", "--quiet"]
    done = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                     env=subprocess_env(OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "ddp"
    rows = metrics_rows(run)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    _assert_matches_metrics(_tensorboard_scalars(run), rows, resent=False, rel=1e-6)
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (only,) = client.search_runs([json.loads((run / "tracking.json").read_text())["mlflow"]["experiment_id"]])
    assert [m.step for m in client.get_metric_history(only.info.run_id, "loss")] == [1, 2, 3]
