"""`qlocal export` end to end: train 5 iters -> export -> verify.json passes -> the GGUF answers.

Also: one-line errors (exit 2, nothing written) and --adapter-only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")

from conftest import REPO, run_qlocal

DATA = REPO / "data" / "alpaca_sample.jsonl"


def _train(model: Path, out: Path, name: str, *extra: str) -> Path:
    r = run_qlocal("train", "--model", model, "--data", DATA, "--iters", "5", "--output-dir", out, "--name", name,
                   "--quiet", "--max-seq-len", "128", *extra)
    assert r.returncode == 0, r.stderr
    return out / name


@pytest.fixture(scope="module")
def qwen_run(tiny_model_dir, tmp_path_factory) -> Path:
    # A high learning rate so five steps move the adapter far enough to matter in the checks.
    return _train(tiny_model_dir("qwen2"), tmp_path_factory.mktemp("runs"), "r", "--lr", "0.02")


def test_export_end_to_end(qwen_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export" / "r"
    r = run_qlocal("export", qwen_run, "--gguf", "--quant", "q8_0,f16,q4_k_m", "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "model-f16.gguf" in r.stdout and "pass" in r.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["Modelfile", "export.json", "fused", "model-f16.gguf", "model-q4_k_m.gguf",
                     "model-q8_0.gguf", "verify.json"]
    assert not list(out.parent.glob(".*"))  # no temp folders left
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"] and len(verify["files"]) == 3
    summary = json.loads((out / "export.json").read_text())
    assert summary["fuse"]["max_abs_logit_diff"] < 1e-4
    assert summary["quantize"]["q4_k_m"]["fallback_tensors"] > 0  # hidden 64: honest about K-quant fallback
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile

    import llama_cpp

    llm = llama_cpp.Llama(str(out / "model-q8_0.gguf"), n_ctx=256, verbose=False)
    answer = llm.create_chat_completion([{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0)
    assert answer["choices"][0]["message"]["content"] is not None
    llm.close()


# Families beyond the tiny training set: arch -> projections `all-linear` must adapt (fused ones included).
FAMILY_TARGETS = {
    "granite": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "smollm3": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "olmo2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "mistral_nemo": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    # transformers 5 keeps Qwen3-MoE's experts as 3-D parameters and its router as a bare parameter:
    # no nn.Linear, so all-linear is the attention projections (the experts export untouched).
    "qwen3moe": {"q_proj", "k_proj", "v_proj", "o_proj"},
}


@pytest.mark.parametrize("arch", sorted(FAMILY_TARGETS))
def test_family_trains_and_exports(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    """Train 3 steps on torch, export f16 + q8_0: verify passes against base + adapter."""
    import yaml

    run = _train(tiny_model_dir(arch), tmp_path / "runs", "r", "--iters", "3", "--backend", "torch", "--lr", "0.02")
    resolved = yaml.safe_load((run / "config.yaml").read_text())["resolved"]
    assert set(resolved["target_modules"]) == FAMILY_TARGETS[arch]
    out = tmp_path / "export"
    r = run_qlocal("export", run, "--gguf", "--quant", "f16,q8_0", "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"] and verify["reference"] == "base + adapter (fp32)"
    f16, q8 = verify["files"]
    assert f16["quant"] == "f16" and f16["nmse"] < 1e-3 and f16["tokenizer_match"] and f16["greedy_agree"] == 1.0
    assert q8["quant"] == "q8_0" and q8["passed"]


def test_qwen3moe_mlx_run_exports(tiny_model_dir, tmp_path: Path) -> None:
    """An MLX-trained Qwen3-MoE run adapts what torch does (mlx-lm's router is an nn.Linear, but PEFT
    on transformers 5 cannot adapt it), so its adapter loads on torch and the export verifies."""
    pytest.importorskip("mlx_lm")
    import yaml

    run = _train(tiny_model_dir("qwen3moe"), tmp_path / "runs", "m", "--iters", "3", "--backend", "mlx", "--lr", "0.02")
    resolved = yaml.safe_load((run / "config.yaml").read_text())["resolved"]
    assert set(resolved["target_modules"]) == FAMILY_TARGETS["qwen3moe"]
    out = tmp_path / "export"
    r = run_qlocal("export", run, "--gguf", "--quant", "f16", "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"] and verify["reference"] == "base + adapter (fp32)"
    assert verify["files"][0]["nmse"] < 1e-3 and verify["files"][0]["greedy_agree"] == 1.0


def test_adapter_only(qwen_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    r = run_qlocal("export", qwen_run, "--adapter-only", "--quant", "f16", "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "adapter.gguf").is_file() and (out / "base-f16.gguf").is_file()
    modelfile = (out / "Modelfile").read_text().splitlines()
    assert "FROM ./base-f16.gguf" in modelfile and "ADAPTER ./adapter.gguf" in modelfile
    (check,) = json.loads((out / "verify.json").read_text())["files"]
    assert check["passed"] and check["lora"] == "adapter.gguf"
    # Control: without the LoRA the base is measurably further from the fused model.
    assert check["nmse_without_lora"] > 10 * check["nmse"]


def test_errors_are_one_line_and_write_nothing(qwen_run: Path, tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "x"
    r = run_qlocal("export", tmp_path, "--out", out)
    assert r.returncode == 2 and "not a qlocal run folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_qlocal("export", qwen_run, "--quant", "q4_k_m,q9", "--out", out)
    assert r.returncode == 2 and "'q9' is not supported" in r.stderr
    # A run whose base model was deleted.
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir("llama"), base)
    run = _train(base, tmp_path / "runs", "gone")
    shutil.rmtree(base)
    r = run_qlocal("export", run, "--out", out)
    assert r.returncode == 2 and "is gone" in r.stderr and "Traceback" not in r.stderr
    # An architecture the converter does not support.
    odd = tmp_path / "odd-run"
    shutil.copytree(qwen_run, odd)
    fake_base = tmp_path / "fake-base"
    shutil.copytree(tiny_model_dir("qwen2"), fake_base)
    cfg = json.loads((fake_base / "config.json").read_text())
    cfg.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (fake_base / "config.json").write_text(json.dumps(cfg))
    text = (odd / "config.yaml").read_text().replace(str(tiny_model_dir("qwen2")), str(fake_base))
    (odd / "config.yaml").write_text(text)
    r = run_qlocal("export", odd, "--out", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".x*"))


@pytest.mark.slow  # two export subprocesses; fast twin: test_atomic.py kills a folder builder mid-write
def test_killed_export_leaves_nothing_at_final_path_and_rerun_succeeds(qwen_run: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from train_helpers import HANG_GUARD_S, subprocess_env

    out = tmp_path / "exp"
    proc = subprocess.Popen([sys.executable, "-m", "qlocal", "export", str(qwen_run), "--quant", "f16,q8_0",
                             "--out", str(out)], env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Kill as soon as the export writes anything beside --out (its temp folder, whatever it is
    # named): mid-fuse, well before the final rename.
    guard = time.monotonic() + HANG_GUARD_S
    while not any(tmp_path.iterdir()):
        assert proc.poll() is None, f"export ended (rc {proc.returncode}) before writing anything"
        assert time.monotonic() < guard, "export hung before writing anything"
        time.sleep(0.005)  # poll interval
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "export finished before it could be killed"
    assert not out.exists()
    res = run_qlocal("export", qwen_run, "--quant", "f16", "--out", out)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "verify.json").read_text())["passed"] and (out / "Modelfile").is_file()


def test_full_disk_is_one_line_and_leaves_nothing(qwen_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """The disk filling up mid-conversion: one line naming the file and the fix, exit 2, no final folder."""
    import errno

    from qlocal import cli
    from qlocal.export import gguf

    def full(writer, t, written):  # after the first tensor's data, with the encoder thread ahead of it
        raise OSError(errno.ENOSPC, "No space left on device", str(t.name))

    monkeypatch.setattr(gguf, "_end_tensor", full)
    out = tmp_path / "x"
    with pytest.raises(SystemExit) as stop:
        cli.main(["export", str(qwen_run), "--quant", "f16", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "no space left on the device" in err[0] and "--out" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".x*"))


def test_tensor_writes_on_a_full_disk_are_enospc(tmp_path: Path) -> None:
    """The converter's and the fused folder's tensor writes (atomic.write_array) on a really full
    device (/dev/full): OSError(ENOSPC) naming the file, which the CLI turns into its one line
    (numpy's tofile raised one with no errno)."""
    import errno

    import numpy as np

    from qlocal import atomic

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "wb", buffering=0) as f, pytest.raises(OSError) as err:
        atomic.write_array(f, np.zeros((64, 32), np.float16))
    assert err.value.errno == errno.ENOSPC and err.value.filename == "/dev/full"


def test_quantise_on_a_full_disk_is_one_line(qwen_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """llama.cpp's quantiser fails on a full disk with status 1 and no message we capture: with less
    room left than the F16 file, export says the disk is full (one line, exit 2), leaving nothing."""
    import shutil as sh

    import llama_cpp

    from qlocal import cli

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda src, dst, params: 1)
    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=0))
    out = tmp_path / "x"
    with pytest.raises(SystemExit) as stop:
        cli.main(["export", str(qwen_run), "--quant", "q4_k_m", "--out", str(out), "--no-verify"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "no space left on the device" in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".x*"))
