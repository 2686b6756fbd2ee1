"""The contract every training backend meets. Backends share no implementation, only this shape.

Batches are numpy dicts from `qlocal.data.batching.collate` (input_ids, loss_mask,
attention_mask). The loss is the same everywhere: mean next-token cross-entropy over target
tokens, where logits[t] predict input_ids[t+1] weighted by loss_mask[t+1]. Over gradient
accumulation the mean is taken over all targets of the optimizer step, so accumulating k
micro-batches equals one batch k times larger.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qlocal.config import Config

Batch = dict[str, np.ndarray]


@dataclass
class StepStats:
    loss: float
    """Mean target-token loss of the optimizer step."""
    grad_norm: float
    """Gradient norm before clipping."""


class Backend(Protocol):
    name: str

    def setup(self, model_path: Path, cfg: Config) -> dict[str, Any]:
        """Load the base model (quantised as configured), attach LoRA, build the optimizer.

        Returns facts for config.yaml (device, dtype, resolved target modules, trainable params).
        """
        ...

    def train_step(self, micro_batches: list[Batch], lr: float) -> StepStats:
        """One optimizer step over the micro-batches (gradient accumulation) at learning rate lr."""
        ...

    def eval_loss(self, batches: list[Batch]) -> tuple[float, int]:
        """Summed target-token loss and the number of target tokens, without gradients."""
        ...

    def save_adapter(self, path: Path) -> None:
        """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors)."""
        ...

    def save_state(self, path: Path) -> None:
        """Write optimizer and RNG state into an existing checkpoint folder."""
        ...

    def load_state(self, path: Path) -> None:
        """Restore adapter weights (path/adapter), optimizer and RNG state from a checkpoint."""
        ...

    def peak_memory_mb(self) -> float:
        """Peak memory so far: accelerator memory where there is one, else process RSS."""
        ...
