"""FSDP2 for the torch backend (train.distributed=fsdp): sharding, and full state for saving.

Checkpoints stay ordinary PEFT folders plus a full optimizer state: every rank joins the gathers,
rank 0 writes; on resume every rank reads the files and keeps its own shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlocal.errors import UserError


def shard(loss_module: Any, model: Any, device: str, dtype: Any) -> Any:
    """FSDP2: each decoder layer its own shard group, the rest (embeddings, norm, head) the root's.

    Frozen base weights are sharded like the LoRA ones, which is what saves memory; gradients are
    reduce-scattered as an average, the same contract as DDP.
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from qlocal import distributed

    mesh = init_device_mesh(device.split(":")[0], (distributed.current().world,))
    # LoRA weights may be fp32 beside a bf16 base; FSDP gathers one dtype, and reduces in fp32.
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(loss_module, mesh=mesh, mp_policy=mp)
    return loss_module


def gather(peft_model: Any, root: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full LoRA weights (PeftModel parameter names, on CPU) and full optimizer state; a collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    lora = {n: p.full_tensor().detach().cpu() for n, p in peft_model.named_parameters() if p.requires_grad}
    optim = get_optimizer_state_dict(root, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return lora, optim


def load(peft_model: Any, root: Any, optimizer: Any, ckpt: Path) -> None:
    """Put a checkpoint's full adapter and optimizer state into this rank's shards; a collective."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import distribute_tensor

    weights = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    name = peft_model.active_adapter
    for n, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        key = n.replace(f".{name}.", ".")  # PEFT files drop the adapter name
        if key not in weights or weights[key].shape != p.shape:
            raise UserError(f"{ckpt}: checkpoint does not match this model/LoRA setup ({key})")
        part = distribute_tensor(weights[key].to(p.dtype), p.device_mesh, p.placements)
        with torch.no_grad():
            p.to_local().copy_(part.to_local())
    optim = torch.load(ckpt / "optimizer.pt", map_location="cpu")
    set_optimizer_state_dict(root, optimizer, optim, options=StateDictOptions(full_state_dict=True))
