"""Length-bucketed epoch order, padding and target counting (qlocal.data.batching)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlocal.data.batching import BUCKET_BATCHES, collate, count_targets, epoch_batches
from qlocal.data.render import Example


def flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 500), max_size=300), batch_size=st.integers(1, 9),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 5))
def test_each_index_once(lengths: list[int], batch_size: int, seed: int, epoch: int) -> None:
    batches = epoch_batches(lengths, batch_size, seed, epoch)
    assert sorted(flat(batches)) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert len(batches) == -(-len(lengths) // batch_size)  # only one partial batch, kept
    assert epoch_batches(lengths, batch_size, seed, epoch) == batches


def test_deterministic_and_varies_by_epoch_and_seed() -> None:
    lengths = list(np.random.default_rng(0).integers(1, 100, size=97))
    a = epoch_batches(lengths, 4, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 4, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 4, seed=1, epoch=1)
    assert a != epoch_batches(lengths, 4, seed=2, epoch=0)
    assert sum(len(b) < 4 for b in a) == 1  # 97 = 24*4 + 1


def test_batches_hold_similar_lengths() -> None:
    # Within one bucket chunk, each batch is a contiguous run of the length-sorted order.
    n, bs = 8 * BUCKET_BATCHES, 8
    lengths = list(np.random.default_rng(3).permutation(n) + 1)
    batches = epoch_batches(lengths, bs, seed=0, epoch=0)
    for b in batches:
        ls = sorted(lengths[i] for i in b)
        assert ls[-1] - ls[0] == bs - 1
    # and the batch order itself is shuffled, not sorted by length
    firsts = [min(lengths[i] for i in b) for b in batches]
    assert firsts != sorted(firsts)


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError):
        epoch_batches([1, 2], 0, 0, 0)


def test_collate_pads_right() -> None:
    exs = [Example([5, 6, 7], [0, 1, 1]), Example([8], [0]), Example([1, 2, 3, 4, 5], [0, 0, 1, 1, 1])]
    b = collate(exs, pad_id=0)
    assert set(b) == {"input_ids", "loss_mask", "attention_mask"}
    for k in b:
        assert b[k].shape == (3, 5) and b[k].dtype == np.int64
    assert b["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [1, 2, 3, 4, 5]]
    assert b["loss_mask"].tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert count_targets(b) == 5
    # position 0 is never predicted, so a mask bit there does not count
    assert count_targets(collate([Example([1, 2], [1, 1])], pad_id=9)) == 1
    with pytest.raises(ValueError):
        collate([], 0)
