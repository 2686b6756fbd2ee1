"""The streaming fp32 merge (qlocal.export.merge): PEFT's merge exactly, bounded memory, and the
export measured against base + adapter in fp32 (a bf16 Gemma 3's F16 GGUF beats its bf16 fused folder)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("gguf")

from export_helpers import make_run, to_dtype_copy  # noqa: E402

from qlocal.errors import UserError  # noqa: E402
from qlocal.export.merge import encode, merged_tensors  # noqa: E402


def test_streamed_merge_equals_peft_merge(tiny_model_dir, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = to_dtype_copy(tiny_model_dir("qwen2"), tmp_path / "base-bf16", "bfloat16")
    run = make_run(base, tmp_path / "run", use_rslora=True, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 32.0})
    tensors = merged_tensors(base, run / "adapter")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                     str(run / "adapter")).merge_and_unload()
    state = {k: v.detach().numpy() for k, v in peft.state_dict().items()}
    adapted = [n for n, t in tensors.items() if t.lora_a is not None]
    assert adapted and all(n in state for n in adapted)
    for name in adapted:
        np.testing.assert_allclose(tensors[name].read(), state[name], rtol=0, atol=1e-6)
        # Row chunks are the same rows as the whole tensor.
        np.testing.assert_array_equal(tensors[name].read(3, 7), tensors[name].read()[3:7])


def test_bf16_encoding_rounds_to_nearest_even() -> None:
    import torch

    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 3
    x[:3] = [np.nan, np.inf, -0.0]
    ours = encode(x, "bfloat16")
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours[1:], ref[1:])
    assert np.isnan((ours[:1].astype(np.uint32) << 16).view(np.float32)).all()


def test_adapter_errors_are_one_line(tiny_model_dir, tmp_path: Path) -> None:
    base = tiny_model_dir("llama")
    run = make_run(base, tmp_path / "run")
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "fan_in_fan_out": True}))
    with pytest.raises(UserError, match="fan_in_fan_out"):
        merged_tensors(base, run / "adapter")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="no tensor .* in base"):
        _renamed(base, run, tmp_path)


def _renamed(base: Path, run: Path, tmp_path: Path) -> None:
    from qlocal.adapters import read_peft_adapter, write_peft_adapter

    cfg, w = read_peft_adapter(run / "adapter")
    write_peft_adapter(tmp_path / "bad", cfg, {k.replace("layers.0.", "layers.99."): v for k, v in w.items()})
    merged_tensors(base, tmp_path / "bad")


def test_fused_dtype_option(tiny_model_dir, tmp_path: Path) -> None:
    from qlocal.export.fuse import fuse_run
    from qlocal.export.gguf import index_safetensors

    base = to_dtype_copy(tiny_model_dir("llama"), tmp_path / "base-bf16", "bfloat16")
    run = make_run(base, tmp_path / "run")
    report = fuse_run(run, tmp_path / "fused", fused_dtype="float32")
    assert report.dtype == "float32"
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["dtype"] == "float32"
    assert {t.dtype for t in index_safetensors(tmp_path / "fused").values()} == {"F32"}
    # Saved in fp32, the fused folder is the merge itself.
    assert report.max_abs_logit_diff < 1e-4 and report.max_abs_logit_diff_fp32 < 1e-4
    with pytest.raises(UserError, match="--fused-dtype"):
        fuse_run(run, tmp_path / "fused2", fused_dtype="int8")


_MEASURE = textwrap.dedent("""
    import sys, json
    from pathlib import Path
    from qlocal.export.merge import merged_tensors, write_safetensors
    def peak_rss_mb():
        # VmHWM, not ru_maxrss: on Linux ru_maxrss keeps the forking parent's (pytest's) peak.
        line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    base, adapter, out = map(Path, sys.argv[1:4])
    tensors = merged_tensors(base, adapter)  # adapter read; no base tensor yet
    before = peak_rss_mb()
    out.mkdir()
    write_safetensors(tensors, base, out, "bfloat16")
    print(json.dumps({"before": before, "peak": peak_rss_mb()}))
""")


def test_merge_peak_memory_is_one_tensor(tmp_path: Path) -> None:
    """A 12 x 32 MB bf16 "model" (768 MB in fp32), LoRA on every tensor: the merge's RSS grows by
    about one tensor's fp32 copy, never by the model."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("measures VmHWM from /proc (Linux)")
    import torch
    from safetensors.torch import save_file

    from qlocal.adapters import peft_config, write_peft_adapter

    base, rows, cols, n = tmp_path / "base", 2048, 8192, 12
    base.mkdir()
    torch.manual_seed(0)
    for shard in range(2):
        save_file({f"layers.{i}.proj.weight": torch.randn(rows, cols, dtype=torch.bfloat16)
                   for i in range(shard * n // 2, (shard + 1) * n // 2)},
                  str(base / f"model-0000{shard + 1}-of-00002.safetensors"))
    rng = np.random.default_rng(0)
    weights = {}
    for i in range(n):
        weights[f"base_model.model.layers.{i}.proj.lora_A.weight"] = rng.standard_normal((8, cols), dtype=np.float32)
        weights[f"base_model.model.layers.{i}.proj.lora_B.weight"] = rng.standard_normal((rows, 8), dtype=np.float32)
    write_peft_adapter(tmp_path / "adapter", peft_config(8, 16, ["proj"], None, str(base)), weights)
    res = subprocess.run([sys.executable, "-c", _MEASURE, str(base), str(tmp_path / "adapter"), str(tmp_path / "out")],
                         capture_output=True, text=True, check=True)
    rss = json.loads(res.stdout.strip().splitlines()[-1])
    grew = rss["peak"] - rss["before"]
    model_fp32_mb = n * rows * cols * 4 / 2**20
    print(f"merge RSS growth {grew:.0f} MiB (peak {rss['peak']:.0f}) for a {model_fp32_mb:.0f} MiB fp32 model")
    assert grew < 0.2 * model_fp32_mb, rss
    out = merged_tensors(tmp_path / "out", tmp_path / "adapter")  # the written file reads back
    assert out["layers.3.proj.weight"].base.dtype == "BF16"


def test_bf16_gemma3_f16_gguf_beats_the_bf16_fused_folder(tiny_model_dir, tmp_path: Path) -> None:
    from qlocal.export.pipeline import ExportOptions, export_run

    base = to_dtype_copy(tiny_model_dir("gemma3"), tmp_path / "base-bf16", "bfloat16")
    run = make_run(base, tmp_path / "run")
    result = export_run(run, ExportOptions(quants=["f16", "q8_0"], out_dir=tmp_path / "export"), echo=print)
    assert result.verify_passed, result.summary
    doc = json.loads((tmp_path / "export" / "verify.json").read_text())
    assert doc["reference"] == "base + adapter (fp32)"
    assert doc["fused"]["dtype"] == "bfloat16"
    f16 = next(f for f in doc["files"] if f["quant"] == "f16")
    print(f"f16 GGUF NMSE {f16['nmse']:.2e} vs bf16 fused folder {doc['fused']['nmse']:.2e}")
    assert f16["nmse"] < doc["fused"]["nmse"], doc
