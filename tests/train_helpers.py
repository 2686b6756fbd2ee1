"""Shared helpers for the training tests (torch, MLX, resume, distributed).

  train_cfg(backend, model, out, name, **kw)   a Config for a 12-step run on the sample data
  metrics_rows(run) / losses(run)              metrics.jsonl as dicts / the loss column
  assert_trained_run(run)                      a train_cfg run's loss fell and its folder is complete
  accumulation_batches()                       one batch of 4 and the same rows as two halves
  subprocess_env()                             offline env whose `python -m qlocal` is this checkout
  train_argv(backend, model, out, name, iters) `python -m qlocal train` for the kill/resume tests
  wait_until / kill_at(proc, run, state)       poll until a training subprocess reaches a state (then SIGKILL)
  reached_step(run)                            furthest step a run shows on disk (metrics or checkpoint)
  resume_to_end(run, iters)                    `qlocal train --resume` to the end; each step logged once
  assert_same_adapter(run_a, run_b)            the two runs saved the same LoRA tensors
  assert_preference_ranks_match_one(one, two)  a 2-rank preference run's per-step loss/rewards equal one process's

Every wait polls for a state on disk; the only clock is a hang guard that no normal run reaches.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data/alpaca_sample.jsonl"
HANG_GUARD_S = 900  # only a hung subprocess gets here; a normal run passes or fails on state


def train_cfg(backend: str, model: Path, out: Path, name: str, /, **kw: object) -> Any:
    """Config for `backend`: 12 constant-lr steps of batch 4 on the alpaca sample, checkpoints every 6.

    kw: `iters=4` means train.iters (`backend="torch"` overrides too); dotted keys (`lora.rank`) are used as given.
    """
    from qlocal import config as config_mod

    sets = {"model.name": str(model), "data.path": str(DATA), "run.output_dir": str(out), "run.name": name,
            "train.backend": backend, "train.iters": 12, "train.batch_size": 4, "train.lr": 5e-3,
            "train.lr_schedule": "constant", "data.max_seq_len": 256, "train.save_every": 6}
    if backend != "mlx":  # torch's auto is bf16 on a CPU with AMX/AVX512-BF16; the parity tests are fp32
        sets["train.dtype"] = "float32"
    sets.update({f"train.{k}" if "." not in k else k: v for k, v in kw.items()})
    return config_mod.build(sets=[f"{k}={v}" for k, v in sets.items()])


def sample_batches(model_dir: Path, n: int = 5, bs: int = 4, max_len: int = 128) -> list[dict[str, np.ndarray]]:
    """Micro-batches of the sample data rendered with the model's own tokenizer and template."""
    from qlocal.data.batching import collate
    from qlocal.data.formats import load_samples
    from qlocal.data.render import render
    from qlocal.data.templates import resolve_chat_template
    from qlocal.hf import load_tokenizer, pad_id

    tok = load_tokenizer(model_dir)
    template, _ = resolve_chat_template(tok, None)
    samples, _ = load_samples(str(DATA))
    return [collate([render(s, tok, template, max_seq_len=max_len) for s in samples[i * bs:(i + 1) * bs]], pad_id(tok))
            for i in range(n)]


def metrics_rows(run: Path) -> list[dict[str, Any]]:
    """Every line of run/metrics.jsonl, parsed."""
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def losses(run: Path) -> list[float]:
    """The training loss of each step, in order."""
    return [r["loss"] for r in metrics_rows(run)]


def assert_trained_run(run: Path) -> None:
    """A run of train_cfg's 12 steps: the loss fell and the folder holds all train writes (checkpoints 6, 12)."""
    ls = losses(run)
    assert np.mean(ls[-3:]) < ls[0] - 0.05, ls
    for name in ("config.yaml", "chat_template.jinja", "metrics.jsonl", "loss.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000006", "step-00000012"]


def accumulation_batches(seed: int = 1) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """(a batch of 4 random rows with a random loss mask, the same rows as two batches of 2)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 200, size=(4, 10))
    mask = (rng.random((4, 10)) > 0.4).astype(np.int64)
    whole = {"input_ids": ids, "loss_mask": mask, "attention_mask": np.ones_like(ids)}
    return whole, [{k: v[:2] for k, v in whole.items()}, {k: v[2:] for k, v in whole.items()}]


# ---------------------------------------------------------------- subprocesses

def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ, offline, with this checkout first on PYTHONPATH (so any cwd works)."""
    from conftest import OFFLINE_ENV

    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **OFFLINE_ENV, "PYTHONPATH": path, **extra}


def train_argv(backend: str, model: Path, out: Path, name: str, iters: int) -> list[str]:
    """The kill/resume tests' run: checkpoints every 2 steps (2 kept), dropout and validation on."""
    return [sys.executable, "-m", "qlocal", "train", "--backend", backend, "--model", str(model),
            "--data", str(DATA), "--iters", str(iters), "--batch-size", "2", "--save-every", "2",
            "--keep-last", "2", "--lr", "3e-3", "--dropout", "0.1", "--max-seq-len", "128",
            "--val-split", "0.1", "--eval-every", "5", "--output-dir", str(out), "--name", name, "--quiet"]


def resume_argv(run: Path) -> list[str]:
    return [sys.executable, "-m", "qlocal", "train", "--resume", str(run), "--quiet"]


_STEP = re.compile(r"step-(\d+)")


def _metrics_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            pass  # a line being appended right now
    return max(steps)


def _checkpoint_step(run: Path) -> int:
    """Furthest step with a checkpoint in any form: being written (temp folder), done, or rotating away."""
    try:
        names = [p.name for p in (run / "checkpoints").iterdir()]
    except FileNotFoundError:
        return 0
    return max([0, *(int(m.group(1)) for n in names if (m := _STEP.search(n)))])


def reached_step(run: Path) -> int:
    """The furthest step `run` shows on disk: a metrics line or a checkpoint (started or finished)."""
    return max(_metrics_step(run), _checkpoint_step(run))


def wait_until(proc: subprocess.Popen, run: Path, state: tuple[str, int]) -> None:
    """Poll until `run` reaches `state`; fails if `proc` exits first.

    state: ("metrics", n) = a metrics line for step >= n exists; ("checkpoint", n) = a checkpoint for
    step >= n exists in any form, so a poll that lands while it is being written sees it mid-write.
    Both only ever grow, so a poll cannot miss them.
    """
    kind, n = state
    probe: Callable[[Path], int] = {"metrics": _metrics_step, "checkpoint": _checkpoint_step}[kind]
    guard = time.monotonic() + HANG_GUARD_S
    while probe(run) < n:
        assert proc.poll() is None, f"training ended (rc {proc.returncode}) before reaching {state}"
        assert time.monotonic() < guard, f"training hung before reaching {state}"
        time.sleep(0.005)  # poll interval, not a wait for time to pass


def kill_at(proc: subprocess.Popen, run: Path, state: tuple[str, int]) -> None:
    """SIGKILL `proc` once `run` reaches `state` (see wait_until), reap it, and check the kill ended it."""
    wait_until(proc, run, state)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"training ended (rc {proc.returncode}) before the kill at {state}"


def resume_to_end(run: Path, iters: int, argv: list[str] | None = None) -> None:
    """Run `argv` (default: `qlocal train --resume run`) to the end; metrics then hold each step once."""
    res = subprocess.run(argv or resume_argv(run), env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in metrics_rows(run)] == list(range(1, iters + 1)), \
        "metrics must hold each step once after resume"


def adapter_arrays(run: Path) -> dict[str, np.ndarray]:
    """run/adapter's PEFT tensors as numpy arrays."""
    from safetensors.numpy import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-5) -> None:
    """Runs a and b saved the same LoRA tensors (same names, values within atol)."""
    want, got = adapter_arrays(a), adapter_arrays(b)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_allclose(want[k], got[k], atol=atol, err_msg=k)


# ---------------------------------------------------------------- two ranks vs one process

def run_single(argv: list[str], env: dict[str, str], cwd: Path) -> None:
    """`python <argv>` in one process; it must succeed."""
    res = subprocess.run([sys.executable, *argv], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert res.returncode == 0, res.stderr


def assert_two_ranks_match_one(one: Path, two: Path, iters: int, val_step: int | None = None,
                               val_tol: float = 0.0) -> None:
    """Run `two` (2 ranks x batch b) trained like run `one` (1 process x batch 2b): same first-step loss
    and target tokens, falling loss, one metrics line per step, the same validation loss at val_step."""
    a, b = metrics_rows(one), metrics_rows(two)
    # Same global batch (2 ranks x 2 = 4 examples per micro-batch): the same first-step loss.
    assert abs(a[0]["loss"] - b[0]["loss"]) < 1e-5, (a[0], b[0])
    assert a[0]["trained_tokens"] == b[0]["trained_tokens"]
    assert b[-1]["loss"] < b[0]["loss"]
    assert [r["step"] for r in b] == list(range(1, iters + 1)), "one rank writes metrics, once per step"
    if val_step is not None:
        assert "val_loss" in b[val_step - 1] and abs(a[val_step - 1]["val_loss"] - b[val_step - 1]["val_loss"]) < val_tol
    assert "world_size: 2" in (two / "config.yaml").read_text()


PREFERENCE_STEP_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def assert_preference_ranks_match_one(one: Path, two: Path, iters: int, val_step: int) -> None:
    """A 2-rank preference run `two` equals the one-process run `one`: every step's loss and rewards
    (means over all pairs of both ranks) within 1e-4, one metrics line per step, falling loss, the
    same validation loss at val_step, and world_size 2 recorded."""
    a_rows, b_rows = metrics_rows(one), metrics_rows(two)
    assert [r["step"] for r in b_rows] == list(range(1, iters + 1)), "one rank writes metrics, once per step"
    for a, b in zip(a_rows, b_rows):
        for key in PREFERENCE_STEP_KEYS:
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["step"], key, a[key], b[key])
    assert a_rows[-1]["loss"] < a_rows[0]["loss"]
    assert b_rows[val_step - 1]["val_loss"] == pytest.approx(a_rows[val_step - 1]["val_loss"], abs=1e-4)
    assert "world_size: 2" in (two / "config.yaml").read_text()


def assert_peft_adapter_loads(model: Path, run: Path) -> None:
    """PEFT loads run/adapter onto the base `model` and the tuned model gives finite logits."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    with torch.no_grad():
        assert torch.isfinite(tuned(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()
