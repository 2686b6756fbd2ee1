"""Data-parallel training under the launchers people already use (torchrun, accelerate launch).

qlocal has no launcher of its own: a launcher sets RANK / WORLD_SIZE / LOCAL_RANK and starts one
process per device; here we only read them, join the process group, and tell the run loop which
shard of each batch is this rank's and whether this rank writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes the run folder, metrics, checkpoints and the progress bar."""
        return self.rank == 0


_CURRENT = Dist()


def from_env() -> Dist:
    """The rank layout a launcher put in the environment (single process when none did)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_torch() -> Dist:
    """Join the torch process group (NCCL on CUDA, gloo on CPU) when launched with several ranks."""
    global _CURRENT
    dist = from_env()
    if dist.enabled:
        import torch
        import torch.distributed as td

        if not td.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(dist.local_rank)
            td.init_process_group("nccl" if cuda else "gloo")
    _CURRENT = dist
    return dist


def current() -> Dist:
    return _CURRENT


def shard(items: Sequence[Any], dist: Dist) -> list[Any]:
    """This rank's part of a global batch: every world-th item starting at rank.

    A rank left with nothing (a last batch smaller than the world) gets the first item with its
    loss masked out, so it still joins the gradient all-reduce but adds nothing to the loss.
    """
    mine = list(items[dist.rank::dist.world])
    if not mine:
        from dataclasses import replace

        first = items[0]
        mine = [replace(first, loss_mask=[0] * len(first.loss_mask))]
    return mine


def all_sum(values: list[float]) -> list[float]:
    """Sum floats across ranks (identity in a single process)."""
    if not _CURRENT.enabled:
        return values
    import torch
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64,
                     device=f"cuda:{_CURRENT.local_rank}" if torch.cuda.is_available() else "cpu")
    td.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if _CURRENT.enabled:
        import torch.distributed as td

        td.barrier()


def shutdown() -> None:
    if _CURRENT.enabled:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()
