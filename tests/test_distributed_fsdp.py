"""FSDP2 (train.distributed=fsdp) under torchrun: 2 CPU processes (gloo) on a tiny model."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import run_group

pytest.importorskip("torch")
pytest.importorskip("peft")

from train_helpers import (  # noqa: E402
    DATA, adapter_arrays, assert_peft_adapter_loads, assert_two_ranks_match_one, run_single, subprocess_env,
)

pytestmark = pytest.mark.slow  # a training subprocess and two 2-rank launches


def _train_args(model: Path, out: Path, name: str, batch: int) -> list[str]:
    return ["train", "--backend", "torch", "--model", str(model), "--data", str(DATA),
            "--iters", "8", "--batch-size", str(batch), "--grad-accum", "2", "--lr", "5e-3", "--max-seq-len", "128",
            "--save-every", "4", "--output-dir", str(out), "--name", name, "--quiet", "--dtype", "float32",
            "--set", "train.distributed=fsdp"]


def _max_diff(a: dict, b: dict) -> float:
    return max(float(abs(a[k] - b[k]).max()) for k in a)


def test_fsdp_two_ranks_match_one_process_and_resume(tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("qwen2")
    env = subprocess_env(OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "qlocal"]
    run_single(["-m", "qlocal", *_train_args(model, tmp_path, "one", 4)], env, tmp_path)
    fsdp = run_group([*torchrun, *_train_args(model, tmp_path, "two", 2)], env, tmp_path)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]

    assert_two_ranks_match_one(tmp_path / "one", tmp_path / "two", 8)
    assert "distributed: fsdp" in (tmp_path / "two" / "config.yaml").read_text()
    # The adapter rank 0 wrote is the gathered full one: same keys and shapes, close to one process.
    a, b = adapter_arrays(tmp_path / "one"), adapter_arrays(tmp_path / "two")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert _max_diff(a, b) < 1e-3
    assert_peft_adapter_loads(model, tmp_path / "two")

    # Resume from the step-4 checkpoint (sharded back from the full files): the same final adapter.
    run = tmp_path / "two"
    finished = adapter_arrays(run)
    shutil.rmtree(run / "checkpoints" / "step-00000008")
    shutil.rmtree(run / "adapter")
    res = run_group([*torchrun, "train", "--resume", str(run), "--quiet"], env, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _max_diff(finished, adapter_arrays(run)) < 1e-6
