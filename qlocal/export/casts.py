"""float32 -> 16-bit encodings for the files export writes (the GGUF converter's F16 tensors, the
fused folder's bfloat16/float16 safetensors): one place for both writers. Round to nearest even,
overflow to infinity, NaN kept a NaN (its sign and top payload bits).

numpy only, on purpose: torch's casts are ~5x faster on a lone array, but inside an export their
OpenMP threads contend with the converter's reading thread and llama.cpp's, and the 0.5B bench
export took longer with them (45-49 s against 40-41 s wall, more CPU and ~80 MiB more RSS).
"""

from __future__ import annotations

import numpy as np


def to_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16."""
    return x.astype(np.float16)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 as uint16 bits."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # In place on one temporary: n + 0x7FFF + (bit 16 of n), shifted down. Only NaNs can wrap; they
    # are set apart below.
    r = n >> np.uint32(16)
    r &= np.uint32(1)
    r += np.uint32(0x7FFF)
    r += n
    r >>= np.uint32(16)
    out = r.astype(np.uint16)
    nan = np.isnan(n.view(np.float32))
    if nan.any():
        out[nan] = ((n[nan] >> np.uint32(16)) | np.uint32(64)).astype(np.uint16)
    return out
