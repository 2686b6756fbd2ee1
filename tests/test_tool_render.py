"""Tool calls and reasoning through the real families' own templates (tests/assets/chat_templates):
the loss mask covers exactly what the model writes in each assistant turn (calls, thinking and the
end-of-turn token), never the tools schema, system, user turns or tool results.

The expected turns come from an independent, hand-written description of each family's format
(`expected_turns`), not from the renderer: what follows the generation prompt for that turn.
"""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlocal.data.formats import Sample, load_samples, normalise
from qlocal.data.render import render, render_for_display
from qlocal.data.tools import link_results
from qlocal.errors import UserError
from render_helpers import trained_spans
from tool_helpers import TOOL_FAMILIES, TOOLS, template, tokenizer

DATA = Path(__file__).resolve().parent.parent / "data"
EOT = {"qwen2.5": "<|im_end|>\n", "qwen3": "<|im_end|>\n", "hermes": "<|im_end|>\n", "llama3.1": "<|eot_id|>",
       "mistral": "<|eot_id|>"}  # Mistral's turns end with eos: the llama3 test tokenizer's is <|eot_id|>


def _args(call: dict) -> str:
    return json.dumps(call["function"]["arguments"], ensure_ascii=False)  # transformers' tojson


def _inline(msg: dict) -> str:
    """Content with reasoning written in front, as qlocal does for a template without thinking."""
    r = msg.get("reasoning_content")
    return f"<think>\n{r}\n</think>\n\n{msg['content']}" if r else msg["content"]


def _qwen_calls(msg: dict, first_newline: bool) -> str:
    out = ""
    for k, c in enumerate(msg.get("tool_calls") or []):
        sep = "\n" if (k > 0 or first_newline) else ""
        out += f'{sep}<tool_call>\n{{"name": "{c["function"]["name"]}", "arguments": {_args(c)}}}\n</tool_call>'
    return out


def expected_turns(family: str, messages: list[dict]) -> list[str]:
    """What the model writes after the generation prompt in each assistant turn, per family."""
    thinks = any(m.get("reasoning_content") for m in messages)
    last_query = max(i for i, m in enumerate(messages) if m["role"] == "user")
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        calls = m.get("tool_calls")
        if family == "qwen2.5":
            content = _inline(m)
            body = content + _qwen_calls(m, bool(content)) if calls else content
        elif family == "qwen3":
            content, r = m["content"], m.get("reasoning_content", "")
            shown = i > last_query and (i == len(messages) - 1 or r)
            # With no reasoning in the chat the thinking switch is off: the empty block is prompt.
            think = f"<think>\n{r}\n</think>\n\n" if shown and thinks else ""
            body = think + content + _qwen_calls(m, bool(content))
        elif family == "hermes":  # calls replace the content; the first newline belongs to the prompt
            body = _qwen_calls(m, False) if calls else _inline(m)
        elif family == "llama3.1":
            body = (f'{{"name": "{calls[0]["function"]["name"]}", "parameters": {_args(calls[0])}}}' if calls
                    else _inline(m).strip())
        else:  # mistral: [TOOL_CALLS][{name, arguments, id}, ...] or the text, then eos
            body = ("[TOOL_CALLS][" + ", ".join(
                json.dumps(c["function"], ensure_ascii=False)[:-1] + f', "id": "{c["id"]}"}}' for c in calls) + "]"
                if calls else _inline(m))
        out.append(body + EOT[family])
    return out


# ---- random tool conversations -----------------------------------------------------------------

_chars = st.characters(codec="utf-8", categories=["L", "N", "Zs"], exclude_characters="▁")
_text = st.text(_chars, min_size=1, max_size=20).map(str.strip).filter(bool)


@st.composite
def tool_chats(draw: Any, family: str) -> list[dict]:
    """OpenAI-style chats: exchanges of user, zero or more calling steps (calls + results), answer."""
    parallel = family != "llama3.1"  # Llama 3.1's template raises on more than one call per turn
    msgs: list[dict] = [{"role": "system", "content": draw(_text)}] if draw(st.booleans()) else []
    n = 0
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(_text)})
        for _ in range(draw(st.integers(0, 2))):
            calls = []
            for _ in range(draw(st.integers(1, 2 if parallel else 1))):
                n += 1
                name = draw(st.sampled_from(["get_weather", "get_time"]))
                key = "city" if name == "get_weather" else "timezone"
                calls.append({"id": f"c{n:08d}", "type": "function",
                              "function": {"name": name, "arguments": {key: draw(_text)}}})
            turn = {"role": "assistant", "content": draw(st.one_of(st.just(""), _text)), "tool_calls": calls}
            if draw(st.booleans()):
                turn["reasoning_content"] = draw(_text)
            msgs.append(turn)
            msgs += [{"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"], "content": draw(_text)}
                     for c in calls]
        answer = {"role": "assistant", "content": draw(_text)}
        if draw(st.booleans()):
            answer["reasoning_content"] = draw(_text)
        msgs.append(answer)
    return msgs


def _nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def _untrained(ex: Any, tok: Any) -> str:
    return tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if not m], skip_special_tokens=False)


@pytest.mark.parametrize("family", TOOL_FAMILIES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mask_is_exactly_the_assistant_turns(family: str, data: Any) -> None:
    _assert_mask_is_the_turns(family, data.draw(tool_chats(family)))


# Identical contents everywhere: Mistral's template compares whole messages (`message ==
# user_messages[-1]`), so both user turns get the tools block and a sentinel swap of the second
# moves text before it; the first turn once lost its end-of-turn token and trained the user's '0'.
REPEATED = [{"role": "system", "content": "0"}, {"role": "user", "content": "0"}, {"role": "assistant", "content": "0"},
            {"role": "user", "content": "0"}, {"role": "assistant", "content": "0"}]


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_mask_with_repeated_contents_is_exactly_the_assistant_turns(family: str) -> None:
    _assert_mask_is_the_turns(family, [dict(m) for m in REPEATED])


def _assert_mask_is_the_turns(family: str, messages: list[dict]) -> None:
    tok = tokenizer(family)
    sample = Sample("chat", messages=messages, where="p:1", tools=TOOLS)
    ex = render(sample, tok, template(family))
    assert len(ex.input_ids) == len(ex.loss_mask)
    assert [_nfc(s) for s in trained_spans(ex, tok)] == [_nfc(s) for s in expected_turns(family, messages)]
    rest = _nfc(_untrained(ex, tok))
    for m in messages:  # every prompt part is in the untrained text (Mistral drops a leading system)
        if m["role"] in ("user", "tool") or (m["role"] == "system" and family != "mistral"):
            assert _nfc(m["content"]) in rest, (m, rest)
    schema = TOOLS[0]["function"]["parameters"]["properties"]["city"]["description"]
    assert schema in rest and not any(schema in s for s in trained_spans(ex, tok))  # the tools block is prompt


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_train_on_reasoning_off_leaves_only_the_thinking_text_untrained(family: str) -> None:
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c00000001", "type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "tool_call_id": "c00000001", "name": "get_weather", "content": "18 C, sunny"},
            {"role": "assistant", "content": "It is 18 C and sunny.", "reasoning_content": "The tool says 18 C."}]
    sample = Sample("chat", messages=msgs, where="r:1", tools=TOOLS)
    tok = tokenizer(family)
    on, off = render(sample, tok, template(family)), render(sample, tok, template(family), train_on_reasoning=False)
    assert on.input_ids == off.input_ids
    assert "The tool says 18 C." in "".join(trained_spans(on, tok))
    spans = trained_spans(off, tok)
    assert "The tool says" not in "".join(spans) and "The tool says 18 C." in _untrained(off, tok)
    assert any("It is 18 C and sunny." in s for s in spans) and any("get_weather" in s for s in spans)
    assert any(s.startswith("<think>") for s in spans) and any(s.startswith("</think>") or "\n</think>" in s for s in spans)


def test_qwen3_thinking_switch_follows_the_data() -> None:
    tok = tokenizer("qwen3")
    plain = Sample("chat", where="q:1", messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    ex = render(plain, tok, template("qwen3"))  # no reasoning: enable_thinking=False, the empty block is prompt
    assert trained_spans(ex, tok) == ["Hello.<|im_end|>\n"]
    assert "<think>\n\n</think>\n\n" in _untrained(ex, tok)
    plain.messages[1]["reasoning_content"] = "Greet back."
    assert trained_spans(render(plain, tok, template("qwen3")), tok) == ["<think>\nGreet back.\n</think>\n\nHello.<|im_end|>\n"]


def test_think_block_in_content_is_reasoning() -> None:
    rec = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "<think>\nSimple sum.\n</think>\n\n4."}]}
    as_block = normalise(rec, "messages", "t:1")
    as_field = normalise({"messages": [rec["messages"][0], {"role": "assistant", "content": "4.",
                                                             "reasoning_content": "Simple sum."}]}, "messages", "t:2")
    assert as_block.messages == as_field.messages
    tok = tokenizer("qwen3")
    assert render(as_block, tok, template("qwen3")) == render(as_field, tok, template("qwen3"))


def test_gemma3_has_no_tool_format_and_says_so() -> None:
    tok = tokenizer("gemma3")
    samples, _ = load_samples(str(DATA / "tools_sample.jsonl"))
    with pytest.raises(UserError, match=r"tools_sample\.jsonl:1: the record has tool calls but the chat template "
                                        r"never renders them.*--chat-template"):
        render(samples[0], tok, template("gemma3"))
    # a chat without tools still renders on Gemma's own template
    plain = next(s for s in samples if not any(m.get("tool_calls") for m in s.messages))
    plain.tools = None
    assert sum(render(plain, tok, template("gemma3")).loss_mask) > 0


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_openai_and_sharegpt_files_give_identical_examples(family: str) -> None:
    openai, _ = load_samples(str(DATA / "tools_sample.jsonl"))
    sharegpt, _ = load_samples(str(DATA / "tools_sample_sharegpt.json"))
    assert len(openai) == len(sharegpt) >= 50
    if family == "mistral":  # the only template that writes call ids: ShareGPT has none, so both use qlocal's
        for s in openai:
            for m in s.messages:
                m.pop("tool_call_id", None)
                for c in m.get("tool_calls") or []:
                    c.pop("id")
            s.messages[:] = link_results(s.messages)
    tok = tokenizer(family)
    for a, b in zip(openai, sharegpt):
        if family == "llama3.1" and any(len(m.get("tool_calls") or []) > 1 for m in a.messages):
            with pytest.raises(UserError, match="only supports single tool-calls"):
                render(a, tok, template(family))
            continue
        ea, eb = render(a, tok, template(family)), render(b, tok, template(family))
        assert (ea.input_ids, ea.loss_mask) == (eb.input_ids, eb.loss_mask), (a.where, b.where)
        assert trained_spans(ea, tok) == expected_turns(family, a.messages), a.where


def test_data_check_shows_tools_calls_results_and_a_marked_call(tmp_path: Path) -> None:
    from qlocal.config import DataConfig
    from qlocal.data.check import check_report

    tok = tokenizer("qwen2.5")
    report = check_report(str(DATA / "tools_sample.jsonl"), tok, template("qwen2.5"), DataConfig(max_seq_len=2048))
    openai, _ = load_samples(str(DATA / "tools_sample.jsonl"))
    calls = sum(len(m.get("tool_calls") or []) for s in openai for m in s.messages)
    results = sum(m["role"] == "tool" for s in openai for m in s.messages)
    assert "tools and reasoning:" in report
    assert f"6 schemas in {len(openai)} records (get_weather, get_time, " in report
    assert f"tool calls      {calls} (5 turns with parallel calls), trained" in report
    assert f"tool results    {results}, not trained" in report
    assert "[[<tool_call>\n{\"name\": \"get_weather\"" in report and "<tool_response>" in report
    off = check_report(str(DATA / "tools_sample.jsonl"), tok, template("qwen2.5"),
                       DataConfig(max_seq_len=2048, train_on_reasoning=False))
    assert "assistant turns, not trained (data.train_on_reasoning: false)" in off


def test_data_tools_file_applies_to_records_without_tools(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    rec = {"messages": [{"role": "user", "content": "Time in Tokyo?"},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"function": {"name": "get_time", "arguments": '{"timezone": "Asia/Tokyo"}'}}]},
                        {"role": "tool", "content": "09:00"}, {"role": "assistant", "content": "It is 09:00."}]}
    data.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "tools": [TOOLS[0]]}) + "\n", encoding="utf-8")
    samples, _ = load_samples(str(data), tools=str(DATA / "tools_schemas.json"))
    assert [len(s.tools) for s in samples] == [6, 1]  # a record's own tools win
    shown = render_for_display(render(samples[0], tokenizer("qwen2.5"), template("qwen2.5")), tokenizer("qwen2.5"))
    assert '"name": "search_flights"' in shown.split("[[")[0]  # the schema is rendered, untrained
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "tools"}', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.json.*'tools\[0\]' must be a function schema"):
        load_samples(str(data), tools=str(bad))
    with pytest.raises(UserError, match=r"data\.tools: .*missing\.json not found"):
        load_samples(str(data), tools=str(tmp_path / "missing.json"))


def test_reasoning_goes_where_the_template_reads_it() -> None:
    tok = tokenizer("qwen2.5")
    sample = Sample("chat", where="k:1", messages=[{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hello.", "reasoning_content": "Be kind."}])
    # a template reading message.thinking (gpt-oss style) gets the reasoning under that key
    thinking = ("{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.thinking %}[T]{{ m.thinking }}[/T]{% endif %}"
                "{{ m.content }}<|im_end|>{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert trained_spans(render(sample, tok, thinking), tok) == ["[T]Be kind.[/T]Hello.<|im_end|>"]
    # a template with no thinking of its own (ChatML fallback) gets it inline, as <think> before the answer
    from qlocal.chat_families import fallbacks

    assert trained_spans(render(sample, tok, fallbacks()["chatml"]), tok) == [
        "<think>\nBe kind.\n</think>\n\nHello.<|im_end|>\n"]
    off = render(sample, tok, fallbacks()["chatml"], train_on_reasoning=False)
    assert "Be kind." not in "".join(trained_spans(off, tok)) and "Be kind." in _untrained(off, tok)


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3.1"])
def test_an_opening_assistant_turn_trains_only_itself(family: str) -> None:
    tok = tokenizer(family)
    sample = Sample("chat", where="o:1", messages=[{"role": "assistant", "content": "Hi there."},
                                                    {"role": "user", "content": "Hello"},
                                                    {"role": "assistant", "content": "How can I help?"}])
    spans = trained_spans(render(sample, tok, template(family)), tok)
    assert [s.rstrip("\n") for s in spans] == [f"Hi there.{EOT[family].strip()}", f"How can I help?{EOT[family].strip()}"]


def test_a_schema_without_description_or_parameters_renders_through_hermes() -> None:
    """The Hermes template reads `description` and `parameters`: a bare {"name"} schema gets "" and an
    empty object schema, so the record renders (it failed with "'dict object' has no attribute")."""
    hermes = (DATA.parent / "configs" / "hermes_tools.jinja").read_text(encoding="utf-8")
    rec = {"tools": [{"type": "function", "function": {"name": "ping"}}],
           "messages": [{"role": "user", "content": "Ping?"},
                        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "ping", "arguments": {}}}]},
                        {"role": "tool", "content": "pong"}, {"role": "assistant", "content": "Pong."}]}
    sample = normalise(rec, "messages", "f:1")
    assert sample.tools == [{"type": "function", "function": {
        "name": "ping", "description": "", "parameters": {"type": "object", "properties": {}}}}]
    tok = tokenizer("hermes")
    tok.chat_template = hermes
    shown = render_for_display(render(sample, tok, hermes), tok)
    assert "ping" in shown.split("[[")[0] and '"name": "ping"' in shown
