"""DPO as SFT is: killed with SIGKILL and resumed it gives the uninterrupted run's adapter, and a
2-rank torchrun (gloo, CPU) run matches one process step for step (slow: training subprocesses)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import run_group

pytest.importorskip("torch")
pytest.importorskip("peft")

from train_helpers import (  # noqa: E402
    HANG_GUARD_S, assert_preference_ranks_match_one, assert_same_adapter, kill_at, metrics_rows, resume_to_end, run_single,
    subprocess_env,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PAIRS = REPO / "data/prefs_sample.jsonl"
ITERS = 12


def _args(model: Path, out: Path, name: str, batch: int, *extra: str) -> list[str]:
    return ["-m", "qlocal", "train", "--backend", "torch", "--method", "dpo", "--model", str(model),
            "--data", str(PAIRS), "--iters", str(ITERS), "--batch-size", str(batch), "--lr", "3e-3",
            "--max-seq-len", "128", "--val-split", "0.1", "--eval-every", "6", "--save-every", "2",
            "--keep-last", "2", "--output-dir", str(out), "--name", name, "--quiet", "--dtype", "float32", *extra]


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_kill_and_resume_matches_uninterrupted(precompute: bool, tiny_model_dir, tmp_path: Path) -> None:
    import subprocess

    model = tiny_model_dir("qwen2")
    extra = ("--dropout", "0.1", "--set", f"train.precompute_ref={str(precompute).lower()}")
    env = subprocess_env()
    run_single(_args(model, tmp_path, "full", 2, *extra), env, REPO)
    proc = subprocess.Popen([sys.executable, *_args(model, tmp_path, "killed", 2, *extra)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "killed"
    kill_at(proc, run, ("checkpoint", 4))
    assert not (run / "adapter").exists()
    resume_to_end(run, ITERS)
    assert_same_adapter(tmp_path / "full", run)
    full, resumed = metrics_rows(tmp_path / "full"), metrics_rows(run)
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)


def test_dpo_torchrun_two_ranks_match_one_process(tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("qwen2")
    env = subprocess_env(OMP_NUM_THREADS="1")
    run_single(_args(model, tmp_path, "one", 4, "--grad-accum", "2"), env, tmp_path)
    ddp = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     *_args(model, tmp_path, "two", 2, "--grad-accum", "2")], env=env, cwd=tmp_path,
                    timeout=HANG_GUARD_S)
    assert ddp.returncode == 0, [ln for ln in ddp.stderr.splitlines() if "rror" in ln or "qlocal" in ln][:20]
    # No dropout: every step's loss and rewards (means over all pairs of both ranks) are one process's.
    assert_preference_ranks_match_one(tmp_path / "one", tmp_path / "two", ITERS, val_step=ITERS // 2)
