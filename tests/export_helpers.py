"""Helpers for the export tests: synthetic run folders with a strong adapter, and a 256-wide model.

A run made here looks exactly like one `qlocal train` writes (config.yaml with `resolved:`,
chat_template.jinja, adapter/ in PEFT format) but its LoRA B matrices are random rather than
zero-initialised, so the adapter visibly changes the logits and "fused == base+adapter" checks
cannot pass by accident. The CLI tests use real training instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_run(base_dir: Path, run_dir: Path, seed: int = 0, b_std: float = 0.05, rank: int = 4,
             alpha: float = 8.0, targets: list[str] | None = None, **lora_kw: Any) -> Path:
    """Write a run folder for `base_dir` with a random (non-zero) PEFT LoRA adapter on `targets`
    (default TARGETS, the seven projections).

    lora_kw go to peft.LoraConfig as they are (use_rslora, rank_pattern, alpha_pattern, ...).
    """
    targets = targets or TARGETS
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlocal import rundir
    from qlocal.config import Config

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                  task_type="CAUSAL_LM", **lora_kw))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    peft_model.save_pretrained(str(run_dir / "adapter"))
    cfg = Config()
    cfg.model.name = str(base_dir)
    cfg.lora.rank, cfg.lora.alpha = rank, alpha
    cfg.train.dtype = "float32"  # what tests compare a run with is fp32 (torch's auto: bf16 on an AMX CPU)
    resolved = {"backend": "torch", "model_path": str(Path(base_dir).resolve()), "model_source": "local",
                "chat_template": "model", "target_modules": targets}
    rundir.save_config_with_template(run_dir, cfg, resolved, tok.chat_template)
    return run_dir


def make_wide_model(out_dir: Path, seed: int = 0) -> Path:
    """A tiny Llama whose every matrix row is a multiple of 256, so K-quants need no fallback."""
    import torch
    import transformers as tf
    from conftest import tokenizer_path

    tok = tf.AutoTokenizer.from_pretrained(tokenizer_path("llama"))
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, tie_word_embeddings=False, rope_theta=500_000.0)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)


def to_dtype_copy(src: Path, dst: Path, dtype: str) -> Path:
    """Copy an HF folder with its weights cast to `dtype` (e.g. "bfloat16")."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=getattr(torch, dtype))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(dst)
    cfg = json.loads((Path(dst) / "config.json").read_text())
    assert cfg.get("dtype") == dtype, cfg.get("dtype")
    return Path(dst)
