"""A second, independent GGUF reader: transformers' own GGUF loader reads our F16 file and must give
the logits of base + adapter (PEFT, fp32), the model that was trained.

verify.py and the writer share an author; transformers' reader (integrations/ggml.py and
modeling_gguf_pytorch_utils.py) does not. It takes the config from the GGUF header alone (the
folder holding the file has no config.json) and undoes the writer's tensor transforms itself (q/k
row permutation, Gemma's norm shift, tied output), so a mistake made twice, in the writer and in
our check, shows up here.

Families: llama, mistral and mistral_nemo (written as llama; Nemo's head_dim reaches the reader as
rope.dimension_count), qwen2, qwen3, gemma2, gemma3, phi3, qwen3moe. transformers' reader
ignores some header keys, so some fixtures differ from conftest's:
  - qwen3 ignores attention.key_length: head_dim must be Qwen3Config's default (128).
  - gemma2/gemma3 don't carry query_pre_attn_scalar (llama.cpp scales by 1/sqrt(head_dim), the
    reader by the default 256): head_dim = query_pre_attn_scalar = 256, as in Gemma 3 270M.
  - gemma3 ignores the per-layer sliding pattern and assumes 5 local : 1 global, so the fixture
    uses that default layout with 6 layers (the smallest that has a global layer); a sliding
    window of 8 is shorter than the prompts, so the window itself is read and applied.
  - phi3 ignores rope.dimension_count and the LongRoPE factors: full rotary and plain rope (the
    fused attn_qkv/ffn_up layout is what this checks; llama.cpp checks partial rotary and LongRoPE).
  - qwen3moe ignores expert_feed_forward_length: moe_intermediate_size must be Qwen3MoeConfig's
    default (768, Qwen3-30B-A3B's). make_run's gate/up/down_proj targets become PEFT LoRA on the
    stacked experts (target_parameters), so this also checks the expert-LoRA merge.
Granite, SmolLM3 and OLMo 2 are not GGUF architectures transformers reads (transformers 5.24's
GGUF_SUPPORTED_ARCHITECTURES has no granite, smollm3 or olmo2).
Llama 3.1 rope scaling is not read by transformers' GGUF loader (it drops rope_freqs), so llama31
is not covered here; verify.py compares it with llama.cpp.

Tolerance: NMSE < 1e-5. The only expected difference is F16 rounding of the merged weights (11-bit
mantissa: relative error <= 2^-11, RMS ~3e-4), which gives logit NMSE ~1e-7 on these models; a
single mis-transformed tensor (a wrong permutation, a missing norm shift) gives > 1e-2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from conftest import _tiny_config, tokenizer_path  # noqa: E402
from export_helpers import make_run  # noqa: E402

from qlocal.export.fuse import fuse_run  # noqa: E402
from qlocal.export.gguf import convert_hf_to_gguf  # noqa: E402

PROMPTS = ["The quick brown fox jumps over the lazy dog. Paris is the capital of France, and",
           "def add(a, b):\n    return a + b  # 12345 67890",
           "Hello, world! 你好，世界。 Ça va? — emoji 🎉 done."]
TOLERANCE = 1e-5

# What transformers' GGUF reader needs beyond conftest's tiny configs (see the module docstring).
READER_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen3": dict(head_dim=128),
    "qwen3moe": dict(moe_intermediate_size=768),
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256),
    "gemma3": dict(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6, layer_types=None,
                   sliding_window=8),
    "phi3": dict(partial_rotary_factor=1.0, rope_scaling=None,
                 rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
}


def make_reader_model(arch: str, out_dir: Path) -> Path:
    """conftest's tiny `arch` model with READER_OVERRIDES applied (fp32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path(arch))
    config = _tiny_config(arch, tok)
    if arch in READER_OVERRIDES:
        fields = {**config.to_dict(), **READER_OVERRIDES[arch]}
        fields.pop("model_type", None)
        config = type(config)(**fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).mean() / (b ** 2).mean())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mistral_nemo", "qwen3moe"])
def test_transformers_reads_our_f16_gguf(arch: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_reader_model(arch, tmp_path / "base")
    run = make_run(base, tmp_path / "run")
    fuse_run(run, tmp_path / "fused")
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    convert_hf_to_gguf(tmp_path / "fused", gguf_dir / "model-f16.gguf", "f16")
    assert not (gguf_dir / "config.json").exists()  # the reader's config comes from the GGUF header

    reader = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    if arch == "gemma3":
        assert "full_attention" in reader.config.layer_types and reader.config.sliding_window == 8
    ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          run / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(base)
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        assert ids.shape[1] > 8  # longer than gemma3's window
        with torch.no_grad():
            ref = ref_model(ids).logits[0].numpy()
            got = reader(ids).logits[0].numpy()
            with ref_model.disable_adapter():
                plain = ref_model(ids).logits[0].numpy()
        assert nmse(plain, ref) > 100 * TOLERANCE, "the adapter must visibly change the logits"
        assert nmse(got, ref) < TOLERANCE, f"{arch}: {prompt!r}"
        assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
