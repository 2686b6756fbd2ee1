"""qlocal's preference losses against TRL's, as an independent reference (issue 16).

One tiny random Qwen2 with a PEFT LoRA adapter whose B matrices are random (so the policy differs
from its base), one fixed batch. qlocal's side is the torch backend's real step: target log-probs
from its chunked head, the reference from the same model with the adapter switched off
(qlocal.reference), the loss from qlocal.preference_losses; lr 0 and no clipping, so the step leaves
the weights alone and the LoRA gradients stay in `.grad`.

TRL's side, on the same PeftModel object:
- DPO (sigmoid, IPO) and KTO: TRL's own trainers (DPOTrainer, KTOTrainer) built offline on a
  two-record dataset; their data collators batch the same token ids and their `compute_loss`
  (full HF forward, TRL's fused head, adapter disabled for the reference) gives the loss, their
  logged rewards and, by backward, the gradients. TRL keeps a copy of an adapter the model already
  has as its reference ("ref"); it is deleted so TRL's reference is the base, as qlocal's is.
- ORPO and SimPO (TRL's experimental ORPOTrainer and CPOTrainer are built around their own
  tokenisation): their loss methods, `ORPOTrainer.odds_ratio_loss` / `get_batch_logps` and
  `CPOTrainer.cpo_loss` (loss_type="simpo", cpo_alpha=0), called on log-probs of the plain HF
  forward's logits. TRL's ORPO NLL is one token mean over the batch's chosen rows with the prompt
  included; qlocal's is each chosen answer's mean token NLL (the ORPO paper's L_SFT, prompt
  masked), so the batch's chosen answers have equal length and TRL's NLL is taken over the answer
  tokens: then the two definitions are the same number.
- DPO with label smoothing: TRL 1.16's "sigmoid" has none (its label_smoothing belongs to robust
  DPO and EXO); qlocal's is conservative DPO, which is CPOTrainer.cpo_loss's sigmoid fed the
  log-ratios.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("trl")
pytest.importorskip("datasets")

import torch  # noqa: E402

from qlocal import config as config_mod  # noqa: E402
from qlocal import reference  # noqa: E402
from qlocal.preference_losses import DPO, KTO, ORPO, SimPO, summarize  # noqa: E402

N_PAIRS = 3
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4


def _ids(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(3, 250, size=n).tolist()


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory) -> SimpleNamespace:
    from qlocal.backends.torch_backend import TorchBackend

    model_dir = tiny_model_dir("qwen2")
    cfg = config_mod.build(sets=[f"model.name={model_dir}", "data.path=unused", "train.backend=torch",
                                 "lora.dropout=0.0", "train.max_grad_norm=0", "train.weight_decay=0",
                                 "train.dtype=float32"])  # TRL's side is fp32
    backend = TorchBackend()
    backend.setup(model_dir, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in backend.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    rng = np.random.default_rng(0)
    # Equal-length chosen answers (see the module docstring, ORPO); rejected lengths differ.
    pairs = [{"prompt_ids": _ids(rng, 4 + i), "chosen_ids": _ids(rng, 5), "rejected_ids": _ids(rng, 3 + 2 * i)}
             for i in range(N_PAIRS)]
    kto = [{"prompt_ids": _ids(rng, 4 + i), "completion_ids": _ids(rng, 3 + i), "label": i % 2 == 0}
           for i in range(4)]
    return SimpleNamespace(backend=backend, model=backend.model, dir=model_dir, pairs=pairs, kto=kto,
                           out=tmp_path_factory.mktemp("trl"))


def _lora_grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def _ours(s: SimpleNamespace, batch: dict[str, np.ndarray], objective: Any) -> tuple[float, dict[str, float], dict]:
    micro = reference.complete(s.backend, [batch], objective)
    stats = s.backend.train_step(micro, 0.0, objective)
    return stats.loss, summarize(objective, stats.metrics), _lora_grads(s.model)


def _assert_grads(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys() and ours
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert worst < GRAD_TOL, worst
    assert max(float(g.abs().max()) for g in ours.values()) > 100 * GRAD_TOL  # the gradients are not ~0


def _trainer(kind: str, s: SimpleNamespace, **args: Any) -> Any:
    from datasets import Dataset
    from transformers import AutoTokenizer

    import trl

    tok = AutoTokenizer.from_pretrained(s.dir)
    common = {"output_dir": str(s.out / kind), "report_to": [], "use_cpu": True, "max_length": None}
    if kind == "dpo":
        ds = Dataset.from_list([{"prompt": "hi", "chosen": " a", "rejected": " b"}] * 2)
        tr = trl.DPOTrainer(model=s.model, args=trl.DPOConfig(**common, per_device_train_batch_size=N_PAIRS, **args),
                            train_dataset=ds, processing_class=tok)
    else:
        ds = Dataset.from_list([{"prompt": "hi", "completion": " a", "label": True},
                                {"prompt": "yo", "completion": " b", "label": False}])
        tr = trl.KTOTrainer(model=s.model, args=trl.KTOConfig(**common, per_device_train_batch_size=4, **args),
                            train_dataset=ds, processing_class=tok)
    if "ref" in tr.model.peft_config:  # TRL's copy of the existing adapter: the reference is the base here
        tr.model.delete_adapter("ref")
    tr.model.train()
    return tr


def _trl_step(tr: Any, inputs: dict[str, torch.Tensor]) -> tuple[float, dict[str, float], dict]:
    tr.model.zero_grad(set_to_none=True)
    loss = tr.compute_loss(tr.model, inputs)
    loss.backward()
    logged = {k: v[-1] for k, v in tr._metrics["train"].items() if v}
    return float(loss), logged, _lora_grads(tr.model)


def _pair_batch(collated: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    n = collated["input_ids"].shape[0] // 2
    return {"input_ids": collated["input_ids"].numpy(), "attention_mask": collated["attention_mask"].numpy(),
            "loss_mask": collated["completion_mask"].numpy(), "chosen": np.array([1] * n + [0] * n)}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_matches_trl_dpotrainer(setup: SimpleNamespace, loss_type: str) -> None:
    beta = 0.3
    tr = _trainer("dpo", setup, beta=beta, loss_type=[loss_type])
    inputs = tr.data_collator(setup.pairs)
    t_loss, t_metrics, t_grads = _trl_step(tr, inputs)
    loss, metrics, grads = _ours(setup, _pair_batch(inputs), DPO(beta=beta, loss_type=loss_type))
    assert abs(loss - t_loss) < LOSS_TOL, (loss, t_loss)
    assert abs(loss - np.log(2)) > 1e-3  # the adapter moved the policy away from its base
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert abs(metrics[key] - t_metrics[key]) < LOSS_TOL, (key, metrics[key], t_metrics[key])
    _assert_grads(grads, t_grads)


def _hf_avg_logps(model: Any, collated: dict[str, torch.Tensor]) -> torch.Tensor:
    """TRL's ORPO/CPO sequence scores: get_batch_logps(average_log_prob=True) on the plain forward's logits."""
    from trl.experimental.orpo import ORPOTrainer

    logits = model(input_ids=collated["input_ids"], attention_mask=collated["attention_mask"]).logits
    labels = collated["input_ids"].masked_fill(collated["completion_mask"] == 0, -100)
    return logits, labels, ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)


def _trl_self(**kw: Any) -> SimpleNamespace:
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **kw)


def test_orpo_matches_trl_odds_ratio_loss(setup: SimpleNamespace) -> None:
    from trl.experimental.orpo import ORPOTrainer

    from trl.trainer.dpo_trainer import DataCollatorForPreference

    lam = 0.25
    collated = DataCollatorForPreference(pad_token_id=0)(setup.pairs)
    model = setup.model
    model.zero_grad(set_to_none=True)
    logits, labels, avg = _hf_avg_logps(model, collated)
    n = N_PAIRS
    ratio_losses, chosen_r, rejected_r, _, _ = ORPOTrainer.odds_ratio_loss(_trl_self(beta=lam), avg[:n], avg[n:])
    nll = torch.nn.functional.cross_entropy(logits[:n, :-1].reshape(-1, logits.shape[-1]), labels[:n, 1:].reshape(-1))
    t_loss = nll - ratio_losses.mean()
    t_loss.backward()
    t_grads = _lora_grads(model)
    loss, metrics, grads = _ours(setup, _pair_batch(collated), ORPO(lam=lam))
    assert abs(loss - float(t_loss)) < LOSS_TOL, (loss, float(t_loss))
    assert abs(metrics["nll_loss"] - float(nll)) < LOSS_TOL
    assert abs(metrics["log_odds_ratio"] - float((ratio_losses / lam).mean())) < LOSS_TOL
    assert abs(metrics["rewards/chosen"] - float(chosen_r.mean())) < LOSS_TOL
    assert abs(metrics["rewards/rejected"] - float(rejected_r.mean())) < LOSS_TOL
    _assert_grads(grads, t_grads)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_matches_trl_cpo_loss(setup: SimpleNamespace, label_smoothing: float) -> None:
    from trl.experimental.cpo import CPOTrainer

    from trl.trainer.dpo_trainer import DataCollatorForPreference

    beta, gamma = 2.0, 0.7
    collated = DataCollatorForPreference(pad_token_id=0)(setup.pairs)
    setup.model.zero_grad(set_to_none=True)
    _, _, avg = _hf_avg_logps(setup.model, collated)
    trl_self = _trl_self(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=label_smoothing)
    losses, chosen_r, rejected_r = CPOTrainer.cpo_loss(trl_self, avg[:N_PAIRS], avg[N_PAIRS:])
    t_loss = losses.mean()  # cpo_alpha = 0: SimPO without CPO's behaviour-cloning term
    t_loss.backward()
    t_grads = _lora_grads(setup.model)
    loss, metrics, grads = _ours(setup, _pair_batch(collated), SimPO(beta=beta, gamma=gamma,
                                                                     label_smoothing=label_smoothing))
    assert abs(loss - float(t_loss)) < LOSS_TOL, (loss, float(t_loss))
    assert abs(metrics["rewards/chosen"] - float(chosen_r.mean())) < LOSS_TOL
    assert abs(metrics["rewards/rejected"] - float(rejected_r.mean())) < LOSS_TOL
    _assert_grads(grads, t_grads)


def test_dpo_label_smoothing_is_conservative_dpo(setup: SimpleNamespace) -> None:
    """cDPO: TRL's label-smoothed sigmoid (CPOTrainer.cpo_loss) on the policy-minus-base log-ratios."""
    from trl.experimental.cpo import CPOTrainer

    from trl.trainer.dpo_trainer import DataCollatorForPreference

    beta, ls = 0.3, 0.15
    collated = DataCollatorForPreference(pad_token_id=0)(setup.pairs)
    model = setup.model
    labels = collated["input_ids"].masked_fill(collated["completion_mask"] == 0, -100)

    def sums() -> torch.Tensor:
        from trl.experimental.orpo import ORPOTrainer

        logits = model(input_ids=collated["input_ids"], attention_mask=collated["attention_mask"]).logits
        return ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=False)

    with torch.no_grad(), model.disable_adapter():
        ref = sums()
    model.zero_grad(set_to_none=True)
    ratios = sums() - ref
    trl_self = _trl_self(alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=ls)
    losses, _, _ = CPOTrainer.cpo_loss(trl_self, ratios[:N_PAIRS], ratios[N_PAIRS:])
    losses.mean().backward()
    t_grads = _lora_grads(model)
    loss, _, grads = _ours(setup, _pair_batch(collated), DPO(beta=beta, label_smoothing=ls))
    assert abs(loss - float(losses.mean())) < LOSS_TOL
    _assert_grads(grads, t_grads)


def test_kto_matches_trl_ktotrainer(setup: SimpleNamespace) -> None:
    beta, dw, uw = 0.3, 1.0, 1.5
    tr = _trainer("kto", setup, beta=beta, desirable_weight=dw, undesirable_weight=uw)
    examples = [dict(e) for e in setup.kto]
    for i, e in enumerate(examples):  # TRL's KL pairing: answers rotated by one within the batch
        e["KL_completion_ids"] = setup.kto[i - 1]["completion_ids"]
    inputs = tr.data_collator(examples)
    t_loss, t_metrics, t_grads = _trl_step(tr, inputs)

    n = len(examples)
    width = max(inputs["input_ids"].shape[1], inputs["KL_input_ids"].shape[1])

    def rows(prefix: str, key: str) -> np.ndarray:
        x = inputs[prefix + key].numpy()
        return np.pad(x, ((0, 0), (0, width - x.shape[1])))

    batch = {k: np.concatenate([rows("", src), rows("KL_", src)])
             for k, src in (("input_ids", "input_ids"), ("attention_mask", "attention_mask"),
                            ("loss_mask", "completion_mask"))}
    batch["label"] = np.concatenate([inputs["label"].numpy().astype(np.int64)] * 2)
    batch["kl"] = np.array([0] * n + [1] * n)
    loss, metrics, grads = _ours(setup, batch, KTO(beta, dw, uw))
    assert abs(loss - t_loss) < LOSS_TOL, (loss, t_loss)
    assert abs(metrics["kl"] - t_metrics["kl"]) < LOSS_TOL, (metrics["kl"], t_metrics["kl"])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(metrics[key] - t_metrics[key]) < LOSS_TOL, (key, metrics[key], t_metrics[key])
    _assert_grads(grads, t_grads)
