"""mlx-lm models outside the training step: the import check, HF config translation, loading
(affine-quantised as a run was), a PEFT adapter applied to a model, the adapter switch and
streamed generation. Training (mlx_backend.py) loads its model through load_mlx_model too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Generator, Iterator

from qlocal import adapters
from qlocal.backends.base import Finish, Sampling
from qlocal.errors import UserError, missing_extra

GROUP_SIZE = 64  # affine quantisation group, mlx-lm's default


def import_mlx() -> tuple[Any, Any, Any]:
    """(mlx.core, mlx.nn, mlx.optimizers), or a one-line UserError naming the missing package."""
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
    if config.get("num_local_experts") and "num_experts" not in config:
        # transformers 5 writes Qwen3-MoE's expert count as num_local_experts; mlx-lm reads num_experts.
        out["num_experts"] = config["num_local_experts"]
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
    mx, nn, _ = import_mlx()
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


def load_peft_adapter_into_mlx(model: Any, adapter_dir: Path) -> Any:
    """Apply a PEFT LoRA adapter folder to an mlx-lm model in place (wrapping layers as needed).

    Modules come from the tensor names, ranks from their shapes, scale from lora_alpha (with
    alpha_pattern / rsLoRA as PEFT defines them). Returns the model.
    """
    mx, nn, _ = import_mlx()
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.lora import LoRALinear

    config, peft_weights = adapters.read_peft_adapter(Path(adapter_dir))
    if config.get("target_parameters"):  # PEFT's LoRA on stacked parameters (torch-trained MoE experts)
        raise UserError(f"{adapter_dir}: the adapter trains stacked parameters ({', '.join(config['target_parameters'])}, "
                        "e.g. MoE experts), which the MLX backend cannot apply; use --backend torch")
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
    rows = adapters.token_rows(config)
    if rows:  # trained rows of added tokens (PEFT trainable_token_indices)
        from qlocal.backends.mlx_tokens import attach_token_rows

        values = {}
        for leaf in rows:
            key = next((k for k in weights if k.removesuffix(f".{adapters.MLX_ROWS_LEAF}").split(".")[-1] == leaf
                        and k.endswith(adapters.MLX_ROWS_LEAF)), None)
            if key is None:
                raise UserError(f"{adapter_dir}: adapter_config.json trains token rows of {leaf} but the weights hold none")
            values[leaf] = weights[key]
        attach_token_rows(model, rows, values)
    return model


def lora_scales(model: Any) -> dict[str, float]:
    """The scale of every LoRA layer, by module path."""
    from mlx_lm.tuner.lora import LoRALinear

    return {k: m.scale for k, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_lora_scales(model: Any, scales: dict[str, float]) -> None:
    """Set LoRA scales by module path. Scale 0 is exactly the base: y + 0 * (x A B) is y."""
    modules = dict(model.named_modules())
    for path, scale in scales.items():
        modules[path].scale = scale


def stream(model: Any, tokenizer: Any, prompt: list[int], stop_ids: list[int],
           sampling: Sampling) -> Generator[str, None, Finish]:
    """Stream a reply from an mlx-lm model with mlx-lm's stream_generate; returns how it ended."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    model.eval()
    wrapper = TokenizerWrapper(tokenizer, eos_token_ids=stop_ids)
    # mlx-lm reads top_p 0 or 1 as "off"; temp 0 is greedy.
    sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p if sampling.top_p < 1 else 0.0)
    finish = Finish()
    yield from text_deltas(_generated_ids(stream_generate(model, wrapper, prompt, max_tokens=sampling.max_tokens,
                                                          sampler=sampler), finish),
                           tokenizer, keep_special=sampling.keep_special)
    return finish


def _generated_ids(responses: Iterator[Any], finish: Finish) -> Iterator[int]:
    """The token ids of mlx-lm's stream_generate responses, counted into `finish`.

    Its last response repeats the final token: an end-of-turn one when it stopped (never shown),
    the last generated one when max_tokens ran out (not yielded before).
    """
    for resp in responses:
        if resp.finish_reason is None or resp.finish_reason == "length":
            finish.tokens += 1
            yield int(resp.token)
        else:  # "stop": a stop id within max_tokens
            finish.stopped = True


def text_deltas(ids: Iterator[int], tokenizer: Any, keep_special: bool = False) -> Iterator[str]:
    """Text pieces of a growing token sequence, decoded as the torch path's streamer decodes it.

    Special tokens are dropped unless `keep_special` (mlx-lm's own detokenizer keeps them all), and a
    piece is held back while it ends inside a multi-byte character.
    """
    seen: list[int] = []
    shown = ""
    for token in ids:
        seen.append(token)
        text = tokenizer.decode(seen, skip_special_tokens=not keep_special)
        if text.endswith("\ufffd") or not text.startswith(shown):
            continue
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    if seen:
        text = tokenizer.decode(seen, skip_special_tokens=not keep_special)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown):]
