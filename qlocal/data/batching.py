"""Batches of Examples: deterministic length-bucketed order and right-padded numpy arrays.

Numpy only, so both backends (torch, MLX) share the exact same batches for a seed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qlocal.data.render import Example

BUCKET_BATCHES = 50  # sort lengths within windows of this many batches: little padding, still random


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of each batch for one epoch; the same (seed, epoch) always gives the same batches.

    Shuffle, sort by length within chunks of batch_size*50 (so a batch holds similar lengths and
    pads little), cut into batches, then shuffle the batch order. Every index appears exactly
    once; the last partial batch is kept.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    lens = np.asarray(lengths, dtype=np.int64)
    order = rng.permutation(len(lens))
    chunk = batch_size * BUCKET_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(lens[part], kind="stable")]  # stable: ties keep the shuffled order
        batches += [part[i:i + batch_size].tolist() for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad a list of Examples to the longest: input_ids, loss_mask, attention_mask (B, T) int64.

    Padding has loss_mask 0 and attention_mask 0.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    attn = np.zeros((len(examples), width), dtype=np.int64)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = e.input_ids
        mask[row, :n] = e.loss_mask
        attn[row, :n] = 1
    return {"input_ids": ids, "loss_mask": mask, "attention_mask": attn}


def count_targets(batch: dict[str, np.ndarray]) -> int:
    """Number of trained tokens in a batch (position 0 is never predicted, so it never counts)."""
    return int(np.asarray(batch["loss_mask"])[:, 1:].sum())


def collate_packed(examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """Padding-free batch: the examples concatenated into one row with position ids restarting at 0
    for each, so attention stays inside each example (block-diagonal causal mask / varlen kernels).

    The first token of every example is not a target: it would be predicted from the previous
    example. That is the same set of targets `collate` gives, so the loss is identical.
    """
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    ids = np.concatenate([np.asarray(e.input_ids, dtype=np.int64) for e in examples])[None]
    mask = np.concatenate([np.asarray([0] + list(e.loss_mask[1:]), dtype=np.int64) for e in examples])[None]
    pos = np.concatenate([np.arange(len(e.input_ids), dtype=np.int64) for e in examples])[None]
    return {"input_ids": ids, "loss_mask": mask, "position_ids": pos, "attention_mask": np.ones_like(ids)}
