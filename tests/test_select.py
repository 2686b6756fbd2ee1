"""Backend selection and `qlocal doctor`."""

from __future__ import annotations

import importlib.util

import pytest

from qlocal.backends import select
from qlocal.backends.select import select_backend, torch_device
from qlocal.errors import UserError


def _hide(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args, **kwargs):
        return None if name in names else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def test_auto_on_linux_cpu_picks_torch() -> None:
    if select.is_apple_silicon():
        pytest.skip("this check is for a non-Mac box")
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present; the CPU reason does not apply")
    name, reason = select_backend("auto")
    assert name == "torch"
    assert "CPU" in reason
    assert torch_device() == "cpu"


def test_explicit_mlx_when_installed() -> None:
    if importlib.util.find_spec("mlx") is None:
        pytest.skip("mlx not installed")
    name, reason = select_backend("mlx")
    assert name == "mlx" and "MLX" in reason


def test_explicit_torch() -> None:
    name, _ = select_backend("torch")
    assert name == "torch"


def test_missing_mlx_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "mlx")
    with pytest.raises(UserError, match=r"MLX backend requested but mlx is not installed: pip install 'qlocal\[mlx\]'"):
        select_backend("mlx")


def test_missing_torch_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "torch")
    with pytest.raises(UserError, match=r"qlocal\[torch\]"):
        select_backend("torch")


def test_auto_on_apple_silicon_prefers_mlx(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("mlx") is None:
        pytest.skip("mlx not installed")
    monkeypatch.setattr(select.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(select.platform, "machine", lambda: "arm64")
    name, reason = select_backend("auto")
    assert name == "mlx" and "Apple Silicon" in reason


def test_auto_without_mlx_on_mac_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(select.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(select, "_cuda_available", lambda: False)
    _hide(monkeypatch, "mlx")
    name, reason = select_backend("auto")
    assert name == "torch" and "mlx is not installed" in reason


def test_unknown_backend() -> None:
    with pytest.raises(UserError, match="train.backend"):
        select_backend("tpu")


def test_doctor_report_sections() -> None:
    from qlocal.doctor import doctor_report

    report = doctor_report()
    for section in ("System:", "GPU:", "bitsandbytes:", "MLX:", "Libraries:", "Backend (auto):"):
        assert section in report
    for word in ("OS:", "Python:", "CPU:", "RAM:", "transformers:", "peft:", "gguf:", "llama-cpp-python:",
                 "datasets:", "CPU 4-bit:"):
        assert word in report
    assert "Traceback" not in report


def test_doctor_reports_missing_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    from qlocal.doctor import doctor_report

    _hide(monkeypatch, "bitsandbytes", "mlx", "llama_cpp")
    report = doctor_report()
    assert "llama-cpp-python: not installed — pip install 'qlocal[gguf]'" in report
    assert "not installed — pip install 'qlocal[mlx]'" in report
