"""The objective is a parameter: one defined only in this file trains on both backends, and through
the training loop, with no change to either (qlocal.objectives)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qlocal import config as config_mod
from qlocal.objectives import SFT

REPO = Path(__file__).resolve().parent.parent
SCALE = 3.0


@dataclass(frozen=True)
class ScaledSFT:
    """SFT times a constant, with two metrics: the mean target log-prob and probability."""

    scale: float
    name: str = "scaled-sft"

    def count(self, batch: dict[str, np.ndarray]) -> int:
        return SFT().count(batch)

    def loss(self, logp: Any, mask: Any, rows: Any, xp: Any) -> tuple[Any, dict[str, Any]]:
        target = (logp * mask).sum()
        return -self.scale * target, {"target_logp": target, "target_prob": (xp.exp(logp) * mask).sum()}


def _cfg(backend: str, model: Path, out: Path, **sets: object) -> config_mod.Config:
    base = {"model.name": model, "data.path": REPO / "data/alpaca_sample.jsonl", "run.output_dir": out,
            "run.name": backend, "train.backend": backend, "train.iters": 2, "train.batch_size": 4,
            "data.max_seq_len": 128, "lora.dropout": 0.0,
            **({"train.dtype": "float32"} if backend == "torch" else {}), **sets}
    return config_mod.build(sets=[f"{k}={v}" for k, v in base.items()])


def _backend(name: str, model: Path, out: Path) -> Any:
    if name == "torch":
        pytest.importorskip("torch")
        pytest.importorskip("peft")
        from qlocal.backends.torch_backend import TorchBackend

        b: Any = TorchBackend()
    else:
        pytest.importorskip("mlx.core")
        pytest.importorskip("mlx_lm")
        from qlocal.backends.mlx_backend import MLXBackend

        b = MLXBackend()
    b.setup(model, _cfg(name, model, out))
    return b


@pytest.mark.parametrize("name", ["torch", "mlx"])
def test_custom_objective_scales_loss_gradient_and_eval(name: str, tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("qwen2")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 200, size=(3, 14))
    mask = (rng.random((3, 14)) > 0.3).astype(np.int64)
    batch = {"input_ids": ids, "loss_mask": mask, "attention_mask": np.ones_like(ids)}
    scaled = ScaledSFT(SCALE)

    plain_b, scaled_b = _backend(name, model, tmp_path), _backend(name, model, tmp_path)
    (s, n), (s3, n3) = plain_b.eval_loss([batch]), scaled_b.eval_loss([batch], scaled)
    assert n3 == n == int(mask[:, 1:].sum()) and s3 == pytest.approx(SCALE * s, rel=1e-5)

    plain, step = plain_b.train_step([batch], 1e-3), scaled_b.train_step([batch], 1e-3, scaled)
    assert plain.metrics == {}
    assert step.loss == pytest.approx(SCALE * plain.loss, rel=1e-5)
    assert step.loss == pytest.approx(SCALE * s / n, rel=1e-5)  # no dropout: the step's loss is the eval loss
    # The objective's loss is what gets differentiated: its gradient is SCALE times SFT's.
    assert step.grad_norm == pytest.approx(SCALE * plain.grad_norm, rel=1e-4)
    # Metrics are means over the step's count, like the loss.
    assert step.metrics["target_logp"] == pytest.approx(-plain.loss, rel=1e-5)
    assert 0.0 < step.metrics["target_prob"] < 1.0


@pytest.mark.parametrize("name", ["torch", "mlx"])
def test_training_loop_records_the_objectives_metrics(name: str, tiny_model_dir, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch" if name == "torch" else "mlx_lm")
    from qlocal import train as train_mod

    # train() has no objective setting yet (SFT is the only one qlocal ships); swap the one it builds.
    monkeypatch.setattr(train_mod, "SFT", lambda: ScaledSFT(SCALE))
    run = train_mod.train(_cfg(name, tiny_model_dir("qwen2"), tmp_path, **{"data.val_split": 0.2}), quiet=True)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "val_loss" in rows[-1]
    for r in rows:
        assert r["loss"] == pytest.approx(-SCALE * r["target_logp"], rel=1e-4)
        assert 0.0 < r["target_prob"] < 1.0
