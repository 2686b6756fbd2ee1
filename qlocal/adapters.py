"""Adapter formats. PEFT is the one on-disk format; MLX converts on save and load.

Pure numpy: name mapping and transposes only, so eval, export and chat code can use it without
importing torch or mlx.

    MLX   model.layers.0.self_attn.q_proj.lora_a                    (in, r)
          model.layers.0.self_attn.q_proj.lora_b                    (r, out)
    PEFT  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (r, in)
          base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   (out, r)

Module paths are the HF module paths on both sides (mlx-lm keeps HF parameter names for the
supported families), so only the prefix, the leaf name and the orientation change.

Trained rows of added tokens (PEFT `trainable_token_indices`; config `lora.new_tokens`) are the
rows' full values, (k, hidden), in the same orientation on both sides:

    MLX   model.embed_tokens.trainable_tokens_delta
    PEFT  base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from qlocal.errors import UserError

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_MLX_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[ab])$")
PEFT_ROWS_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$")
MLX_ROWS_LEAF = "trainable_tokens_delta"


def token_rows(config: dict[str, Any]) -> dict[str, list[int]]:
    """Module leaf name -> trained token ids, from adapter_config.json (a bare list means the embedding)."""
    rows = config.get("trainable_token_indices") or {}
    return {"embed_tokens": list(rows)} if isinstance(rows, list) else {k: list(v) for k, v in rows.items()}


def vocab_needed(config: dict[str, Any]) -> int:
    """The vocabulary size the adapter's trained token rows need (0 when it trains none)."""
    return max((max(ids) + 1 for ids in token_rows(config).values() if ids), default=0)


def grow_vocab(model: Any, need: int) -> None:
    """Grow a transformers model's embedding (and untied head) to `need` rows; the new rows are the
    mean of the old ones, each matrix its own (what training starts from on both backends, and what
    the base gives for them with the adapter switched off)."""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    if need <= old:
        return
    model.resize_token_embeddings(need, mean_resizing=False)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    layers = [emb] if head is None or head.weight is emb.weight else [emb, head]
    with torch.no_grad():
        for layer in layers:
            w = layer.weight
            w[old:] = w[:old].float().mean(0).to(w.dtype)


def fit_vocab(model: Any, adapter_dir: Path) -> None:
    """Grow a transformers model's vocabulary to the adapter's trained token rows, before PEFT
    loads the adapter (which holds those rows' values)."""
    config = json.loads((Path(adapter_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    grow_vocab(model, vocab_needed(config))


def mlx_to_peft(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """MLX LoRA tensors (`<path>.lora_a` (in, r), `<path>.lora_b` (r, out)) -> PEFT state dict."""
    out = {}
    for name, w in weights.items():
        path, _, leaf = name.rpartition(".")
        if leaf == MLX_ROWS_LEAF:
            out[f"{PEFT_PREFIX}{path}.token_adapter.{MLX_ROWS_LEAF}"] = np.ascontiguousarray(w)
            continue
        m = _MLX_KEY.match(name)
        if m is None:
            raise ValueError(f"not an MLX LoRA tensor: {name}")
        ab = m["ab"].upper()
        out[f"{PEFT_PREFIX}{m['path']}.lora_{ab}.weight"] = np.ascontiguousarray(np.asarray(w).T)
    return out


def peft_to_mlx(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PEFT state dict -> MLX LoRA tensors (transposed). Anything but lora_A/lora_B is an error."""
    out = {}
    for name, w in weights.items():
        rows = PEFT_ROWS_KEY.match(name)
        if rows is not None:
            out[f"{rows['path']}.{MLX_ROWS_LEAF}"] = np.ascontiguousarray(w)
            continue
        m = _PEFT_KEY.match(name)
        if m is None:
            # DoRA magnitudes, embedding LoRA, modules_to_save...: MLX cannot apply them faithfully.
            raise UserError(f"adapter tensor '{name}' is not a plain LoRA A/B matrix; "
                            "only LoRA on linear layers can be loaded into MLX")
        out[f"{m['path']}.lora_{m['ab'].lower()}"] = np.ascontiguousarray(np.asarray(w).T)
    return out


def lora_modules(mlx_weights: dict[str, np.ndarray]) -> dict[str, int]:
    """Adapted module path -> rank, from MLX-named tensors (checks every A has its B)."""
    ranks: dict[str, int] = {}
    for name, w in mlx_weights.items():
        path, leaf = name.rsplit(".", 1)
        if leaf == MLX_ROWS_LEAF:
            continue
        r = w.shape[1] if leaf == "lora_a" else w.shape[0]
        if ranks.setdefault(path, r) != r:
            raise UserError(f"adapter: lora_A and lora_B of {path} disagree on the rank")
    for path in ranks:
        if f"{path}.lora_a" not in mlx_weights or f"{path}.lora_b" not in mlx_weights:
            raise UserError(f"adapter: {path} has only one of lora_A / lora_B")
    return ranks


def _pattern_value(patterns: dict[str, Any], path: str) -> Any:
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key that, as a regex, matches the
    # end of the module path at a dot boundary.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return None


def lora_scale(config: dict[str, Any], path: str, rank: int) -> float:
    """The factor PEFT multiplies B @ A by for module `path`: alpha / r (alpha / sqrt(r) with rsLoRA)."""
    alpha = _pattern_value(config.get("alpha_pattern", {}), path)
    if alpha is None:
        alpha = config.get("lora_alpha", 8)
    if config.get("use_rslora"):
        return float(alpha) / float(np.sqrt(rank))
    return float(alpha) / float(rank)


def peft_config(rank: int, alpha: float, target_modules: list[str], layers: list[int] | None,
                base_model: str, dropout: float = 0.0,
                token_indices: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """adapter_config.json for a LoRA adapter on a causal LM (with trained token rows when
    `token_indices` is given), as PEFT itself writes it."""
    return {"trainable_token_indices": token_indices,
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(target_modules),
        "layers_to_transform": layers, "layers_pattern": None, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True, "revision": None,
    }


def write_peft_adapter(folder: Path, config: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    """Write adapter_config.json + adapter_model.safetensors (PEFT names) into `folder`."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    tensors = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def read_peft_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config, PEFT-named numpy tensors) of a PEFT adapter folder, with clear errors."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise UserError(f"{folder}: not a PEFT adapter folder (no {CONFIG_FILE})")
    if not w_path.is_file():
        raise UserError(f"{folder}: no {WEIGHTS_FILE} (only safetensors adapters are supported)")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_path}: peft_type {config.get('peft_type')} is not supported; only LORA")
    if config.get("use_dora"):
        raise UserError(f"{cfg_path}: DoRA adapters are not supported by the MLX backend")
    try:
        weights = load_file(str(w_path))
    except Exception as e:  # bf16 tensors need torch's loader; everything else is a bad file
        if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
            weights = _load_bf16_as_f32(w_path)
        else:
            raise UserError(f"{w_path}: cannot read ({e})") from None
    return config, weights


def _load_bf16_as_f32(path: Path) -> dict[str, np.ndarray]:
    # numpy has no bfloat16: widen through torch when present (PEFT adapters trained on CUDA often are bf16).
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(path)).items()}
