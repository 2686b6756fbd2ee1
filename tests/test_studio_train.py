"""A real tiny training driven through the studio's HTTP API on a real uvicorn: started from the
New-run form, followed by server-sent events, stopped (SIGINT: exit 130 and a checkpoint),
resumed, finished; its rendered example equals what `qlocal data check` shows."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("torch")

import httpx  # noqa: E402
from studio_helpers import live_studio  # noqa: E402
from train_helpers import DATA, HANG_GUARD_S, metrics_rows  # noqa: E402

ITERS = 120


def _poll(http: httpx.Client, url: str, done, what: str) -> dict:
    """GET url until done(json) holds (a hung training is the only way to reach the guard)."""
    guard = time.monotonic() + HANG_GUARD_S
    while True:
        doc = http.get(url).json()
        if done(doc):
            return doc
        assert time.monotonic() < guard, f"never reached: {what}; last {doc}"
        time.sleep(0.05)  # poll interval


@pytest.mark.slow
def test_train_stop_resume_finish_through_the_api(tiny_model_dir, tmp_path: Path) -> None:
    root = tmp_path / "work"
    for d in ("outputs", "export", "data"):
        (root / d).mkdir(parents=True)
    shutil.copytree(tiny_model_dir("qwen2"), root / "models" / "tiny")
    shutil.copy(DATA, root / "data" / DATA.name)
    form = {"model.name": "models/tiny", "data.path": f"data/{DATA.name}", "train.backend": "torch",
            "train.iters": str(ITERS), "train.batch_size": "2", "data.max_seq_len": "128", "train.lr": "3e-3",
            "train.save_every": "1000", "train.eval_every": "5", "data.val_split": "0.1", "lora.rank": "4",
            "run.name": "tiny"}
    with live_studio(root) as (url, app), httpx.Client(base_url=url, timeout=120) as http:
        origin = {"origin": url}
        resp = http.post("/new", data=form, headers=origin)
        assert resp.status_code == 303 and resp.headers["location"] == "/runs/tiny", resp.text
        job = app.state.studio.jobs.active_for("outputs/tiny")
        assert job is not None and job.args[:1] == ["train"]

        # Live metrics by server-sent events while it trains: step lines arrive one after another.
        steps: list[int] = []
        statuses: list[str] = []
        with http.stream("GET", "/api/runs/tiny/events") as events:
            event = None
            for line in events.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    data = json.loads(line.split(":", 1)[1])
                    if event == "metrics":
                        steps += [r["step"] for r in data]
                    elif event == "status":
                        statuses.append(data["status"])
                    if len(steps) >= 3:
                        break
        assert steps[:3] == [1, 2, 3] and "running" in statuses

        run = _poll(http, "/api/runs/tiny", lambda d: d["status"] == "running" and d["steps"] >= 3, "step 3")
        assert run["total_steps"] == ITERS and 0 < run["progress"]["fraction"] < 1 and run["progress"]["eta_s"] > 0
        assert http.post("/runs/tiny/stop", headers=origin).status_code == 303
        stopped = _poll(http, "/api/runs/tiny", lambda d: d["status"] != "running", "the stop")
        assert stopped["status"] == "stopped" and stopped["returncode"] == 130, stopped
        log = http.get(f"/api/jobs/{stopped['job']}").json()["log"]
        assert "continue with: qlocal train --resume" in log and "Traceback" not in log
        ckpts = sorted((root / "outputs/tiny/checkpoints").glob("step-*"))
        assert len(ckpts) == 1 and int(ckpts[0].name[5:]) == stopped["steps"] < ITERS
        assert not (root / "outputs/tiny/adapter").exists()

        page = http.get("/runs/tiny").text
        assert 'id="resume-button" ' in page and 'id="resume-button" hidden' not in page
        assert http.post("/runs/tiny/resume", headers=origin).status_code == 303
        done = _poll(http, "/api/runs/tiny", lambda d: d["status"] != "running", "the end")
        assert done["status"] == "finished" and done["returncode"] == 0 and done["steps"] == ITERS, done
        assert done["progress"]["fraction"] == 1.0 and done["progress"]["eta_s"] == 0
        assert [r["step"] for r in metrics_rows(root / "outputs/tiny") if "loss" in r] == list(range(1, ITERS + 1))
        assert (root / "outputs/tiny/adapter/adapter_config.json").is_file()
        jobs = http.get("/api/jobs").json()
        assert [(j["args"][1], j["status"], j["returncode"]) for j in jobs] == \
            [("--resume", "finished", 0), ("--set", "stopped", 130)]

        listed = {r["name"]: r for r in http.get("/api/runs").json()}
        assert listed["tiny"]["status"] == "finished" and listed["tiny"]["backend"] == "torch"
        assert http.post("/runs/tiny/stop", headers=origin).status_code == 409

        example = http.get("/api/runs/tiny/example").json()
        assert "error" not in example, example
        assert any(t for t, trained in example["segments"] if trained) and any(not tr for _, tr in example["segments"])
    _assert_example_matches_data_check(root, example)


def _assert_example_matches_data_check(root: Path, example: dict) -> None:
    """The page's example, trained spans wrapped in [[ ]], is the example `qlocal data check` prints."""
    from conftest import run_qlocal

    res = run_qlocal("data", "check", f"data/{DATA.name}", "--model", "models/tiny", "--max-seq-len", "128", cwd=root)
    assert res.returncode == 0, res.stderr
    shown = res.stdout.split("(trained spans in [[ ]]):\n", 1)[1]
    page = "".join(f"[[{t}]]" if trained else t for t, trained in example["segments"])
    assert shown.rstrip("\n") == page.rstrip("\n")


@contextmanager
def _terminal_training(tiny_model_dir, tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[str]]]:
    """(work root, run folder, process) of a `qlocal train` started as from a terminal (not a studio
    job), once it has written its first step; killed on the way out if still running."""
    from train_helpers import reached_step, subprocess_env

    root = tmp_path / "work"
    (root / "outputs").mkdir(parents=True)
    shutil.copytree(tiny_model_dir("qwen2"), root / "models" / "tiny")
    argv = [sys.executable, "-m", "qlocal", "train", "--model", "models/tiny", "--data", str(DATA), "--backend", "torch",
            "--iters", str(ITERS), "--batch-size", "2", "--max-seq-len", "128", "--save-every", "1000", "--quiet"]
    proc = subprocess.Popen(argv, cwd=root, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        guard = time.monotonic() + HANG_GUARD_S
        while not (runs := list((root / "outputs").glob("tiny-*"))) or reached_step(runs[0]) < 1:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < guard, "training never wrote its first step"
            time.sleep(0.05)  # poll interval
        (run,) = runs
        yield root, run, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_training_started_in_a_terminal_reads_as_running(tiny_model_dir, tmp_path: Path) -> None:
    """No studio job, a default run name: the studio finds the `qlocal train` process (/proc)."""
    import signal

    from fastapi.testclient import TestClient

    from qlocal.studio.app import create_app

    if not Path("/proc/self/cmdline").is_file():
        pytest.skip("finding terminal trainings needs /proc")
    with _terminal_training(tiny_model_dir, tmp_path) as (root, run, proc), \
            TestClient(create_app(root, None), base_url="http://127.0.0.1") as client:
        listed = client.get("/api/runs").json()
        assert [(r["name"], r["status"], r["job"]) for r in listed] == [(run.name, "running", None)]
        assert 'id="stop-button" hidden' in client.get(f"/runs/{run.name}").text  # Ctrl-C is in its terminal
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 130, err
        after = client.get(f"/api/runs/{run.name}").json()
        assert (after["status"], after["resumable"]) == ("stopped", True)


@pytest.mark.slow
def test_a_terminal_training_reads_as_running_without_proc(tiny_model_dir, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """As on macOS: with /proc use disabled the studio finds a terminal's `qlocal train` by its
    train.pid (start time through psutil, and through POSIX ps without psutil); after Ctrl-C the
    file is gone and the run reads as stopped, resumable."""
    import signal

    from fastapi.testclient import TestClient

    from qlocal import pidfile
    from qlocal.studio.app import create_app

    monkeypatch.setattr(pidfile, "PROC", tmp_path / "no-proc")
    with _terminal_training(tiny_model_dir, tmp_path) as (root, run, proc), \
            TestClient(create_app(root, None), base_url="http://127.0.0.1") as client:
        def status() -> list[tuple[str, str, object]]:
            return [(r["name"], r["status"], r["job"]) for r in client.get("/api/runs").json()]

        if importlib.util.find_spec("psutil") is not None:
            assert status() == [(run.name, "running", None)]
        with monkeypatch.context() as mp:
            mp.setitem(sys.modules, "psutil", None)  # `ps -o etime=` instead
            assert status() == [(run.name, "running", None)]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 130, err
        assert not (run / "train.pid").exists()
        after = client.get(f"/api/runs/{run.name}").json()
        assert (after["status"], after["resumable"]) == ("stopped", True)
