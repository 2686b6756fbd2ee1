"""Data-parallel MLX training under mlx.launch: 2 local processes (ring backend) on a tiny model."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import run_group

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from train_helpers import (  # noqa: E402
    DATA, adapter_arrays, assert_two_ranks_match_one, metrics_rows, run_single, subprocess_env,
)


def _train_args(model: Path, out: Path, name: str, batch: int) -> list[str]:
    return ["-m", "qlocal", "train", "--backend", "mlx", "--model", str(model),
            "--data", str(DATA), "--iters", "6", "--batch-size", str(batch),
            "--grad-accum", "2", "--lr", "5e-3", "--max-seq-len", "128", "--val-split", "0.1", "--eval-every", "3",
            "--save-every", "3", "--output-dir", str(out), "--name", name, "--quiet"]


def _launcher() -> list[str]:
    exe = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
    if exe is None:
        pytest.skip("mlx.launch is not installed with this mlx")
    if not mx.distributed.is_available("ring"):
        pytest.skip("this mlx build has no ring backend for mx.distributed")
    return [exe, "-n", "2", "--backend", "ring", "--starting-port", str(20000 + os.getpid() % 20000), "--"]


@pytest.mark.slow  # a training subprocess and two 2-rank launches
def test_mlx_launch_two_ranks_match_one_process(tiny_model_dir, tmp_path: Path) -> None:
    launch = _launcher()
    model = tiny_model_dir("qwen2")
    env = subprocess_env(OMP_NUM_THREADS="1")
    run_single(_train_args(model, tmp_path, "one", 4), env, tmp_path)
    two_ranks = run_group([*launch, sys.executable, *_train_args(model, tmp_path, "two", 2)], env, tmp_path)
    assert two_ranks.returncode == 0, (two_ranks.stdout[-2000:], two_ranks.stderr[-3000:])
    assert_two_ranks_match_one(tmp_path / "one", tmp_path / "two", 6, val_step=3, val_tol=1e-4)
    # Gradients averaged across ranks = the same updates as one process: the adapters agree.
    a, b = adapter_arrays(tmp_path / "one"), adapter_arrays(tmp_path / "two")
    assert a.keys() == b.keys()
    assert max(float(abs(a[k] - b[k]).max()) for k in a) < 1e-3

    # Resume under mlx.launch from the step-3 checkpoint: the same final adapter.
    run = tmp_path / "two"
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    shutil.rmtree(run / "adapter")
    res = run_group([*launch, sys.executable, "-m", "qlocal", "train", "--resume", str(run), "--quiet"], env, tmp_path)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    again = adapter_arrays(run)
    assert max(float(abs(b[k] - again[k]).max()) for k in b) < 1e-6
    assert [r["step"] for r in metrics_rows(run)] == list(range(1, 7))


def test_launcher_mismatch_is_a_user_error(monkeypatch) -> None:
    from qlocal import distributed
    from qlocal.errors import UserError

    for k in ("RANK", "MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    before = distributed.current()  # earlier in-process runs may have set it
    with pytest.raises(UserError, match="mlx.launch"):
        distributed.init_mlx()  # torchrun ranks MLX cannot see: not N separate runs
    assert distributed.current() is before
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("MLX_RANK", "1")
    assert distributed.launched_by_mlx() and distributed.from_env().rank == 1 and not distributed.from_env().is_main
