"""One rank dying mid-run stops a 2-rank torchrun run (gloo on CPU) promptly: torchrun stops the
other rank, which says in one line why it stopped (no traceback burying the failing rank's error),
and the run folder keeps its complete checkpoints, nothing half-written and no train.pid.

Known gap, not tested here: a rank that fails before it joins the process group (a bad record that
only one node's copy of the data holds: train checks its data before init_process_group) can leave
the other node's rank waiting in init_process_group (gloo's 30-minute default); a 2-node test of it
passed once and hung once. The fix is for train to join the group before its own checks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
psutil = pytest.importorskip("psutil")

from train_helpers import DATA, HANG_GUARD_S, subprocess_env  # noqa: E402

pytestmark = pytest.mark.slow  # a 2-rank launch


def _rank(launcher: "psutil.Process", rank: str) -> "psutil.Process | None":
    for p in launcher.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.environ().get("RANK") == rank and "qlocal" in " ".join(p.cmdline()):
                return p
    return None


def _train(model: Path, out: Path, data: Path | str, iters: int) -> list[str]:
    return ["-m", "qlocal", "train", "--backend", "torch", "--model", str(model), "--data", str(data),
            "--iters", str(iters), "--batch-size", "2", "--max-seq-len", "64", "--save-every", "3", "--keep-last", "2",
            "--output-dir", str(out), "--name", "two", "--quiet", "--dtype", "float32"]


@contextlib.contextmanager
def _launched(cmds: list[tuple[list[str], Path]]) -> Iterator[tuple[list[subprocess.Popen], set]]:
    """Start each (argv, cwd) with stderr to cwd/err.txt; on the way out kill whatever is left of
    them and the workers they started (torchrun puts each worker in a session of its own)."""
    procs, started = [], set()
    try:
        for argv, cwd in cmds:
            with open(cwd / "err.txt", "w") as err:
                procs.append(subprocess.Popen(argv, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=cwd,
                                              stdout=subprocess.DEVNULL, stderr=err, start_new_session=True))
        yield procs, started
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for p in started:
            with contextlib.suppress(psutil.Error):
                p.kill()
        for proc in procs:
            proc.wait()


def _wait_all(procs: list[subprocess.Popen], started: set, until: Any = None) -> bool:
    """Poll until every process has exited (or `until()` holds), noting the workers they start.
    Only the hang guard bounds it: every real wait ends on a state."""
    guard = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < guard:
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                started.update(psutil.Process(proc.pid).children(recursive=True))
        if until is not None and until():
            return True
        if all(proc.poll() is not None for proc in procs):
            return until is None
        with contextlib.suppress(subprocess.TimeoutExpired):
            procs[0].wait(timeout=0.2)
    return False


def test_a_killed_rank_stops_the_whole_run(tiny_model_dir, tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed (what the OOM killer does) after the first checkpoint."""
    model = tiny_model_dir("llama")
    run = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    with _launched([([*torchrun, *_train(model, tmp_path, DATA, 2000)], tmp_path)]) as (procs, started):
        launcher = psutil.Process(procs[0].pid)
        mid_run = _wait_all(procs, started, lambda: any((run / "checkpoints").glob("step-*/state.json"))
                            and _rank(launcher, "1") is not None)
        assert mid_run, f"no checkpoint before the run ended: {procs[0].returncode}"
        _rank(launcher, "1").send_signal(signal.SIGKILL)
        assert _wait_all(procs, started), "the run did not stop after a rank was killed"
    log = (tmp_path / "err.txt").read_text()
    assert procs[0].returncode != 0
    assert "exitcode  : -9" in log, log[-3000:]  # torchrun names the killed rank's signal
    # the surviving rank: one line saying why, not a collective's traceback
    assert "error: rank 0: another rank stopped mid-run" in log, log[-3000:]
    assert "[rank0]: Traceback" not in log, log[-3000:]
    assert not (run / "train.pid").exists() and not (run / "adapter").exists()
    ckpts = sorted((run / "checkpoints").iterdir())
    assert ckpts and all((c / "state.json").is_file() and (c / "adapter" / "adapter_model.safetensors").is_file()
                         for c in ckpts), ckpts
    assert not [p.name for p in run.rglob("*") if p.name.startswith(".")], "a temp left half-written"
