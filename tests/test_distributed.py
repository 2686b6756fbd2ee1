"""Data-parallel training under torchrun: 2 CPU processes (gloo) on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_group

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parent.parent


def _train_args(model: Path, out: Path, name: str, batch: int) -> list[str]:
    return ["train", "--backend", "torch", "--model", str(model), "--data", str(REPO / "data/alpaca_sample.jsonl"),
            "--iters", "8", "--batch-size", str(batch), "--grad-accum", "2", "--lr", "5e-3", "--max-seq-len", "128",
            "--val-split", "0.1", "--eval-every", "4", "--save-every", "4", "--output-dir", str(out),
            "--name", name, "--quiet"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_ranks_match_one_process(tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("llama")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    single = subprocess.run([sys.executable, "-m", "qlocal", *_train_args(model, tmp_path, "one", 4)],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    ddp = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      "-m", "qlocal", *_train_args(model, tmp_path, "two", 2)], env=env, cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    # Same global batch (2 ranks x 2 = 4 examples per micro-batch): the same first-step loss.
    assert abs(one[0]["loss"] - two[0]["loss"]) < 1e-5, (one[0], two[0])
    assert one[0]["trained_tokens"] == two[0]["trained_tokens"]
    assert two[-1]["loss"] < two[0]["loss"]
    assert [r["step"] for r in two] == list(range(1, 9)), "one rank writes metrics, once per step"
    assert "val_loss" in two[3] and abs(one[3]["val_loss"] - two[3]["val_loss"]) < 1e-3
    cfg = (tmp_path / "two" / "config.yaml").read_text()
    assert "world_size: 2" in cfg

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, str(tmp_path / "two" / "adapter")).eval()
    with torch.no_grad():
        assert torch.isfinite(tuned(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()
