"""Training objectives: what a backend's step minimises, given per-token log-probabilities.

A backend computes, in one function of its own, the log-probability of every target token of a
batch under the model being trained: `logp[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1])`,
a (B, T-1) float32 array, with `mask[b, t] = loss_mask[b, t+1]` beside it (0 where nothing is
predicted: prompt, padding, the first token of a packed example). An objective turns those into a
summed loss and summed metrics; the backend divides both by the step's total `count` over all
micro-batches and ranks, so gradient accumulation and data parallelism equal one big batch.

Each objective's loss is written once, against `xp`: the backend's array library itself (`torch`
or `mlx.core`), not a wrapper. One definition means MLX and torch cannot drift apart, and a new
objective needs no backend code; the price is using only what both libraries spell the same way
(`*`, `-`, `.sum(axis=...)`, `exp`, `log`, `logaddexp`, `where`, `maximum`, ...), which the
cross-backend test of an objective checks. Writing each loss twice (a torch and an MLX function)
would read no better and could disagree.

Preference objectives (DPO, ORPO, KTO, SimPO) fit the same contract: a batch shape of their own
(chosen/rejected rows, or a per-row label), per-row fields that reach `loss` in `rows` (any batch
key that is not a token field, first axis = batch row), and per-sequence scores from
`(logp * mask).sum(axis=-1)`: qlocal.preference_losses. Their reference log-probs (the base with
the adapter off) are row fields that qlocal.reference fills before the step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from qlocal.data.batching import count_targets

# Batch keys with one entry per token; every other key is a per-row field for the objective.
TOKEN_FIELDS = frozenset({"input_ids", "loss_mask", "attention_mask", "position_ids"})


class Objective(Protocol):
    """A loss on target-token log-probabilities; see the module docstring for the shapes."""

    name: str

    def count(self, batch: dict[str, np.ndarray]) -> int:
        """Units the batch's summed loss counts (SFT: target tokens); the step's loss is their mean."""
        ...

    def loss(self, logp: Any, mask: Any, rows: Mapping[str, Any], xp: Any) -> tuple[Any, dict[str, Any]]:
        """(summed loss, summed metrics) as scalar `xp` arrays; the loss is differentiated."""
        ...


@dataclass(frozen=True)
class SFT:
    """Supervised fine-tuning: mean next-token cross-entropy over target tokens.

    Token-weighted over the whole optimizer step: every target token counts the same, however
    the step's examples are split into micro-batches or across ranks.
    """

    name: str = "sft"

    def count(self, batch: dict[str, np.ndarray]) -> int:
        return count_targets(batch)

    def loss(self, logp: Any, mask: Any, rows: Mapping[str, Any], xp: Any) -> tuple[Any, dict[str, Any]]:
        return -(logp * mask).sum(), {}


def row_fields(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch's per-row fields (everything but the token fields), for `Objective.loss`."""
    return {k: v for k, v in batch.items() if k not in TOKEN_FIELDS}
