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


# ---- one rule for train, eval, chat and generate ---------------------------------------------

both_installed = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "peft", "mlx", "mlx_lm")),
    reason="needs both backends installed (torch extra and mlx[cpu])")


@both_installed
@pytest.mark.parametrize("mac", [False, True], ids=["linux", "apple-silicon"])
def test_eval_chat_generate_choose_what_train_chooses(mac: bool, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    """With torch and mlx installed, `auto` gives the same backend everywhere, whichever backend a
    run was trained on; an explicit --backend wins."""
    from infer_helpers import lively_model, synthetic_run

    from qlocal.config import Config
    from qlocal.evaluate import EvalOptions, open_scorer
    from qlocal.infer import open_generator

    monkeypatch.setattr(select, "is_apple_silicon", lambda: mac)
    trains_on, _ = select_backend(Config().train.backend)  # what `qlocal train` without --backend uses
    assert trains_on == ("mlx" if mac else "torch")
    root = tmp_path_factory.getbasetemp()
    base = lively_model(root, "qwen2")
    for trained_with in ("torch", "mlx"):
        run = str(synthetic_run(root, base, backend=trained_with))
        # chat and generate open their target with open_generator(target, --backend), eval with open_scorer.
        assert open_generator(run, "auto").backend.name == trains_on
        assert open_generator(run).backend.name == trains_on
        scorer, kind, _ = open_scorer(run, EvalOptions(data="unused.jsonl", backend="auto"))
        assert kind == "run" and scorer.backend_name == trains_on
    other = "torch" if mac else "mlx"
    assert open_generator(run, other).backend.name == other
    assert open_scorer(str(base), EvalOptions(data="unused.jsonl", backend=other))[0].backend_name == other
