"""float32 -> 16-bit encodings for the files export writes (the GGUF converter's F16 tensors, the
fused folder's bfloat16/float16 safetensors): one place for both writers.

torch's casts are vectorised (~5x numpy's scalar float16 cast here; numpy has no bfloat16 at all, so
its path is six integer passes) and are used when the process has already imported torch, as an
export has; a bare conversion keeps numpy and does not pay torch's ~2 s import for them. Either way
the bits are the same: round to nearest even, overflow to infinity, NaN kept a NaN.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def _torch(x: np.ndarray) -> Any:
    """torch when this process has imported it and `x` can be shared with it as it is, else None."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and x.dtype == np.float32 and x.flags.c_contiguous else None


def to_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16."""
    torch = _torch(x)
    if torch is None:
        return x.astype(np.float16)
    out = torch.from_numpy(x).to(torch.float16).numpy()
    nan = np.isnan(x)
    if nan.any():  # numpy keeps a NaN's payload where torch writes its canonical one
        out[nan] = x[nan].astype(np.float16)
    return out


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 as uint16 bits. A NaN keeps its sign and top payload bits, made quiet
    (torch would write its one canonical NaN)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    torch = _torch(x)
    if torch is not None:
        out = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        nan = np.isnan(x)
        if nan.any():
            out[nan] = ((x.view(np.uint32)[nan] >> np.uint32(16)) | np.uint32(64)).astype(np.uint16)
        return out
    n = x.view(np.uint32)
    # In place on one temporary: n + 0x7FFF + (bit 16 of n), shifted down. Only NaNs can wrap; they
    # are set apart below.
    r = n >> np.uint32(16)
    r &= np.uint32(1)
    r += np.uint32(0x7FFF)
    r += n
    r >>= np.uint32(16)
    out = r.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((n[nan] >> np.uint32(16)) | np.uint32(64)).astype(np.uint16)
    return out
