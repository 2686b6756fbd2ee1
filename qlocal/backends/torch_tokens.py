"""Trained rows for added special tokens on the torch backend (config `lora.new_tokens`).

The vocabulary grows to hold the new ids; rows that did not exist start as the mean of the old
rows (embedding and untied head each their own), the same rule as the MLX backend, so both start
from the same model. PEFT's `trainable_token_indices` then trains those rows: it stores their
full values (not deltas) in the adapter, so whoever loads the adapter only has to resize the
base first (`qlocal.adapters.fit_vocab`), however the new rows were filled there.
"""

from __future__ import annotations

from typing import Any


def _leaf(model: Any, module: Any) -> str:
    return next(n for n, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def prepare_rows(model: Any, ids: list[int]) -> dict[str, list[int]] | None:
    """Resize `model` (a transformers causal LM) to hold `ids`, fill the new rows, and return
    PEFT's trainable_token_indices ({embedding: ids}, plus {head: ids} when the head is untied)."""
    import torch

    if not ids:
        return None
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    need = max(old, max(ids) + 1)
    if need > old:
        model.resize_token_embeddings(need, mean_resizing=False)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight is emb.weight
    with torch.no_grad():
        for layer in [emb] if tied else [emb, head]:
            w = layer.weight
            w[old:] = w[:old].float().mean(0).to(w.dtype)
    rows = {_leaf(model, emb): list(ids)}
    if not tied:
        rows[_leaf(model, head)] = list(ids)
    return rows

