"""Data-parallel training under the launchers people already use (torchrun, accelerate launch,
and mlx.launch for the MLX backend).

qlocal has no launcher of its own: a launcher sets RANK / WORLD_SIZE / LOCAL_RANK (torch) or
MLX_RANK / MLX_HOSTFILE (mlx.launch) and starts one process per device; here we only read them,
join the process group, and tell the run loop which shard of each batch is this rank's and whether
this rank writes files.

A rank that fails (its error, exit 2 for a user's) or is killed ends its process; the launcher then
stops the others (torchrun: SIGTERM, and across nodes through its rendezvous; mlx.launch: SIGTERM),
and gloo, NCCL and MLX's ring fail a collective whose peer is gone. A rank that learns it that way
says so in one line (`lost_peer`, exit 1) below the failing rank's own error, and train.py's cleanup
applies (a fresh run folder without a checkpoint is removed, complete checkpoints stay).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    engine: str = "torch"  # which library's collectives all_sum/barrier use: "torch" or "mlx"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes the run folder, metrics, checkpoints and the progress bar."""
        return self.rank == 0


_CURRENT = Dist()


def from_env() -> Dist:
    """The rank layout a launcher put in the environment (single process when none did).

    mlx.launch's ring backend sets MLX_RANK but no world size; that comes from init_mlx().
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = os.environ.get("RANK", os.environ.get("MLX_RANK", "0"))
    return Dist(int(rank), world, int(os.environ.get("LOCAL_RANK", "0")))


def launched_by_mlx() -> bool:
    """True under mlx.launch (any of its backends) rather than torchrun/accelerate."""
    return "RANK" not in os.environ and any(k in os.environ for k in ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE"))


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


def init_mlx() -> Dist:
    """Join mx.distributed's global group (ring, MPI, JACCL or NCCL, whichever mlx.launch set up).

    Outside mlx.launch this is a single process. Every rank must end up in the same group, so a
    launcher whose ranks MLX cannot see (torchrun) is a user error rather than N separate runs.
    """
    global _CURRENT
    env = from_env()
    size, rank = 1, 0
    if launched_by_mlx():
        import mlx.core as mx

        group = mx.distributed.init()
        size, rank = group.size(), group.rank()
    if env.enabled and size == 1:
        from qlocal.errors import UserError

        raise UserError(f"launched with {env.world} ranks by torchrun/accelerate, but the MLX backend runs "
                        "under mlx.launch (mlx.launch -n N -- python -m qlocal train ...); or use --backend torch")
    dist = Dist(rank, size, rank, engine="mlx")
    _CURRENT = dist
    return dist


def current() -> Dist:
    return _CURRENT


class PeerLost(RuntimeError):
    """A collective failed because another rank is gone: the CLI prints it as one line, exit 1."""


# What gloo, NCCL and MLX's ring raise in a collective whose peer process has gone away.
_LOST = re.compile(r"closed by peer|reset by peer|broken pipe|connection to a peer was lost|"
                   r"remote process exited|communicator was aborted", re.I)


def lost_peer(e: BaseException) -> PeerLost | None:
    """`e` as a PeerLost when it is a multi-rank run's "another rank is gone", else None.

    The launcher (torchrun, accelerate, mlx.launch) stops the other ranks when one exits, but a rank
    blocked in a collective learns it first from the collective's error: that rank's traceback
    would bury the failing rank's own one-line error, printed above it.
    """
    if isinstance(e, PeerLost):
        return e
    multi = _CURRENT.enabled or from_env().enabled or launched_by_mlx()
    if not multi or not isinstance(e, RuntimeError) or not _LOST.search(str(e)):
        return None
    rank = _CURRENT.rank if _CURRENT.enabled else from_env().rank
    why = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:160]
    return PeerLost(f"rank {rank}: another rank stopped mid-run (its own error is above, or it was killed), "
                    f"so this rank stopped too ({why})")


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
    if _CURRENT.engine == "mlx":
        import mlx.core as mx

        # float32 keeps it valid on a Mac GPU stream; per-step counts and loss sums fit it exactly enough.
        out = mx.distributed.all_sum(mx.array(values, dtype=mx.float32))
        return [float(v) for v in out.tolist()]
    import torch
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64,
                     device=f"cuda:{_CURRENT.local_rank}" if torch.cuda.is_available() else "cpu")
    td.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if _CURRENT.enabled and _CURRENT.engine == "mlx":
        all_sum([0.0])  # mx.distributed has no barrier; a blocking collective is one
    elif _CURRENT.enabled:
        import torch.distributed as td

        td.barrier()


def shutdown() -> None:
    if _CURRENT.enabled and _CURRENT.engine == "torch":
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()
