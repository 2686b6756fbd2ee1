"""MLX backend: mlx-lm model code, LoRA / QLoRA (affine 4- or 8-bit) on Apple Silicon or mlx[cpu].

Only the model classes and LoRALinear come from mlx-lm; data, loss, schedule and checkpoints are
qlocal's, so the same Examples and the same loss contract as the torch backend apply (base.py).
Adapters are converted to PEFT on save and from PEFT on load (qlocal.adapters).

Under mlx.launch every rank holds the whole model and its shard of each global batch; gradients are
averaged across ranks (mlx.nn.average_gradients) inside the compiled step, so every rank takes the
same update (qlocal.distributed).
"""

from __future__ import annotations

import resource
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from qlocal import adapters
from qlocal.backends.base import Batch, StepStats
from qlocal.config import Config
from qlocal.errors import UserError, missing_extra

GROUP_SIZE = 64  # affine quantisation group, mlx-lm's default
PAD_MULTIPLE = 16  # sequence widths are rounded up so mx.compile sees few distinct shapes
_NEVER_ADAPT = {"lm_head", "embed_tokens", "embed_out", "output", "score"}
_STATE_FILE = "mlx_optimizer.safetensors"


def _mlx() -> tuple[Any, Any, Any]:
    try:
        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim
    except ImportError:
        raise missing_extra("mlx", "mlx") from None
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        raise missing_extra("mlx-lm", "mlx") from None
    return mx, nn, optim


def hf_config_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """Config keys mlx-lm 0.32 reads but transformers >= 5 no longer writes.

    transformers 5 moved rope_theta/rope_scaling into `rope_parameters` (per attention type for
    Gemma 3) and describes Gemma 3's local/global pattern with `layer_types`. Without this, mlx-lm
    silently uses its defaults (e.g. Llama's rope_theta 10000 instead of 500000).
    """
    out: dict[str, Any] = {}
    rp = config.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" not in config:
        nested = "full_attention" in rp
        full = rp["full_attention"] if nested else rp
        if "rope_theta" in full:
            out["rope_theta"] = full["rope_theta"]
        if full.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            out["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
        if nested and "rope_theta" in rp.get("sliding_attention", {}):
            out["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
    types = config.get("layer_types")
    if config.get("model_type") == "gemma3_text" and types and "sliding_window_pattern" not in config:
        # mlx-lm's Gemma 3 assumes a periodic pattern: layer i is global iff (i+1) % p == 0.
        p = types.index("full_attention") + 1 if "full_attention" in types else len(types) + 1
        if any((t == "full_attention") != ((i + 1) % p == 0) for i, t in enumerate(types)):
            raise UserError(f"Gemma 3 layer_types {types} are not periodic; the MLX backend cannot run them")
        out["sliding_window_pattern"] = p
    return out


def load_mlx_model(model_path: Path, quantize: str = "none", dtype: str = "auto") -> tuple[Any, dict[str, Any]]:
    """Load an HF (or mlx-lm quantised) folder as an mlx-lm model; quantise it affine when asked.

    Returns (model, facts) with facts: dtype, quantization ("4bit"/"8bit"/"none", and whether it
    was pre-quantised on disk), model_type. The folder on disk is never modified.
    """
    mx, nn, _ = _mlx()
    from mlx_lm.utils import load_config, load_model

    model_path = Path(model_path)
    config = load_config(model_path)
    try:
        model, config = load_model(model_path, model_config=hf_config_overrides(config))
    except ValueError as e:
        raise UserError(f"{model_path}: mlx-lm cannot load this model ({e})") from None
    on_disk = config.get("quantization")
    gpu = mx.default_device() == mx.gpu
    name = dtype if dtype != "auto" else ("bfloat16" if gpu else "float32")
    if not gpu and name == "float16":
        raise UserError("train.dtype=float16 is not supported by MLX on CPU; use float32 or bfloat16")
    model.set_dtype(getattr(mx, name))
    quant = "none"
    if on_disk:
        quant = f"{on_disk.get('bits', '?')}bit (pre-quantised {on_disk.get('mode', 'affine')})"
        if quantize != "none" and not quant.startswith(quantize):
            raise UserError(f"{model_path} is already quantised to {quant}; drop --quantize {quantize} "
                            "or point --model at the 16-bit original")
    elif quantize != "none":
        bits = int(quantize.removesuffix("bit"))

        # As mlx-lm's convert: every linear/embedding whose input width divides into groups.
        def predicate(path: str, m: Any) -> bool:
            return hasattr(m, "to_quantized") and m.weight.shape[-1] % GROUP_SIZE == 0

        nn.quantize(model, group_size=GROUP_SIZE, bits=bits, mode="affine", class_predicate=predicate)
        quant = f"{bits}bit (affine, group {GROUP_SIZE})"
    mx.eval(model.parameters())
    return model, {"dtype": name, "quantization": quant, "model_type": config.get("model_type")}


def attach_lora(model: Any, rank: int, alpha: float, dropout: float, targets: list[str],
                layers: int | None) -> tuple[list[str], list[int]]:
    """Freeze the model and wrap the chosen linear layers of the last `layers` blocks in LoRA.

    `targets` is ["all-linear"] or leaf/suffix names (q_proj, self_attn.v_proj). Returns the
    resolved leaf names and the adapted layer indices. Scale is alpha / rank, as in PEFT.
    """
    _, nn, _ = _mlx()
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.lora import LoRALinear

    model.freeze()
    blocks = model.layers
    linear = (nn.Linear, nn.QuantizedLinear)
    every = {k for b in blocks for k, m in b.named_modules() if isinstance(m, linear)}
    if targets == ["all-linear"]:
        chosen = {k for k in every if k.rsplit(".", 1)[-1] not in _NEVER_ADAPT}
    else:
        chosen = {k for k in every for t in targets if k == t or k.endswith("." + t)}
        unknown = [t for t in targets if not any(k == t or k.endswith("." + t) for k in every)]
        if unknown:
            leaves = sorted({k.rsplit(".", 1)[-1] for k in every})
            raise UserError(f"lora.target_modules: {', '.join(unknown)} not found in the model's blocks "
                            f"(linear layers there: {', '.join(leaves)})")
    first = len(blocks) - layers if layers is not None and layers < len(blocks) else 0
    for block in blocks[first:]:
        wrapped = [(k, LoRALinear.from_base(m, r=rank, dropout=dropout, scale=alpha / rank))
                   for k, m in block.named_modules() if k in chosen]
        block.update_modules(tree_unflatten(wrapped))
    return sorted({k.rsplit(".", 1)[-1] for k in chosen}), list(range(first, len(blocks)))


def load_peft_adapter_into_mlx(model: Any, adapter_dir: Path) -> Any:
    """Apply a PEFT LoRA adapter folder to an mlx-lm model in place (wrapping layers as needed).

    Modules come from the tensor names, ranks from their shapes, scale from lora_alpha (with
    alpha_pattern / rsLoRA as PEFT defines them). Returns the model.
    """
    mx, nn, _ = _mlx()
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.lora import LoRALinear

    config, peft_weights = adapters.read_peft_adapter(Path(adapter_dir))
    weights = adapters.peft_to_mlx(peft_weights)
    modules = dict(model.named_modules())
    wrapped = []
    for path, rank in adapters.lora_modules(weights).items():
        m = modules.get(path)
        a, b = mx.array(weights[f"{path}.lora_a"]), mx.array(weights[f"{path}.lora_b"])
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            m = LoRALinear.from_base(m, r=rank)
            wrapped.append((path, m))
        elif not isinstance(m, LoRALinear):
            raise UserError(f"{adapter_dir}: adapter targets '{path}', which is not a linear layer of this model")
        out_dims = m.linear.weight.shape[0]
        if a.shape[0] != m.lora_a.shape[0] or b.shape[1] != out_dims:
            raise UserError(f"{adapter_dir}: {path} has shape {tuple(a.shape)}/{tuple(b.shape)}, "
                            f"the model's layer is {m.lora_a.shape[0]} -> {out_dims}: wrong base model?")
        m.lora_a, m.lora_b = a.astype(m.lora_a.dtype), b.astype(m.lora_b.dtype)
        m.scale = adapters.lora_scale(config, path, rank)
    if wrapped:
        model.update_modules(tree_unflatten(wrapped))
    return model


def _checkpoint_blocks(model: Any) -> None:
    """Recompute each block's activations in the backward pass.

    mlx-lm's grad_checkpoint patches the block *class*, which would leak into every later model in
    the process; swapping each instance to a private subclass keeps it local (and names unchanged).
    """
    mx, _, _ = _mlx()
    for block in model.layers:
        cls = type(block)
        if getattr(cls, "_qlocal_checkpointed", False):
            continue
        base_call = cls.__call__

        def call(self: Any, *args: Any, _base: Any = base_call, **kwargs: Any) -> Any:
            def inner(params: Any, *a: Any, **kw: Any) -> Any:
                self.update(params)
                return _base(self, *a, **kw)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        block.__class__ = type(cls.__name__, (cls,), {"__call__": call, "_qlocal_checkpointed": True})


def _loss_sum(model: Any, ids: Any, weights: Any) -> Any:
    """Summed next-token CE over targets: logits[t] predicts ids[t+1], weighted by loss_mask[t+1]."""
    mx, nn, _ = _mlx()
    logits = model(ids[:, :-1]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="none")
    return (ce * weights).sum()


class MLXBackend:
    """Trains a LoRA adapter on an mlx-lm model; writes and reads PEFT adapters."""

    name = "mlx"

    def __init__(self) -> None:
        self.model: Any = None
        self.optimizer: Any = None
        self._fns: Any = None
        self.world = 1

    def setup(self, model_path: Path, cfg: Config) -> dict[str, Any]:
        mx, _, optim = _mlx()
        tc, lc = cfg.train, cfg.lora
        self.model, facts = load_mlx_model(model_path, tc.quantize, tc.dtype)
        mx.random.seed(tc.seed)  # LoRA A init draws from MLX's global key
        targets, layers = attach_lora(self.model, lc.rank, lc.alpha, lc.dropout, list(lc.target_modules), lc.layers)
        if tc.grad_checkpointing:
            _checkpoint_blocks(self.model)
        self.model.train()
        # bias_correction=True is torch's AdamW; mlx's default (False) would train differently.
        self.optimizer = optim.AdamW(learning_rate=tc.lr, weight_decay=tc.weight_decay, bias_correction=True)
        self.optimizer.init(self.model.trainable_parameters())
        self.seed, self.step, self.max_grad_norm = tc.seed, 0, tc.max_grad_norm
        from qlocal import distributed

        self.world = distributed.current().world if distributed.current().engine == "mlx" else 1
        self.adapter_config = adapters.peft_config(
            lc.rank, lc.alpha, targets, layers if len(layers) < len(self.model.layers) else None,
            str(model_path), lc.dropout)
        from mlx.utils import tree_flatten

        n_train = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        n_total = sum(v.size for _, v in tree_flatten(self.model.parameters()))
        mx.reset_peak_memory()
        device = "Apple GPU (Metal)" if mx.default_device() == mx.gpu else "cpu"
        return {"device": device, "dtype": facts["dtype"], "quantization": facts["quantization"],
                "world_size": self.world, "target_modules": targets, "layers_adapted": layers,
                "trainable_params": int(n_train), "total_params": int(n_total)}

    # -- compiled step pieces ------------------------------------------------------------------

    def _compiled(self) -> tuple[Any, Any, Any]:
        """(grad_fn, apply_fn, step_fn) compiled once per optimizer-state object (rebuilt after load_state).

        step_fn fuses forward, backward, clipping and the update for the common one-micro-batch
        step; with accumulation, grad_fn runs per micro-batch and apply_fn once.
        """
        if self._fns is not None:
            return self._fns
        mx, nn, optim = _mlx()
        model, opt, max_norm, world = self.model, self.optimizer, self.max_grad_norm, self.world
        state = [model.state, opt.state, mx.random.state]

        def scaled(m: Any, ids: Any, w: Any, inv_total: Any) -> Any:
            return _loss_sum(m, ids, w) * inv_total

        value_and_grad = nn.value_and_grad(model, scaled)

        def apply(grads: Any) -> Any:
            if world > 1:
                # Each rank's loss is scaled by world / global targets, so the mean is the global gradient.
                grads = nn.average_gradients(grads)
            if max_norm > 0:
                grads, norm = optim.clip_grad_norm(grads, max_norm)
            else:
                norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for g in _leaves(grads)))
            opt.update(model, grads)
            return norm

        def step(ids: Any, w: Any, inv_total: Any) -> tuple[Any, Any]:
            loss, grads = value_and_grad(model, ids, w, inv_total)
            return loss, apply(grads)

        compile_ = partial(mx.compile, inputs=state, outputs=state)
        self._fns = (compile_(lambda ids, w, inv: value_and_grad(model, ids, w, inv)), compile_(apply), compile_(step))
        return self._fns

    def _arrays(self, batch: Batch) -> tuple[Any, Any]:
        """(ids int32, target weights float32) with the width rounded up; the extra is masked out."""
        mx, _, _ = _mlx()
        ids, mask = batch["input_ids"], batch["loss_mask"]
        b, t = ids.shape
        width = -(-t // PAD_MULTIPLE) * PAD_MULTIPLE
        # Right padding never changes earlier positions under a causal mask, and carries no loss.
        pad_ids = np.zeros((b, width), np.int32)
        pad_ids[:, :t] = ids
        w = np.zeros((b, width - 1), np.float32)
        w[:, : t - 1] = mask[:, 1:]
        return mx.array(pad_ids), mx.array(w)

    def train_step(self, micro_batches: list[Batch], lr: float) -> StepStats:
        mx, _, _ = _mlx()
        from mlx.utils import tree_map

        from qlocal import distributed

        grad_fn, apply_fn, step_fn = self._compiled()
        total = sum(int(b["loss_mask"][:, 1:].sum()) for b in micro_batches)
        if self.world > 1:
            # The loss is token-weighted over the global batch: every rank divides by all ranks' targets.
            (total,) = distributed.all_sum([float(total)])
        inv_total = mx.array(self.world / max(total, 1), mx.float32)
        self.optimizer.learning_rate = lr
        # Dropout masks are a pure function of (seed, step): resume needs no saved RNG state.
        mx.random.seed(self.seed * 1_000_003 + self.step)
        if len(micro_batches) == 1:
            loss, norm = step_fn(*self._arrays(micro_batches[0]), inv_total)
        else:
            loss, grads = None, None
            for batch in micro_batches:
                part, g = grad_fn(*self._arrays(batch), inv_total)
                # Lazy sums: nothing is evaluated until the single mx.eval below (no per-batch host sync).
                loss = part if loss is None else loss + part
                grads = g if grads is None else tree_map(lambda x, y: x + y, grads, g)
            norm = apply_fn(grads)
        if self.world > 1:
            loss = mx.distributed.all_sum(loss) / self.world
        mx.eval(loss, norm, self.model.state, self.optimizer.state)
        self.step += 1
        return StepStats(loss=float(loss), grad_norm=float(norm))

    def eval_loss(self, batches: list[Batch]) -> tuple[float, int]:
        mx, _, _ = _mlx()
        self.model.eval()
        total, count = 0.0, 0
        for batch in batches:
            ids, w = self._arrays(batch)
            total += float(_loss_sum(self.model, ids, w))
            count += int(batch["loss_mask"][:, 1:].sum())
        self.model.train()
        if self.world > 1:
            from qlocal import distributed

            total, count_f = distributed.all_sum([total, float(count)])
            count = int(count_f)
        return total, count

    # -- adapters and checkpoints --------------------------------------------------------------

    def lora_weights(self) -> dict[str, np.ndarray]:
        """The trained LoRA tensors, MLX-named and float32 numpy."""
        mx, _, _ = _mlx()
        from mlx.utils import tree_flatten

        return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(self.model.trainable_parameters())}

    def save_adapter(self, path: Path) -> None:
        adapters.write_peft_adapter(path, self.adapter_config, adapters.mlx_to_peft(self.lora_weights()))

    def save_state(self, path: Path) -> None:
        mx, _, _ = _mlx()
        from mlx.utils import tree_flatten

        state = dict(tree_flatten(self.optimizer.state))
        mx.save_safetensors(str(path / _STATE_FILE), state, metadata={"qlocal_step": str(self.step)})

    def load_state(self, path: Path) -> None:
        mx, _, _ = _mlx()
        from mlx.utils import tree_flatten, tree_unflatten

        ckpt_cfg, peft_weights = adapters.read_peft_adapter(path / "adapter")
        weights = adapters.peft_to_mlx(peft_weights)
        own = dict(tree_flatten(self.model.trainable_parameters()))
        if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
            raise UserError(f"{path}: checkpoint does not match this model/LoRA setup")
        self.model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=False)
        saved, meta = mx.load(str(path / _STATE_FILE), return_metadata=True)
        current = dict(tree_flatten(self.optimizer.state))
        if set(saved) != set(current):
            raise UserError(f"{path}: optimizer state does not match this model/LoRA setup")
        self.optimizer.state = tree_unflatten(list(saved.items()))
        self.step = int(meta.get("qlocal_step", int(saved["step"].item())))
        self._fns = None  # compiled functions captured the old state tree
        mx.eval(self.model.parameters(), self.optimizer.state)

    def peak_memory_mb(self) -> float:
        mx, _, _ = _mlx()
        peak = mx.get_peak_memory()  # MLX's allocator peak: Metal on a Mac, the CPU heap on mlx[cpu]
        if peak > 0:
            return peak / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _leaves(tree: Any) -> list[Any]:
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]
