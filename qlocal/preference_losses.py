"""Preference objectives (DPO with its IPO loss type, ORPO, KTO, SimPO), written once against `xp`.

They meet the `Objective` contract of qlocal.objectives: a backend hands them the per-token target
log-probs of a batch, `logp` (B, T-1) with `mask` (B, T-1) over the scored response tokens, and the
batch's per-row fields in `rows`; they return a summed loss and summed metrics that the backend
divides by the optimizer step's `count` (pairs, or KTO examples), so gradient accumulation and
data parallelism equal one big batch.

Batch layout (qlocal.data.preference): a pair batch of n pairs has 2n rows, the n chosen rows first
and the n rejected rows after them, pair i in rows i and n + i (TRL's concatenated forward). A KTO
batch has one row per example with `label` (1 desirable, 0 undesirable). Every sequence score
comes from `sequence_scores` below: the sum of the response tokens' log-probs and their count.
`loss` is `scored_loss` on those two numbers per row, so `qlocal eval` (qlocal.pref_eval) scores
held-out pairs with the very function training differentiates.

Reference log-probs are per-row fields filled before the step (qlocal.reference): `ref_logp`, the
summed response log-prob under the base with the adapter switched off; for KTO also
`kl_estimate`, the step's KL estimate (TRL's: mean over mismatched prompt/answer rows of policy
minus reference log-prob, clamped at 0, no gradient). An objective says what it needs with its
`reference` and `kl` flags.

The definitions follow TRL 1.16 (DPOTrainer, KTOTrainer, experimental ORPOTrainer, CPOTrainer with
loss_type="simpo"), and tests/test_preference_trl.py compares them on one batch. Where qlocal
differs it says so: ORPO's NLL term is the mean over each chosen response's tokens (the paper's
L_SFT), where TRL takes one token mean over the batch with the prompt tokens included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from qlocal.config import Config
from qlocal.objectives import SFT, Objective

_LN2 = math.log(2.0)


def sequence_scores(logp: Any, mask: Any) -> tuple[Any, Any]:
    """(summed response log-prob, response token count) per row: the one sequence score."""
    return (logp * mask).sum(axis=-1), mask.sum(axis=-1)


def _mean(total: Any, length: Any, xp: Any) -> Any:
    """Mean response log-prob per token per row (ORPO's and SimPO's length-normalised score)."""
    return total / xp.maximum(length, xp.ones_like(length))


def _halves(x: Any) -> tuple[Any, Any]:
    n = x.shape[0] // 2
    return x[:n], x[n:]


def _logsigmoid(x: Any, xp: Any) -> Any:
    return -xp.logaddexp(xp.zeros_like(x), -x)


def _log1mexp(x: Any, xp: Any) -> Any:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (TRL's ORPO spells it the same)."""
    return xp.where(x < -_LN2, xp.log1p(-xp.exp(x)), xp.log(-xp.expm1(x)))


def _pair_metrics(chosen: Any, rejected: Any, xp: Any) -> dict[str, Any]:
    """Summed reward metrics of a pair batch (TRL's names); the backend turns sums into means."""
    return {"rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
            "rewards/accuracies": xp.where(chosen > rejected, 1.0, 0.0).sum(),
            "rewards/margins": (chosen - rejected).sum()}


def _count_pairs(batch: Mapping[str, np.ndarray]) -> int:
    return int(batch["chosen"].sum()) if "chosen" in batch else int(batch["input_ids"].shape[0]) // 2


def _sigmoid_loss(logits: Any, label_smoothing: float, xp: Any) -> Any:
    """-log sigmoid(logits), conservative (label-smoothed, cDPO) when label_smoothing > 0."""
    loss = -_logsigmoid(logits, xp)
    if label_smoothing:
        loss = loss * (1 - label_smoothing) - _logsigmoid(-logits, xp) * label_smoothing
    return loss


@dataclass(frozen=True)
class DPO:
    """Direct Preference Optimisation against the base model (adapter off) as the reference.

    loss_type "sigmoid": -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), log-ratios
    being policy minus reference summed log-probs, label-smoothed as cDPO when label_smoothing > 0.
    loss_type "ipo": (delta - 1 / (2 beta))^2 with each log-ratio divided by its response length
    first (TRL's IPO). Rewards are beta * log-ratio for both.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    name: str = "dpo"
    reference: ClassVar[bool] = True
    kl: ClassVar[bool] = False

    def count(self, batch: dict[str, np.ndarray]) -> int:
        return _count_pairs(batch)

    def loss(self, logp: Any, mask: Any, rows: Mapping[str, Any], xp: Any) -> tuple[Any, dict[str, Any]]:
        return self.scored_loss(*sequence_scores(logp, mask), rows, xp)

    def scored_loss(self, total: Any, length: Any, rows: Mapping[str, Any], xp: Any) -> tuple[Any, dict[str, Any]]:
        """The loss and metrics from each row's sequence score (summed log-prob, token count)."""
        ratio_c, ratio_r = _halves(total - rows["ref_logp"])
        if self.loss_type == "ipo":
            len_c, len_r = _halves(xp.maximum(length, xp.ones_like(length)))
            losses = (ratio_c / len_c - ratio_r / len_r - 1 / (2 * self.beta)) ** 2
        else:
            losses = _sigmoid_loss(self.beta * (ratio_c - ratio_r), self.label_smoothing, xp)
        logp_c, logp_r = _halves(total)
        metrics = _pair_metrics(self.beta * ratio_c, self.beta * ratio_r, xp)
        return losses.sum(), {**metrics, "logps/chosen": logp_c.sum(), "logps/rejected": logp_r.sum()}


@dataclass(frozen=True)
class ORPO:
    """Odds-ratio preference optimisation: chosen NLL plus lambda times the odds-ratio term, no reference.

    Per pair, with p the mean log-prob per response token: loss = -p_chosen - lam * log sigmoid(
    log odds(p_chosen) - log odds(p_rejected)), log odds(p) = p - log(1 - exp(p)). Rewards are
    lam * p (TRL's). Metrics add both parts: `nll_loss` and `log_odds_ratio` (the log sigmoid).
    """

    lam: float = 0.1
    name: str = "orpo"
    reference: ClassVar[bool] = False
    kl: ClassVar[bool] = False

    def count(self, batch: dict[str, np.ndarray]) -> int:
        return _count_pairs(batch)

    def loss(self, logp: Any, mask: Any, rows: Mapping[str, Any], xp: Any) -> tuple[Any, dict[str, Any]]:
        return self.scored_loss(*sequence_scores(logp, mask), rows, xp)

    def scored_loss(self, total: Any, length: Any, rows: Mapping[str, Any], xp: Any) -> tuple[Any, dict[str, Any]]:
        """The loss and metrics from each row's sequence score (summed log-prob, token count)."""
        mean_c, mean_r = _halves(_mean(total, length, xp))
        log_odds = (mean_c - mean_r) - (_log1mexp(mean_c, xp) - _log1mexp(mean_r, xp))
        ratio = _logsigmoid(log_odds, xp)
        nll = -mean_c
        losses = nll - self.lam * ratio
        metrics = _pair_metrics(self.lam * mean_c, self.lam * mean_r, xp)
        return losses.sum(), {**metrics, "logps/chosen": mean_c.sum(), "logps/rejected": mean_r.sum(),
                              "nll_loss": nll.sum(), "log_odds_ratio": ratio.sum(), "log_odds_chosen": log_odds.sum()}


@dataclass(frozen=True)
class SimPO:
    """Simple preference optimisation: length-normalised log-probs, a target margin gamma, no reference.

    Per pair: -log sigmoid(beta * (p_chosen - p_rejected) - gamma), p the mean log-prob per
    response token (label-smoothed like DPO when label_smoothing > 0); rewards beta * p. TRL's
    CPOTrainer with loss_type="simpo" and cpo_alpha=0 (no behaviour-cloning term).
    """

    beta: float = 0.1
    gamma: float = 0.5
    label_smoothing: float = 0.0
    name: str = "simpo"
    reference: ClassVar[bool] = False
    kl: ClassVar[bool] = False

    def count(self, batch: dict[str, np.ndarray]) -> int:
        return _count_pairs(batch)

    def loss(self, logp: Any, mask: Any, rows: Mapping[str, Any], xp: Any) -> tuple[Any, dict[str, Any]]:
        return self.scored_loss(*sequence_scores(logp, mask), rows, xp)

    def scored_loss(self, total: Any, length: Any, rows: Mapping[str, Any], xp: Any) -> tuple[Any, dict[str, Any]]:
        """The loss and metrics from each row's sequence score (summed log-prob, token count)."""
        mean_c, mean_r = _halves(_mean(total, length, xp))
        losses = _sigmoid_loss(self.beta * (mean_c - mean_r) - self.gamma, self.label_smoothing, xp)
        metrics = _pair_metrics(self.beta * mean_c, self.beta * mean_r, xp)
        return losses.sum(), {**metrics, "logps/chosen": mean_c.sum(), "logps/rejected": mean_r.sum()}


@dataclass(frozen=True)
class KTO:
    """Kahneman-Tversky optimisation on unpaired, labelled completions, the base as the reference.

    Per example, r = beta * (policy - reference summed log-prob) and z = beta * KL (the step's
    estimate, a row field): desirable examples lose desirable_weight * (1 - sigmoid(r - z)),
    undesirable ones undesirable_weight * (1 - sigmoid(z - r)); the loss is their mean over
    examples (TRL's). rewards/chosen and rewards/rejected are means over the desirable and the
    undesirable examples (see `summary`).
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    name: str = "kto"
    reference: ClassVar[bool] = True
    kl: ClassVar[bool] = True

    def count(self, batch: dict[str, np.ndarray]) -> int:
        # KL rows (collate_kto's `kl` = 1) are scored before the step, never counted.
        return int(len(batch["input_ids"]) - batch["kl"].sum()) if "kl" in batch else int(len(batch["input_ids"]))

    def loss(self, logp: Any, mask: Any, rows: Mapping[str, Any], xp: Any) -> tuple[Any, dict[str, Any]]:
        return self.scored_loss(*sequence_scores(logp, mask), rows, xp)

    def scored_loss(self, total: Any, length: Any, rows: Mapping[str, Any], xp: Any) -> tuple[Any, dict[str, Any]]:
        """The loss and metrics from each row's sequence score (summed log-prob, token count)."""
        good = rows["label"] > 0
        reward = self.beta * (total - rows["ref_logp"])
        z = self.beta * rows["kl_estimate"]
        losses = xp.where(good, self.desirable_weight * (1 - xp.sigmoid(reward - z)),
                          self.undesirable_weight * (1 - xp.sigmoid(z - reward)))
        zero = xp.zeros_like(reward)
        return losses.sum(), {
            "rewards/chosen": xp.where(good, reward, zero).sum(), "rewards/rejected": xp.where(good, zero, reward).sum(),
            "share/desirable": xp.where(good, 1.0, 0.0).sum(), "kl": rows["kl_estimate"].sum()}

    @staticmethod
    def summary(metrics: dict[str, float]) -> dict[str, float]:
        """Step means over all examples -> rewards as means over each label, and their margin."""
        out = dict(metrics)
        share = out.pop("share/desirable", None)
        if share is None:
            return out
        # A step without examples of one label has no mean reward for it (TRL logs none either).
        for key, part in (("rewards/chosen", share), ("rewards/rejected", 1.0 - share)):
            if part > 1e-9:
                out[key] /= part
            else:
                del out[key]
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


def objective_for(cfg: Config) -> Objective:
    """The objective `train.method` names, with the preference section's hyperparameters."""
    pc, method = cfg.preference, cfg.train.method
    if method == "dpo":
        return DPO(pc.beta, pc.label_smoothing, pc.loss_type)
    if method == "orpo":
        return ORPO(pc.orpo_lambda)
    if method == "simpo":
        return SimPO(pc.beta, pc.simpo_gamma, pc.label_smoothing)
    if method == "kto":
        return KTO(pc.beta, pc.desirable_weight, pc.undesirable_weight)
    return SFT()


def summarize(objective: Any, metrics: dict[str, float]) -> dict[str, float]:
    """The metrics to record for a step: the objective's own view of its step means where it has one."""
    view = getattr(objective, "summary", None)
    return view(metrics) if view is not None else metrics
