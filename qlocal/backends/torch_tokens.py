"""Trained rows for added special tokens on the torch backend (config `lora.new_tokens`).

The vocabulary grows to hold the new ids; rows that did not exist start as the mean of the old
rows (embedding and untied head each their own), the same rule as the MLX backend, so both start
from the same model. PEFT's `trainable_token_indices` then trains those rows: it stores their
full values (not deltas) in the adapter, so whoever loads the adapter only has to resize the
base first (`qlocal.adapters.fit_vocab`).
"""

from __future__ import annotations

from typing import Any

from qlocal.adapters import grow_vocab


def _leaf(model: Any, module: Any) -> str:
    return next(n for n, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def prepare_rows(model: Any, ids: list[int]) -> dict[str, list[int]] | None:
    """Resize `model` (a transformers causal LM) to hold `ids`, fill the new rows, and return
    PEFT's trainable_token_indices ({embedding: ids}, plus {head: ids} when the head is untied)."""
    if not ids:
        return None
    grow_vocab(model, max(ids) + 1)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight is emb.weight
    rows = {_leaf(model, emb): list(ids)}
    if not tied:
        rows[_leaf(model, head)] = list(ids)
    return rows

