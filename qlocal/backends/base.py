"""The contract every backend meets, for training and for inference. Backends share no
implementation, only this shape.

Batches are numpy dicts from `qlocal.data.batching.collate` (input_ids, loss_mask,
attention_mask). What a step minimises is its `objective` (qlocal.objectives; SFT by default:
mean next-token cross-entropy over target tokens, logits[t] predicting input_ids[t+1] weighted by
loss_mask[t+1]). A backend computes the target tokens' log-probabilities in one function of its
own and hands them to the objective; the mean is over the objective's count for the whole
optimizer step, so accumulating k micro-batches equals one batch k times larger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Protocol

import numpy as np

from qlocal.config import Config
from qlocal.distributed import Dist
from qlocal.objectives import SFT, Objective

Batch = dict[str, np.ndarray]

# Leaf module names that are never adapted: output heads and embeddings.
NEVER_ADAPT = frozenset({"lm_head", "embed_tokens", "embed_out", "output", "score"})


@dataclass
class StepStats:
    loss: float
    """Mean loss of the optimizer step (SFT: per target token)."""
    grad_norm: float
    """Gradient norm before clipping."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The objective's metrics, means over the step like the loss (SFT has none)."""


@dataclass
class Sampling:
    """How a reply is sampled: greedy by default."""

    max_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    keep_special: bool = False
    """Keep special tokens in the text (a tool-call tag such as Mistral's [TOOL_CALLS] is one)."""


@dataclass
class Finish:
    """How a streamed reply ended: the generator's return value (StopIteration.value)."""

    tokens: int = 0
    """Tokens generated, the stop token not counted."""
    stopped: bool = False
    """It ended on one of the stop ids within max_tokens (else it ran out of tokens)."""


class Backend(Protocol):
    """Everything train, eval and inference use of a backend; callers never branch on `name`."""

    name: str
    """"torch" or "mlx": recorded in config.yaml and eval reports."""
    supports_packing: bool
    """Whether train_step takes packed rows (several examples per row, position_ids restarting)."""

    def init_distributed(self) -> Dist:
        """Join the process group of the launcher this backend runs under (torchrun/accelerate
        for torch, mlx.launch for MLX); a single process when not launched. A launcher of the
        other framework is a UserError. Called before setup()."""
        ...

    def setup(self, model_path: Path, cfg: Config) -> dict[str, Any]:
        """Load the base model (quantised as configured), attach LoRA, build the optimizer.

        Returns facts for config.yaml (device, dtype, resolved target modules, trainable params).
        """
        ...

    def load_for_inference(self, model_path: Path, adapter: Path | None, cfg: Config) -> None:
        """Load the base model plus a PEFT adapter folder (None: the plain model) to generate
        from, without training state. torch loads the 16-bit base (bf16 on CUDA, fp32 on CPU);
        MLX quantises as the run did (cfg.train.quantize), since its adapter trained on that."""
        ...

    def train_step(self, micro_batches: list[Batch], lr: float, objective: Objective = SFT()) -> StepStats:
        """One optimizer step minimising `objective` over the micro-batches (gradient
        accumulation) at learning rate lr."""
        ...

    def eval_loss(self, batches: list[Batch], objective: Objective = SFT()) -> tuple[float, int]:
        """Summed objective loss and its count (SFT: target tokens) over all ranks, without gradients."""
        ...

    def sequence_logprobs(self, batch: Batch) -> np.ndarray:
        """Per row, the summed log-prob of the target tokens (loss_mask[:, 1:]) as float32 (B,),
        under the model as it is now (adapter on or off), without gradients and without dropout:
        the reference scores of preference training. Collective-free, so ranks may call it apart."""
        ...

    def gather_state(self) -> None:
        """Collect sharded adapter and optimizer state before saving; every rank calls it (the
        gathers are collectives). A no-op except under torch FSDP."""
        ...

    def save_adapter(self, path: Path) -> None:
        """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors)."""
        ...

    def load_adapter(self, path: Path) -> None:
        """Load a PEFT adapter folder's weights into the LoRA layers setup() attached (the run's
        rank and targets); the adapter is switched on afterwards."""
        ...

    def set_adapter_enabled(self, enabled: bool) -> None:
        """Switch the adapter off (exactly the base model: eval --compare-base, the reference
        model of preference training) or back on. Nothing is copied or reloaded."""
        ...

    def stream(self, prompt: list[int], tokenizer: Any, stop_ids: list[int],
               sampling: Sampling) -> Generator[str, None, Finish]:
        """Generate a reply to the prompt token ids, text piece by piece, ending at any of
        stop_ids; `tokenizer` (transformers) decodes. Returns (as a generator) a `Finish`: how
        many tokens, and whether a stop id ended it (eval's stops rate)."""
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
