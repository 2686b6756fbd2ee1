"""Ctrl-C (the studio's Stop) at every phase from the last step to the end of teardown, once or twice:
the run folder survives, the final save is let finish (or the last checkpoint resumes to the same
adapter), and train ends with exit status 130 and one closing line.

Each case sends real SIGINTs to this process on entry to one phase (a wrapped function), with
training's own handler in place, so the signal lands there deterministically. Before the fix a
second Ctrl-C during the run's only checkpoint (the final one) cut it short and train.py removed
the run folder; a Ctrl-C after the loop was a bare KeyboardInterrupt that lost the adapter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from qlocal import distributed, progress, rundir, tracking
from qlocal import train as train_mod
from qlocal.stop_flag import StopFlag

from train_helpers import DATA, HANG_GUARD_S, assert_same_adapter, subprocess_env, train_cfg  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ITERS = 3


def _backends() -> list[Any]:
    def needs(*mods: str) -> Any:
        import importlib.util

        missing = [m for m in mods if importlib.util.find_spec(m) is None]
        return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed")

    return [pytest.param("torch", marks=needs("torch", "peft")), pytest.param("mlx", marks=needs("mlx", "mlx_lm"))]


# phase -> (module or class, attribute, which call of it the Ctrl-Cs precede)
PHASES: dict[str, tuple[Any, str, Callable[[tuple[Any, ...]], bool]]] = {
    "last step": (train_mod, "_step", lambda a: a[3] == ITERS - 1),
    "final checkpoint": (train_mod, "_checkpoint", lambda a: True),
    "after the loop": (progress.Progress, "close", lambda a: True),
    "adapter": (rundir, "save_dir_atomic", lambda a: Path(a[0]).name == "adapter"),
    "loss.png": (rundir, "plot_losses", lambda a: True),
    "footer": (train_mod, "print_footer", lambda a: True),
    "trackers closed": (tracking.Trackers, "close", lambda a: True),
    "teardown": (distributed, "shutdown", lambda a: True),
}


def _ctrl_c_at(monkeypatch: pytest.MonkeyPatch, phase: str, times: int) -> list[str]:
    """Wrap `phase` so its first matching call starts with `times` SIGINTs; returns the phases hit."""
    owner, name, matches = PHASES[phase]
    real = getattr(owner, name)
    hit: list[str] = []

    def wrapped(*args: Any, **kw: Any) -> Any:
        if not hit and matches(args):
            hit.append(phase)
            handler = signal.getsignal(signal.SIGINT)
            # Only with training's own handler in place: a bare KeyboardInterrupt is the bug (and
            # pytest's default handler would end the session).
            if not isinstance(getattr(handler, "__self__", None), StopFlag):
                pytest.fail(f"no StopFlag handler at phase {phase!r}: a Ctrl-C here is a bare KeyboardInterrupt")
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kw)

    monkeypatch.setattr(owner, name, wrapped)
    return hit


def _last_line(err: str) -> str:
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()][-1]


def _train(backend: str, model: Path, out: Path) -> tuple[Path, Any]:
    """A fresh 3-step run (its only checkpoint the final one) that must end in SystemExit: (run, exit code)."""
    cfg = train_cfg(backend, model, out, "run", iters=ITERS, batch_size=1, save_every=1000,
                    **{"data.max_seq_len": 64})
    with pytest.raises(SystemExit) as exc:
        train_mod.train(cfg)
    return out / "run", exc.value.code


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("phase", list(PHASES))
def test_one_ctrl_c_after_the_last_step_lets_the_run_finish(backend: str, phase: str, tiny_model_dir, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    hit = _ctrl_c_at(monkeypatch, phase, 1)
    run, code = _train(backend, tiny_model_dir("qwen2"), tmp_path)
    err = capsys.readouterr().err
    assert hit == [phase], "the phase was never reached"
    assert code == 130
    assert "Traceback" not in err
    assert _last_line(err) == f"stopped after the last step; the run is complete: {run / 'adapter'}"
    (step, ckpt), = rundir.checkpoints(run)
    assert step == ITERS
    assert_same_adapter(ckpt, run)  # the adapter is the last step's
    assert (run / "loss.png").is_file()


# Second Ctrl-C (abort) at a phase: what is left, and the line that says so.
ABORTS = {
    "final checkpoint": "resume",  # deferred until the checkpoint is written (it used to cut it and lose the run)
    "adapter": "complete",  # deferred until the adapter is written
    "loss.png": "complete",
    "trackers closed": "complete",
    "teardown": "complete",
}


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("phase", list(ABORTS))
def test_two_ctrl_c_never_lose_a_checkpoint_or_the_adapter(backend: str, phase: str, tiny_model_dir, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from qlocal.config import Config

    hit = _ctrl_c_at(monkeypatch, phase, 2)
    run, code = _train(backend, tiny_model_dir("qwen2"), tmp_path)
    err = capsys.readouterr().err
    assert hit == [phase] and code == 130 and "Traceback" not in err
    (step, ckpt), = rundir.checkpoints(run)
    assert step == ITERS, "the checkpoint the first Ctrl-C asked for was written whole"
    if ABORTS[phase] == "complete":
        assert _last_line(err) == f"aborted after the adapter was saved: {run / 'adapter'} is complete"
        assert_same_adapter(ckpt, run)
        return
    assert _last_line(err) == f"aborted; the last checkpoint is step {ITERS}; continue with: qlocal train --resume {run}"
    assert not (run / "adapter").exists()
    monkeypatch.undo()
    assert train_mod.train(Config(), resume=run, quiet=True) == run
    assert_same_adapter(ckpt, run)


@pytest.mark.parametrize("backend", _backends())
def test_abort_before_any_checkpoint_removes_the_fresh_run(backend: str, tiny_model_dir, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Two Ctrl-Cs during a step, before the first checkpoint: nothing to resume, so the folder goes."""
    _ctrl_c_at(monkeypatch, "last step", 2)
    run, code = _train(backend, tiny_model_dir("qwen2"), tmp_path)
    assert code == 130
    assert _last_line(capsys.readouterr().err) == f"aborted before the first checkpoint; {run} removed"
    assert not run.exists()


# The same through the real command line: Stop clicked twice just as the run's only checkpoint is written.
_DRIVER = """
import os, signal, sys
import qlocal.train as t
real = t._checkpoint
def twice(*a, **k):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    return real(*a, **k)
t._checkpoint = twice
from qlocal.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backends())
def test_cli_double_stop_at_the_final_checkpoint_resumes(backend: str, tiny_model_dir, tmp_path: Path) -> None:
    run = tmp_path / "first"
    argv = ["train", "--backend", backend, "--model", str(tiny_model_dir("qwen2")), "--data", str(DATA),
            "--iters", "4", "--batch-size", "1", "--save-every", "1000", "--max-seq-len", "64",
            "--output-dir", str(tmp_path), "--name", "first"]
    res = subprocess.run([sys.executable, "-c", _DRIVER, *argv], env=subprocess_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr and "\naborted\n" not in res.stderr
    assert _last_line(res.stderr) == f"aborted; the last checkpoint is step 4; continue with: qlocal train --resume {run}"
    res = subprocess.run([sys.executable, "-m", "qlocal", "train", "--resume", str(run), "--quiet"],
                         env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert res.returncode == 0, res.stderr
    assert_same_adapter(rundir.checkpoints(run)[-1][1], run)
