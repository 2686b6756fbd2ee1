"""FSDP2 (train.distributed=fsdp) under torchrun: 2 CPU processes (gloo) on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
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
            "--save-every", "4", "--output-dir", str(out), "--name", name, "--quiet",
            "--set", "train.distributed=fsdp"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_fsdp_two_ranks_match_one_process_and_resume(tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("qwen2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "qlocal"]
    single = subprocess.run([sys.executable, "-m", "qlocal", *_train_args(model, tmp_path, "one", 4)],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    fsdp = run_group([*torchrun, *_train_args(model, tmp_path, "two", 2)], env, tmp_path)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]

    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert abs(one[0]["loss"] - two[0]["loss"]) < 1e-5, (one[0], two[0])
    assert two[-1]["loss"] < two[0]["loss"]
    assert [r["step"] for r in two] == list(range(1, 9))
    assert "distributed: fsdp" in (tmp_path / "two" / "config.yaml").read_text()
    # The adapter rank 0 wrote is the gathered full one: same keys and shapes, close to one process.
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, str(tmp_path / "two" / "adapter")).eval()
    with torch.no_grad():
        assert torch.isfinite(tuned(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()

    # Resume from the step-4 checkpoint (sharded back from the full files): the same final adapter.
    run = tmp_path / "two"
    finished = _adapter(run)
    shutil.rmtree(run / "checkpoints" / "step-00000008")
    shutil.rmtree(run / "adapter")
    res = run_group([*torchrun, "train", "--resume", str(run), "--quiet"], env, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    again = _adapter(run)
    assert max(float((finished[k] - again[k]).abs().max()) for k in finished) < 1e-6
