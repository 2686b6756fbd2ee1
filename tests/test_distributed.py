"""Data-parallel training under torchrun: 2 CPU processes (gloo) on a tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import run_group

pytest.importorskip("torch")
pytest.importorskip("peft")

from train_helpers import (  # noqa: E402
    DATA, assert_peft_adapter_loads, assert_two_ranks_match_one, run_single, subprocess_env,
)

pytestmark = pytest.mark.slow  # two training subprocesses and a 2-rank launch


def _train_args(model: Path, out: Path, name: str, batch: int) -> list[str]:
    return ["train", "--backend", "torch", "--model", str(model), "--data", str(DATA),
            "--iters", "8", "--batch-size", str(batch), "--grad-accum", "2", "--lr", "5e-3", "--max-seq-len", "128",
            "--val-split", "0.1", "--eval-every", "4", "--save-every", "4", "--output-dir", str(out),
            "--name", name, "--quiet", "--dtype", "float32"]


def test_torchrun_two_ranks_match_one_process(tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("llama")
    env = subprocess_env(OMP_NUM_THREADS="1")
    run_single(["-m", "qlocal", *_train_args(model, tmp_path, "one", 4)], env, tmp_path)
    ddp = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      "-m", "qlocal", *_train_args(model, tmp_path, "two", 2)], env=env, cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert_two_ranks_match_one(tmp_path / "one", tmp_path / "two", 8, val_step=4, val_tol=1e-3)
    assert_peft_adapter_loads(model, tmp_path / "two")
