"""What an optimizer step trains on and at which learning rate: pure functions of (seed, step),
so a resumed run continues exactly where it stopped."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qlocal import preference_run


def lr_at(step: int, total: int, peak: float, schedule: str, warmup: int) -> float:
    """Learning rate for 0-based optimizer step `step`: linear warmup, then cosine/linear/constant."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Schedule:
    """Maps optimizer steps to micro-batches: a pure function of (seed, step), so resume can jump."""

    def __init__(self, examples: list[Any], batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 packed: bool, dist: Any = None, collate_fn: Any = None) -> None:
        from qlocal.data.batching import epoch_batches
        from qlocal.distributed import Dist

        self.dist = dist or Dist()
        # With N ranks a micro-batch holds N * batch_size examples and each rank takes its shard.
        self.bs = batch_size * self.dist.world
        self.examples, self.ga, self.seed, self.pad_id = examples, grad_accum, seed, pad_id
        self.packed, self.collate_fn = packed, collate_fn
        """collate_fn: the batching of a preference method's examples; None = SFT's collate."""
        self.lengths = [preference_run.length(e) for e in examples]
        self._epoch_batches = epoch_batches
        self._cache: dict[int, list[list[int]]] = {}
        self.per_epoch = len(epoch_batches(self.lengths, self.bs, seed, 0))

    def _epoch(self, e: int) -> list[list[int]]:
        if e not in self._cache:
            self._cache = {e: self._epoch_batches(self.lengths, self.bs, self.seed, e)}
        return self._cache[e]

    def micro_batches(self, step: int) -> tuple[list[dict[str, np.ndarray]], float]:
        """Collated micro-batches of 0-based optimizer step `step`, and the epoch position reached."""
        from qlocal.data.batching import collate, collate_packed
        from qlocal.distributed import shard

        out = []
        for m in range(step * self.ga, (step + 1) * self.ga):
            e, i = divmod(m, self.per_epoch)
            chosen = shard([self.examples[j] for j in self._epoch(e)[i]], self.dist)
            if self.collate_fn is not None:
                out.append(self.collate_fn(chosen))
            else:
                out.append(collate_packed(chosen) if self.packed else collate(chosen, self.pad_id))
        return out, (step + 1) * self.ga / self.per_epoch
