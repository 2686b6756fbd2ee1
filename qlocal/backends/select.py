"""Pick the backend (MLX or PyTorch) and the torch device, without importing either.

`auto` = MLX on Apple Silicon when mlx is installed, else PyTorch on CUDA when available, else
PyTorch on CPU. Every choice comes with a one-sentence reason that `qlocal doctor` prints.

One rule for train, eval, chat and generate: they all call select_backend with --backend (auto
when not given). A run folder records the backend it trained on, but that is a fact about the
machine it trained on, not a request: its adapter is PEFT on disk and loads into either backend,
so a run trained on a Mac is evaluated and served by PyTorch on a CUDA box (and a CUDA run by
MLX on a Mac). An explicit --backend always wins.
"""

from __future__ import annotations

import importlib.util
import platform
from typing import TYPE_CHECKING

from qlocal.errors import UserError

if TYPE_CHECKING:
    from qlocal.backends.base import Backend

BACKENDS = ("auto", "torch", "mlx")


def _installed(module: str) -> bool:
    # find_spec only looks the module up; importing mlx/torch costs seconds and may fail loudly.
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def is_apple_silicon() -> bool:
    """True on macOS running natively on arm64 (not under Rosetta's x86_64 view)."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _cuda_available() -> bool:
    if not _installed("torch"):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install should mean "no CUDA", not a crash
        return False


def torch_device() -> str:
    """Device torch training runs on: "cuda" when available, else "cpu".

    MPS is deliberately not used: bitsandbytes has no MPS kernels (so no QLoRA), several ops
    silently fall back or differ in bf16, and MLX is the better path on a Mac anyway.
    """
    return "cuda" if _cuda_available() else "cpu"


def select_backend(requested: str = "auto") -> tuple[str, str]:
    """Resolve `requested` ("auto" | "torch" | "mlx") to (backend, reason sentence).

    Raises UserError when an explicitly requested backend is not installed.
    """
    requested = (requested or "auto").lower()
    if requested not in BACKENDS:
        raise UserError(f"train.backend: unknown backend '{requested}'; use one of {', '.join(BACKENDS)}")
    has_mlx, has_torch = _installed("mlx"), _installed("torch")

    if requested == "mlx":
        if not has_mlx:
            raise UserError("MLX backend requested but mlx is not installed: pip install 'qlocal[mlx]'")
        where = "Apple Silicon GPU" if is_apple_silicon() else "CPU (mlx[cpu]; slow, for testing)"
        return "mlx", f"MLX requested explicitly; it runs on the {where}."
    if requested == "torch":
        if not has_torch:
            raise UserError("PyTorch backend requested but torch is not installed: pip install 'qlocal[torch]'")
        return "torch", f"PyTorch requested explicitly; it runs on {_device_words(torch_device())}."

    # auto
    if is_apple_silicon() and has_mlx:
        return "mlx", "Apple Silicon with mlx installed: MLX uses the unified-memory GPU."
    if has_torch:
        dev = torch_device()
        if dev == "cuda":
            return "torch", "CUDA GPU available: PyTorch on CUDA (QLoRA via bitsandbytes)."
        why = "mlx is not installed" if is_apple_silicon() else "no Apple Silicon"
        return "torch", f"No CUDA GPU and {why}: PyTorch on CPU (slow; fine for small models)."
    if has_mlx:
        return "mlx", "torch is not installed but mlx is: MLX on CPU (slow)."
    raise UserError("no training backend installed: pip install 'qlocal[torch]' (or 'qlocal[mlx]' on a Mac)")


def _device_words(dev: str) -> str:
    return "the CUDA GPU" if dev == "cuda" else "the CPU"


def create_backend(name: str) -> Backend:
    """Instantiate a backend by name; imports stay inside so unused frameworks never load."""
    if name == "torch":
        from qlocal.backends.torch_backend import TorchBackend

        return TorchBackend()
    if name == "mlx":
        from qlocal.backends.mlx_backend import MLXBackend  # type: ignore[import-not-found]

        return MLXBackend()
    raise ValueError(f"unknown backend {name}")
