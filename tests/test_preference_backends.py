"""Preference objectives on both backends: one definition of each loss, so the same batch gives the
same first step on torch and MLX; the reference is the base with the adapter switched off.

Both backends start from one adapter with random B (written by torch in PEFT format, loaded by
MLX), so the policy differs from its base and DPO/KTO's reference terms are not trivially zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qlocal import config as config_mod
from qlocal import reference
from qlocal.preference_losses import DPO, KTO, ORPO, SimPO, summarize

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

OBJECTIVES = {"dpo": DPO(beta=0.3), "ipo": DPO(beta=0.3, loss_type="ipo"), "orpo": ORPO(lam=0.2),
              "simpo": SimPO(beta=2.0, gamma=0.5), "kto": KTO(beta=0.3, undesirable_weight=1.3)}


def _cfg(backend: str, model: Path, **sets: Any) -> config_mod.Config:
    base = {"model.name": model, "data.path": "unused", "train.backend": backend, "lora.dropout": 0.0,
            "train.max_grad_norm": 0, **({"train.dtype": "float32"} if backend == "torch" else {}), **sets}
    return config_mod.build(sets=[f"{k}={v}" for k, v in base.items()])


def _rows(rng: np.random.Generator, prompts: list[list[int]], answers: list[list[int]]) -> dict[str, np.ndarray]:
    """Right-padded rows prompt + answer with the answer scored (qlocal.data.preference's layout)."""
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = np.zeros((len(prompts), width), np.int64)
    mask, att = np.zeros_like(ids), np.zeros_like(ids)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, :len(p) + len(a)] = p + a
        mask[i, len(p):len(p) + len(a)] = 1
        att[i, :len(p) + len(a)] = 1
    return {"input_ids": ids, "loss_mask": mask, "attention_mask": att}


def _ids(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(3, 250, size=n).tolist()


def pair_batch(seed: int = 0, n: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    prompts = [_ids(rng, 4 + i) for i in range(n)]
    chosen, rejected = [_ids(rng, 3 + i) for i in range(n)], [_ids(rng, 6 - i) for i in range(n)]
    batch = _rows(rng, prompts + prompts, chosen + rejected)
    batch["chosen"] = np.array([1] * n + [0] * n)
    return batch


def kto_batch(seed: int = 0, n: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    prompts, answers = [_ids(rng, 4 + i) for i in range(n)], [_ids(rng, 3 + i) for i in range(n)]
    kl_answers = [answers[i - 1] for i in range(n)]
    batch = _rows(rng, prompts + prompts, answers + kl_answers)
    labels = [1, 0, 1, 1][:n]
    batch["label"], batch["kl"] = np.array(labels + labels), np.array([0] * n + [1] * n)
    return batch


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, a PEFT adapter with random B trained on nothing), shared by both backends."""
    import torch

    from qlocal.backends.torch_backend import TorchBackend

    model = tiny_model_dir("qwen2")
    b = TorchBackend()
    b.setup(model, _cfg("torch", model))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in b.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    out = tmp_path_factory.mktemp("pref_adapter") / "adapter"
    b.save_adapter(out)
    return model, out


def _backend(name: str, model: Path, adapter_dir: Path) -> Any:
    if name == "torch":
        from qlocal.backends.torch_backend import TorchBackend

        b: Any = TorchBackend()
    else:
        from qlocal.backends.mlx_backend import MLXBackend

        b = MLXBackend()
    b.setup(model, _cfg(name, model))
    b.load_adapter(adapter_dir)
    return b


def _first_step(b: Any, objective: Any, batch: dict[str, np.ndarray]) -> tuple[float, dict[str, float]]:
    stats = b.train_step(reference.complete(b, [batch], objective), 1e-3, objective)
    return stats.loss, summarize(objective, stats.metrics)


@pytest.mark.parametrize("method", list(OBJECTIVES))
def test_first_step_loss_and_rewards_agree_across_backends(method: str, adapter) -> None:
    objective = OBJECTIVES[method]
    batch = kto_batch() if method == "kto" else pair_batch()
    results = {name: _first_step(_backend(name, *adapter), objective, batch) for name in ("torch", "mlx")}
    (t_loss, t_m), (m_loss, m_m) = results["torch"], results["mlx"]
    assert abs(t_loss - m_loss) < 1e-4, (t_loss, m_loss)
    assert t_m.keys() == m_m.keys() and "rewards/chosen" in t_m
    for k in t_m:
        assert abs(t_m[k] - m_m[k]) < 1e-4, (k, t_m[k], m_m[k])
    if method in ("dpo", "ipo", "kto"):
        assert abs(t_m["rewards/chosen"]) > 1e-3  # the adapter moved the policy off its base


@pytest.mark.parametrize("name", ["torch", "mlx"])
def test_reference_is_the_base_with_the_adapter_off(name: str, adapter, tiny_model_dir) -> None:
    """ref_logp equals a fresh backend's scores with no adapter loaded (B = 0 is the base), and
    switching the adapter off for the reference leaves the policy's scores as they were."""
    model, adapter_dir = adapter
    b = _backend(name, model, adapter_dir)
    batch = pair_batch(seed=5)
    before = b.sequence_logprobs(batch)
    (done,) = reference.complete(b, [batch], DPO())
    plain = _backend(name, model, adapter_dir)
    plain.set_adapter_enabled(False)
    np.testing.assert_allclose(done["ref_logp"], plain.sequence_logprobs(batch), atol=1e-5)
    fresh: Any = type(b)()
    fresh.setup(model, _cfg(name, model))  # B = 0: exactly the base
    np.testing.assert_allclose(done["ref_logp"], fresh.sequence_logprobs(batch), atol=1e-4)
    np.testing.assert_allclose(b.sequence_logprobs(batch), before, atol=1e-6)
    assert np.abs(before - done["ref_logp"]).max() > 1e-3


@pytest.mark.parametrize("name", ["torch", "mlx"])
def test_accumulation_equals_one_big_batch(name: str, adapter) -> None:
    """Two micro-batches of pairs give the step one batch of all of them gives (mean over pairs),
    and KTO's KL estimate is the step's, not each micro-batch's."""
    for objective, make in ((DPO(beta=0.3), pair_batch), (KTO(beta=0.3), kto_batch)):
        halves = [make(seed=1, n=2), make(seed=2, n=2)]
        whole = _merge(halves, paired=isinstance(objective, DPO))
        big, small = _backend(name, *adapter), _backend(name, *adapter)
        s_big = big.train_step(reference.complete(big, [whole], objective), 1e-3, objective)
        s_small = small.train_step(reference.complete(small, halves, objective), 1e-3, objective)
        assert abs(s_big.loss - s_small.loss) < 1e-5, (objective.name, s_big.loss, s_small.loss)
        assert abs(s_big.grad_norm - s_small.grad_norm) < 1e-4 * max(1.0, s_big.grad_norm)
        for k in s_big.metrics:
            assert abs(s_big.metrics[k] - s_small.metrics[k]) < 1e-5, (objective.name, k)


def _merge(batches: list[dict[str, np.ndarray]], paired: bool) -> dict[str, np.ndarray]:
    """One batch holding every pair (or example) of `batches`, in the same layout."""
    width = max(b["input_ids"].shape[1] for b in batches)
    pad = {k: [np.pad(b[k], ((0, 0), (0, width - b[k].shape[1]))) if b[k].ndim == 2 else b[k] for b in batches]
           for k in batches[0]}
    first = [b["chosen" if paired else "kl"] == (1 if paired else 0) for b in batches]
    out = {}
    for k, parts in pad.items():
        head = [p[m] for p, m in zip(parts, first)]
        tail = [p[~m] for p, m in zip(parts, first)]
        out[k] = np.concatenate(head + tail)
    return out


@pytest.mark.parametrize("name", ["torch", "mlx"])
def test_qlora_reference_is_the_quantised_base(name: str, tiny_model_dir) -> None:
    """QLoRA (torch: bitsandbytes NF4; MLX: affine 4-bit): the reference is the same quantised base
    with the adapter off, no second copy: it equals a fresh quantised backend (B = 0), and a DPO
    step on it trains only the adapter."""
    if name == "torch":
        pytest.importorskip("bitsandbytes")
    model = tiny_model_dir("qwen2")

    def quantised() -> Any:
        if name == "torch":
            from qlocal.backends.torch_backend import TorchBackend

            b: Any = TorchBackend()
        else:
            from qlocal.backends.mlx_backend import MLXBackend

            b = MLXBackend()
        b.setup(model, _cfg(name, model, **{"train.quantize": "4bit"}))
        return b

    b, fresh = quantised(), quantised()
    batch = pair_batch(seed=7)
    objective = DPO(beta=0.3)
    for _ in range(3):  # move the adapter off its zero start
        b.train_step(reference.complete(b, [batch], objective), 5e-3, objective)
    (done,) = reference.complete(b, [batch], objective)
    np.testing.assert_allclose(done["ref_logp"], fresh.sequence_logprobs(batch), atol=1e-4)
    assert np.abs(b.sequence_logprobs(batch) - done["ref_logp"]).max() > 1e-3  # the policy did move
    stats = b.train_step(reference.complete(b, [batch], objective), 5e-3, objective)
    assert stats.metrics["rewards/margins"] > 0 and stats.loss < np.log(2)
