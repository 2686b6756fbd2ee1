"""Helpers for the studio tests: run folders as train leaves them, and a real studio on a free port
(uvicorn in a thread, or the `qlocal studio` command in a subprocess)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

HANG_GUARD_S = 120  # only a studio that never comes up gets here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_row(step: int, loss: float, **extra: float) -> dict[str, Any]:
    """A metrics.jsonl record with the keys train writes."""
    return {"step": step, "epoch": round(step / 10, 4), "loss": loss, "lr": 1e-3, "grad_norm": 0.5,
            "tokens": 400, "trained_tokens": 100, "tokens_per_s": 800.0, "trained_tokens_per_s": 200.0,
            "peak_memory_mb": 100.0, **extra}


def make_run(root: Path, name: str, steps: int, total: int, checkpoints: tuple[int, ...] = (),
             adapter: bool = False, model: str = "org/base-model", method: str = "sft",
             backend: str = "torch") -> Path:
    """outputs/<name> as train writes it: config.yaml (+ resolved), metrics.jsonl, checkpoints, adapter/."""
    from qlocal import config as config_mod
    from qlocal import rundir

    run = root / "outputs" / name
    (run / "checkpoints").mkdir(parents=True)
    cfg = config_mod.build(sets=[f"model.name={model}", f"train.method={method}", f"train.backend={backend}",
                                 f"train.iters={total}"])
    rundir.save_config_with_template(run, cfg, {"backend": backend, "total_steps": total,
                                                "model_path": str(root / "models" / "x")}, "{{ messages }}")
    rows = [metric_row(s, round(2.0 - 0.05 * s, 4), **({"val_loss": round(2.1 - 0.05 * s, 4)} if s % 5 == 0 else {}))
            for s in range(1, steps + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step in checkpoints:
        ck = run / "checkpoints" / f"step-{step:08d}"
        ck.mkdir()
        (ck / "state.json").write_text(json.dumps({"step": step, "total_steps": total, "elapsed_s": 1.0}))
    if adapter:
        (run / "adapter").mkdir()
        (run / "adapter" / "adapter_config.json").write_text("{}")
    return run


@contextlib.contextmanager
def live_studio(root: Path, token: str | None = None) -> Iterator[tuple[str, Any]]:
    """(base URL, app) of create_app(root, token) served by a real uvicorn on a free loopback port."""
    import uvicorn

    from qlocal.studio.app import create_app

    app = create_app(root, token)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    guard = time.monotonic() + HANG_GUARD_S
    while not server.started:
        assert thread.is_alive(), "uvicorn exited before it started"
        assert time.monotonic() < guard, "uvicorn did not start"
        time.sleep(0.01)  # poll interval
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join()


@contextlib.contextmanager
def studio_process(root: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """`qlocal studio --root root *args` in a subprocess; yields it and the lines it printed once
    its `open` line is out and its port answers."""
    from train_helpers import subprocess_env

    proc = subprocess.Popen([sys.executable, "-m", "qlocal", "studio", "--root", str(root), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # blocks per line; ends if the process exits
            lines.append(line.rstrip("\n"))
            if line.startswith("open"):
                break
        assert any(ln.startswith("open") for ln in lines), f"studio exited: {lines}"
        port = int(args[args.index("--port") + 1])
        guard = time.monotonic() + HANG_GUARD_S
        while True:
            assert proc.poll() is None, f"studio exited: {lines}"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < guard, "studio's port never answered"
            time.sleep(0.02)  # poll interval
        yield proc, lines
    finally:
        proc.terminate()
        proc.wait()
