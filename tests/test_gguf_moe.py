"""Qwen3-MoE to GGUF: experts stacked per layer as llama.cpp expects, from either HF layout.

test_gguf_convert covers the family end to end (tokens, logits, greedy vs HF); here: the expert
tensors hold exactly HF's experts in llama.cpp's order, a checkpoint with transformers 5's stacked
3-D layout converts to the same file, the stacking streams a few experts at a time, Q8_0 and a
K-quant work on the 3-D tensors, and configs llama.cpp's qwen3moe cannot run stop in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")

from test_gguf_convert import PROMPT, gguf_logits, hf_model, load_gguf, nmse, read_fields  # noqa: E402

from qlocal.errors import UserError  # noqa: E402
from qlocal.export import gguf as gguf_mod  # noqa: E402
from qlocal.export.gguf import convert_hf_to_gguf, index_safetensors  # noqa: E402

PROJ = ("gate", "up", "down")


def _experts(hf_dir: Path, layer: int, proj: str) -> np.ndarray:
    """HF's per-expert weights of one layer stacked (E, out, in), float32."""
    index = index_safetensors(hf_dir)
    n = json.loads((hf_dir / "config.json").read_text())["num_local_experts"]
    return np.stack([index[f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight"].read() for e in range(n)])


def _tensor_data(path: Path) -> dict[str, np.ndarray]:
    return {name: np.asarray(t.data).copy() for name, t in read_fields(path)["_tensors"].items()}


def test_experts_stacked_as_llama_cpp_expects(tiny_model_dir: Any, tmp_path: Path) -> None:
    hf_dir = tiny_model_dir("qwen3moe")
    path = convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf", "f32")
    f = read_fields(path)
    assert f["qwen3moe.expert_count"] == 4 and f["qwen3moe.expert_used_count"] == 2
    assert f["qwen3moe.expert_feed_forward_length"] == 64 and f["qwen3moe.attention.key_length"] == 32
    t = f["_tensors"]
    assert not any(".mlp." in name or "experts" in name for name in t)  # every expert tensor was stacked
    index = index_safetensors(hf_dir)
    for layer in range(2):
        # GGUF shapes are reversed: ne = {in, out, experts}, llama.cpp's {n_embd, n_ff_exp, n_expert}.
        assert list(t[f"blk.{layer}.ffn_gate_exps.weight"].shape) == [64, 64, 4]
        assert list(t[f"blk.{layer}.ffn_gate_inp.weight"].shape) == [64, 4]
        for proj in PROJ:
            got = np.asarray(t[f"blk.{layer}.ffn_{proj}_exps.weight"].data)
            np.testing.assert_array_equal(got, _experts(hf_dir, layer, proj))
        router = np.asarray(t[f"blk.{layer}.ffn_gate_inp.weight"].data)
        np.testing.assert_array_equal(router, index[f"model.layers.{layer}.mlp.gate.weight"].read())


def _write_stacked_copy(src: Path, dst: Path) -> Path:
    """`src` with transformers 5's in-memory expert layout on disk: gate_up_proj (E, 2*ff, hidden)
    with gate rows first, down_proj (E, hidden, ff), as 3-D tensors without a .weight suffix."""
    from safetensors.numpy import save_file

    shutil.copytree(src, dst)
    index = index_safetensors(src)
    out = {k: v.read() for k, v in index.items() if ".mlp.experts." not in k}
    for layer in range(2):
        gate, up, down = (_experts(src, layer, p) for p in PROJ)
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = down
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_stacked_checkpoint_layout_gives_the_same_file(tiny_model_dir: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5's 3-D layout and the per-expert layout give identical tensors; and reading one
    expert per chunk (the stacking streams experts) changes nothing."""
    hf_dir = tiny_model_dir("qwen3moe")
    ref = _tensor_data(convert_hf_to_gguf(hf_dir, tmp_path / "per-expert.gguf", "f16"))
    stacked = _write_stacked_copy(hf_dir, tmp_path / "stacked")
    assert "model.layers.0.mlp.experts.gate_up_proj" in index_safetensors(stacked)
    got = _tensor_data(convert_hf_to_gguf(stacked, tmp_path / "stacked.gguf", "f16"))
    assert got.keys() == ref.keys()
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)

    reads: list[int] = []
    original = gguf_mod.StTensor.read

    def counting(self: Any, a: int = 0, b: int | None = None) -> np.ndarray:
        x = original(self, a, b)
        reads.append(x.nbytes)
        return x

    monkeypatch.setattr(gguf_mod, "CHUNK_BYTES", 64 * 64 * 4)  # one expert's fp32 bytes per chunk
    monkeypatch.setattr(gguf_mod.StTensor, "read", counting)
    small = _tensor_data(convert_hf_to_gguf(hf_dir, tmp_path / "chunked.gguf", "f16"))
    for name in ref:
        np.testing.assert_array_equal(small[name], ref[name], err_msg=name)
    assert max(reads) <= 600 * 64 * 4  # the embedding (vocab x hidden); never a layer's 4 experts at once


def test_q8_0_expert_tensors(tiny_model_dir: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    hf_dir = tiny_model_dir("qwen3moe")
    path = convert_hf_to_gguf(hf_dir, tmp_path / "m-q8_0.gguf", "q8_0")
    t = read_fields(path)["_tensors"]
    for proj in PROJ:
        assert t[f"blk.0.ffn_{proj}_exps.weight"].tensor_type.name == "Q8_0"
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"  # the router stays F32, as llama.cpp's
    ids = AutoTokenizer.from_pretrained(hf_dir)(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = hf_model(hf_dir)(torch.tensor([ids])).logits[0].numpy()
    llm = load_gguf(path)
    got = gguf_logits(llm, ids)
    llm.close()
    assert nmse(got, ref) < 0.05  # verify.py's q8_0 guide; measured ~3e-3
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.8


def _wide_moe(out_dir: Path) -> Path:
    """A one-layer Qwen3-MoE whose rows are multiples of 256, so K-quants need no fallback."""
    import transformers as tf
    from conftest import tokenizer_path

    from qlocal.hf import pad_id

    tok = tf.AutoTokenizer.from_pretrained(tokenizer_path("qwen3moe"))
    config = tf.Qwen3MoeConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=64, intermediate_size=512, max_position_embeddings=1024,
                               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, norm_topk_prob=True,
                               eos_token_id=tok.eos_token_id, pad_token_id=pad_id(tok), tie_word_embeddings=False,
                               initializer_range=0.1)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def test_kquant_on_expert_tensors(tmp_path: Path) -> None:
    """llama.cpp's Q4_K_M quantises the 3-D expert tensors expert by expert, and the result still
    picks HF's next tokens."""
    from transformers import AutoTokenizer

    from qlocal.export.quantize import quantize_gguf

    hf_dir = _wide_moe(tmp_path / "wide")
    f16 = convert_hf_to_gguf(hf_dir, tmp_path / "wide-f16.gguf", "f16")
    rep = quantize_gguf(f16, tmp_path / "wide-q4_k_m.gguf", "q4_k_m")
    assert rep.fallback_tensors == 0, rep.tensor_types
    t = read_fields(tmp_path / "wide-q4_k_m.gguf")["_tensors"]
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"  # llama.cpp never quantises the router
    for proj in PROJ:
        tensor = t[f"blk.0.ffn_{proj}_exps.weight"]
        assert tensor.tensor_type.name in ("Q4_K", "Q5_K", "Q6_K") and list(tensor.shape)[-1] == 4
    ids = AutoTokenizer.from_pretrained(hf_dir)(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = hf_model(hf_dir)(torch.tensor([ids])).logits[0].numpy()
    for path, limit in ((f16, 1e-3), (tmp_path / "wide-q4_k_m.gguf", 0.35)):
        llm = load_gguf(path)
        got = gguf_logits(llm, ids)
        llm.close()
        assert nmse(got, ref) < limit, path.name
        assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.5, path.name


@pytest.mark.parametrize("change,message", [
    ({"norm_topk_prob": False}, "norm_topk_prob false"),
    ({"mlp_only_layers": [1]}, "dense layers"),
    ({"decoder_sparse_step": 2}, "dense layers"),
    ({"num_local_experts": 8}, "num_experts is 8"),
])
def test_what_llama_cpp_cannot_run_stops_in_one_line(change: dict[str, Any], message: str,
                                                     tiny_model_dir: Any, tmp_path: Path) -> None:
    src = tmp_path / "m"
    shutil.copytree(tiny_model_dir("qwen3moe"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(UserError, match=message) as e:
        convert_hf_to_gguf(src, tmp_path / "out.gguf", "f16")
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("out.gguf*")) and not list(tmp_path.glob(".out.gguf*"))


# ---------------------------------------------------------------- LoRA on the experts

@pytest.fixture(scope="module")
def expert_run(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run whose random adapter covers attention and the experts: PEFT turns the gate/up/down_proj
    targets into LoRA on transformers 5's stacked expert parameters (target_parameters)."""
    pytest.importorskip("peft")
    from export_helpers import make_run

    base = tiny_model_dir("qwen3moe")
    run = make_run(base, tmp_path_factory.mktemp("moe") / "run", b_std=0.2)
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == ["down_proj", "gate_up_proj"]
    return base, run


def test_expert_lora_merge_equals_peft(expert_run: tuple[Path, Path]) -> None:
    """Every expert's streamed fp32 merge equals PEFT's own merge_and_unload of the stacked parameters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlocal.export.merge import merged_tensors

    base, run = expert_run
    tensors = merged_tensors(base, run / "adapter")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           str(run / "adapter"))
    merged = peft_model.merge_and_unload()
    for layer in range(2):
        experts = merged.model.layers[layer].mlp.experts
        gate_up, down = experts.gate_up_proj.detach().numpy(), experts.down_proj.detach().numpy()
        for e in range(4):
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            want = {"gate": gate_up[e, :64], "up": gate_up[e, 64:], "down": down[e]}
            for proj in PROJ:
                t = tensors[f"{prefix}.{proj}_proj.weight"]
                assert t.lora_a is not None, "every expert tensor carries its LoRA pair"
                got = t.read()
                np.testing.assert_allclose(got, want[proj], atol=2e-6, err_msg=f"{prefix}.{proj}")
                assert np.abs(got - t.base.read()).max() > 1e-3  # the adapter moved this expert


def test_expert_lora_exports(expert_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Fused folder and F16 GGUF of an expert-LoRA run give base + adapter's logits (PEFT, fp32); a
    GGUF LoRA of it is refused in one line (the writer has no stacked-parameter LoRA)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlocal.export.fuse import fuse_run
    from qlocal.export.gguf_lora import convert_lora_to_gguf
    from qlocal.export.merge import merged_tensors

    base, run = expert_run
    report = fuse_run(run, tmp_path / "fused")
    assert report.max_abs_logit_diff < 1e-4, report
    path = convert_hf_to_gguf(tmp_path / "fused", tmp_path / "m-f16.gguf", "f16",
                              tensors=merged_tensors(base, run / "adapter"))
    ids = AutoTokenizer.from_pretrained(base)(PROMPT)["input_ids"]
    ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          str(run / "adapter")).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
        with ref_model.disable_adapter():
            plain = ref_model(torch.tensor([ids])).logits[0].numpy()
    llm = load_gguf(path)
    got = gguf_logits(llm, ids)
    llm.close()
    assert nmse(plain, ref) > 0.01, "the adapter must visibly change the logits"
    assert nmse(got, ref) < 1e-4
    with pytest.raises(UserError, match="stacked parameters") as e:
        convert_lora_to_gguf(run / "adapter", base, tmp_path / "lora.gguf")
    assert "\n" not in str(e.value) and not (tmp_path / "lora.gguf").exists()


@pytest.mark.slow  # trains and exports in subprocesses; fast twin: test_expert_lora_exports
def test_torch_trains_the_experts_when_asked(tiny_model_dir: Any, tmp_path: Path) -> None:
    """Naming the expert projections trains them on torch (PEFT maps gate/up/down_proj onto the stacked
    parameters); the run exports f16 that verifies against base + adapter."""
    from conftest import REPO, run_qlocal
    from safetensors.numpy import load_file

    run = tmp_path / "runs" / "e"
    targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    r = run_qlocal("train", "--model", tiny_model_dir("qwen3moe"), "--data", REPO / "data" / "alpaca_sample.jsonl",
                   "--iters", "3", "--output-dir", run.parent, "--name", run.name, "--quiet", "--max-seq-len", "128",
                   "--backend", "torch", "--lr", "0.02", "--target-modules", targets)
    assert r.returncode == 0, r.stderr
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    expert_b = [v for k, v in weights.items() if ".mlp.experts." in k and "lora_B" in k]
    assert len(expert_b) == 4 and all(np.abs(b).max() > 0 for b in expert_b)  # 2 layers x (gate_up, down)
    out = tmp_path / "export"
    r = run_qlocal("export", run, "--gguf", "--quant", "f16", "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"] and verify["files"][0]["nmse"] < 1e-3


def test_attention_lora_as_gguf_lora(tiny_model_dir: Any, tmp_path: Path) -> None:
    """--adapter-only on Qwen3-MoE: an attention LoRA (what all-linear trains) as a GGUF LoRA over the
    base GGUF gives PEFT's base + adapter in llama.cpp."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlocal.export.gguf_lora import convert_lora_to_gguf

    hf_dir = tiny_model_dir("qwen3moe")
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                                LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    base = convert_hf_to_gguf(hf_dir, tmp_path / "base.gguf", "f16")
    lora = convert_lora_to_gguf(tmp_path / "adapter", hf_dir, tmp_path / "lora.gguf")
    names = {t for t in read_fields(lora)["_tensors"]}
    assert {"blk.0.attn_q.weight.lora_a", "blk.1.attn_output.weight.lora_b"} <= names
    ids = AutoTokenizer.from_pretrained(hf_dir)(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = peft_model.eval()(torch.tensor([ids])).logits[0].numpy()
        with peft_model.disable_adapter():
            plain = peft_model(torch.tensor([ids])).logits[0].numpy()
    assert nmse(plain, ref) > 0.01
    llm = load_gguf(base, lora_path=str(lora))
    got = gguf_logits(llm, ids)
    llm.close()
    assert nmse(got, ref) < 1e-3


_MEASURE = """
import json, sys
from pathlib import Path
from qlocal.export.gguf import convert_hf_to_gguf
from qlocal.export.merge import merged_tensors
from qlocal.export.pretokenizer import check_pretokenizer
def peak_rss_mb():
    # VmHWM, not ru_maxrss: on Linux ru_maxrss keeps the forking parent's (pytest's) peak.
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
base, adapter, out = map(Path, sys.argv[1:4])
pre = check_pretokenizer(base)
tensors = merged_tensors(base, adapter)  # adapter read; no base tensor yet
before = peak_rss_mb()
convert_hf_to_gguf(base, out, "f16", pretokenizer=pre, tensors=tensors)
print(json.dumps({"before": before, "peak": peak_rss_mb()}))
"""


@pytest.mark.slow  # an export subprocess on 300 MiB of experts; fast twin: the one-expert chunks above
def test_stacking_merged_experts_holds_a_chunk_not_a_layer(tmp_path: Path) -> None:
    """Two layers of 16 bf16 experts of Qwen3-30B-A3B's width (768 x 2048), LoRA on all of them: the
    F16 conversion's RSS grows by about one 64 MiB chunk, not by a layer's experts (288 MiB fp32)."""
    import subprocess
    import sys

    from conftest import OFFLINE_ENV, REPO, tokenizer_path
    from safetensors.torch import save_file

    from qlocal.adapters import write_peft_adapter

    if not Path("/proc/self/status").is_file():
        pytest.skip("measures VmHWM from /proc (Linux)")
    n_layers, n_exp, hidden, ff, r = 2, 16, 2048, 768, 4
    base = tmp_path / "base"
    shutil.copytree(tokenizer_path("qwen3moe"), base)
    vocab = json.loads((base / "tokenizer.json").read_text())["model"]["vocab"]
    (base / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden,
        "num_hidden_layers": n_layers, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
        "intermediate_size": 6144, "moe_intermediate_size": ff, "num_experts": n_exp, "num_experts_per_tok": 2,
        "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 4096,
        "vocab_size": len(vocab) + 64, "tie_word_embeddings": True}))
    torch.manual_seed(0)
    tensors = {}
    for layer in range(n_layers):
        prefix = f"model.layers.{layer}.mlp"
        tensors[f"{prefix}.gate.weight"] = torch.randn(n_exp, hidden, dtype=torch.bfloat16)
        for e in range(n_exp):
            for proj, shape in (("gate", (ff, hidden)), ("up", (ff, hidden)), ("down", (hidden, ff))):
                tensors[f"{prefix}.experts.{e}.{proj}_proj.weight"] = torch.randn(*shape, dtype=torch.bfloat16)
    save_file(tensors, str(base / "model.safetensors"))
    del tensors
    rng = np.random.default_rng(0)
    weights = {}
    for layer in range(n_layers):
        mod = f"base_model.model.model.layers.{layer}.mlp.experts"
        # PEFT's layout: gate_up_proj (rank doubled, as PEFT's MoE conversion writes it) nested in down_proj.
        weights[f"{mod}.base_layer.lora_A.weight"] = rng.standard_normal((n_exp * 2 * r, hidden), dtype=np.float32)
        weights[f"{mod}.base_layer.lora_B.weight"] = rng.standard_normal((2 * ff, 2 * r * n_exp), dtype=np.float32)
        weights[f"{mod}.lora_A.weight"] = rng.standard_normal((n_exp * r, ff), dtype=np.float32)
        weights[f"{mod}.lora_B.weight"] = rng.standard_normal((hidden, r * n_exp), dtype=np.float32)
    write_peft_adapter(tmp_path / "adapter", {
        "peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": [], "lora_dropout": 0.0,
        "target_parameters": ["down_proj", "gate_up_proj"], "rank_pattern": {r".*\.gate_up_proj": 2 * r},
        "alpha_pattern": {r".*\.gate_up_proj": 16}}, weights)
    env = {**OFFLINE_ENV, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", _MEASURE, str(base), str(tmp_path / "adapter"), str(tmp_path / "m.gguf")],
                         capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    rss = json.loads(res.stdout.strip().splitlines()[-1])
    grew = rss["peak"] - rss["before"]
    layer_fp32_mb = n_exp * 3 * ff * hidden * 4 / 2**20
    print(f"MoE F16 conversion RSS growth {grew:.0f} MiB (peak {rss['peak']:.0f}); one layer's experts "
          f"{layer_fp32_mb:.0f} MiB fp32, the model's {n_layers * layer_fp32_mb:.0f} MiB")
    assert grew < 0.6 * layer_fp32_mb, rss
    t = read_fields(tmp_path / "m.gguf")["_tensors"]
    assert list(t["blk.1.ffn_down_exps.weight"].shape) == [ff, hidden, n_exp]
