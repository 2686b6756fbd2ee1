"""The tool-call preflight end to end on a tiny model: a run trained on the tools sample (Qwen 2.5's
template, a fifth held out) exports an f16 GGUF whose verify.json answers exactly the held-out calling
turns, and `qlocal eval` reports the same metrics on the GGUF (the same llama.cpp greedy answers, text
for text) and on the run (torch). A tiny random model does not learn to call in a few steps, so its
answers are failures with their problems named; the Gemma 3 270M slow test shows the passing side
(tests/test_slow_gemma_tools.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_qlocal

pytest.importorskip("llama_cpp")
pytest.importorskip("peft")

QWEN25 = REPO / "tests/assets/chat_templates/qwen2.5.jinja"
SAMPLE = REPO / "data/tools_sample.jsonl"
METRICS = ("tool_valid", "tool_valid_json", "tool_name_accuracy", "tool_arguments_exact")


def test_verify_and_eval_answer_the_held_out_tool_prompts(tiny_model_dir, tmp_path: Path) -> None:
    from qlocal import config as config_mod
    from qlocal.data.split import held_out_samples
    from qlocal.tool_eval import prompts_from_samples
    from qlocal.train import train

    sets = {"model.name": str(tiny_model_dir("qwen2")), "model.chat_template": str(QWEN25), "data.path": str(SAMPLE),
            "data.val_split": 0.2, "data.max_seq_len": 2048, "run.output_dir": str(tmp_path / "runs"), "run.name": "t",
            "train.backend": "torch", "train.iters": 2, "train.batch_size": 2, "train.save_every": 100,
            "train.eval_every": 100}
    cfg = config_mod.build(sets=[f"{k}={v}" for k, v in sets.items()])
    run = train(cfg, quiet=True)
    held = held_out_samples(cfg)
    want = prompts_from_samples(held)
    assert 0 < len(want) <= 24

    out = tmp_path / "export"
    r = run_qlocal("export", run, "--quant", "f16", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "verify.json").read_text())
    assert doc["passed"] and doc["tool_prompts"] == {"count": len(want), "source": "held-out validation chats"}
    tc = doc["files"][0]["tool_calls"]
    assert tc["prompts"] == len(want) and tc["tag"] == "<tool_call>" and tc["source"] == "held-out validation chats"
    assert tc["valid_rate"] == tc["valid"] / len(want) and tc["valid"] <= tc["valid_json"] <= len(want)
    assert len(tc["failures"]) == min(3, len(want) - tc["valid"])
    assert all(f["problems"] and f["where"] in {p.where for p in want} for f in tc["failures"])
    assert "tool calls valid on" in r.stdout and f"/{len(want)} prompts" in r.stdout
    assert json.loads((out / "export.json").read_text())["verify"]["tool_calls_valid"] == {"model-f16.gguf": tc["valid_rate"]}

    # The held-out records as a test file: eval finds the same calling turns in it.
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    test_file = tmp_path / "held_out.jsonl"
    test_file.write_text("".join(lines[int(s.where.rsplit(":", 1)[1]) - 1] + "\n" for s in held), encoding="utf-8")
    reports = {}
    for name, target, limit in (("gguf", out, "100"), ("run", run, "3")):  # torch generation is the slow one
        rep = tmp_path / f"eval-{name}.json"
        r = run_qlocal("eval", target, "--data", test_file, "--max-tokens", "4", "--limit", limit, "--report", rep,
                       "--quiet", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        reports[name] = json.loads(rep.read_text())["metrics"]
        assert all(k in r.stdout for k in METRICS) and "calling turns answered greedily" in r.stdout
    gguf = reports["gguf"]
    # the same file and the same greedy decoding as verify: the same answers and metrics
    assert gguf["tool_calls"]["prompts"] == len(want)
    def answers(rep: dict) -> list:  # the records are named by the file they were read from
        return [(e["output"], e.get("problems")) for e in rep["examples"] + rep["failures"]]

    assert answers(gguf["tool_calls"]) == answers(tc)
    assert [gguf[k] for k in METRICS] == [tc["valid_rate"], tc["valid_json_rate"], tc["name_accuracy"],
                                          tc["arguments_exact"]]
    assert reports["run"]["tool_calls"]["prompts"] == 3
    assert all(0.0 <= reports["run"][k] <= 1.0 for k in METRICS)
