"""`qlocal export` on preference runs: the held-out split (qlocal.data.split) is the one training
held out, the tool-call preflight answers the held-out pairs' prompts with the chosen calls as the
reference, and a DPO run (torch and MLX) exports to an F16 GGUF that verifies; DPO with gradient
checkpointing trains as without."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qlocal import config as config_mod

REPO = Path(__file__).resolve().parent.parent
PAIRS = REPO / "data/prefs_sample.jsonl"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Baku", "Riga", "Doha", "Suva", "Apia"]


def _call(city: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


def _tool_pairs(path: Path) -> Path:
    """Pairs whose chosen answer calls get_weather and whose rejected one makes the answer up."""
    rows = [{"prompt": [{"role": "user", "content": f"Weather in {c}?"}],
             "chosen": [{"role": "assistant", "tool_calls": [_call(c)]}],
             "rejected": [{"role": "assistant", "content": f"It is sunny in {c}."}], "tools": TOOLS} for c in CITIES]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _kto(path: Path) -> Path:
    rows = []
    for i, c in enumerate(CITIES):
        good = i % 2 == 0
        answer = {"role": "assistant", "tool_calls": [_call(c)]} if good else {"role": "assistant", "content": "Sunny."}
        rows.append({"prompt": [{"role": "user", "content": f"Weather in {c}?"}], "completion": [answer],
                     "label": good, "tools": TOOLS})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_held_out_pairs_are_the_ones_training_held_out(tiny_model_dir) -> None:
    from qlocal import preference_run
    from qlocal.data.split import held_out_samples
    from qlocal.data.templates import resolve_chat_template
    from qlocal.hf import load_tokenizer

    model = tiny_model_dir("qwen2")
    cfg = config_mod.build(sets=[f"model.name={model}", f"data.path={PAIRS}", "train.method=dpo",
                                 "data.val_split=0.2", "train.seed=7", "data.max_seq_len=512"])
    tok = load_tokenizer(model)
    train, val, *_ = preference_run.prepare(cfg, tok, resolve_chat_template(tok, None)[0])
    held = [s.where for s in held_out_samples(cfg)]
    assert held == [e.where for e in val] and len(held) == round(0.2 * (len(train) + len(val)))
    assert not set(held) & {e.where for e in train}


def test_tool_preflight_prompts_of_a_preference_run(tmp_path: Path) -> None:
    from qlocal.data.split import held_out_samples
    from qlocal.tool_eval import run_prompts

    data = _tool_pairs(tmp_path / "pairs.jsonl")
    cfg = config_mod.build(sets=[f"data.path={data}", "train.method=dpo", "data.val_split=0.2", "model.name=x"])
    held = held_out_samples(cfg)
    prompts, source = run_prompts(cfg, 8)
    assert source == "held-out validation chats" and len(prompts) == len(held) == 2
    for p, s in zip(prompts, held):
        assert p.messages == s.prompt and p.tools == TOOLS
        assert [c["function"] for c in p.reference] == [c["function"] for c in s.chosen[0]["tool_calls"]]
    # No held-out share: the prompts come from the pairs' tool schemas, not an SFT reader's error.
    cfg = config_mod.build(sets=[f"data.path={data}", "train.method=orpo", "model.name=x"])
    prompts, source = run_prompts(cfg, 8)
    assert source.startswith("built from the training data's tool schemas") and prompts
    assert prompts[0].reference[0]["function"]["name"] == "get_weather"


def test_kto_preflight_takes_desirable_answers_only(tmp_path: Path) -> None:
    from qlocal.tool_eval import prompts_from_samples
    from qlocal.data.split import run_samples

    cfg = config_mod.build(sets=[f"data.path={_kto(tmp_path / 'kto.jsonl')}", "train.method=kto", "model.name=x"])
    prompts = prompts_from_samples(run_samples(cfg, cfg.data.path))
    assert [p.reference[0]["function"]["arguments"]["city"] for p in prompts] == CITIES[::2]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_dpo_run_exports_and_verifies(backend: str, tiny_model_dir, tmp_path: Path) -> None:
    from qlocal.export.pipeline import ExportOptions, export_run
    from qlocal.train import train

    pytest.importorskip("torch" if backend == "torch" else "mlx_lm")
    pytest.importorskip("llama_cpp")
    sets = {"model.name": tiny_model_dir("qwen2"), "data.path": PAIRS, "run.output_dir": tmp_path, "run.name": "dpo",
            "train.backend": backend, "train.iters": 3, "train.batch_size": 4, "data.max_seq_len": 160,
            "lora.dropout": 0.0, "train.method": "dpo", "data.val_split": 0.1, "train.lr": 1e-2}
    run = train(config_mod.build(sets=[f"{k}={v}" for k, v in sets.items()]), quiet=True)
    lines: list[str] = []
    res = export_run(run, ExportOptions(quants=["f16"], out_dir=tmp_path / "export"), echo=lines.append)
    assert res.verify_passed and res.summary["verify"]["files"] == {"model-f16.gguf": True}
    assert res.summary["fuse"]["max_abs_logit_diff"] < 1e-4
    # What was verified carries a trained delta (DPO moved lora_B off its zero start).
    from safetensors.numpy import load_file

    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert max(abs(v).max() for k, v in weights.items() if "lora_B" in k) > 0
    assert (tmp_path / "export" / "Modelfile").is_file()
    assert not [x for x in lines if x.startswith("note: no tool-call preflight")]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_dpo_with_gradient_checkpointing_trains_as_without(backend: str, tiny_model_dir, tmp_path: Path) -> None:
    """The first step's DPO loss is log 2 either way (the policy starts as its reference), so the
    second step's loss and rewards, after one update from checkpointed gradients, are compared."""
    from qlocal.train import train

    pytest.importorskip("torch" if backend == "torch" else "mlx_lm")
    rows = {}
    for ckpt in (False, True):
        sets = {"model.name": tiny_model_dir("qwen2"), "data.path": PAIRS, "run.output_dir": tmp_path,
                "run.name": f"gc{ckpt}", "train.backend": backend, "train.iters": 2, "train.batch_size": 4,
                "data.max_seq_len": 160, "lora.dropout": 0.0, "train.method": "dpo", "train.lr": 1e-2,
                "train.grad_checkpointing": ckpt}
        run = train(config_mod.build(sets=[f"{k}={v}" for k, v in sets.items()]), quiet=True)
        rows[ckpt] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    off, on = rows[False], rows[True]
    assert on[0]["loss"] == pytest.approx(off[0]["loss"], abs=1e-6)
    assert abs(off[1]["rewards/margins"]) > 1e-4  # the update did move the policy
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert on[1][key] == pytest.approx(off[1][key], abs=1e-5), key
