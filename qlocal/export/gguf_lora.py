"""PEFT LoRA adapter folder -> GGUF LoRA adapter that llama.cpp applies on top of the base GGUF.

Mirrors llama.cpp's convert_lora_to_gguf.py: tensors `<base gguf name>.lora_a` (r, in) and
`.lora_b` (out, r), the same name mapping as the base conversion, the llama q/k row permutation
applied to lora_b (the permute acts on output rows, and B @ A's rows are B's rows), and
`adapter.lora.alpha` so llama.cpp scales by alpha / rank exactly like PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qlocal.adapters import lora_scale
from qlocal.errors import UserError

_PREFIXES = ("base_model.model.", "base_model.")


def convert_lora_to_gguf(adapter_dir: Path, base_hf_dir: Path, out_path: Path) -> Path:
    """Convert the PEFT adapter in `adapter_dir` (trained on `base_hf_dir`) to a GGUF LoRA at `out_path`.

    Load it with llama.cpp on the base model's GGUF, e.g.
    `Llama(model_path=base.gguf, lora_path=out_path)`. adapter.lora.alpha is the adapter's
    lora_alpha; where PEFT's per-module scale differs from alpha/rank (rslora, alpha_pattern) the
    difference is folded into lora_b so the result is exact.
    """
    import gguf

    from qlocal.export.gguf import StTensor, index_safetensors, open_writer
    from qlocal.export.gguf_arch import find_family, hf_tensor_name, permute_qk, text_hparams

    adapter_dir, base_hf_dir, out_path = Path(adapter_dir), Path(base_hf_dir), Path(out_path)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; expected a PEFT adapter folder")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise UserError(f"{cfg_path}: only plain LoRA adapters convert to GGUF (not DoRA or {cfg.get('peft_type')})")
    if cfg.get("trainable_token_indices"):
        raise UserError(f"{cfg_path}: the adapter trains rows of added tokens, and a GGUF LoRA cannot change the "
                        "vocabulary (llama.cpp takes it from the base GGUF); export the fused model instead")
    if cfg.get("modules_to_save"):
        raise UserError(f"{cfg_path}: modules_to_save ({cfg['modules_to_save']}) cannot be expressed as a GGUF "
                        "LoRA; export the fused model instead")
    if cfg.get("target_parameters"):
        raise UserError(f"{cfg_path}: the adapter trains stacked parameters ({', '.join(cfg['target_parameters'])}, "
                        "e.g. MoE experts), which the GGUF LoRA writer does not write; export the fused model instead")
    config = json.loads((base_hf_dir / "config.json").read_text(encoding="utf-8"))
    family = find_family(config)
    hp = text_hparams(config)
    name_map = gguf.get_tensor_name_map(family.arch, int(hp["num_hidden_layers"]))
    n_head = int(hp["num_attention_heads"])
    n_kv = int(hp.get("num_key_value_heads") or n_head)
    tied = hp.get("tie_word_embeddings") is True
    alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))

    tensors = index_safetensors(adapter_dir)
    modules: dict[str, dict[str, StTensor]] = {}
    for key, st in tensors.items():
        mod, sep, part = key.partition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise UserError(f"{adapter_dir}: tensor {key!r} is not a LoRA A/B weight "
                            "(embedding LoRA, lora bias and trained extra modules are not supported)")
        modules.setdefault(mod, {})[part[0]] = st

    writer_items: list[tuple[str, np.ndarray]] = []
    for mod in sorted(modules):
        pair = modules[mod]
        if set(pair) != {"A", "B"}:
            raise UserError(f"{adapter_dir}: module {mod} lacks lora_A or lora_B")
        path = mod
        for prefix in _PREFIXES:
            if path.startswith(prefix):
                path = path[len(prefix):]
                break
        hf_name = hf_tensor_name(path + ".weight") or ""
        if hf_name == "lm_head.weight" and tied:
            raise UserError(f"{adapter_dir}: LoRA on lm_head of a tied-embedding model has no GGUF tensor to attach to")
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight",)) if hf_name else None
        if gguf_name is None:
            raise UserError(f"{adapter_dir}: LoRA target {mod!r} has no GGUF tensor in {family.name}")
        a, b = pair["A"].read(), pair["B"].read()
        rank = a.shape[0]
        # llama.cpp scales by alpha/rank; fold any other PEFT scale into B.
        b = b * np.float32(lora_scale(cfg, path, rank) / (alpha / rank))
        if family.permute_qk and hf_name.endswith("q_proj.weight"):
            b = permute_qk(b, n_head)
        elif family.permute_qk and hf_name.endswith("k_proj.weight"):
            b = permute_qk(b, n_kv)
        writer_items.append((gguf_name + ".lora_a", np.ascontiguousarray(a, dtype=np.float32)))
        writer_items.append((gguf_name + ".lora_b", np.ascontiguousarray(b, dtype=np.float32)))
    if not writer_items:
        raise UserError(f"{adapter_dir}: the adapter has no LoRA tensors")

    with open_writer(out_path, family.gguf_arch) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(f"{base_hf_dir.name} LoRA")
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, arr in writer_items:
            writer.add_tensor(name, arr)  # adapters are small: holding them is fine
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return out_path
