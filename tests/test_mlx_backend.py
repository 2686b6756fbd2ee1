"""MLX backend on tiny random Qwen2, Llama, Gemma 3, Granite, SmolLM3, OLMo 2 and Mistral Nemo models
(mlx[cpu] on Linux): real training.

The torch comparisons need the torch extra too; everything skips cleanly without mlx.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from qlocal import config as config_mod  # noqa: E402
from qlocal.errors import UserError  # noqa: E402
from qlocal.train import train  # noqa: E402
from train_helpers import (  # noqa: E402
    DATA, HANG_GUARD_S, REPO, accumulation_batches, assert_same_adapter, assert_trained_run, kill_at, metrics_rows,
    resume_to_end, sample_batches, subprocess_env, train_argv, train_cfg,
)

ARCHS = ("qwen2", "llama", "gemma3", "granite", "smollm3", "olmo2", "mistral_nemo", "qwen3moe")


def _cfg(model: Path, out: Path, name: str, **kw: object) -> config_mod.Config:
    return train_cfg("mlx", model, out, name, **kw)


def _backend(model_dir: Path, tmp: Path, **kw: object):  # type: ignore[no-untyped-def]
    from qlocal.backends.mlx_backend import MLXBackend

    b = MLXBackend()
    b.setup(model_dir, _cfg(model_dir, tmp, "x", **kw))
    return b


@pytest.mark.parametrize("arch", ARCHS)
def test_first_step_loss_matches_torch_and_both_fall(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from qlocal.backends.torch_backend import TorchBackend

    model_dir = tiny_model_dir(arch)
    batches = sample_batches(model_dir)
    losses = {}
    for name in ("torch", "mlx"):
        if name == "torch":
            b = TorchBackend()
            b.setup(model_dir, _cfg(model_dir, tmp_path, "x", backend="torch"))
        else:
            b = _backend(model_dir, tmp_path)
        losses[name] = [b.train_step([batches[i % len(batches)]], 5e-3).loss for i in range(20)]
    # B starts at zero on both, so step 0 is the base model's loss under the shared token contract.
    assert abs(losses["torch"][0] - losses["mlx"][0]) < 1e-4, (losses["torch"][0], losses["mlx"][0])
    for name, ls in losses.items():
        assert np.mean(ls[-5:]) < ls[0] - 0.05, (name, ls)


@pytest.mark.parametrize("arch", ARCHS)
def test_train_lora_end_to_end(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    model_dir = tiny_model_dir(arch)
    before = load_file(str(model_dir / "model.safetensors"))
    run = train(_cfg(model_dir, tmp_path, arch, **{"data.val_split": 0.1, "train.eval_every": 6}), quiet=True)
    assert_trained_run(run)
    rows = metrics_rows(run)
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    assert all(r["peak_memory_mb"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    after = load_file(str(model_dir / "model.safetensors"))
    assert all(np.array_equal(before[k], after[k]) for k in before)
    resolved = (run / "config.yaml").read_text()
    assert "backend: mlx" in resolved and "device: cpu" in resolved


@pytest.mark.parametrize("quantize,arch", [("4bit", "qwen2"), ("4bit", "llama"), ("4bit", "gemma3"), ("8bit", "qwen2")])
def test_qlora_loss_falls(quantize: str, arch: str, tiny_model_dir, tmp_path: Path) -> None:
    import mlx.nn as nn

    model_dir = tiny_model_dir(arch)
    b = _backend(model_dir, tmp_path, quantize=quantize)
    quantized = [m for _, m in b.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert quantized and all(m.bits == int(quantize[0]) and m.group_size == 64 for m in quantized)
    batches = sample_batches(model_dir)
    losses = [b.train_step([batches[i % len(batches)]], 5e-3).loss for i in range(15)]
    assert np.mean(losses[-3:]) < losses[0] - 0.05, losses
    b.save_adapter(tmp_path / "a")
    cfg = json.loads((tmp_path / "a/adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16


def test_prequantised_mlx_folder(tiny_model_dir, tmp_path: Path) -> None:
    """An mlx-lm 4-bit folder (as `mlx_lm.convert -q` writes) trains as is; asking for 8-bit on it is an error."""
    from mlx_lm.convert import convert

    src = tiny_model_dir("qwen2")
    dst = tmp_path / "q4"
    convert(str(src), str(dst), quantize=True, q_bits=4, q_group_size=64)
    b = _backend(dst, tmp_path)
    batches = sample_batches(src)
    losses = [b.train_step([batches[i % len(batches)]], 5e-3).loss for i in range(10)]
    assert losses[-1] < losses[0]
    with pytest.raises(UserError, match="already quantised"):
        _backend(dst, tmp_path, quantize="8bit")


def test_grad_accumulation_equals_one_big_batch(tiny_model_dir, tmp_path: Path) -> None:
    model_dir = tiny_model_dir("qwen2")
    whole, halves = accumulation_batches()
    results = []
    for batches in ([whole], halves):
        b = _backend(model_dir, tmp_path)
        stats = [b.train_step(batches, 1e-2) for _ in range(2)]
        results.append((stats, b.lora_weights()))
    for s1, s2 in zip(results[0][0], results[1][0]):
        assert abs(s1.loss - s2.loss) < 1e-5 and abs(s1.grad_norm - s2.grad_norm) < 1e-4
    for k, v in results[0][1].items():
        np.testing.assert_allclose(v, results[1][1][k], atol=1e-5, err_msg=k)  # 2 Adam steps amplify fp32 sum order


def test_grad_checkpointing_changes_nothing_but_memory(tiny_model_dir, tmp_path: Path) -> None:
    model_dir = tiny_model_dir("gemma3")
    batches = sample_batches(model_dir, n=2)
    out = []
    for ckpt in (False, True):
        b = _backend(model_dir, tmp_path, grad_checkpointing=str(ckpt).lower())
        out.append(([b.train_step([x], 1e-2).loss for x in batches * 2], b.lora_weights()))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
    for k, v in out[0][1].items():
        np.testing.assert_allclose(v, out[1][1][k], atol=1e-5, err_msg=k)
    # The checkpointing wrapper is per instance: a fresh model's blocks are untouched.
    fresh = _backend(model_dir, tmp_path)
    assert not getattr(type(fresh.model.layers[0]), "_qlocal_checkpointed", False)


def test_options_reach_the_adapter(tiny_model_dir, tmp_path: Path) -> None:
    """rank/alpha/layers/target modules/dropout/accumulation/checkpointing flow through `train`."""
    run = train(_cfg(tiny_model_dir("llama"), tmp_path, "opts", iters=4, grad_accum=2, grad_checkpointing="true",
                     **{"lora.rank": 4, "lora.alpha": 8, "lora.layers": 1, "lora.target_modules": "q_proj,v_proj",
                        "lora.dropout": 0.1}), quiet=True)
    cfg = json.loads((run / "adapter/adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["layers_to_transform"] == [1]
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    from safetensors.numpy import load_file

    keys = sorted(load_file(str(run / "adapter/adapter_model.safetensors")))
    assert keys == sorted(f"base_model.model.model.layers.1.self_attn.{m}.lora_{ab}.weight"
                          for m in ("q_proj", "v_proj") for ab in "AB")


def test_unknown_target_module_is_a_user_error(tiny_model_dir, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="lora.target_modules: qq_proj not found.*q_proj"):
        _backend(tiny_model_dir("qwen2"), tmp_path, **{"lora.target_modules": "qq_proj"})
    # Qwen3-MoE on MLX: the experts (SwitchLinear) and the router are not targets, and the line says where they train.
    with pytest.raises(UserError, match=r"gate_proj not found.*\(linear layers there: k_proj, o_proj, q_proj, v_proj\); "
                                        "LoRA on MoE experts trains on the torch backend only"):
        _backend(tiny_model_dir("qwen3moe"), tmp_path, **{"lora.target_modules": "q_proj,gate_proj"})


def test_cli_train_mlx_shows_progress(tiny_model_dir, tmp_path: Path, qlocal_cli) -> None:
    res = qlocal_cli("train", "--backend", "mlx", "--model", tiny_model_dir("qwen2"), "--data", DATA,
                     "--iters", "3", "--batch-size", "2", "--max-seq-len", "128", "--output-dir", tmp_path,
                     "--name", "cli")
    assert res.returncode == 0, res.stderr
    assert "backend   mlx on cpu" in res.stderr and "train: 100%" in res.stderr and "done: loss" in res.stderr
    assert (tmp_path / "cli/loss.png").is_file() and (tmp_path / "cli/adapter/adapter_model.safetensors").is_file()


def test_missing_mlx_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from qlocal import cli
    from qlocal.backends import select

    real = select._installed
    monkeypatch.setattr(select, "_installed", lambda m: False if m == "mlx" else real(m))
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--backend", "mlx", "--data", str(DATA)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "pip install 'qlocal[mlx]'" in err, err
    # mlx present but mlx-lm missing: the backend itself says which package and extra.
    from qlocal.backends import mlx_backend

    monkeypatch.setitem(sys.modules, "mlx_lm", None)
    with pytest.raises(UserError, match=r"^mlx-lm is not installed: pip install 'qlocal\[mlx\]'$"):
        mlx_backend._mlx()


def test_doctor_says_mlx_is_ready() -> None:
    from qlocal.doctor import doctor_report

    mlx_section = doctor_report().split("MLX:")[1].split("Libraries:")[0]
    assert "matmul smoke test: works" in mlx_section and "--backend mlx: ready" in mlx_section


def test_hf5_config_translation() -> None:
    from qlocal.backends.mlx_infer import hf_config_overrides

    llama = {"model_type": "llama", "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}}
    assert hf_config_overrides(llama) == {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    gemma = {"model_type": "gemma3_text", "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2,
             "rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                 "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    assert hf_config_overrides(gemma) == {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 6}
    with pytest.raises(UserError, match="not periodic"):
        hf_config_overrides({"model_type": "gemma3_text", "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]})
    assert hf_config_overrides({"model_type": "qwen2", "rope_theta": 1e6}) == {}
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts; mlx-lm's qwen3_moe requires num_experts.
    assert hf_config_overrides({"model_type": "qwen3_moe", "rope_theta": 1e6, "num_local_experts": 4}) == {"num_experts": 4}
    assert hf_config_overrides({"model_type": "qwen3_moe", "rope_theta": 1e6, "num_experts": 8}) == {}


# ---------------------------------------------------------------- resume (as tests/test_resume.py)

def test_resume_in_process_matches_uninterrupted(tiny_model_dir, tmp_path: Path) -> None:
    """A run cut back to its step-4 checkpoint resumes to the same adapter (optimizer, RNG, data order)."""
    from qlocal import rundir
    from qlocal.config import Config

    cfg = _cfg(tiny_model_dir("qwen2"), tmp_path, "full", iters=8, batch_size=2, save_every=4, lr=3e-3,
               **{"lora.dropout": 0.1, "data.val_split": 0.1, "train.eval_every": 3, "data.max_seq_len": 128})
    full = train(cfg, quiet=True)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "adapter")
    shutil.rmtree(cut / "checkpoints" / "step-00000008")
    assert train(Config(), resume=cut, quiet=True) == cut
    assert_same_adapter(full, cut)
    assert [r["step"] for r in metrics_rows(cut)] == list(range(1, 9)), "metrics must hold each step once"
    assert [s for s, _ in rundir.checkpoints(cut)] == [4, 8]


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tiny_model_dir, tmp_path: Path) -> None:
    iters = 24
    model = tiny_model_dir("qwen2")
    full_run = subprocess.run(train_argv("mlx", model, tmp_path, "full", iters), env=subprocess_env(), cwd=REPO,
                              capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert full_run.returncode == 0, full_run.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen(train_argv("mlx", model, tmp_path, "killed", iters), env=subprocess_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Step 8 or later, in any form: rotation deletes step 8 itself once step 12 is saved.
    kill_at(proc, run, ("checkpoint", 8))
    assert not (run / "adapter").exists()
    resume_to_end(run, iters)
    assert_same_adapter(tmp_path / "full", run)
    assert len(list((run / "checkpoints").iterdir())) == 2
