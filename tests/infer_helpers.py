"""Shared, cached builders for the eval / infer / serve tests: a run with a strong random adapter
(export_helpers.make_run), an export folder of it (real export pipeline, F16 GGUF, no verify),
and a free TCP port. Built once per pytest process, whichever test module asks first."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

_CACHE: dict[tuple[str, ...], Path] = {}


def lively_model(root: Path, arch: str = "qwen2") -> Path:
    """A tiny random model initialised 10x wider than usual (initializer_range 0.2), so greedy
    answers depend on the prompt instead of repeating one token: generation tests can then tell
    a right prompt from a wrong one."""
    key = ("lively", arch)
    if key not in _CACHE:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from conftest import _tiny_config, tokenizer_path

        tok = AutoTokenizer.from_pretrained(tokenizer_path(arch))
        config = _tiny_config(arch, tok)
        config.initializer_range = 0.2
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        out = root / f"lively-{arch}"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        _CACHE[key] = out
    return _CACHE[key]


def synthetic_run(root: Path, base: Path, backend: str = "torch") -> Path:
    """A run folder for `base` whose adapter visibly changes the logits; config records `backend`."""
    key = ("run", str(base), backend)
    if key not in _CACHE:
        from export_helpers import make_run

        run = make_run(base, root / f"run-{base.name}-{backend}", b_std=0.05)
        doc = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        doc["resolved"]["backend"] = backend
        doc["train"]["backend"] = backend
        (run / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
        _CACHE[key] = run
    return _CACHE[key]


def export_folder(root: Path, run: Path) -> Path:
    """export/<run>/ with fused/, model-f16.gguf and export.json, as `qlocal export --quant f16` writes."""
    key = ("export", str(run))
    if key not in _CACHE:
        from qlocal.export.pipeline import ExportOptions, export_run

        out = root / f"export-{run.name}"
        export_run(run, ExportOptions(quants=["f16"], out_dir=out, verify=False), echo=lambda *_: None)
        _CACHE[key] = out
    return _CACHE[key]


def greedy_answer(gguf: Path, question: str, max_tokens: int) -> dict:
    """llama.cpp's own chat completion of one user question, greedy (seed 0, n_ctx 512): the first
    choice, with its finish_reason ("stop" when the model ended its turn inside max_tokens)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=512, verbose=False, seed=0)
    try:
        res = llm.create_chat_completion([{"role": "user", "content": question}],
                                         max_tokens=max_tokens, temperature=0.0)
    finally:
        llm.close()
    return res["choices"][0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(proc: subprocess.Popen, url: str, log_path: Path, guard_s: float) -> None:
    """Poll `url` until it answers; fail with the process's log if it exits or `guard_s` passes (a hang guard)."""
    deadline = time.monotonic() + guard_s
    while True:
        assert proc.poll() is None, "the server exited:\n" + log_path.read_text()
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            assert time.monotonic() < deadline, "the server did not come up:\n" + log_path.read_text()
            time.sleep(0.2)  # poll interval while the port opens


@contextlib.contextmanager
def served(export_dir: Path, log_path: Path, *args: str) -> Iterator[str]:
    """`qlocal serve EXPORT_DIR` on a free loopback port, up once /v1/models answers; yields its /v1 URL.

    Stopped with SIGINT (killed if it does not exit) and its log closed however the block ends.
    """
    from conftest import OFFLINE_ENV, REPO
    from train_helpers import HANG_GUARD_S

    port = free_port()
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "qlocal", "serve", str(export_dir), "--port", str(port),
                             "--host", "127.0.0.1", *args], env={**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO)},
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_answers(proc, f"{base}/models", log_path, HANG_GUARD_S)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
