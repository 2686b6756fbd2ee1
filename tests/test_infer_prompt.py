"""Inference prompts are the training render's prefix: for every assistant turn of a tool-calling
record, the prompt qlocal.infer builds from the conversation before that turn (sent as a client or a
generate file sends it: OpenAI shape, arguments as JSON strings, results without names) is exactly
the training render's tokens before that turn's first trained token, on each family's own template.
The GGUF path (llama.cpp's tokenizer) gives the same ids as the HF path.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from qlocal.data.formats import Sample, normalise
from qlocal.data.render import chat_inputs, generation_ids, render
from qlocal.infer import prompt_ids
from tool_helpers import TIME, TOOL_FAMILIES, WEATHER, template, tokenizer

# Properties and argument keys out of sorted order, as clients send them: training sorts both.
WEATHER_UNSORTED = copy.deepcopy(WEATHER)
WEATHER_UNSORTED["function"]["parameters"]["properties"] = dict(
    reversed(list(WEATHER["function"]["parameters"]["properties"].items())))


def _call(n: int, name: str, args: dict) -> dict:
    return {"id": f"abcdefgh{n}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def _record(reasoning: bool) -> dict:
    """Two calls in turn (Llama 3.1 takes one call per turn), results without names, then the answer."""
    first = {"role": "assistant", "content": None,
             "tool_calls": [_call(1, "get_weather", {"unit": "celsius", "city": "Paris"})]}
    if reasoning:
        first["reasoning_content"] = "The weather tool first."
    return {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Weather and time in Paris?"},
        first,
        {"role": "tool", "tool_call_id": "abcdefgh1", "content": "18 C"},
        {"role": "assistant", "content": "", "tool_calls": [_call(2, "get_time", {"timezone": "Europe/Paris"})]},
        {"role": "tool", "tool_call_id": "abcdefgh2", "content": "14:05"},
        {"role": "assistant", "content": "18 C, and it is 14:05."}],
        "tools": [WEATHER_UNSORTED, TIME]}


def _turn_starts(mask: list[int]) -> list[int]:
    """Index of the first trained token of each trained run (one run per assistant turn here)."""
    return [i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])]


# Turns where a template itself renders the conversation so far differently once the turn follows:
# no prompt can be the training prefix there, and the prompt is the template's own generation prompt
# (what Ollama and llama.cpp send too). Found by this test; each is the family's published template.
TEMPLATE_QUIRKS = {
    # Qwen3 writes the empty thinking block only into the last assistant turn; its generation
    # prompt (enable_thinking=False) always ends with it.
    ("qwen3", False, 2), ("qwen3", False, 4),
    # Hermes closes a tool-result block with <|im_end|> and the next assistant turn opens with
    # "\n<|im_start|>", where the generation prompt opens with "<|im_start|>".
    ("hermes", False, 4), ("hermes", True, 4), ("hermes", False, 6), ("hermes", True, 6),
    # Mistral writes the system prompt into the user turn only while that turn is the last message.
    ("mistral", False, 2), ("mistral", True, 2),
}


@pytest.mark.parametrize("reasoning", [False, True], ids=["plain", "reasoning"])
@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_infer_prompt_is_the_training_prefix(family: str, reasoning: bool) -> None:
    tok, tmpl = tokenizer(family), template(family)
    record = _record(reasoning)
    sample = normalise(record, "messages", "r:1")
    example = render(sample, tok, tmpl)
    turns = [i for i, m in enumerate(record["messages"]) if m["role"] == "assistant"]
    starts = _turn_starts(example.loss_mask)
    assert len(starts) == len(turns), (family, starts)
    for i, start in zip(turns, starts):
        ids = prompt_ids(tok, tmpl, record["messages"][:i], record["tools"], thinking=reasoning)
        # always: the generation prompt of the conversation as training reads and hands it to the template
        before = Sample("chat", messages=sample.messages[:i], where="r:1", tools=sample.tools)
        msgs, extra = chat_inputs(before, tmpl)
        extra.update({"enable_thinking": reasoning} if "enable_thinking" in extra else {})
        assert ids == generation_ids(tok, msgs, tmpl, extra), (family, i)
        if (family, reasoning, i) in TEMPLATE_QUIRKS:
            assert ids != example.input_ids[:start]  # a quirk that went away belongs out of the list
            continue
        assert ids == example.input_ids[:start], (family, i, tok.decode(ids), tok.decode(example.input_ids[:start]))


def test_raw_messages_would_differ() -> None:
    """The gap this closes: the conversation handed to the template as sent (schema properties and
    call arguments in the client's order) is not what training rendered."""
    tok, tmpl = tokenizer("qwen2.5"), template("qwen2.5")
    record = _record(False)
    example = render(normalise(record, "messages", "r:1"), tok, tmpl)
    start = _turn_starts(example.loss_mask)[2]
    raw = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                                for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in record["messages"][:6]]
    assert generation_ids(tok, raw, tmpl, {"tools": record["tools"]}) != example.input_ids[:start]
    assert prompt_ids(tok, tmpl, record["messages"][:6], record["tools"]) == example.input_ids[:start]


def test_qwen3_thinking_switch_follows_the_run() -> None:
    """A run trained without reasoning saw Qwen3's empty thinking block as prompt; one trained with
    reasoning wrote its own <think>: the prompt follows the run, not the (reasoning-free) question."""
    tok, tmpl = tokenizer("qwen3"), template("qwen3")
    question = [{"role": "user", "content": "Hi"}]
    assert tok.decode(prompt_ids(tok, tmpl, question, thinking=False)).endswith("assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(prompt_ids(tok, tmpl, question, thinking=True)).endswith("assistant\n")


@pytest.mark.slow  # two tiny exports to GGUF
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_gguf_prompt_ids_equal_the_hf_ones(arch: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """llama.cpp's tokenizer on transformers' render gives the HF path's ids, bos rule included
    (the tiny llama's tokenizer adds a bos the hermes template lacks)."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("peft")
    from transformers import AutoTokenizer

    from infer_helpers import export_folder, lively_model, synthetic_run
    from qlocal.infer import find_gguf, gguf_prompt_ids
    from qlocal.llamacpp import load_llama

    root = tmp_path_factory.mktemp(f"gguf_prompt_{arch}")
    export = export_folder(root, synthetic_run(root, lively_model(root, arch)))
    tok = AutoTokenizer.from_pretrained(str(export / "fused"))
    gguf, _ = find_gguf(export)
    llm = load_llama(gguf, n_ctx=512)
    record = _record(True)
    for family in ("hermes", "qwen3", "llama3.1"):
        tmpl = template(family)
        for i in (2, 6):
            want = prompt_ids(tok, tmpl, record["messages"][:i], record["tools"], thinking=True)
            assert gguf_prompt_ids(llm, tmpl, record["messages"][:i], record["tools"], thinking=True) == want, (family, i)
    if arch == "llama":
        assert want[0] == tok.bos_token_id


def test_a_run_records_whether_its_data_reasons() -> None:
    """train writes resolved.data_reasoning; infer's run generators pass it as `thinking`."""
    from qlocal.train import _reasons

    assert _reasons([normalise(_record(True), "messages", "r:1")]) is True
    assert _reasons([normalise(_record(False), "messages", "r:1")]) is False
