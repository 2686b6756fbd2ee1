"""train.dtype on the torch backend: auto's choice on CPU, and bf16 CPU training against fp32."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from train_helpers import sample_batches, train_cfg


def test_auto_is_fp32_on_cpu_and_names_bf16_where_the_cpu_has_a_bf16_matmul(tmp_path: Path, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    from qlocal.backends import torch_dtype

    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(sys, "platform", "linux")
    for flags, want in (("fpu sse2 avx2 avx512f avx512_bf16 amx_tile", "avx512_bf16"),
                        ("fpu sse2 avx2 amx_bf16 amx_tile avx512_bf16", "amx_bf16"),
                        ("fpu sse2 avx2 avx512f avx512_vnni", None)):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert torch_dtype.cpu_bf16_flag(info) == want, flags
    assert torch_dtype.cpu_bf16_flag(tmp_path / "absent") is None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert torch_dtype.cpu_bf16_flag(info) is None  # no /proc there: fp32 (a Mac trains on MLX)

    for flag in ("amx_bf16", None):
        monkeypatch.setattr(torch_dtype, "cpu_bf16_flag", lambda flag=flag: flag)
        dtype, why = torch_dtype.pick_dtype("auto", "cpu")
        assert dtype == torch.float32 and why.startswith("auto:") and (flag or "without") in why
        assert ("--dtype bfloat16" in why) == bool(flag)  # the faster setting is named where it is native
        assert torch_dtype.pick_dtype("float32", "cpu") == (torch.float32, "train.dtype")  # a setting stands


@pytest.mark.slow
def test_bf16_cpu_training_falls_and_tracks_fp32(tiny_model_dir, tmp_path: Path) -> None:
    """20 steps of the same batches in fp32 and in bf16 (base weights bf16, LoRA weights and AdamW
    state fp32, bf16 matmuls): the bf16 loss falls and stays within 0.02 of fp32's at every step
    (measured 0.004 at most on this tiny model; the bf16 rounding of the base weights is the rest)."""
    torch = pytest.importorskip("torch")
    from qlocal.backends.torch_backend import TorchBackend

    model_dir = tiny_model_dir("qwen2")
    batches = sample_batches(model_dir, n=5, bs=4, max_len=128)
    curves = {}
    for dtype in ("float32", "bfloat16"):
        b = TorchBackend()
        info = b.setup(model_dir, train_cfg("torch", model_dir, tmp_path, dtype, **{
            "train.dtype": dtype, "lora.dropout": 0.0}))
        assert info["dtype"] == dtype and "fused_lora_linear" in info["fused_kernels"]
        if dtype == "bfloat16":
            trained = [p for p in b.model.parameters() if p.requires_grad]
            frozen = [p for p in b.model.parameters() if not p.requires_grad]
            assert {p.dtype for p in trained} == {torch.float32}
            assert {p.dtype for p in frozen} == {torch.bfloat16}
        curves[dtype] = [b.train_step([batches[step % 5]], 5e-3).loss for step in range(20)]
    fp32, bf16 = curves["float32"], curves["bfloat16"]
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.02, (fp32, bf16)
    assert sum(bf16[-5:]) / 5 < bf16[0] - 0.15, bf16
