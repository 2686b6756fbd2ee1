"""Float32 weights read into reused buffers, for the layer-by-layer reference (qlocal.export.layerwise).

Every decoder layer of a model has the same parameter shapes, so one float32 buffer per (parameter,
shape) serves each layer in turn. A fresh array per tensor, as `StTensor.read` returns, is paid for
in page faults: the kernel zeroes every new 4 KiB page on first write. On the 0.5B Qwen-shaped
bench model that was 1.7 of the 2.3 CPU-s it took to read the decoder layers once, which dominates
a KV-cached greedy step (one token per sequence, the whole model read for it).

The values are exactly `read()`'s: the same bf16 widening, the same fp32 LoRA merge arithmetic
(tests/test_layerwise.py compares them bit for bit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}


def _source(t: Any) -> tuple[Any, tuple[np.ndarray, np.ndarray, float] | None] | None:
    """(safetensors tensor, LoRA pair to merge or None) when `t` (a gguf.StTensor, or a
    merge.MergedTensor without trained token rows) can be read into a buffer; else None."""
    lora = None
    if hasattr(t, "base"):  # merge.MergedTensor
        if t.token_rows is not None or t.n_rows is not None:
            return None
        if t.lora_a is not None:
            lora = (t.lora_a, t.lora_b, t.scale)
        t = t.base
    if not isinstance(getattr(t, "path", None), Path) or getattr(t, "dtype", None) not in _ITEMSIZE \
            or not getattr(t, "shape", ()):
        return None
    return t, lora


class WeightPool:
    """Reused float32 buffers, one per (key, shape), and one raw byte buffer for the file reads."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[Any, ...], np.ndarray] = {}
        self._raw = np.empty(0, np.uint8)

    def read(self, key: Any, t: Any, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of `t` as float32, in the buffer kept for `key` (valid until the next
        read with the same key and shape); tensors the pool cannot read come from `t.read`."""
        src = _source(t)
        if src is None:
            return t.read(start, stop)
        st, lora = src
        stop = st.shape[0] if stop is None else stop
        shape = (stop - start, *st.shape[1:])
        row = int(np.prod(st.shape[1:], dtype=np.int64))
        item = _ITEMSIZE[st.dtype]
        nbytes = (stop - start) * row * item
        out = self._buf((key, shape), shape)
        if self._raw.nbytes < nbytes:
            self._raw = np.empty(nbytes, np.uint8)
        raw = self._raw[:nbytes]
        with open(st.path, "rb") as f:
            f.seek(st.offset + start * row * item)
            if f.readinto(memoryview(raw)) != nbytes:
                raise OSError(f"{st.path}: file ends inside a tensor (truncated safetensors)")
        flat = out.reshape(-1)
        if st.dtype == "BF16":  # bf16 is the top half of an fp32: widening is exact
            np.left_shift(raw.view(np.uint16), 16, out=flat.view(np.uint32), dtype=np.uint32, casting="unsafe")
        else:
            flat[...] = raw.view(np.float16 if st.dtype == "F16" else np.float32)
        if lora is not None:  # merge.MergedTensor.read's arithmetic, into a buffer
            a, b, scale = lora
            delta = np.matmul(b[start:stop], a, out=self._buf((key, "delta", shape), shape))
            delta *= np.float32(scale)
            out += delta
        return out

    def _buf(self, key: tuple[Any, ...], shape: tuple[int, ...]) -> np.ndarray:
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = np.empty(shape, np.float32)
        return buf

    def clear(self) -> None:
        """Free every buffer."""
        self._bufs.clear()
        self._raw = np.empty(0, np.uint8)
