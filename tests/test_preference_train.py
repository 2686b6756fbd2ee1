"""Preference methods through the training loop (qlocal.train): the same run folder, metrics and
checkpoints as SFT, the reference from the adapter switched off, train.precompute_ref."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qlocal import config as config_mod

REPO = Path(__file__).resolve().parent.parent
PAIRS = REPO / "data/prefs_sample.jsonl"


def _cfg(backend: str, model: Path, out: Path, name: str, **sets: Any) -> config_mod.Config:
    base = {"model.name": model, "data.path": PAIRS, "run.output_dir": out, "run.name": name,
            "train.backend": backend, "train.iters": 3, "train.batch_size": 4, "data.max_seq_len": 160,
            "lora.dropout": 0.0, "train.method": "dpo", **({"train.dtype": "float32"} if backend == "torch" else {}),
            **sets}
    return config_mod.build(sets=[f"{k}={v}" for k, v in base.items()])


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _skip_unless(backend: str) -> None:
    pytest.importorskip("torch" if backend == "torch" else "mlx_lm")
    if backend == "torch":
        pytest.importorskip("peft")


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_dpo_run_records_rewards_and_plots_them(backend: str, tiny_model_dir, tmp_path: Path) -> None:
    import matplotlib.image

    from qlocal.train import train

    _skip_unless(backend)
    cfg = _cfg(backend, tiny_model_dir("qwen2"), tmp_path, "dpo", **{"data.val_split": 0.1, "train.eval_every": 3,
                                                                    "train.grad_accum": 2})
    run = train(cfg, quiet=True)
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and "val_loss" in rows[-1]
    # B starts at 0: the first step's policy is its reference, so every pair scores log 2, no margin.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for r in rows:
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= r.keys()
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
        assert 0.0 <= r["rewards/accuracies"] <= 1.0
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margins"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert config_mod.load_yaml(run / "config.yaml")["train"]["method"] == "dpo"
    # Two panels (loss; reward accuracy and margin): about square, where SFT's one panel is 7 x 4.
    h, w = matplotlib.image.imread(run / "loss.png").shape[:2]
    assert h > 0.8 * w


@pytest.mark.slow
@pytest.mark.parametrize("method,backend", [("dpo", "torch"), ("kto", "torch"), ("kto", "mlx")])
def test_precomputed_reference_trains_as_the_per_step_one(method: str, backend: str, tiny_model_dir,
                                                          tmp_path: Path) -> None:
    from qlocal.train import train

    _skip_unless(backend)
    model = tiny_model_dir("qwen2")
    runs = [train(_cfg(backend, model, tmp_path, f"{method}-{pre}", **{"train.method": method,
                                                                        "train.precompute_ref": pre}), quiet=True)
            for pre in (False, True)]
    live, pre = (_rows(r) for r in runs)
    for a, b in zip(live, pre):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a[key], b[key])
    if method == "kto":
        assert live[-1]["kl"] == pytest.approx(pre[-1]["kl"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["orpo", "simpo", "kto"])
def test_every_method_trains_on_the_sample_pairs(method: str, tiny_model_dir, tmp_path: Path) -> None:
    from qlocal.train import train

    _skip_unless("torch")
    run = train(_cfg("torch", tiny_model_dir("qwen2"), tmp_path, method, **{"train.method": method,
                                                                           "train.lr": 2e-3}), quiet=True)
    rows = _rows(run)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["rewards/chosen"] > rows[-1]["rewards/rejected"] or method == "orpo"
    if method == "orpo":
        assert {"nll_loss", "log_odds_ratio"} <= rows[0].keys()
        for r in rows:  # loss = NLL - lambda * log sigmoid(log odds ratio)
            assert r["loss"] == pytest.approx(r["nll_loss"] - 0.1 * r["log_odds_ratio"], abs=1e-4)
    if method == "kto":
        assert all(r["kl"] >= 0 for r in rows)
