"""Reference logits in bounded memory: transformers' own model, one decoder layer's weights at a time.

The model is built from its config with every parameter on the meta device (buffers, such as the
rotary frequencies of each layer type, are real). Forward hooks then give each decoder layer its
float32 weights from a tensor source just before it runs and drop them right after, the input
embedding gathers only the rows of the ids it is given, and the output head is replaced by one that
multiplies by the head's rows chunk by chunk. Everything else (masks, sliding windows, per-layer
rope, Granite's multipliers, Phi-3's LongRoPE, Gemma's embedding scale and softcapping, Granite's
logits_scaling) is the model's own forward, so the logits are transformers' computation for every
family while the process holds one layer, not the model.

Sources: a folder's safetensors (gguf.index_safetensors), the streamed fp32 merge (merge.py), or the
base with the LoRA adapter *unmerged*: y = W x + scale * B (A x) on each adapted Linear, as PEFT
computes it, which is the trained model (base + adapter in fp32) the export is judged against.

Greedy continuations (from a draft, then on a KV cache) are qlocal.export.ref_runs'; the weights
a layer reads land in reused buffers (qlocal.export.weight_pool), exactly as `read()` gives them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import re

import numpy as np

from qlocal.errors import missing_extra
from qlocal.export.ref_runs import _Runs
from qlocal.export.weight_pool import WeightPool

LoraPair = tuple[np.ndarray, np.ndarray, float]  # A (r, in), B (out, r), PEFT scale
_EXPERTS = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<proj>gate_up|down)_proj$")


class Unsupported(Exception):
    """The model's parameters do not map one to one onto the checkpoint's tensors (e.g. experts that
    transformers stacks at load time); callers fall back to loading the whole model."""


class LayerwiseLM(_Runs):
    """A causal LM whose weights stay on disk; `logits`/`greedy` run its own forward layer by layer.

    `tensors`: checkpoint name -> object with `.shape` and `.read(row_start, row_stop)` (float32
    rows), as gguf.StTensor and merge.MergedTensor. With `unmerge`, a MergedTensor's LoRA update on
    an nn.Linear (or the head) is applied unmerged, W x + scale * B (A x), as PEFT does; on any other
    parameter (experts stacked in 3-D) its fp32 merge is used."""

    def __init__(self, config_dir: Path, tensors: dict[str, Any], unmerge: bool = False) -> None:
        try:
            import torch
            from accelerate import init_empty_weights
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError:
            raise missing_extra("torch/accelerate", "torch") from None
        from qlocal.hf import quiet_transformers

        quiet_transformers()
        self.config = AutoConfig.from_pretrained(str(config_dir))
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        self.model = model.eval()
        self.mode = "layer by layer"
        self.tensors = dict(tensors)
        self._hooks: list[Any] = []
        self._pool = WeightPool()
        layers_name, layers = _decoder_layers(model, self.config)
        emb_name = _module_name(model, model.get_input_embeddings())
        head_name = _module_name(model, model.get_output_embeddings())
        self.lora: dict[str, LoraPair] = self._split_lora(model, head_name) if unmerge else {}
        self.vocab = int(tensors[self._key(f"{emb_name}.weight")].shape[0])
        for i, layer in enumerate(layers):
            self._hook_layer(layer, f"{layers_name}.{i}")
        self._hook_embedding(model.get_input_embeddings(), emb_name)
        head_key = f"{head_name}.weight"
        if head_key not in self.tensors:
            if not _tied(self.config):
                raise Unsupported(f"no tensor {head_key} and the embeddings are not tied")
            head_key = f"{emb_name}.weight"
        bias = self.tensors.get(f"{head_name}.bias")
        _set_module(model, head_name, _chunked_head(self.tensors[head_key], bias, self.lora.pop(head_name, None),
                                                    self._pool))
        # What is left outside the layers (final norm, ...) is small: load it once.
        inside = (f"{layers_name}.", f"{emb_name}.", f"{head_name}.")
        for name, _ in list(model.named_parameters()):
            if not name.startswith(inside):
                _set_param(model, name, self._read(name))
        self._hook_lora(model)

    # -- building ---------------------------------------------------------------------------------

    def _split_lora(self, model: Any, head_name: str) -> dict[str, LoraPair]:
        """Take the LoRA pairs of Linear modules out of the merged tensors (their base stays)."""
        import torch

        modules = dict(model.named_modules())
        lora = {}
        for key, t in list(self.tensors.items()):
            path = key.removesuffix(".weight")
            if getattr(t, "lora_a", None) is None or getattr(t, "token_rows", None) is not None or path == key:
                continue  # no LoRA, or trained token rows as well (then the merged values say both)
            if isinstance(modules.get(path), torch.nn.Linear) or path == head_name:
                lora[path] = (t.lora_a, t.lora_b, t.scale)
                self.tensors[key] = t.base
        return lora

    def _key(self, name: str) -> str:
        if name not in self.tensors and not self._experts(name):
            raise Unsupported(f"model parameter {name} has no tensor of that name in the checkpoint")
        return name

    def _experts(self, name: str) -> list[list[Any]] | None:
        """Per-expert checkpoint tensors of a parameter transformers stacks (E, out, in): one list of
        experts for down_proj, two (gate rows, then up rows) for gate_up_proj."""
        m = _EXPERTS.match(name)
        if m is None:
            return None
        projs = ("gate", "up") if m["proj"] == "gate_up" else ("down",)
        out = []
        for proj in projs:
            parts, e = [], 0
            while f"{m['prefix']}.{e}.{proj}_proj.weight" in self.tensors:
                parts.append(self.tensors[f"{m['prefix']}.{e}.{proj}_proj.weight"])
                e += 1
            if not parts:
                return None
            out.append(parts)
        return out

    def _read(self, name: str, pool_key: str | None = None) -> Any:
        """Parameter `name` as a float32 tensor; with `pool_key`, in the pool's buffer for that key
        (decoder layers: the buffer is the next layer's once this one has run)."""
        import torch

        if name not in self.tensors:
            groups = self._experts(self._key(name))
            stacks = [np.stack([t.read() for t in parts]) for parts in groups]  # type: ignore[union-attr]
            return torch.from_numpy(np.concatenate(stacks, axis=1) if len(stacks) > 1 else stacks[0])
        t = self.tensors[self._key(name)]
        # A LoRA-merged tensor is read by its own read(): the fp32-merge check then runs the very
        # code that feeds the GGUF writer, not the pool's copy of its arithmetic.
        own = pool_key is None or getattr(t, "lora_a", None) is not None
        x = t.read() if own else self._pool.read(pool_key, t)
        return torch.from_numpy(np.ascontiguousarray(x).reshape(t.shape))

    def _hook_layer(self, layer: Any, prefix: str) -> None:
        names = [n for n, _ in layer.named_parameters()]
        for n in names:
            self._key(f"{prefix}.{n}")

        def load(mod: Any, args: Any) -> None:
            for n in names:
                _set_param(mod, n, self._read(f"{prefix}.{n}", n))

        def drop(mod: Any, args: Any, out: Any) -> None:
            for n in names:
                _set_param(mod, n, None)

        self._hooks += [layer.register_forward_pre_hook(load), layer.register_forward_hook(drop)]

    def _hook_embedding(self, emb: Any, name: str) -> None:
        import torch

        src = self.tensors[self._key(f"{name}.weight")]
        padding_idx = getattr(emb, "padding_idx", None)

        def load(mod: Any, args: Any) -> tuple[Any, ...]:
            ids = args[0]
            uniq, inverse = torch.unique(ids, return_inverse=True)
            rows = [src.read(int(r), int(r) + 1) for r in uniq]
            _set_param(mod, "weight", torch.from_numpy(np.concatenate(rows, axis=0)))
            mod.padding_idx = None  # the gathered table is re-indexed; padding_idx only matters to gradients
            return (inverse.reshape(ids.shape), *args[1:])

        def drop(mod: Any, args: Any, out: Any) -> None:
            _set_param(mod, "weight", None, shape=(self.vocab, src.shape[1]))
            mod.padding_idx = padding_idx

        self._hooks += [emb.register_forward_pre_hook(load), emb.register_forward_hook(drop)]

    def _hook_lora(self, model: Any) -> None:
        import torch

        modules = dict(model.named_modules())
        for path, (a, b, scale) in self.lora.items():
            mod = modules[path]
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)

            def add(mod: Any, args: Any, out: Any, ta: Any = ta, tb: Any = tb, scale: float = scale) -> Any:
                # PEFT's order: base output + lora_B(lora_A(x)) * scaling.
                return out + torch.nn.functional.linear(torch.nn.functional.linear(args[0], ta), tb) * scale

            self._hooks.append(mod.register_forward_hook(add))

    def close(self) -> None:
        """Remove the hooks (the model holds no weights of its own)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._pool.clear()


def _chunked_head(weight: Any, bias: Any, lora: LoraPair | None, pool: WeightPool) -> Any:
    """A stand-in for the output Linear: logits = h W^T (+ b) with W read a row chunk at a time
    (merge.row_chunks' chunks, into the pool's buffer)."""
    import torch
    from torch.nn.functional import linear

    from qlocal.export.merge import CHUNK_BYTES

    n_rows = weight.shape[0]
    step = max(1, CHUNK_BYTES // (4 * int(np.prod(weight.shape[1:], dtype=np.int64))))

    class ChunkedHead(torch.nn.Module):
        def forward(self, h: Any) -> Any:
            out = h.new_empty(*h.shape[:-1], n_rows)
            for a in range(0, n_rows, step):
                w = torch.from_numpy(pool.read("head", weight, a, min(a + step, n_rows)))
                out[..., a: a + w.shape[0]] = linear(h, w)
            if bias is not None:
                out += torch.from_numpy(bias.read().reshape(-1))
            if lora is not None:
                la, lb, scale = lora
                out += linear(linear(h, torch.from_numpy(la)), torch.from_numpy(lb)) * scale
            return out

    return ChunkedHead()


class WholeLM(_Runs):
    """The same runs on a model loaded whole (the fallback where LayerwiseLM is Unsupported)."""

    def __init__(self, model: Any, reason: str) -> None:
        self.model = model.eval()
        self.config = model.config
        self.mode = f"whole model ({reason})"

    def close(self) -> None:
        """Free the model."""
        del self.model


# ---------------------------------------------------------------- helpers

def _decoder_layers(model: Any, config: Any) -> tuple[str, Any]:
    import torch

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return name, mod
    raise Unsupported(f"no list of {n} decoder layers in {type(model).__name__}")


def _module_name(model: Any, module: Any) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise Unsupported(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def _set_module(model: Any, name: str, module: Any) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _set_param(root: Any, name: str, value: Any, shape: tuple[int, ...] | None = None) -> None:
    """Give parameter `name` of `root` the tensor `value`, or (None) an empty meta tensor of its shape."""
    import torch

    parent, _, leaf = name.rpartition(".")
    mod = root.get_submodule(parent) if parent else root
    if value is None:
        value = torch.empty(shape or mod._parameters[leaf].shape, device="meta")
    mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def _tied(config: Any) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


# ---------------------------------------------------------------- the three sources

def folder_lm(hf_dir: Path) -> LayerwiseLM:
    """An HF folder's own weights (widened to float32)."""
    from qlocal.export.gguf import index_safetensors

    return LayerwiseLM(Path(hf_dir), index_safetensors(Path(hf_dir)))


def merged_lm(base_path: Path, adapter_dir: Path) -> LayerwiseLM:
    """The base with the adapter merged in float32 by merge.py's streaming merge."""
    from qlocal.export.merge import merged_tensors

    return LayerwiseLM(Path(base_path), merged_tensors(Path(base_path), Path(adapter_dir)))


def trained_lm(base_path: Path, adapter_dir: Path) -> LayerwiseLM:
    """The trained model: the base in float32 with the adapter unmerged on its Linear layers (PEFT's
    arithmetic); the merge's own checks say when an adapter does not fit the base."""
    from qlocal.export.merge import merged_tensors

    return LayerwiseLM(Path(base_path), merged_tensors(Path(base_path), Path(adapter_dir)), unmerge=True)
