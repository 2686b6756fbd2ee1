"""The torch backend's compute dtype: `train.dtype` resolved for the device, with the reason."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# x86 flags of a native bf16 matmul (AMX tiles, AVX-512 dot products): there torch's bf16 matmuls ran
# 2.2-2.6x faster than fp32 (bench/RESULTS.md); without them bf16 is emulated and slower than fp32.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flag(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The first of BF16_FLAGS this CPU reports (Linux /proc/cpuinfo), else None. Read as text, no
    torch import. Elsewhere None: a Mac trains on MLX by default, and torch's CPU bf16 speed on ARM
    has not been measured here."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return next((f for f in BF16_FLAGS if f in flags), None)
    return None


def pick_dtype(name: str, device: str) -> tuple[Any, str]:
    """(torch dtype, why) for `train.dtype`. auto: bf16 on CUDA when supported (else fp16); fp32 on
    CPU, with a hint to `--dtype bfloat16` (frozen base in bf16, LoRA weights and AdamW state fp32)
    when the CPU has a native bf16 matmul."""
    import torch

    if name != "auto":
        return getattr(torch, name), "train.dtype"
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: CUDA bf16"
        return torch.float16, "auto: CUDA without bf16"
    # fp32 even where bf16 is native: the quickstart's Gemma trained in bf16 ends its turn from the
    # run itself (seeds 0-2), but its Q4_K_M GGUF (seed 0) rambled past <end_of_turn> where fp32's
    # stops: a narrower end-of-turn margin. bf16 stays one flag away and is named here, since it
    # trains ~2x faster on such a CPU (bench/RESULTS.md).
    flag = cpu_bf16_flag()
    if flag:
        return torch.float32, f"auto: fp32 on CPU (this CPU has {flag}: --dtype bfloat16 trains faster)"
    return torch.float32, "auto: CPU without a native bf16 matmul"
