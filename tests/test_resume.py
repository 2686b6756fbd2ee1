"""Resume gives the uninterrupted run's adapter: in process from a checkpoint (default run), and
after SIGKILLs of a real training subprocess at polled, seeded points (slow)."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from qlocal import rundir

pytest.importorskip("torch")

from train_helpers import (  # noqa: E402
    HANG_GUARD_S, assert_same_adapter, kill_at, metrics_rows, reached_step, resume_argv, resume_to_end, subprocess_env,
    train_argv, train_cfg, wait_until,
)

REPO = Path(__file__).resolve().parent.parent
ITERS = 60


def test_resume_in_process_matches_uninterrupted(tiny_model_dir, tmp_path: Path) -> None:
    """A run cut back to its step-4 checkpoint (as a kill after step 6 leaves it) resumes to the same adapter."""
    from qlocal.config import Config
    from qlocal.train import train

    cfg = train_cfg("torch", tiny_model_dir("qwen2"), tmp_path, "full", iters=8, batch_size=2, save_every=4,
                    lr=3e-3, **{"lora.dropout": 0.1, "data.val_split": 0.1, "train.eval_every": 3,
                                "data.max_seq_len": 128})
    full = train(cfg, quiet=True)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "adapter")
    shutil.rmtree(cut / "checkpoints" / "step-00000008")
    assert [s for s, _ in rundir.checkpoints(cut)] == [4]
    assert train(Config(), resume=cut, quiet=True) == cut
    assert_same_adapter(full, cut)
    assert [r["step"] for r in metrics_rows(cut)] == list(range(1, 9)), "metrics must hold each step once"
    val = {r["step"]: r["val_loss"] for r in metrics_rows(full) if "val_loss" in r}
    assert val.keys() == {3, 6, 8}
    assert {r["step"]: r["val_loss"] for r in metrics_rows(cut) if "val_loss" in r} == pytest.approx(val, abs=1e-5)
    assert [s for s, _ in rundir.checkpoints(cut)] == [4, 8]


def test_ctrl_c_in_process_saves_checkpoint_and_exits_130(tiny_model_dir, tmp_path: Path, monkeypatch,
                                                          capsys) -> None:
    """Ctrl-C after the first metrics line: the step finishes, a checkpoint is saved, exit status 130."""
    import os

    from qlocal.train import train

    real_write = rundir.Metrics.write

    def write_then_ctrl_c(self, record) -> None:  # type: ignore[no-untyped-def]
        real_write(self, record)
        # Only with training's own handler in place: pytest's would abort the whole session.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            pytest.fail("training installed no SIGINT handler")
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(rundir.Metrics, "write", write_then_ctrl_c)
    cfg = train_cfg("torch", tiny_model_dir("qwen2"), tmp_path, "int", iters=20, save_every=1000)
    with pytest.raises(SystemExit) as exc:
        train(cfg, quiet=True)
    assert exc.value.code == 130
    assert "--resume" in capsys.readouterr().err
    (step, ckpt), = rundir.checkpoints(tmp_path / "int")
    assert step == 1 and (ckpt / "state.json").is_file() and not (tmp_path / "int" / "adapter").exists()


# ---------------------------------------------------------------- real SIGKILLs (slow: each trains a subprocess)

@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> Path:
    """The same run never interrupted (trained once for every kill test)."""
    out = tmp_path_factory.mktemp("full")
    subprocess.run(train_argv("torch", tiny_model_dir("qwen2"), out, "full", ITERS), check=True,
                   env=subprocess_env(), cwd=REPO, capture_output=True, timeout=HANG_GUARD_S)
    return out / "full"


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(uninterrupted, tiny_model_dir, tmp_path: Path) -> None:
    run = tmp_path / "killed"
    proc = subprocess.Popen(train_argv("torch", tiny_model_dir("qwen2"), tmp_path, "killed", ITERS),
                            env=subprocess_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at(proc, run, ("checkpoint", 8))  # well before the last step
    assert not (run / "adapter").exists()
    resume_to_end(run, ITERS)
    assert_same_adapter(uninterrupted, run)
    assert len(list((run / "checkpoints").iterdir())) == 2


@pytest.mark.slow
def test_sigint_saves_checkpoint_and_exits_cleanly(tiny_model_dir, tmp_path: Path) -> None:
    args = train_argv("torch", tiny_model_dir("qwen2"), tmp_path, "int", ITERS)
    args[args.index("--save-every") + 1] = "1000"
    proc = subprocess.Popen(args, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    run = tmp_path / "int"
    wait_until(proc, run, ("metrics", 1))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    ckpts = list((run / "checkpoints").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "state.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("trial", [1, 2])
def test_sigkill_at_random_points_then_resume(trial: int, uninterrupted, tiny_model_dir, tmp_path: Path) -> None:
    """Kill `trial` times at seeded states, then resume. Earlier kills land after a metrics line (maybe
    before any checkpoint: then start over); the last once a checkpoint appears, so possibly mid-write."""
    rng = random.Random(trial)
    model = tiny_model_dir("qwen2")
    run = tmp_path / "killed"
    args = args_fresh = train_argv("torch", model, tmp_path, "killed", ITERS)
    for k in range(trial):
        proc = subprocess.Popen(args, env=subprocess_env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Past everything the run shows already, so the state is one this process reaches.
        kill_at(proc, run, ("checkpoint" if k == trial - 1 else "metrics", reached_step(run) + rng.randint(1, 20)))
        # Killed before the first checkpoint: nothing to resume, start over.
        args = resume_argv(run) if rundir.checkpoints(run) else args_fresh + ["--overwrite"]
    resume_to_end(run, ITERS, args)
    assert_same_adapter(uninterrupted, run)
    assert not list((run / "checkpoints").glob(".*")), "no temp folders left behind"
