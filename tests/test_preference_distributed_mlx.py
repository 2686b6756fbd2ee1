"""DPO under mlx.launch (2 local ranks, ring backend) matches one process step for step, as SFT does
(tests/test_distributed_mlx.py); slow: training subprocesses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import run_group

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from test_distributed_mlx import _launcher  # noqa: E402
from train_helpers import assert_preference_ranks_match_one, run_single, subprocess_env  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PAIRS = REPO / "data/prefs_sample.jsonl"
ITERS = 6


def _args(model: Path, out: Path, name: str, batch: int) -> list[str]:
    return ["-m", "qlocal", "train", "--backend", "mlx", "--method", "dpo", "--model", str(model),
            "--data", str(PAIRS), "--iters", str(ITERS), "--batch-size", str(batch), "--grad-accum", "2",
            "--lr", "3e-3", "--max-seq-len", "128", "--val-split", "0.1", "--eval-every", "3",
            "--output-dir", str(out), "--name", name, "--quiet", "--set", "lora.dropout=0"]


def test_dpo_mlx_launch_two_ranks_match_one_process(tiny_model_dir, tmp_path: Path) -> None:
    launch = _launcher()
    model = tiny_model_dir("qwen2")
    env = subprocess_env(OMP_NUM_THREADS="1")
    run_single(_args(model, tmp_path, "one", 4), env, tmp_path)
    res = run_group([*launch, sys.executable, *_args(model, tmp_path, "two", 2)], env, tmp_path)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    # Every step's loss and rewards are means over all pairs of both ranks: one process's numbers.
    assert_preference_ranks_match_one(tmp_path / "one", tmp_path / "two", ITERS, val_step=3)
