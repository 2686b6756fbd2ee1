"""GGUF LoRA adapters: llama.cpp's base GGUF + our adapter GGUF gives the logits of HF base + PEFT adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from qlocal.errors import UserError  # noqa: E402
from qlocal.export.gguf import convert_hf_to_gguf  # noqa: E402
from qlocal.export.gguf_lora import convert_lora_to_gguf  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).mean() / (b ** 2).mean())


def make_adapter(hf_dir: Path, out: Path, **lora_kw: Any) -> Any:
    """A PEFT LoRA on every linear layer with random, clearly nonzero B (fresh LoRA has B = 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(target_modules=TARGETS, **lora_kw)).eval()
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(out)
    return peft_model


@pytest.mark.parametrize("arch,lora_kw", [
    ("llama", dict(r=4, lora_alpha=16)),                         # q/k permute applied to lora_b
    ("gemma3", dict(r=8, lora_alpha=8)),                         # SentencePiece vocab, tied, norm shift
    ("qwen2", dict(r=4, lora_alpha=8, use_rslora=True,           # scales folded into lora_b
                   rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 32})),
])
def test_lora_gguf_matches_peft(arch: str, lora_kw: dict[str, Any], tiny_model_dir: Any, tmp_path: Path) -> None:
    from gguf import GGUFReader
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    hf_dir = tiny_model_dir(arch)
    peft_model = make_adapter(hf_dir, tmp_path / "adapter", **lora_kw)
    base = convert_hf_to_gguf(hf_dir, tmp_path / "base.gguf", "f16")
    lora = convert_lora_to_gguf(tmp_path / "adapter", hf_dir, tmp_path / "lora.gguf")

    r = GGUFReader(lora)
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == pytest.approx(lora_kw["lora_alpha"])
    names = {t.name for t in r.tensors}
    assert {"blk.0.attn_q.weight.lora_a", "blk.1.ffn_down.weight.lora_b"} <= names

    ids = AutoTokenizer.from_pretrained(hf_dir)(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = peft_model(torch.tensor([ids])).logits[0].numpy()
        with peft_model.disable_adapter():
            plain = peft_model(torch.tensor([ids])).logits[0].numpy()
    assert nmse(plain, ref) > 0.05  # the adapter really changes the model
    llm = Llama(model_path=str(base), lora_path=str(lora), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    assert nmse(got, ref) < 1e-3
    llm.close()


def test_lora_rejects_extra_modules(tiny_model_dir: Any, tmp_path: Path) -> None:
    hf_dir = tiny_model_dir("qwen2")
    make_adapter(hf_dir, tmp_path / "adapter", r=2, lora_alpha=4)
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["modules_to_save"] = ["lm_head"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="modules_to_save"):
        convert_lora_to_gguf(tmp_path / "adapter", hf_dir, tmp_path / "lora.gguf")
    assert not (tmp_path / "lora.gguf").exists()
