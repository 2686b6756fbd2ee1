"""Tool-call scoring (qlocal.tool_eval): which prompts a run is checked with, and how answers score.

The answers scored here are what each real family template writes for the reference turn (the text a
model is trained to emit after the generation prompt), so a perfect model scores 1.0 on every metric
and a call the schema does not allow is named in the failures. Models answering is in
tests/test_tool_preflight.py (a trained tiny model through export and eval) and the Gemma slow test.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from conftest import REPO, tokenizer_path
from tool_helpers import tokenizer as family_tokenizer
from qlocal import config as config_mod
from qlocal.tool_calls import check_call, template_tag
from qlocal.tool_eval import prompt_ids, prompts_from_samples, run_prompts, schema_prompts, score

SAMPLE = REPO / "data/tools_sample.jsonl"
ENDS = ("<|im_end|>", "<|eot_id|>", "</s>")


def _samples(path: Path = SAMPLE):  # type: ignore[no-untyped-def]
    from qlocal.data.formats import load_samples

    return load_samples(str(path))[0]


def _cfg(tmp_path: Path, **sets: object) -> config_mod.Config:
    base = {"data.path": str(SAMPLE), "run.output_dir": str(tmp_path), "train.seed": 3}
    base.update(sets)
    return config_mod.build(sets=[f"{k}={v}" for k, v in base.items()])


def _reference_text(tok, prompt, calls) -> str:  # type: ignore[no-untyped-def]
    """What the template writes for the assistant turn making `calls` after `prompt`'s generation prompt."""
    from qlocal.data.formats import Sample
    from qlocal.data.render import chat_inputs

    msgs, extra = chat_inputs(Sample(kind="chat", messages=prompt.messages, tools=prompt.tools, where="t"), tok.chat_template)
    head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **extra)
    turn = {"role": "assistant", "content": "", "tool_calls": calls}
    full = tok.apply_chat_template(msgs + [turn], tokenize=False, **extra)
    text = full[len(os.path.commonprefix([head, full])):]
    return text[:min((text.find(e) for e in ENDS if e in text), default=len(text))]


def test_held_out_prompts_are_the_validation_split_training_used(tmp_path: Path) -> None:
    from qlocal.data.render import render
    from qlocal.data.split import held_out_samples
    from qlocal.hf import load_tokenizer
    from qlocal.train_data import prepare_data

    tpl = str(REPO / "tests/assets/chat_templates/qwen2.5.jinja")
    cfg = _cfg(tmp_path, **{"data.val_split": 0.2, "model.chat_template": tpl, "data.max_seq_len": 2048})
    tok = load_tokenizer(tokenizer_path("qwen2"))
    prepared = prepare_data(cfg, tok, tpl)
    held = held_out_samples(cfg)
    assert len(held) == len(prepared.val) == round(54 * 0.2)
    assert [(e.input_ids, e.loss_mask) for e in prepared.val] == \
        [(e.input_ids, e.loss_mask) for e in (render(s, tok, prepared.template, max_seq_len=2048) for s in held)]
    # another seed holds out other records: the split follows train.seed
    other = held_out_samples(_cfg(tmp_path, **{"data.val_split": 0.2, "train.seed": 4}))
    assert [s.where for s in other] != [s.where for s in held]


def test_every_calling_turn_is_a_prompt_with_its_calls_as_reference() -> None:
    samples = _samples()
    prompts = prompts_from_samples(samples)
    turns = [(s, i) for s in samples if s.tools for i, m in enumerate(s.messages)
             if m["role"] == "assistant" and m.get("tool_calls")]
    assert len(prompts) == len(turns) > 40
    for p, (s, i) in zip(prompts, turns):
        assert p.messages == s.messages[:i] and p.messages[-1]["role"] in ("user", "tool")
        assert p.reference == s.messages[i]["tool_calls"] and p.tools == s.tools
    assert any("(turn" in p.where for p in prompts)  # multi-step chats give a prompt per calling turn
    assert len(prompts_from_samples(samples, limit=5)) == 5


@pytest.mark.parametrize("family", ["qwen2.5", "hermes", "llama3.1", "mistral"])
def test_the_templates_own_call_text_scores_perfectly_and_bad_calls_are_named(family: str) -> None:
    tok = family_tokenizer(family)
    tag = template_tag(tok.chat_template)
    prompts = [p for p in prompts_from_samples(_samples()) if len(p.reference) == 1][:6]
    texts = [_reference_text(tok, p, p.reference) for p in prompts]
    good = score(prompts, texts, tag)
    assert (good["prompts"], good["valid"], good["failures"]) == (6, 6, [])
    assert good["valid_rate"] == good["valid_json_rate"] == good["name_accuracy"] == good["arguments_exact"] == 1.0

    wrong = []
    for p in prompts[:3]:  # a declared tool without its required arguments, then an undeclared tool
        fn = p.reference[0]["function"]
        wrong.append([{"id": "abcdefghi", "type": "function", "function": {"name": fn["name"], "arguments": {}}}])
    rocket_call = {"id": "abcdefghi", "type": "function", "function": {"name": "launch_rocket", "arguments": {"to": "moon"}}}
    wrong += [[rocket_call]] * 3
    bad = score(prompts, [_reference_text(tok, p, c) for p, c in zip(prompts, wrong)], tag)
    assert bad["valid"] == 0 and bad["valid_json"] == 6  # well-formed JSON calls, invalid against the schema
    assert bad["name_accuracy"] == 0.5 and bad["arguments_exact"] == 0.0
    assert len(bad["failures"]) == 3 and all("missing required argument" in f["problems"][0] for f in bad["failures"])
    rocket = score(prompts[3:], [_reference_text(tok, p, c) for p, c in zip(prompts[3:], wrong[3:])], tag)
    assert "not a declared tool" in rocket["failures"][0]["problems"][0]
    # plain text (no tag) and a truncated call are no calls
    cut = texts[0][: texts[0].index("{") + 5]
    none = score(prompts[:2], ["It is sunny.", cut], tag)
    assert none["valid"] == none["valid_json"] == 0 and len(none["failures"]) == 2


def test_parallel_calls_match_in_any_order() -> None:
    tok = family_tokenizer("qwen2.5")
    tag = template_tag(tok.chat_template)
    prompts = [p for p in prompts_from_samples(_samples()) if len(p.reference) > 1][:3]
    assert prompts
    swapped = [_reference_text(tok, p, list(reversed(p.reference))) for p in prompts]
    out = score(prompts, swapped, tag)
    assert out["valid"] == len(prompts) and out["arguments_exact"] == 1.0


def test_schema_prompts_ask_for_each_tool_with_its_required_arguments() -> None:
    tools = json.loads((REPO / "data/tools_schemas.json").read_text())
    tools = tools["tools"] if isinstance(tools, dict) else tools
    prompts = schema_prompts(tools)
    assert [p.reference[0]["function"]["name"] for p in prompts] == [t["function"]["name"] for t in tools]
    for p, t in zip(prompts, tools):
        fn = t["function"]
        assert check_call(p.reference[0], tools, types=True) == [], p.reference
        text = p.messages[0]["content"]
        assert fn["name"] in text
        for key, value in p.reference[0]["function"]["arguments"].items():
            assert key in text and json.dumps(value) in text
    # rendered as training renders: the tools are in the prompt the model sees
    tok = family_tokenizer("hermes")
    ids = prompt_ids(tok, tok.chat_template, prompts[0])
    assert tools[0]["function"]["name"] in tok.decode(ids) and tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_run_prompts_prefer_held_out_chats_then_the_schemas(tmp_path: Path) -> None:
    held, source = run_prompts(_cfg(tmp_path, **{"data.val_split": 0.2}), 24)
    assert held and source == "held-out validation chats"
    assert all(p.reference for p in held)
    built, source = run_prompts(_cfg(tmp_path), 24)
    assert "schemas" in source and {p.reference[0]["function"]["name"] for p in built} == \
        {t["function"]["name"] for s in _samples() for t in s.tools or []}
    plain, source = run_prompts(_cfg(tmp_path, **{"data.path": str(REPO / "data/alpaca_sample.jsonl")}), 24)
    assert plain == [] and "declares no tools" in source
    gone, source = run_prompts(_cfg(tmp_path, **{"data.path": str(tmp_path / "moved.jsonl")}), 24)
    assert gone == [] and "not found" in source


def test_prompt_ids_follow_the_bos_rule_of_training() -> None:
    from qlocal.data.render import render
    from qlocal.data.formats import Sample
    from qlocal.hf import load_tokenizer

    tok = load_tokenizer(tokenizer_path("gemma3"))
    tpl = (REPO / "configs/hermes_tools.jinja").read_text()
    p = prompts_from_samples(_samples(), limit=1)[0]
    ids = prompt_ids(tok, tpl, p)
    full = render(Sample(kind="chat", messages=p.messages + [{"role": "assistant", "content": "",
                                                              "tool_calls": copy.deepcopy(p.reference)}],
                         tools=p.tools, where="t"), tok, tpl)
    assert full.input_ids[: len(ids)] == ids and ids[0] == tok.bos_token_id
    assert sum(full.loss_mask[: len(ids)]) == 0 and sum(full.loss_mask[len(ids):]) > 0


def test_export_probes_render_with_a_template_that_needs_tools() -> None:
    # Hermes 3's tool_use template (configs/tools_sample.yaml) loops over `tools` unguarded: fuse and
    # verify render their plain probe chats with an empty tool list instead of failing the export.
    from qlocal.export.fuse import PROBE_CONVERSATIONS, render_chat
    from qlocal.hf import load_tokenizer

    tok = load_tokenizer(tokenizer_path("gemma3"))
    tpl = (REPO / "configs/hermes_tools.jinja").read_text()
    for conv in PROBE_CONVERSATIONS:
        text = render_chat(tok, tpl, conv)
        assert text.endswith("<|im_start|>assistant\n") and conv[-1]["content"] in text
