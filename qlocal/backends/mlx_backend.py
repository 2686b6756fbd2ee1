"""MLX backend: mlx-lm model code, LoRA / QLoRA (affine 4- or 8-bit) on Apple Silicon or mlx[cpu].

Only the model classes and LoRALinear come from mlx-lm; data, loss, schedule and checkpoints are
qlocal's, so the same Examples and the same loss contract as the torch backend apply (base.py).
Adapters are converted to PEFT on save and from PEFT on load (qlocal.adapters). Loading,
generation and the adapter switch are in mlx_infer.py.

Under mlx.launch every rank holds the whole model and its shard of each global batch; gradients are
averaged across ranks (mlx.nn.average_gradients) inside the compiled step, so every rank takes the
same update (qlocal.distributed).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from qlocal import adapters
from qlocal.backends import mlx_infer, mlx_loss, mlx_packing
from qlocal.backends.base import NEVER_ADAPT, Batch, Sampling, StepStats
from qlocal.backends.mlx_infer import import_mlx as _mlx
from qlocal.backends.mlx_infer import load_mlx_model
from qlocal.config import Config
from qlocal.distributed import Dist
from qlocal.errors import UserError
from qlocal.memory import peak_rss_mb
from qlocal.objectives import SFT, Objective, row_fields

PAD_MULTIPLE = mlx_packing.PAD_MULTIPLE  # widths are rounded up so mx.compile sees few distinct shapes
_STATE_FILE = "mlx_optimizer.safetensors"


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
    # A MoE router (mlx-lm's `gate` beside `switch_mlp`) is no nn.Linear in transformers 5, so PEFT
    # cannot adapt it: it is left out here too, and the adapter stays loadable on torch.
    routers = {f"{k}.gate" for b in blocks for k, m in b.named_modules() if hasattr(m, "switch_mlp")}
    every = {k for b in blocks for k, m in b.named_modules() if isinstance(m, linear)} - routers
    if targets == ["all-linear"]:
        chosen = {k for k in every if k.rsplit(".", 1)[-1] not in NEVER_ADAPT}
    else:
        chosen = {k for k in every for t in targets if k == t or k.endswith("." + t)}
        unknown = [t for t in targets if not any(k == t or k.endswith("." + t) for k in every)]
        if unknown:
            leaves = sorted({k.rsplit(".", 1)[-1] for k in every})
            moe = "; LoRA on MoE experts trains on the torch backend only" if routers else ""
            raise UserError(f"lora.target_modules: {', '.join(unknown)} not found in the model's blocks "
                            f"(linear layers there: {', '.join(leaves)}){moe}")
    first = len(blocks) - layers if layers is not None and layers < len(blocks) else 0
    for block in blocks[first:]:
        wrapped = [(k, LoRALinear.from_base(m, r=rank, dropout=dropout, scale=alpha / rank))
                   for k, m in block.named_modules() if k in chosen]
        block.update_modules(tree_unflatten(wrapped))
    return sorted({k.rsplit(".", 1)[-1] for k in chosen}), list(range(first, len(blocks)))


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


def _target_logprobs(model: Any, ids: Any, aux: dict[str, Any] | None = None, plan: Any = None) -> Any:
    """The one place this backend computes target log-probs: (B, T-1) float32, logp[:, t] =
    log p(ids[:, t+1] | ids[:, :t+1]); the objective masks them (objectives.py).

    With `aux` (from `_arrays`) and the model's `plan`, only the target positions are scored, the
    head in checkpointed chunks, on packed rows where aux holds positions (mlx_loss); 0 elsewhere.
    Without, every position, through the model's own call."""
    mx, nn, _ = _mlx()
    if aux is not None:
        return mlx_loss.target_logprobs(model, ids, aux, plan)
    logits = model(ids[:, :-1]).astype(mx.float32)
    return -nn.losses.cross_entropy(logits, ids[:, 1:], reduction="none")


class MLXBackend:
    """Trains a LoRA adapter on an mlx-lm model; writes and reads PEFT adapters."""

    name = "mlx"
    supports_packing = True  # packed rows through a mask-and-positions cache (mlx_packing)

    def __init__(self) -> None:
        self.model: Any = None
        self.optimizer: Any = None
        self._fns: Any = None
        self.world = 1
        self._lora_scales: dict[str, float] | None = None
        """The LoRA scales while the adapter is switched off; None while it is on."""
        self._plan: Any = None
        """mlx_loss.Plan of the loaded model: head split, packing, loss chunk."""

    def init_distributed(self) -> Dist:
        from qlocal import distributed

        return distributed.init_mlx()

    def setup(self, model_path: Path, cfg: Config) -> dict[str, Any]:
        mx, _, optim = _mlx()
        tc, lc = cfg.train, cfg.lora
        self.model, facts = load_mlx_model(model_path, tc.quantize, tc.dtype)
        mx.random.seed(tc.seed)  # LoRA A init draws from MLX's global key
        targets, layers = attach_lora(self.model, lc.rank, lc.alpha, lc.dropout, list(lc.target_modules), lc.layers)
        token_rows = None
        if lc.new_tokens:  # added special tokens: their embedding (and head) rows train too
            from qlocal.backends import mlx_tokens
            from qlocal.hf import add_special_tokens, load_tokenizer

            ids = add_special_tokens(load_tokenizer(model_path, cfg.model.trust_remote_code), list(lc.new_tokens))
            token_rows = mlx_tokens.token_indices(self.model, ids)
            mlx_tokens.attach_token_rows(self.model, token_rows)
        self._plan = mlx_loss.plan_for(self.model, tc.loss_chunk)
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
            str(model_path), lc.dropout, token_rows)
        from mlx.utils import tree_flatten

        n_train = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        n_total = sum(v.size for _, v in tree_flatten(self.model.parameters()))
        mx.reset_peak_memory()
        device = "Apple GPU (Metal)" if mx.default_device() == mx.gpu else "cpu"
        return {"device": device, "dtype": facts["dtype"], "quantization": facts["quantization"],
                "world_size": self.world, "target_modules": targets, "layers_adapted": layers,
                "trainable_params": int(n_train), "total_params": int(n_total)}

    # -- compiled step pieces ------------------------------------------------------------------

    def _compiled(self, objective: Objective) -> tuple[Any, Any, Any]:
        """(grad_fn, apply_fn, step_fn) compiled once per objective and optimizer-state object
        (rebuilt after load_state).

        step_fn fuses forward, objective, backward, clipping and the update for the common
        one-micro-batch step; with accumulation, grad_fn runs per micro-batch and apply_fn once.
        """
        if self._fns is not None and self._fns[0] == objective:
            return self._fns[1]
        mx, nn, optim = _mlx()
        model, opt, max_norm, world = self.model, self.optimizer, self.max_grad_norm, self.world
        state = [model.state, opt.state, mx.random.state]

        plan = self._plan

        def scaled(m: Any, ids: Any, w: Any, rows: Any, aux: Any, inv_total: Any) -> tuple[Any, dict[str, Any]]:
            loss, metrics = objective.loss(_target_logprobs(m, ids, aux, plan), w, rows, mx)
            return loss * inv_total, {k: v * inv_total for k, v in metrics.items()}

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

        def step(ids: Any, w: Any, rows: Any, aux: Any, inv_total: Any) -> tuple[Any, Any, Any]:
            (loss, metrics), grads = value_and_grad(model, ids, w, rows, aux, inv_total)
            return loss, metrics, apply(grads)

        def grad(ids: Any, w: Any, rows: Any, aux: Any, inv_total: Any) -> Any:
            return value_and_grad(model, ids, w, rows, aux, inv_total)

        compile_ = partial(mx.compile, inputs=state, outputs=state)
        fns = (compile_(grad), compile_(apply), compile_(step))
        self._fns = (objective, fns)
        return fns

    def _arrays(self, batch: Batch) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
        """(ids int32, target weights float32, per-row fields, aux) for the step: padded rows
        right-padded to a multiple of 16 (the extra is masked out), packed batches laid out in rows
        of one width (mlx_packing.layout); aux names the target positions (count bucketed)."""
        mx, _, _ = _mlx()
        if self._plan is None:
            self._plan = mlx_loss.plan_for(self.model, 1024)
        arrays = mlx_packing.layout(batch, self._plan.pack)
        sel, valid = mlx_loss.target_rows(arrays["w"])
        aux = {"sel": mx.array(sel), "valid": mx.array(valid)}
        if "pos" in arrays:
            aux.update(pos=mx.array(arrays["pos"]), seg=mx.array(arrays["seg"]))
        rows = {k: mx.array(v) for k, v in row_fields(batch).items()}
        return mx.array(arrays["ids"]), mx.array(arrays["w"]), rows, aux

    def train_step(self, micro_batches: list[Batch], lr: float, objective: Objective = SFT()) -> StepStats:
        mx, _, _ = _mlx()
        from mlx.utils import tree_map

        from qlocal import distributed

        grad_fn, apply_fn, step_fn = self._compiled(objective)
        total = sum(objective.count(b) for b in micro_batches)
        if self.world > 1:
            # The loss is weighted over the global batch: every rank divides by all ranks' count.
            (total,) = distributed.all_sum([float(total)])
        inv_total = mx.array(self.world / max(total, 1), mx.float32)
        self.optimizer.learning_rate = lr
        # Dropout masks are a pure function of (seed, step): resume needs no saved RNG state.
        mx.random.seed(self.seed * 1_000_003 + self.step)
        if len(micro_batches) == 1:
            loss, metrics, norm = step_fn(*self._arrays(micro_batches[0]), inv_total)
        else:
            loss, metrics, grads = None, None, None
            for batch in micro_batches:
                (part, m), g = grad_fn(*self._arrays(batch), inv_total)
                # Lazy sums: nothing is evaluated until the single mx.eval below (no per-batch host sync).
                loss = part if loss is None else loss + part
                metrics = m if metrics is None else tree_map(lambda x, y: x + y, metrics, m)
                grads = g if grads is None else tree_map(lambda x, y: x + y, grads, g)
            norm = apply_fn(grads)
        if self.world > 1:
            loss = mx.distributed.all_sum(loss) / self.world
            metrics = {k: mx.distributed.all_sum(v) / self.world for k, v in metrics.items()}
        mx.eval(loss, norm, metrics, self.model.state, self.optimizer.state)
        self.step += 1
        return StepStats(loss=float(loss), grad_norm=float(norm), metrics={k: float(v) for k, v in metrics.items()})

    def eval_loss(self, batches: list[Batch], objective: Objective = SFT()) -> tuple[float, int]:
        mx, _, _ = _mlx()
        self.model.eval()
        total, count = 0.0, 0
        for batch in batches:
            ids, w, rows, aux = self._arrays(batch)
            loss, _ = objective.loss(_target_logprobs(self.model, ids, aux, self._plan), w, rows, mx)
            total += float(loss)
            count += objective.count(batch)
        self.model.train()
        if self.world > 1:
            from qlocal import distributed

            total, count_f = distributed.all_sum([total, float(count)])
            count = int(count_f)
        return total, count

    def sequence_logprobs(self, batch: Batch) -> np.ndarray:
        mx, _, _ = _mlx()
        # Outside the compiled step: it reads the LoRA scales as they are now (0 with the adapter off).
        was_training = self.model.training
        self.model.eval()
        try:
            ids, w, _, aux = self._arrays({k: v for k, v in batch.items() if k in ("input_ids", "loss_mask")})
            scores = (mx.stop_gradient(_target_logprobs(self.model, ids, aux, self._plan)) * w).sum(axis=-1)
            mx.eval(scores)
        finally:
            self.model.train(was_training)
        return np.array(scores, dtype=np.float32)

    # -- inference and the adapter switch (mlx_infer) -----------------------------------------

    def load_for_inference(self, model_path: Path, adapter: Path | None, cfg: Config) -> None:
        self.model, _ = load_mlx_model(model_path, cfg.train.quantize)
        self._lora_scales = None
        if adapter is not None:
            mlx_infer.load_peft_adapter_into_mlx(self.model, adapter)
        self._plan = mlx_loss.plan_for(self.model, cfg.train.loss_chunk)

    def load_adapter(self, path: Path) -> None:
        self.set_adapter_enabled(True)  # the adapter's own scales replace the saved ones
        mlx_infer.load_peft_adapter_into_mlx(self.model, path)

    def set_adapter_enabled(self, enabled: bool) -> None:
        """Off = every LoRA scale 0 (exactly the base); on = the scales saved when switched off."""
        from qlocal.backends.mlx_tokens import set_rows_enabled

        if not enabled and self._lora_scales is None:
            self._lora_scales = mlx_infer.lora_scales(self.model)
            mlx_infer.set_lora_scales(self.model, dict.fromkeys(self._lora_scales, 0.0))
        elif enabled and self._lora_scales is not None:
            mlx_infer.set_lora_scales(self.model, self._lora_scales)
            self._lora_scales = None
        set_rows_enabled(self.model, enabled)  # added tokens' rows: the ones training started from

    def stream(self, prompt: list[int], tokenizer: Any, stop_ids: list[int], sampling: Sampling) -> Iterator[str]:
        return mlx_infer.stream(self.model, tokenizer, prompt, stop_ids, sampling)

    # -- adapters and checkpoints --------------------------------------------------------------

    def lora_weights(self) -> dict[str, np.ndarray]:
        """The trained LoRA tensors, MLX-named and float32 numpy."""
        mx, _, _ = _mlx()
        from mlx.utils import tree_flatten

        return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(self.model.trainable_parameters())}

    def gather_state(self) -> None:
        """Nothing to gather: under mlx.launch every rank holds the whole adapter and optimizer."""

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
        return peak_rss_mb()


def _leaves(tree: Any) -> list[Any]:
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]
