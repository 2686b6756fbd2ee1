"""The one table of model families the GGUF converter supports, and what each needs.

Each family says which HF architectures it covers, which GGUF architecture it becomes, which
hyperparameters go into the GGUF header and how tensors are transformed on the way. The facts come
from llama.cpp's own converter (convert_hf_to_gguf.py) and the loader in the llama.cpp that
llama-cpp-python ships; the comments say which quirk each line reproduces.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, RopeScalingType

from qlocal.errors import UserError

Hparams = dict[str, Any]


@dataclass(frozen=True)
class Family:
    """One supported model family."""

    name: str
    hf_archs: tuple[str, ...]        # config.json "architectures" entries
    model_types: tuple[str, ...]     # config.json "model_type" values (fallback when no architectures)
    arch: MODEL_ARCH
    permute_qk: bool = False         # llama.cpp's llama arch uses interleaved (GPT-J) rope; HF uses halves
    norm_shift: float = 0.0          # Gemma stores RMSNorm weights as w-1 (HF computes x*(1+w))
    write_hparams: Callable[[Hparams, GGUFWriter], None] = lambda hp, w: None
    extra_tensors: Callable[[Hparams], Iterator[tuple[str, np.ndarray]]] = lambda hp: iter(())
    # Rewrites the checkpoint's tensor dict before naming (MoE: per-expert weights stacked per layer).
    regroup: Callable[[dict[str, Any], Hparams], dict[str, Any]] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def gguf_arch(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]


# ---------------------------------------------------------------- config helpers

def text_hparams(config: Hparams) -> Hparams:
    """The language-model part of a config (multimodal configs nest it under text_config)."""
    if isinstance(config.get("text_config"), dict):
        return {**config, **config["text_config"]}
    return config


def head_dim(hp: Hparams) -> int:
    return int(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])


def rope_params(hp: Hparams, layer_type: str | None = None) -> dict[str, Any]:
    """rope settings for either config style: transformers 5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    rp = hp.get("rope_parameters")
    if isinstance(rp, dict):
        if layer_type and isinstance(rp.get(layer_type), dict):
            return rp[layer_type]
        if "full_attention" in rp and isinstance(rp["full_attention"], dict):
            return rp["full_attention"]
        return rp
    out = dict(hp.get("rope_scaling") or {})
    if layer_type == "sliding_attention" and "rope_local_base_freq" in hp:
        out["rope_theta"] = hp["rope_local_base_freq"]
    elif "rope_theta" in hp:
        out["rope_theta"] = hp["rope_theta"]
    return out


def _rope_type(rp: dict[str, Any]) -> str:
    return str(rp.get("rope_type") or rp.get("type") or "default").lower()


# ---------------------------------------------------------------- hparams writers

def _block_shape(hp: Hparams, w: GGUFWriter) -> None:
    """Widths, depth and head counts: the same keys for every family, whoever writes the rest."""
    w.add_embedding_length(int(hp["hidden_size"]))
    w.add_block_count(int(hp["num_hidden_layers"]))
    w.add_feed_forward_length(int(hp["intermediate_size"]))
    w.add_head_count(int(hp["num_attention_heads"]))
    w.add_head_count_kv(int(hp.get("num_key_value_heads") or hp["num_attention_heads"]))


def _common(hp: Hparams, w: GGUFWriter, rope_default: float | None = None) -> None:
    """What llama.cpp's TextModel.set_gguf_parameters writes for every family."""
    w.add_context_length(int(hp.get("max_position_embeddings", 131072)))
    _block_shape(hp, w)
    w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", 1e-6)))
    theta = rope_params(hp).get("rope_theta", rope_default)
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    if hp.get("head_dim"):
        # Qwen3/Gemma/Mistral-Nemo have head_dim != hidden/heads; llama.cpp assumes the ratio otherwise.
        w.add_key_length(int(hp["head_dim"]))
        w.add_value_length(int(hp["head_dim"]))
    _rope_scaling(hp, w)


def _rope_scaling(hp: Hparams, w: GGUFWriter) -> None:
    rp = rope_params(hp)
    kind, factor = _rope_type(rp), rp.get("factor")
    if kind == "linear" and factor:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor:
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3"):
        raise UserError(f"rope scaling type {kind!r} is not supported by the GGUF export; "
                        "supported: default, linear, yarn, llama3")


def _llama(hp: Hparams, w: GGUFWriter) -> None:
    _common(hp, w, rope_default=10000.0)
    w.add_vocab_size(int(hp["vocab_size"]))
    w.add_rope_dimension_count(head_dim(hp))


def _qwen(hp: Hparams, w: GGUFWriter) -> None:
    _common(hp, w, rope_default=10000.0)


def _smollm3(hp: Hparams, w: GGUFWriter) -> None:
    # llama.cpp's SmolLM3Model is its LlamaModel (same header, q/k permute); the loader hard-codes
    # "every 4th layer has no RoPE" (n_no_rope_layer_step = 4, no header key) and full attention.
    n = int(hp["num_hidden_layers"])
    want = [int((i + 1) % 4 != 0) for i in range(n)]
    if list(hp.get("no_rope_layers") or want) != want:
        raise UserError(f"config.json: no_rope_layers {hp['no_rope_layers']} cannot be exported; llama.cpp's "
                        "smollm3 skips RoPE on every 4th layer only (no_rope_layer_interval 4)")
    if hp.get("use_sliding_window") or any(t != "full_attention" for t in hp.get("layer_types") or ()):
        raise UserError("config.json: SmolLM3 with sliding-window layers cannot be exported; llama.cpp's "
                        "smollm3 has full attention only (set use_sliding_window: false)")
    _llama(hp, w)


def _granite(hp: Hparams, w: GGUFWriter) -> None:
    # llama.cpp's GraniteModel: the llama header (it ignores head_dim) plus the four multipliers,
    # written under llama.cpp's *_scale names; logits are divided by logits_scaling in both.
    _llama({k: v for k, v in hp.items() if k != "head_dim"}, w)
    for key, add in (("attention_multiplier", w.add_attention_scale), ("embedding_multiplier", w.add_embedding_scale),
                     ("residual_multiplier", w.add_residual_scale), ("logits_scaling", w.add_logit_scale)):
        if hp.get(key):
            add(float(hp[key]))


def _phi3(hp: Hparams, w: GGUFWriter) -> None:
    # llama.cpp's Phi3MiniModel writes its own header (no _common): partial rotary as a rope
    # dimension count, the pre-scaling context, and sliding_window 0 for "none" (Phi-4).
    rp = rope_params(hp)
    w.add_context_length(int(hp["max_position_embeddings"]))
    orig = hp.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings")
    if orig:
        w.add_rope_scaling_orig_ctx_len(int(orig))
    _block_shape(hp, w)
    w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", 1e-5)))
    w.add_rope_dimension_count(phi3_rope_dims(hp))
    w.add_rope_freq_base(float(rp.get("rope_theta", 10000.0)))
    w.add_sliding_window(int(hp.get("sliding_window") or 0))
    kind = _rope_type(rp)
    if kind in ("longrope", "su"):
        w.add_rope_scaling_attn_factors(_longrope_attn_factor(hp, rp))
    elif kind != "default":
        raise UserError(f"rope scaling type {kind!r} is not supported by the GGUF export for Phi-3; "
                        "supported: default, longrope")


def _qwen3moe(hp: Hparams, w: GGUFWriter) -> None:
    # llama.cpp's Qwen3MoeModel: Qwen3's header plus expert count, experts used per token and the
    # expert width (without it the loader guesses feed_forward_length / experts used).
    from qlocal.export.gguf_experts import n_experts

    _check_qwen3moe(hp)
    _common(hp, w, rope_default=10000.0)
    w.add_expert_count(n_experts(hp))
    w.add_expert_used_count(int(hp["num_experts_per_tok"]))
    w.add_expert_feed_forward_length(int(hp["moe_intermediate_size"]))


def _check_qwen3moe(hp: Hparams) -> None:
    """What llama.cpp's qwen3moe graph cannot run: dense layers, and top-k weights left unnormalised."""
    if hp.get("mlp_only_layers") or int(hp.get("decoder_sparse_step") or 1) != 1:
        raise UserError("config.json: Qwen3-MoE with dense layers (mlp_only_layers "
                        f"{hp.get('mlp_only_layers')}, decoder_sparse_step {hp.get('decoder_sparse_step')}) "
                        "cannot be exported; llama.cpp's qwen3moe makes every layer a MoE layer")
    if not hp.get("norm_topk_prob"):
        raise UserError("config.json: Qwen3-MoE with norm_topk_prob false cannot be exported; llama.cpp's "
                        "qwen3moe always renormalises the top-k router weights (released Qwen3-MoE set true)")


def qwen3moe_experts(tensors: dict[str, Any], hp: Hparams) -> dict[str, Any]:
    """Qwen3-MoE's experts stacked per layer (gguf_experts), checked before anything is written."""
    from qlocal.export.gguf_experts import stack_experts

    _check_qwen3moe(hp)
    return stack_experts(tensors, hp)


def phi3_rope_dims(hp: Hparams) -> int:
    """Rotary dimensions per head: llama.cpp's int(partial_rotary_factor * hidden) // heads."""
    pct = hp.get("partial_rotary_factor") or rope_params(hp).get("partial_rotary_factor") or 1.0
    return int(float(pct) * int(hp["hidden_size"])) // int(hp["num_attention_heads"])


def _longrope_attn_factor(hp: Hparams, rp: dict[str, Any]) -> float:
    # HF scales cos/sin by this; an explicit attention_factor wins there, else the LongRoPE formula.
    if rp.get("attention_factor") is not None:
        return float(rp["attention_factor"])
    orig = float(hp.get("original_max_position_embeddings") or rp["original_max_position_embeddings"])
    scale = float(hp["max_position_embeddings"]) / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


def _gemma2(hp: Hparams, w: GGUFWriter) -> None:
    _common(hp, w, rope_default=10000.0)
    _gemma_head_dim(hp, w)
    if hp.get("attn_logit_softcapping"):
        w.add_attn_logit_softcapping(float(hp["attn_logit_softcapping"]))
    if hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))
    # llama.cpp hard-codes Gemma 2's alternation (even layers local), matching HF.
    w.add_sliding_window(int(hp["sliding_window"]))


def _gemma3(hp: Hparams, w: GGUFWriter) -> None:
    _common(hp, w, rope_default=1_000_000.0)  # rope_params() picks the global layers' theta
    _gemma_head_dim(hp, w)
    local = rope_params(hp, "sliding_attention").get("rope_theta")
    if local is not None:
        w.add_rope_freq_base_swa(float(local))
    if hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))
    if hp.get("sliding_window") and hp.get("sliding_window_pattern") != 1:
        w.add_sliding_window(int(hp["sliding_window"]))
        # The loader assumes 5 local : 1 global; write the real per-layer pattern for models that differ.
        w.add_sliding_window_pattern(_swa_pattern(hp))


def _gemma_head_dim(hp: Hparams, w: GGUFWriter) -> None:
    if not hp.get("head_dim"):  # _common wrote it otherwise; Gemma's default is 256, not hidden/heads
        w.add_key_length(256)
        w.add_value_length(256)


def _swa_pattern(hp: Hparams) -> list[bool]:
    n = int(hp["num_hidden_layers"])
    types = hp.get("layer_types")
    if isinstance(types, list) and len(types) == n:
        return [t == "sliding_attention" for t in types]
    period = int(hp.get("sliding_window_pattern") or hp.get("_sliding_window_pattern") or 6)
    return [(i + 1) % period != 0 for i in range(n)]


# ---------------------------------------------------------------- extra tensors

def llama3_rope_freqs(hp: Hparams) -> Iterator[tuple[str, np.ndarray]]:
    """Llama 3.1+ `rope_type: llama3`: the per-frequency factors llama.cpp reads as `rope_freqs`."""
    rp = rope_params(hp)
    if _rope_type(rp) != "llama3":
        return
    base, dim = float(rp.get("rope_theta", 10000.0)), head_dim(hp)
    factor = float(rp.get("factor", 8.0))
    low, high = float(rp.get("low_freq_factor", 1.0)), float(rp.get("high_freq_factor", 4.0))
    old_ctx = float(rp.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    yield "rope_freqs.weight", np.asarray(factors, dtype=np.float32)


def longrope_factors(hp: Hparams) -> Iterator[tuple[str, np.ndarray]]:
    """Phi-3 LongRoPE: the short and long per-frequency factors llama.cpp reads as rope_factors_*."""
    rp = rope_params(hp)
    if _rope_type(rp) not in ("longrope", "su"):
        return
    pairs = phi3_rope_dims(hp) // 2
    for kind in ("long", "short"):
        factors = rp.get(f"{kind}_factor")
        if not isinstance(factors, list) or len(factors) != pairs:
            raise UserError(f"config.json: rope {kind}_factor must list {pairs} numbers (one per rotary "
                            f"pair), got {factors!r}")
        yield f"rope_factors_{kind}.weight", np.asarray(factors, dtype=np.float32)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: HF rotate-half row order -> interleaved pairs, per head."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# ---------------------------------------------------------------- the table

FAMILIES: tuple[Family, ...] = (
    Family("Qwen2/Qwen2.5", ("Qwen2ForCausalLM",), ("qwen2",), MODEL_ARCH.QWEN2, write_hparams=_qwen),
    Family("Qwen3", ("Qwen3ForCausalLM",), ("qwen3",), MODEL_ARCH.QWEN3, write_hparams=_qwen),
    # Qwen3-MoE: Qwen3's attention, every layer's experts stacked into ffn_{gate,up,down}_exps.
    Family("Qwen3-MoE", ("Qwen3MoeForCausalLM",), ("qwen3_moe",), MODEL_ARCH.QWEN3MOE,
           write_hparams=_qwen3moe, regroup=qwen3moe_experts),
    Family("Llama 2/3.x", ("LlamaForCausalLM",), ("llama",), MODEL_ARCH.LLAMA, permute_qk=True,
           write_hparams=_llama, extra_tensors=llama3_rope_freqs),
    # llama.cpp writes Mistral (v0.1-v0.3, Nemo) as the llama arch; its sliding window is ignored there too.
    Family("Mistral", ("MistralForCausalLM",), ("mistral",), MODEL_ARCH.LLAMA, permute_qk=True,
           write_hparams=_llama, extra_tensors=llama3_rope_freqs),
    # Granite 3.x is llama-shaped (so the same q/k permute) with four scalar multipliers.
    Family("Granite 3.x", ("GraniteForCausalLM",), ("granite",), MODEL_ARCH.GRANITE, permute_qk=True,
           write_hparams=_granite),
    # Phi-3/3.5/Phi-4-mini: fused qkv_proj and gate_up_proj map to attn_qkv/ffn_up as they are
    # (llama.cpp splits them in the same order as HF); NEOX rope, so no permute.
    Family("Phi-3/Phi-4-mini", ("Phi3ForCausalLM",), ("phi3",), MODEL_ARCH.PHI3,
           write_hparams=_phi3, extra_tensors=longrope_factors),
    # SmolLM3: llama-shaped (permute) with RoPE skipped on every 4th layer (checked in _smollm3).
    Family("SmolLM3", ("SmolLM3ForCausalLM",), ("smollm3",), MODEL_ARCH.SMOLLM3, permute_qk=True,
           write_hparams=_smollm3, extra_tensors=llama3_rope_freqs),
    # OLMo 2: post-attention/post-feedforward norms only, QK-norm over the whole q/k projection;
    # NEOX rope (no permute, so the q/k norm weights keep HF's order); the generic header.
    Family("OLMo 2", ("Olmo2ForCausalLM",), ("olmo2",), MODEL_ARCH.OLMO2, write_hparams=_qwen),
    Family("Gemma 2", ("Gemma2ForCausalLM",), ("gemma2",), MODEL_ARCH.GEMMA2, norm_shift=1.0,
           write_hparams=_gemma2),
    Family("Gemma 3 (text)", ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"), ("gemma3_text", "gemma3"),
           MODEL_ARCH.GEMMA3, norm_shift=1.0, write_hparams=_gemma3),
)


def supported_families() -> str:
    """One line naming every supported family."""
    return ", ".join(f"{f.name} ({'/'.join(f.hf_archs)})" for f in FAMILIES)


def find_family(config: Hparams) -> Family:
    """The family of an HF config.json, or a one-line UserError listing the supported ones."""
    archs = config.get("architectures") or []
    for fam in FAMILIES:
        if any(a in fam.hf_archs for a in archs):
            return fam
    if not archs:
        for fam in FAMILIES:
            if config.get("model_type") in fam.model_types:
                return fam
    got = "/".join(archs) or config.get("model_type") or "unknown"
    raise UserError(f"GGUF export does not support architecture {got}; supported: {supported_families()}")


def general_name(name: str) -> str:
    """`general.name` that cannot switch on llama.cpp's name-keyed tokenizer quirk.

    llama.cpp's vocab loader marks every special token RSTRIP when general.name contains
    "phi3"/"phi-3" (and aborts loading if "</s>", "<unk>", "<s>" or "<|endoftext|>" is missing),
    so tokenisation would depend on a run's name, not on its tokenizer. llama.cpp's own converter
    writes "Phi 3 ..." which does not match; do the same.
    """
    return re.sub(r"(?i)phi-?3", "Phi 3", name)


def hf_tensor_name(name: str) -> str | None:
    """Normalise multimodal checkpoints to the text model's names; None for tensors to skip."""
    for prefix in ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."):
        if name.startswith(prefix):
            return None
    name = name.replace("model.language_model.", "model.").replace("language_model.model.", "model.")
    name = name.replace("language_model.lm_head.", "lm_head.")
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name
