"""GGUF quantisation: which types the converter writes directly and which go through llama.cpp.

F32/F16/BF16/Q8_0 are written by qlocal.export.gguf straight from the HF tensors. K-quants and the
legacy 4/5-bit types are made from an F16 GGUF by the llama.cpp compiled into llama-cpp-python
(`llama_model_quantize`), so no llama.cpp checkout or build is needed.

llama.cpp quantises a tensor with a K-quant only when its row length is a multiple of 256 (the
super-block size); other tensors silently get a fallback type (e.g. q5_0/q8_0). `tensor_types`
reads the result back so the export can say how much of the file really is the asked-for type.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlocal import atomic
from qlocal.errors import UserError, missing_extra

DIRECT = ("f32", "f16", "bf16", "q8_0")
"""Written by the converter itself."""

VIA_LLAMA_CPP: dict[str, str] = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
}
"""Made from an F16 GGUF with llama-cpp-python's llama_model_quantize."""

ALL_QUANTS = (*DIRECT, *VIA_LLAMA_CPP)


@dataclass
class QuantReport:
    """One quantised file: its size, time, and the tensor types it really holds."""

    quant: str
    path: str
    bytes: int
    seconds: float
    tensor_types: dict[str, int] = field(default_factory=dict)
    fallback_tensors: int = 0
    """2-D weight tensors that llama.cpp could not give the asked-for block type (row length not a
    multiple of the block size) and stored in another type instead."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_quants(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'q4_k_m,Q8_0, f16' -> ['q4_k_m', 'q8_0', 'f16'] (deduplicated, order kept); UserError if unknown."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        q = raw.strip().lower().replace("-", "_")
        if not q:
            continue
        if q not in ALL_QUANTS:
            raise UserError(f"--quant {raw.strip()!r} is not supported; choose from {', '.join(ALL_QUANTS)} "
                            "(comma-separated for several)")
        if q not in out:
            out.append(q)
    if not out:
        raise UserError(f"--quant is empty; choose from {', '.join(ALL_QUANTS)}")
    return out


def gguf_name(quant: str) -> str:
    """File name of the model GGUF for `quant` inside the export folder."""
    return f"model-{quant}.gguf"


def quantize_gguf(src: Path, out: Path, quant: str, nthread: int = 0) -> QuantReport:
    """Quantise F16 GGUF `src` to `quant` at `out` (temp name + rename). nthread 0 = all cores."""
    if quant not in VIA_LLAMA_CPP:
        raise UserError(f"{quant} is written directly by the converter, not by llama_model_quantize "
                        f"(llama.cpp types: {', '.join(VIA_LLAMA_CPP)})")
    try:
        import llama_cpp
    except ImportError:
        raise missing_extra("llama-cpp-python", "gguf") from None
    t0 = time.perf_counter()
    out = Path(out)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, VIA_LLAMA_CPP[quant])
    params.nthread = nthread
    with atomic.writing(out) as tmp:
        with _captured_output() as log:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0 or not tmp.is_file():
            _raise_if_disk_full(src, tmp)
            tail = " | ".join(log().strip().splitlines()[-3:])
            raise UserError(f"{src}: llama.cpp could not quantise it to {quant} (status {rc}: {tail})")
    types = tensor_types(out)
    return QuantReport(quant, str(out), out.stat().st_size, round(time.perf_counter() - t0, 2), types,
                       fallback_count(out, quant))


def _raise_if_disk_full(src: Path, tmp: Path) -> None:
    """llama.cpp reports a full disk as status 1 and logs nothing we capture; with less room left
    than the F16 source takes (a quantised file is smaller), that is what happened: say so, as every
    other full-disk write does (cli: one line, exit 2)."""
    import errno
    import shutil

    if shutil.disk_usage(tmp.parent).free < src.stat().st_size:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))


@contextlib.contextmanager
def _captured_output() -> Iterator[Callable[[], str]]:
    """Send C-level stdout/stderr to a temp file: llama.cpp logs every tensor while quantising."""
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    text: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield lambda: "".join(text)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            f.seek(0)
            text.append(f.read().decode("utf-8", "replace"))


def tensor_types(path: Path) -> dict[str, int]:
    """Histogram of tensor storage types in a GGUF, e.g. {'Q4_K': 120, 'F32': 49}."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return dict(Counter(t.tensor_type.name for t in reader.tensors))


_BASE_TYPE = {"q4_k_m": ("Q4_K", "Q5_K", "Q6_K"), "q4_k_s": ("Q4_K", "Q5_K"), "q5_k_m": ("Q5_K", "Q6_K"),
              "q5_k_s": ("Q5_K",), "q6_k": ("Q6_K",), "q3_k_m": ("Q3_K", "Q4_K", "Q5_K"),
              "q4_0": ("Q4_0", "Q4_1", "Q6_K", "Q8_0"), "q5_0": ("Q5_0", "Q5_1", "Q6_K", "Q8_0")}
"""Types each llama.cpp ftype mix legitimately uses for its 2-D weights (the _M mixes bump some
tensors, e.g. attn_v / ffn_down / output, to a larger K type on purpose)."""


def fallback_count(path: Path, quant: str) -> int:
    """2-D weight tensors not stored in one of the types `quant`'s mix uses (i.e. fallbacks)."""
    from gguf import GGUFReader

    allowed = _BASE_TYPE.get(quant)
    if not allowed:
        return 0
    reader = GGUFReader(str(path))
    # llama.cpp never quantises a MoE router (ffn_gate_inp): kept as it is on purpose, not a fallback.
    return sum(1 for t in reader.tensors
               if len(t.shape) >= 2 and t.name.endswith(".weight") and "norm" not in t.name
               and "ffn_gate_inp" not in t.name and t.tensor_type.name not in allowed)
