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
    # PEFT reads pattern keys as regexes, first match wins: only layer 1's q/k get alpha 64.
    ("llama", dict(r=4, lora_alpha=8, use_rslora=True,
                   alpha_pattern={r"layers\.1\.self_attn\.(q|k)_proj": 64, "q_proj": 2})),
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


# ---------------------------------------------------------------- `qlocal export --adapter-only` of runs

def _peft_logits(base_dir: Path, adapter_dir: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(base + adapter, base alone) logits in fp32 through PEFT: the model that was trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      adapter_dir).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
        with model.disable_adapter():
            plain = model(torch.tensor([ids])).logits[0].numpy()
    return ref, plain


def _check_adapter_export(run: Path, base_dir: Path, out: Path) -> dict[str, Any]:
    """Export `run` with --adapter-only and compare llama.cpp's base GGUF + GGUF LoRA with PEFT.

    Returns the adapter's adapter_config.json.
    """
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from qlocal.export.pipeline import ExportOptions, export_run

    result = export_run(run, ExportOptions(quants=["f16"], out_dir=out, adapter_only=True), echo=lambda _: None)
    assert result.verify_passed
    ids = AutoTokenizer.from_pretrained(base_dir)(PROMPT)["input_ids"]
    ref, plain = _peft_logits(base_dir, run / "adapter", ids)
    assert nmse(plain, ref) > 1e-2  # the adapter really changes the model
    llm = Llama(model_path=str(out / "base-f16.gguf"), lora_path=str(out / "adapter.gguf"), logits_all=True,
                n_ctx=256, n_threads=2, verbose=False)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    assert nmse(got, ref) < 1e-3
    return json.loads((run / "adapter" / "adapter_config.json").read_text())


def _gguf_lora(path: Path) -> tuple[float, dict[str, np.ndarray]]:
    from gguf import GGUFReader

    r = GGUFReader(path)
    return float(r.fields["adapter.lora.alpha"].contents()), {t.name: np.array(t.data) for t in r.tensors}


def test_adapter_only_export_of_rslora_run(tiny_model_dir: Any, tmp_path: Path) -> None:
    """A torch rsLoRA run (scale alpha/sqrt(r)): the alpha/rank llama.cpp applies, times the B we
    wrote, is PEFT's alpha/sqrt(r) times the trained B."""
    from export_helpers import make_run
    from safetensors.numpy import load_file

    base = tiny_model_dir("llama")
    run = make_run(base, tmp_path / "run", rank=4, alpha=8.0, use_rslora=True)
    cfg = _check_adapter_export(run, base, tmp_path / "export")
    assert cfg["use_rslora"] and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    alpha, tensors = _gguf_lora(tmp_path / "export" / "adapter.gguf")
    trained = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = trained["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    got_b = tensors["blk.0.attn_v.weight.lora_b"].reshape(b.shape)
    np.testing.assert_allclose(alpha / 4 * got_b, 8 / np.sqrt(4) * b, rtol=1e-6, atol=1e-8)


def test_adapter_only_export_of_mlx_run(tiny_model_dir: Any, tmp_path: Path) -> None:
    """An MLX-trained run (adapter_config.json from qlocal.adapters.peft_config, scale alpha/rank,
    only the last layer adapted): the GGUF LoRA's alpha/rank is the MLX training scale."""
    pytest.importorskip("mlx.core")
    from train_helpers import train_cfg

    from qlocal.train import train

    base = tiny_model_dir("llama")
    cfg = train_cfg("mlx", base, tmp_path / "runs", "m", iters=6, lr=2e-2,
                    **{"lora.rank": 4, "lora.alpha": 32, "lora.layers": 1})
    run = train(cfg, quiet=True)
    adapter_cfg = _check_adapter_export(run, base, tmp_path / "export")
    assert adapter_cfg["lora_alpha"] == 32 and adapter_cfg["r"] == 4 and not adapter_cfg["use_rslora"]
    alpha, tensors = _gguf_lora(tmp_path / "export" / "adapter.gguf")
    assert alpha / 4 == 8.0  # llama.cpp's alpha / rank == the MLX LoRALinear scale, nothing folded
    assert {n.split(".")[1] for n in tensors} == {"1"}  # only the last of the two layers
