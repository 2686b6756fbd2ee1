"""Reference log-probs for preference training: the same base with the adapter switched off.

There is never a second model: `Backend.set_adapter_enabled(False)` makes the trained model exactly
its base (PEFT's switch on torch, LoRA scales 0 on MLX, for LoRA and QLoRA alike), and
`Backend.sequence_logprobs` scores the rows without gradients, outside MLX's compiled step. What an
objective needs is said by its `reference` and `kl` flags (qlocal.preference_losses):

- `ref_logp` (B,): each row's summed response log-prob under the base. Either precomputed once
  before training (`train.precompute_ref`: kept on the examples, carried by the collation) or
  filled here before every step.
- `kl_estimate` (B,): KTO's KL estimate, TRL's: the mean over the step's KL rows (prompt i with
  another example's answer, qlocal.data.preference.assign_kl) of policy minus reference log-prob,
  clamped at 0, with no gradient. It is one number for the whole optimizer step (all micro-batches
  and ranks), so gradient accumulation equals one big batch; the KL rows never reach the
  differentiated step.

Written once here, for both backends, against the Backend protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qlocal import distributed
from qlocal.backends.base import Backend, Batch


def needs_reference(objective: Any) -> bool:
    """Whether the objective scores against the base model (DPO, KTO)."""
    return bool(getattr(objective, "reference", False))


def take_rows(batch: Batch, rows: np.ndarray) -> Batch:
    """The batch's rows where `rows` is true (every key's first axis), padding trimmed to the longest."""
    out = {k: v[rows] for k, v in batch.items()}
    width = max(int(out["attention_mask"].sum(axis=1).max(initial=0)), 2)
    for k in ("input_ids", "loss_mask", "attention_mask", "position_ids"):
        if k in out:
            out[k] = out[k][:, :width]
    return out


def _scores_off(backend: Backend, batches: list[Batch], policy_adapter: bool = True) -> list[np.ndarray]:
    """Summed response log-probs of each batch's rows under the base (the adapter switched off);
    the adapter is left as the policy has it (on, unless the policy is the base itself)."""
    backend.set_adapter_enabled(False)
    try:
        return [backend.sequence_logprobs(b) for b in batches]
    finally:
        backend.set_adapter_enabled(policy_adapter)


def complete(backend: Backend, batches: list[Batch], objective: Any, policy_adapter: bool = True) -> list[Batch]:
    """The step's micro-batches as the objective's loss reads them (every rank calls it every step).

    DPO/KTO rows get `ref_logp` unless the collation carried it (train.precompute_ref). A KTO
    batch (qlocal.data.preference.collate_kto) loses its KL rows (`kl` = 1): they are scored here,
    by the policy and by the base, without gradients, and every remaining row gets `kl_estimate`,
    the step's KL estimate (over all micro-batches and ranks, clamped at 0, as TRL's KTOTrainer).
    `policy_adapter` False scores the base as the policy (`qlocal eval --compare-base`).
    """
    kl = bool(getattr(objective, "kl", False))
    if not needs_reference(objective) and not kl:
        return batches
    out, kl_parts = [], []
    for b in batches:
        is_kl = b["kl"].astype(bool) if kl and "kl" in b else np.zeros(len(b["input_ids"]), bool)
        main, kl_rows = take_rows(b, ~is_kl), take_rows(b, is_kl) if is_kl.any() else None
        main.pop("kl", None)
        if "ref_logp" not in b:
            todo = [main] + ([kl_rows] if kl_rows is not None else [])
            scores = _scores_off(backend, todo, policy_adapter)
            main["ref_logp"] = scores[0]
            if kl_rows is not None:
                kl_rows["ref_logp"] = scores[1]
        if kl_rows is not None:
            kl_parts.append(kl_rows)
        out.append(main)
    if kl:
        diff, n = 0.0, 0.0
        for rows in kl_parts:  # the policy's scores of the mismatched rows: adapter on, no gradient
            diff += float((backend.sequence_logprobs(rows) - rows["ref_logp"]).sum())
            n += len(rows["input_ids"])
        diff, n = distributed.all_sum([diff, n])
        estimate = max(diff / n, 0.0) if n > 0 else 0.0
        for b in out:
            b["kl_estimate"] = np.full(len(b["input_ids"]), estimate, np.float32)
    return out


def precompute(backend: Backend, examples: Sequence[Any], collate: Callable[[list[Any]], Batch],
               batch_size: int) -> None:
    """`train.precompute_ref`: score every example under the base once, before training, and keep
    the scores on the examples (PairExample.ref_chosen/ref_rejected, KTOExample.ref/ref_kl), so
    the collation carries them as `ref_logp` and no step runs the base again.

    Batches go in order of length, so little padding is scored; the rows of a collated batch are
    laid out as qlocal.data.preference documents (chosen block then rejected block; matched rows
    then KL rows), so row j of block k belongs to example j.
    """
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    for start in range(0, len(order), batch_size):
        group = [examples[i] for i in order[start:start + batch_size]]
        (scores,) = _scores_off(backend, [collate(group)])
        blocks = scores.reshape(-1, len(group))  # (rows per example, examples)
        for j, ex in enumerate(group):
            if hasattr(ex, "ref_chosen"):
                ex.ref_chosen, ex.ref_rejected = float(blocks[0, j]), float(blocks[1, j])
            else:
                ex.ref = float(blocks[0, j])
                ex.ref_kl = float(blocks[1, j]) if len(blocks) > 1 else None
