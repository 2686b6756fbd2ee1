"""Kill a real training subprocess part-way, resume it, and get the uninterrupted run's adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlocal import rundir

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parent.parent
ITERS = 60


def _args(model: Path, out: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "qlocal", "train", "--backend", "torch", "--model", str(model),
            "--data", str(REPO / "data/alpaca_sample.jsonl"), "--iters", str(ITERS), "--batch-size", "2",
            "--save-every", "2", "--keep-last", "2", "--lr", "3e-3", "--dropout", "0.1", "--max-seq-len", "128",
            "--val-split", "0.1", "--eval-every", "5", "--output-dir", str(out), "--name", name, "--quiet"]


def _adapter(run: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> dict[str, "torch.Tensor"]:
    """The adapter of the same run never interrupted (computed once for every kill test)."""
    out = tmp_path_factory.mktemp("full")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(_args(tiny_model_dir("qwen2"), out, "full"), check=True, env=env, cwd=REPO, capture_output=True)
    return _adapter(out / "full")


def test_kill_and_resume_matches_uninterrupted(uninterrupted, tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("qwen2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    proc = subprocess.Popen(_args(model, tmp_path, "killed"), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "killed"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # Any checkpoint at or past step 8 (older ones rotate away), well before the last step.
        if any(step >= 8 for step, _ in rundir.checkpoints(run)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (run / "adapter").exists()

    res = subprocess.run([sys.executable, "-m", "qlocal", "train", "--resume", str(run), "--quiet"],
                         env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    full, resumed = uninterrupted, _adapter(run)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-5), k
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, ITERS + 1)), "metrics must hold each step once after resume"
    assert len(list((run / "checkpoints").iterdir())) == 2


def test_sigint_saves_checkpoint_and_exits_cleanly(tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("qwen2")
    args = _args(model, tmp_path, "int")
    args[args.index("--save-every") + 1] = "1000"
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "int"
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    ckpts = list((run / "checkpoints").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "state.json").is_file()


@pytest.mark.parametrize("trial", [1, 2])
def test_sigkill_at_random_points_then_resume(trial: int, uninterrupted, tiny_model_dir, tmp_path: Path) -> None:
    """Kill at a random moment (possibly mid-checkpoint write), possibly twice, then resume."""
    import random

    rng = random.Random(trial)
    model = tiny_model_dir("qwen2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "killed"
    args = _args(model, tmp_path, "killed")
    for _kill in range(trial):
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (run / "metrics.jsonl").exists():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.2, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        args = [sys.executable, "-m", "qlocal", "train", "--resume", str(run), "--quiet"]
        if not rundir.checkpoints(run):
            # Killed before the first checkpoint: nothing to resume, start over.
            args = _args(model, tmp_path, "killed") + ["--overwrite"]
    res = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    full, resumed = uninterrupted, _adapter(run)
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-5), k
    assert not list((run / "checkpoints").glob(".*")), "no temp folders left behind"
