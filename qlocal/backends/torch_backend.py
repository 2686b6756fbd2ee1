"""PyTorch backend: transformers + PEFT LoRA, bitsandbytes NF4/int8 for QLoRA, on CUDA or CPU."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from qlocal.backends import torch_fused, torch_infer
from qlocal.backends.torch_dtype import pick_dtype
from qlocal.backends.base import NEVER_ADAPT, Batch, Sampling, StepStats
from qlocal.config import Config
from qlocal.distributed import Dist
from qlocal.errors import UserError, missing_extra
from qlocal.memory import peak_rss_mb
from qlocal.objectives import SFT, TOKEN_FIELDS, Objective, row_fields


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise missing_extra("torch", "torch") from None
    return torch


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of every linear layer inside the transformer blocks (what `all-linear` means)."""
    torch = _import_torch()
    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    head = model.get_output_embeddings()
    names = set()
    for full, module in model.named_modules():
        if isinstance(module, linear_types) and module is not head:
            leaf = full.rsplit(".", 1)[-1]
            if leaf not in NEVER_ADAPT:
                names.add(leaf)
    return sorted(names)


def _cuda_kernels(model_path: Path) -> list[str]:
    """Apply the optional CUDA kernels that are installed; return their names for config.yaml.

    Liger patches the transformers modeling classes before the model is built (RMSNorm, SwiGLU,
    RoPE; its fused linear cross-entropy is not used: our head + loss runs on target rows only).
    """
    import importlib.util
    import json

    used = []
    if importlib.util.find_spec("flash_attn") is not None:
        used.append("flash_attention_2")
    model_type = json.loads((Path(model_path) / "config.json").read_text()).get("model_type", "")
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel import transformers as liger

        patch = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
        if patch is not None:
            patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
            used.append("liger")
    return used


def num_layers(model: Any) -> int:
    cfg = model.config
    return int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg.get_text_config(), "num_hidden_layers"))


def chunked_target_logprobs(h: Any, targets: Any, head: Any, softcap: float | None, chunk: int,
                            divisor: float | None = None) -> Any:
    """log softmax(head(h))[targets] per row (float32, shape (n,)), `chunk` rows at a time.

    `divisor`: logits are divided by it first (Granite's `logits_scaling`, which HF applies after
    the head; skipping it would train a sharper distribution than the model computes).

    Each chunk's logits are recomputed in the backward pass (checkpointed), so full-vocabulary
    logits never exist for more than `chunk` positions: with Gemma's 262k vocabulary that is the
    difference between megabytes and gigabytes.
    """
    torch = _import_torch()
    from torch.utils.checkpoint import checkpoint

    def piece(hc: Any, tc: Any) -> Any:
        logits = head(hc).float()
        if divisor:
            logits = logits / divisor
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return -torch.nn.functional.cross_entropy(logits, tc, reduction="none")

    if chunk <= 0 or h.shape[0] <= chunk:
        return piece(h, targets)
    parts = []
    for i in range(0, h.shape[0], chunk):
        hc, tc = h[i:i + chunk], targets[i:i + chunk]
        parts.append(checkpoint(piece, hc, tc, use_reentrant=False) if torch.is_grad_enabled() else piece(hc, tc))
    return torch.cat(parts)


@contextlib.contextmanager
def _no_dropout(model: Any) -> Iterator[None]:
    """Eval mode for a pass without gradients, except bitsandbytes 4-bit layers: on CPU their
    eval-mode forward repacks the weights for inference for good, and training on them then fails."""
    was_training = model.training
    model.eval()
    try:
        import bitsandbytes as bnb

        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.train(was_training)
    except ImportError:
        pass
    try:
        yield
    finally:
        model.train(was_training)


_FUSED_NAMES = {"head": "head_loss_grad_in_forward", "attention": "packed_per_example_sdpa", "adamw": "fused_adamw",
                "lora": "fused_lora_linear"}


def _logprob_module(peft_model: Any, chunk: int, fused_head: bool = False, packed_attention: bool = False) -> Any:
    """The one place this backend computes target log-probs: a module, so DDP/FSDP can wrap it.

    forward(batch) -> (B, T-1) float32: log p(ids[:, t+1] | ids[:, :t+1]) where loss_mask[:, t+1]
    is set, 0 elsewhere. The head runs only on those positions, in chunks (chunked_target_logprobs,
    or torch_fused's head with its gradient taken in the forward when `fused_head`); packed rows
    attend per example (torch_fused) when `packed_attention`.
    """
    torch = _import_torch()

    class TargetLogprobs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = peft_model

        def forward(self, t: dict[str, Any]) -> Any:
            ids, mask = t["input_ids"], t["loss_mask"]
            base = self.model.get_base_model()
            if "position_ids" in t:  # packed: no 2-D mask, so transformers builds a per-example causal mask
                pos = t["position_ids"]
                with torch_fused.packed_forward(pos) if packed_attention else contextlib.nullcontext({}) as kw:
                    out = base.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False, **kw)
            else:
                out = base.get_decoder()(input_ids=ids, attention_mask=t["attention_mask"], use_cache=False)
            select = mask[:, 1:].bool()
            h = out.last_hidden_state[:, :-1][select]
            cap = getattr(base.config, "final_logit_softcapping", None)
            head, scaling = base.get_output_embeddings(), getattr(base.config, "logits_scaling", None)
            if fused_head and torch_fused.head_is_fusable(head):
                rows = torch_fused.chunk_rows(chunk, head.weight.shape[0])
                logp = torch_fused.fused_target_logprobs(h, ids[:, 1:][select], head, cap, rows, scaling)
            else:
                logp = chunked_target_logprobs(h, ids[:, 1:][select], head, cap, chunk, scaling)
            return logp.new_zeros(select.shape).masked_scatter(select, logp)

    return TargetLogprobs()


class TorchBackend:
    """Trains a PEFT LoRA adapter on a transformers causal LM."""

    name = "torch"
    supports_packing = True

    def __init__(self) -> None:
        self.model: Any = None
        self.fsdp = False
        self.optimizer: Any = None
        self.device = "cpu"

    def init_distributed(self) -> Dist:
        from qlocal import distributed

        if distributed.launched_by_mlx():
            raise UserError("launched by mlx.launch, which starts MLX ranks; the torch backend runs under "
                            "torchrun or accelerate launch (or use --backend mlx)")
        return distributed.init_torch()

    def setup(self, model_path: Path, cfg: Config) -> dict[str, Any]:
        torch = _import_torch()
        from qlocal.hf import quiet_bitsandbytes, quiet_transformers

        quiet_bitsandbytes()  # before peft imports bitsandbytes, which warns at import
        try:
            import peft
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise missing_extra("peft", "torch") from None

        quiet_transformers()
        from qlocal import distributed

        tc, lc = cfg.train, cfg.lora
        self.dist = distributed.current()
        self.fsdp = self.dist.enabled and tc.distributed == "fsdp"
        self._gathered: tuple[dict[str, Any], dict[str, Any]] | None = None
        if self.fsdp and tc.quantize != "none":
            raise UserError(f"train.distributed=fsdp shards 16-bit LoRA; --quantize {tc.quantize} (QLoRA) "
                            "runs with train.distributed=ddp")
        self.device = f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu"
        dtype, dtype_reason = pick_dtype(tc.dtype, self.device.split(":")[0])
        if self.device == "cpu" and dtype == torch.float16:
            raise UserError("train.dtype=float16 is not supported on CPU; use float32 or bfloat16")
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code}
        cuda = self.device.startswith("cuda")
        kernels = _cuda_kernels(model_path) if cuda and tc.fused_kernels else []
        # torch's default (OMP_NUM_THREADS, else every core) unless set: a guess from the load average
        # starved a dedicated box whenever the process before had just finished
        if not cuda and tc.cpu_threads:
            torch.set_num_threads(tc.cpu_threads)
        if "flash_attention_2" in kernels:
            kwargs["attn_implementation"] = "flash_attention_2"  # varlen: packed rows without a T x T mask
        if tc.quantize != "none":
            kwargs["quantization_config"] = self._bnb_config(tc.quantize, dtype)
            kwargs["device_map"] = {"": self.device}
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
        token_rows = None
        if lc.new_tokens:  # added special tokens: a larger vocabulary and their rows trained
            from qlocal.backends.torch_tokens import prepare_rows
            from qlocal.hf import add_special_tokens, load_tokenizer

            if self.fsdp:
                raise UserError("lora.new_tokens (trained rows of added tokens) runs with train.distributed=ddp, "
                                "not fsdp")
            tok = load_tokenizer(model_path, cfg.model.trust_remote_code)
            token_rows = prepare_rows(model, add_special_tokens(tok, list(lc.new_tokens)))
        if tc.quantize == "none" and not self.fsdp:
            model.to(self.device)  # FSDP moves each layer to the device as it shards it
        model.config.use_cache = False
        for p in model.parameters():
            p.requires_grad_(False)
        fused = set() if not tc.fused_kernels else {"head", "attention", "adamw", "lora"} - torch_fused.DISABLED
        if "attention" in fused and not (tc.packing and torch_fused.enable_packed_attention(model)):
            fused.discard("attention")
        if self.fsdp:
            fused -= {"adamw", "lora"}  # the fused kernels take plain tensors, not FSDP's DTensors
        if tc.quantize != "none":
            # Casts norms to fp32 and enables input grads, as QLoRA expects.
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=tc.grad_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        elif tc.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()

        targets = linear_module_names(model) if lc.target_modules == ["all-linear"] else list(lc.target_modules)
        layers_total = num_layers(model)
        layers = None
        if lc.layers is not None and lc.layers < layers_total:
            layers = list(range(layers_total - lc.layers, layers_total))
        lora = peft.LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                               target_modules=targets, layers_to_transform=layers, bias="none",
                               task_type="CAUSAL_LM", trainable_token_indices=token_rows)
        torch.manual_seed(tc.seed)  # LoRA A init draws from the global RNG
        try:
            self.model = peft.get_peft_model(model, lora)
        except ValueError as e:
            raise UserError(f"lora.target_modules: {e}") from None
        self.model.train()
        if "lora" in fused and not torch_fused.fuse_lora(self.model):
            fused.discard("lora")  # no LoRA layer over a plain nn.Linear (QLoRA's are bitsandbytes layers)
        self.logprob_fn = _logprob_module(self.model, tc.loss_chunk, "head" in fused, "attention" in fused)
        if self.fsdp:
            from qlocal.backends import torch_fsdp

            self.logprob_fn = torch_fsdp.shard(self.logprob_fn, model, self.device, dtype)
        elif self.dist.enabled:
            # DDP all-reduces the LoRA gradients during backward; frozen weights are not touched.
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.local_rank] if self.device.startswith("cuda") else None
            self.logprob_fn = DistributedDataParallel(self.logprob_fn, device_ids=ids)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # One fused kernel for every LoRA tensor instead of a dozen ops per tensor per step.
        self.optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused="adamw" in fused)
        self.max_grad_norm = tc.max_grad_norm
        self.dtype = dtype
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        return {
            "device": self.device.split(":")[0],
            "world_size": self.dist.world,
            "distributed": ("fsdp" if self.fsdp else "ddp") if self.dist.enabled else "none",
            "fused_kernels": kernels + [_FUSED_NAMES[k] for k in sorted(fused)],
            "dtype": str(dtype).replace("torch.", ""),
            "dtype_reason": dtype_reason,
            "cpu_threads": None if cuda else torch.get_num_threads(),
            "target_modules": targets,
            "layers_adapted": layers or list(range(layers_total)),
            "trainable_params": int(sum(p.numel() for p in params)),
            "total_params": int(sum(p.numel() for p in self.model.parameters())),
        }

    @staticmethod
    def _bnb_config(quantize: str, dtype: Any) -> Any:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise missing_extra("bitsandbytes", "torch") from None
        if quantize == "4bit":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        return BitsAndBytesConfig(load_in_8bit=True)

    def _tensors(self, batch: Batch) -> dict[str, Any]:
        torch = _import_torch()
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in batch.items()}

    def _summed_loss(self, batch: Batch, objective: Objective = SFT()) -> tuple[Any, dict[str, Any]]:
        """The objective's (summed loss, summed metrics) on this batch's target log-probs."""
        torch = _import_torch()
        t = self._tensors(batch)
        logp = self.logprob_fn(t)
        return objective.loss(logp, t["loss_mask"][:, 1:].to(logp.dtype), row_fields(t), torch)

    def train_step(self, micro_batches: list[Batch], lr: float, objective: Objective = SFT()) -> StepStats:
        """Weighted by the objective's count over the global batch (SFT: tokens): with N ranks each
        backward uses N * loss / all ranks' count, and DDP's gradient average turns that into the
        single-process gradient."""
        import contextlib

        torch = _import_torch()
        from qlocal import distributed

        (total,) = distributed.all_sum([float(sum(objective.count(b) for b in micro_batches))])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, metric_sums = 0.0, {}  # type: dict[str, float]
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            if self.fsdp:
                self.logprob_fn.set_requires_gradient_sync(last)  # reduce-scatter once, after the last micro-batch
                sync: Any = contextlib.nullcontext()
            else:
                sync = contextlib.nullcontext() if last or not self.dist.enabled else self.logprob_fn.no_sync()
            with sync:
                loss, metrics = self._summed_loss(batch, objective)
                (loss * self.dist.world / max(total, 1.0)).backward()
            loss_sum += float(loss.detach())
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v.detach())
        loss_sum, *sums = distributed.all_sum([loss_sum, *metric_sums.values()])
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
        if math.isfinite(grad_norm):  # a non-finite step would poison the weights; the loop stops the run
            self.optimizer.step()
        means = {k: v / max(total, 1.0) for k, v in zip(metric_sums, sums)}
        return StepStats(loss=loss_sum / max(total, 1.0), grad_norm=grad_norm, metrics=means)

    def eval_loss(self, batches: list[Batch], objective: Objective = SFT()) -> tuple[float, int]:
        torch = _import_torch()
        from qlocal import distributed

        total, count = 0.0, 0
        with torch.no_grad(), _no_dropout(self.model):
            for batch in batches:
                loss, _ = self._summed_loss(batch, objective)
                total += float(loss)
                count += objective.count(batch)
        total, count_f = distributed.all_sum([total, float(count)])
        return total, int(count_f)

    def sequence_logprobs(self, batch: Batch) -> np.ndarray:
        torch = _import_torch()
        # DDP's wrapper would broadcast buffers (a collective); FSDP's must run to gather the shards.
        fn = self.logprob_fn if self.fsdp else getattr(self.logprob_fn, "module", self.logprob_fn)
        with torch.no_grad(), _no_dropout(self.model):
            t = self._tensors({k: v for k, v in batch.items() if k in TOKEN_FIELDS})
            scores = (fn(t) * t["loss_mask"][:, 1:]).sum(-1)
        return scores.float().cpu().numpy()

    def gather_state(self) -> None:
        """Under FSDP, gather the full LoRA weights and optimizer state; every rank must call it
        before rank 0 saves (the gathers are collectives). A no-op otherwise."""
        if not self.fsdp:
            return
        from qlocal.backends import torch_fsdp

        lora, optim = torch_fsdp.gather(self.model, self.logprob_fn, self.optimizer)
        self._gathered = (lora, optim)

    def _full_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The FSDP state gather_state() collected (full LoRA weights, full optimizer state)."""
        if self._gathered is None:
            raise RuntimeError("TorchBackend under FSDP saves only after gather_state() on every rank")
        return self._gathered

    def save_adapter(self, path: Path) -> None:
        if self.fsdp:
            self.model.save_pretrained(str(path), safe_serialization=True, state_dict=self._full_state()[0])
            return
        # Trained token rows are saved as rows; never the whole (resized) embedding and head.
        self.model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)

    def save_state(self, path: Path) -> None:
        torch = _import_torch()
        optim = self._full_state()[1] if self.fsdp else self.optimizer.state_dict()
        torch.save(optim, path / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, path / "rng.pt")

    def load_state(self, path: Path) -> None:
        torch = _import_torch()
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.fsdp:
            self._load_state_fsdp(path)
            return
        weights = load_file(str(path / "adapter" / "adapter_model.safetensors"), device=self.device)
        result = set_peft_model_state_dict(self.model, weights)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise UserError(f"{path}: checkpoint does not match this model/LoRA setup (missing {missing[0]})")
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device))
        rng = torch.load(path / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _load_state_fsdp(self, path: Path) -> None:
        """Scatter the full checkpoint (adapter + optimizer) into this rank's shards; every rank reads it."""
        torch = _import_torch()
        from qlocal.backends import torch_fsdp

        torch_fsdp.load(self.model, self.logprob_fn, self.optimizer, path)
        rng = torch.load(path / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # -- inference and the adapter switch (torch_infer) ---------------------------------------

    def load_for_inference(self, model_path: Path, adapter: Path | None, cfg: Config) -> None:
        self.model, self.device = torch_infer.load_model(model_path, adapter, cfg.model.trust_remote_code)

    def load_adapter(self, path: Path) -> None:
        torch_infer.load_adapter(self.model, path, self.device)
        torch_infer.set_adapter_enabled(self.model, True)

    def set_adapter_enabled(self, enabled: bool) -> None:
        torch_infer.set_adapter_enabled(self.model, enabled)

    def stream(self, prompt: list[int], tokenizer: Any, stop_ids: list[int], sampling: Sampling) -> Iterator[str]:
        return torch_infer.stream(self.model, tokenizer, prompt, stop_ids, sampling)

    def peak_memory_mb(self) -> float:
        torch = _import_torch()
        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated() / 2**20
        return peak_rss_mb()

